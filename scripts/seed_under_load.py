#!/usr/bin/env python3
"""Does a seeded request get the same text on a busy server as on an idle one?

Sends a seeded, sampled completion (a prompt of about 100 tokens, n=2) to a running
`flora serve` alone, then again while other requests (prompts of 60-600 tokens, sampling) run
beside it, for a few rounds, and prints whether each round's text equals the idle one
(docs/serving.md says when it must). Standard library only.

    flora serve --served-model-name base --port 8391 &
    python3 scripts/seed_under_load.py --url http://127.0.0.1:8391 --model base
"""

import argparse
import json
import sys
import threading
import urllib.request


def post(url, body):
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.load(r)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default="base", help="the request's model: the base model's served name or an adapter")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--load", type=int, default=10, help="other requests running beside the seeded one")
    args = ap.parse_args()
    subject = {
        "model": args.model,
        "prompt": "Write a short story about a lighthouse keeper who " + "finds a strange message in a bottle, " * 12,
        "max_tokens": 48,
        "temperature": 1.0,
        "top_p": 0.95,
        "seed": 7,
        "n": 2,
        "ignore_eos": True,
    }
    idle = [c["text"] for c in post(args.url, subject)["choices"]]
    failures = 0
    for rnd in range(args.rounds):
        def load(i):
            body = {"model": args.model, "prompt": ("Explain topic %d in detail. " % i) * (10 + 9 * i), "max_tokens": 64, "temperature": 0.8, "seed": 100 + i, "ignore_eos": True}
            post(args.url, body)

        others = [threading.Thread(target=load, args=(i,)) for i in range(args.load)]
        for t in others:
            t.start()
        busy = [c["text"] for c in post(args.url, subject)["choices"]]
        for t in others:
            t.join()
        same = busy == idle
        failures += not same
        print(f"round {rnd}: {'same text as idle' if same else 'DIFFERENT from idle'}", flush=True)
        if not same:
            print("  idle:", idle)
            print("  busy:", busy)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
