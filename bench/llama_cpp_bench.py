#!/usr/bin/env python3
"""Side-by-side reference numbers from llama.cpp (llama-cpp-python) on the same GGUF file.

Run outside CI (it needs the llama-cpp-python package, which compiles llama.cpp):
    python3 bench/llama_cpp_bench.py [--model PATH] [--threads 2] [--prompt-len 128] [--decode 64]
Prints prompt-eval tokens/s and batch-1 decode tokens/s (medians of --repeats runs) as JSON.
"""
import argparse
import json
import os
import statistics
import time
from pathlib import Path


def default_model() -> Path:
    cache = Path(os.environ.get("FLORA_CACHE_DIR", Path.home() / ".cache" / "flora"))
    return cache / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path(os.environ.get("FLORA_MODEL", default_model())))
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import llama_cpp  # imported late so --help works without the package
    from llama_cpp import Llama

    llm = Llama(model_path=str(args.model), n_ctx=2048, n_threads=args.threads, n_batch=512, verbose=False, logits_all=False)
    vocab = llm.n_vocab()
    prompt = [(t * 104729 + 17) % (vocab - 100) + 50 for t in range(args.prompt_len)]
    prefill, decode = [], []
    for _ in range(args.repeats):
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt)
        prefill.append(args.prompt_len / (time.perf_counter() - t))
        tok = prompt[-1]
        t = time.perf_counter()
        for _ in range(args.decode):
            llm.eval([tok])
            tok = (tok * 31 + 7) % (vocab - 100) + 50
        decode.append(args.decode / (time.perf_counter() - t))
    print(json.dumps({
        "engine": "llama.cpp via llama-cpp-python",
        "version": llama_cpp.__version__,
        "system_info": llama_cpp.llama_print_system_info().decode().strip(),
        "model": str(args.model),
        "threads": args.threads,
        "prompt_len": args.prompt_len,
        "prefill_tok_s_median": round(statistics.median(prefill), 1),
        "decode_batch1_tok_s_median": round(statistics.median(decode), 1),
        "runs": {"prefill": [round(x, 1) for x in prefill], "decode": [round(x, 1) for x in decode]},
    }, indent=1))


if __name__ == "__main__":
    main()
