"""`qlora-native generate`: load a model (HF dir or GGUF), stream generated text, report tokens/s."""
from __future__ import annotations

import argparse
import sys
import time


def add_parser(sub) -> None:
    from .cli_common import MODEL_HELP, HelpFormatter

    p = sub.add_parser(
        "generate", help="generate text from a prompt, or chat (one-shot or interactive)",
        formatter_class=HelpFormatter,
        description="--prompt TEXT: raw text completion. --chat --prompt TEXT: one reply through the model's chat "
                    "template (with --system). --chat alone: interactive chat, one user turn per input line.")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--prompt", default=None,
                   help="the prompt: raw text, or with --chat the user message of a one-shot chat")
    p.add_argument("--chat", action="store_true",
                   help="use the model's chat template; interactive unless --prompt is given")
    p.add_argument("--system", default=None, help="system message (with --chat)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="stop after this many new tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling probability mass")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="penalty for repeated tokens (1: none)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--quantize", choices=["nf4", "none"], default="nf4", help="base weights in NF4 or fp32")
    p.add_argument("--adapter", action="append", default=None, metavar="[NAME=]DIR",
                   help="PEFT LoRA adapter directory (or .gguf LoRA) to apply; repeat to apply several at once")
    p.add_argument("--adapter-scale", action="append", type=float, default=None, metavar="S",
                   help="scale of each --adapter, in order (like llama.cpp's --lora-scaled; default 1 each)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
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


def _check_args(args) -> None:
    from .cli_common import UsageError

    if args.prompt is None and not args.chat:
        raise UsageError("give --prompt TEXT (raw text), --chat --prompt TEXT (one chat reply) or --chat (interactive)")
    if args.system is not None and not args.chat:
        raise UsageError("--system needs --chat: the system message goes through the chat template")
    if args.adapter_scale is not None and len(args.adapter_scale) != len(args.adapter or []):
        raise UsageError(f"--adapter-scale given {len(args.adapter_scale)} time(s) for {len(args.adapter or [])} "
                         "--adapter(s): give one scale per adapter, in the same order")


def _adapter_specs(args) -> list[tuple[str, str, float]]:
    """(name, directory, scale) of each --adapter [NAME=]DIR (a directory may itself contain '=')."""
    import os
    import re

    from .cli_common import UsageError

    specs = []
    scales = args.adapter_scale or [1.0] * len(args.adapter or [])
    for i, (spec, scale) in enumerate(zip(args.adapter or [], scales)):
        name, sep, d = spec.partition("=")
        if not sep or os.path.exists(spec) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            name, d = f"adapter{i}", spec
        if any(name == n for n, _, _ in specs):
            raise UsageError(f"--adapter: the name {name!r} is given twice")
        specs.append((name, d, scale))
    return specs


def _apply_adapters(model, specs) -> None:
    """Load the adapters; one at scale 1 is used as it is. Several (or a scale != 1) are combined into
    one adapter holding exactly sum(scale_i * delta_i) (PEFT's add_weighted_adapter, "cat"), which is what
    applying each adapter with its scale computes."""
    for name, d, _ in specs:
        model.load_adapter(d, name)
    if not specs:
        return
    if len(specs) == 1 and specs[0][2] == 1.0:
        model.set_active_adapter(specs[0][0])
        return
    model.add_weighted_adapter([n for n, _, _ in specs], [s for _, _, s in specs], "__combined__",
                               combination_type="cat")
    model.set_active_adapter("__combined__")


def _adapter_prompt_note(args, adapter_dir) -> None:
    """When the adapter directory records a prompt format (the demo's does) other than this command's,
    say on stderr which options reproduce it: an adapter prompted unlike its training answers badly."""
    from .cli_common import prompt_flags, read_prompt_info

    info = read_prompt_info(adapter_dir)
    if not info:
        return
    chat, system = bool(info.get("chat_template")), info.get("system")
    if chat == bool(args.chat) and (not chat or system == args.system):
        return
    want = prompt_flags(chat, system) or "no --chat (raw text prompts)"
    print(f"[note: adapter {adapter_dir} was trained on prompts formatted as {want}; this command differs, "
          f"so expect other answers than in training]", file=sys.stderr)


def _chat_ids(tokenizer, messages) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer.encode(text, add_special_tokens=False))  # the template writes any BOS itself


def run(args: argparse.Namespace) -> int:
    from . import Model, Tokenizer, set_num_threads
    from .cli_common import resolve_model

    _check_args(args)
    path = resolve_model(args.model)
    if args.threads is not None:  # 0 or too many: set_num_threads says so
        set_num_threads(args.threads)
    t0 = time.perf_counter()
    tokenizer = Tokenizer.from_pretrained(path)
    if args.chat and tokenizer.chat_template is None:  # said before the weights load
        raise ValueError(f"--chat: {path} has no chat template (tokenizer_config.json / GGUF metadata); "
                         "use --prompt without --chat")
    specs = _adapter_specs(args)
    model = Model.from_pretrained(path, quantize=None if args.quantize == "none" else "nf4", tokenizer=tokenizer)
    _apply_adapters(model, specs)
    print(f"[loaded {path} in {time.perf_counter() - t0:.1f}s]", file=sys.stderr)
    for _, d, _ in specs:
        _adapter_prompt_note(args, d)
    messages = [] if args.system is None else [{"role": "system", "content": args.system}]
    if args.prompt is not None:  # one shot: raw text, or one chat turn
        if args.chat:
            ids = _chat_ids(tokenizer, messages + [{"role": "user", "content": args.prompt}])
        else:
            ids = tokenizer.encode(args.prompt)
        out, dt = _generate(model, tokenizer, ids, args)
        _report(len(ids), len(out), dt)
        return 0
    interactive = sys.stdin.isatty()
    while True:
        try:
            # the "> " prompt only for a person at a terminal: piped input gets replies and nothing else
            user = input("> " if interactive else "")
        except EOFError:
            if interactive:
                print()  # end the line the prompt is on
            return 0
        if not user.strip():
            continue
        messages.append({"role": "user", "content": user})
        ids = _chat_ids(tokenizer, messages)
        out, dt = _generate(model, tokenizer, ids, args)
        _report(len(ids), len(out), dt)
        messages.append({"role": "assistant", "content": tokenizer.decode(out, skip_special_tokens=True)})


def _report(n_prompt: int, n_new: int, seconds: float) -> None:
    rate = n_new / seconds if seconds > 0 else float("inf")
    print(f"[{n_prompt} prompt tokens, {n_new} new tokens in {seconds:.2f}s: {rate:.1f} tokens/s]", file=sys.stderr)
