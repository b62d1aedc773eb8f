"""`qlora-native generate`: load a model (HF dir or GGUF), stream generated text, report tokens/s."""
from __future__ import annotations

import argparse
import sys
import time


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt or an interactive chat")
    p.add_argument("--model", required=True, help="HF model directory or .gguf file")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (raw, no chat template)")
    src.add_argument("--chat", action="store_true", help="interactive chat using the model's chat template")
    p.add_argument("--system", default=None, help="system message for --chat")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--quantize", choices=["nf4", "none"], default="nf4")
    p.add_argument("--adapter", default=None, help="PEFT LoRA adapter directory to apply")
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=run)


class _Streamer:
    """Prints text as tokens arrive, holding back an incomplete UTF-8 sequence at the end."""

    def __init__(self, tokenizer, out=None):
        self.tok, self.out = tokenizer, out or sys.stdout  # looked up per call: tests swap sys.stdout
        self.ids: list[int] = []
        self.printed = 0

    def __call__(self, row: int, token: int) -> None:
        self.ids.append(token)
        self._emit(final=False)

    def finish(self) -> None:
        self._emit(final=True)  # whatever is left, even an incomplete byte sequence

    def _emit(self, final: bool) -> None:
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd") and not final:
            return
        self.out.write(text[self.printed:])
        self.out.flush()
        self.printed = len(text)


def _generate(model, tokenizer, ids, args) -> tuple[list[int], float]:
    streamer = _Streamer(tokenizer)
    t0 = time.perf_counter()
    out = model.generate([ids], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                         seed=args.seed, eos_token_id=sorted(tokenizer.eos_token_ids) or None, stream=streamer)[0]
    dt = time.perf_counter() - t0
    streamer.finish()
    print()
    return out, dt


def run(args: argparse.Namespace) -> int:
    from . import Model, Tokenizer, set_num_threads

    if args.threads:
        set_num_threads(args.threads)
    t0 = time.perf_counter()
    tokenizer = Tokenizer.from_pretrained(args.model)
    model = Model.from_pretrained(args.model, quantize=None if args.quantize == "none" else "nf4", tokenizer=tokenizer)
    if args.adapter:
        model.load_adapter(args.adapter, "default")
    print(f"[loaded {args.model} in {time.perf_counter() - t0:.1f}s]", file=sys.stderr)
    if args.prompt is not None:
        ids = tokenizer.encode(args.prompt)
        out, dt = _generate(model, tokenizer, ids, args)
        _report(len(ids), len(out), dt)
        return 0
    messages = [] if args.system is None else [{"role": "system", "content": args.system}]
    while True:
        try:
            user = input("> ")
        except EOFError:
            print()
            return 0
        if not user.strip():
            continue
        messages.append({"role": "user", "content": user})
        ids = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True),
                               add_special_tokens=False)
        out, dt = _generate(model, tokenizer, ids, args)
        _report(len(ids), len(out), dt)
        messages.append({"role": "assistant", "content": tokenizer.decode(out, skip_special_tokens=True)})


def _report(n_prompt: int, n_new: int, seconds: float) -> None:
    rate = n_new / seconds if seconds > 0 else float("inf")
    print(f"[{n_prompt} prompt tokens, {n_new} new tokens in {seconds:.2f}s: {rate:.1f} tokens/s]", file=sys.stderr)
