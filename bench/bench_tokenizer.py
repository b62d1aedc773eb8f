"""Tokenizer speed: our C++ tokenizer (qlora_native._core.Tokenizer, cpp/src/tokenizer) vs the
`tokenizers` library on the same vocabulary and text, in tokens per second.

    PYTHONPATH=python:build/dev python bench/bench_tokenizer.py [--mib 2] [--runs 3]

Vocabularies: the SmolLM2-135M GGUF (byte-level BPE, pre-tokenizer "smollm"; `tokenizers` side:
the Python face's rebuild of it), a Llama-3-style tokenizer.json and a GGUF `llama` (SPM)
vocabulary trained at run time (tests/helpers_tokenizer.py). Text: the Declaration of Independence
(bench/_common.TEXT) plus generated multilingual lines (words, numbers, code, emoji, scripts),
about --mib MiB. Modes:
  doc    one long string, encode()                  (both single-threaded)
  lines  a list of ~100-byte lines, one encode() call per line from Python (both single-threaded)
  batch  the same lines in one encode_batch() call  (ours: one thread; tokenizers: its thread pool)
Each number is the best of --runs after a warm-up run (both libraries cache words). The ids are
checked equal first. The machine is shared: expect noise of 10-20 %.
"""
import argparse
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from _common import RESULTS, TEXT, default_gguf, machine_info, machine_line, write_json  # noqa: E402


def best(fn, runs):
    fn()  # warm-up (word caches)
    t = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        t.append(time.perf_counter() - t0)
    return min(t)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=float, default=2.0, help="text size in MiB (default 2)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(RESULTS, "tokenizer.json"))
    args = ap.parse_args()

    from helpers_tokenizer import build_hf_tokenizer_dir, generate_lines, sample_texts, train_sentencepiece, write_llama_gguf
    import numpy as np

    from qlora_native import Tokenizer, _core

    lines = [ln for ln in TEXT.splitlines() if ln.strip()] + generate_lines(4000, seed=11) + \
        sample_texts(np.random.default_rng(1), n=200)
    target = int(args.mib * (1 << 20))
    text_lines, size, k = [], 0, 0
    while size < target:
        ln = lines[k % len(lines)]
        text_lines.append(ln)
        size += len(ln.encode()) + 1
        k += 1
    doc = "\n".join(text_lines)

    tmp = tempfile.mkdtemp(prefix="bench_tok_")
    sources = {"SmolLM2 GGUF (smollm BPE)": default_gguf(),
               "Llama-3-style tokenizer.json": str(build_hf_tokenizer_dir(os.path.join(tmp, "l3"), "llama3", 8000)),
               "GGUF llama (SPM)": str(write_llama_gguf(train_sentencepiece(tmp, 4000), os.path.join(tmp, "spm.gguf")))}
    info = machine_info()
    mline = machine_line(info)
    print(f"machine: {mline}")
    print(f"load average at start: {info.get('loadavg')} (shared machine: numbers are noisy)")
    print(f"text: {len(doc.encode()) / (1 << 20):.2f} MiB, {len(text_lines)} lines\n")
    rows = []
    print(f"{'vocabulary':32s} {'mode':6s} {'tokens':>9s} {'ours tok/s':>12s} {'tokenizers':>12s} {'ratio':>6s}")
    for name, src in sources.items():
        ours = _core.Tokenizer(src)
        tk = Tokenizer.from_pretrained(src)._b.tk  # the `tokenizers` object the Python face uses
        ref_ids = tk.encode(doc, add_special_tokens=False).ids
        assert ours.encode(doc, add_special=False) == ref_ids, f"{name}: ids differ"
        assert ours.encode_batch(text_lines[:2000]) == [e.ids for e in tk.encode_batch(text_lines[:2000])]
        n_doc = len(ref_ids)
        n_lines = sum(len(e.ids) for e in tk.encode_batch(text_lines, add_special_tokens=False))
        modes = {
            "doc": (n_doc, lambda: ours.encode(doc, add_special=False), lambda: tk.encode(doc, add_special_tokens=False)),
            "lines": (n_lines, lambda: [ours.encode(s, add_special=False) for s in text_lines],
                      lambda: [tk.encode(s, add_special_tokens=False) for s in text_lines]),
            "batch": (n_lines, lambda: ours.encode_batch(text_lines, add_special=False),
                      lambda: tk.encode_batch(text_lines, add_special_tokens=False)),
        }
        for mode, (n, f_ours, f_ref) in modes.items():
            t_ours, t_ref = best(f_ours, args.runs), best(f_ref, args.runs)
            r = {"vocabulary": name, "mode": mode, "tokens": n, "ours_tok_s": n / t_ours, "tokenizers_tok_s": n / t_ref,
                 "ratio": t_ref / t_ours}
            rows.append(r)
            print(f"{name:32s} {mode:6s} {n:9d} {r['ours_tok_s']:12.3g} {r['tokenizers_tok_s']:12.3g} {r['ratio']:6.2f}")
    import tokenizers

    write_json(args.out, {"machine": info, "machine_line": mline, "tokenizers_version": tokenizers.__version__,
                          "text_bytes": len(doc.encode()), "rows": rows})
    print(f"\nratio = ours / tokenizers tokens per second (> 1: ours faster); written {args.out}")


if __name__ == "__main__":
    main()
