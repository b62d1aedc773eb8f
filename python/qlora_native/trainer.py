"""LoRA training loop around a qlora_native.Model: schedules, accumulation, clipping, eval, checkpoints.

    args = TrainingArguments(output_dir="out", learning_rate=2e-4, max_steps=200, save_steps=50)
    trainer = Trainer(model, LoraConfig(r=16, target_modules="all-linear"), "train.jsonl", 0.05, args)
    trainer.train()                                # or train(resume_from_checkpoint=True | "out/checkpoint-50")

Gradient accumulation convention: one optimizer step minimizes the mean loss over ALL counted
tokens (labels != -100 after the causal shift) of its gradient_accumulation_steps micro-batches,
i.e. exactly what one big batch gives: micro-batch i is back-propagated with
grad_scale = n_i / N (n_i its counted tokens, N the step's total). transformers' Trainer instead
averages per-micro-batch means (each micro-batch weighs 1/G whatever its token count); the two
agree when every micro-batch counts the same number of tokens. The reported step loss is the
same token-weighted mean.

output_dir holds trainer_log.jsonl (one JSON object per logging/eval event), the final adapter
(PEFT format: adapter_config.json + adapter_model.safetensors) and checkpoint-N/ directories:
adapter (PEFT), optimizer.safetensors + optimizer.json (model.get_optimizer_state()),
trainer_state.json (step, data position, RNG states). Every save goes through atomic_io: a
checkpoint-N directory is written beside it and swapped in as a unit (re-saving the same step
included), the final adapter is committed into output_dir as a set of files, so a failure or a
kill -9 at any point leaves each of them complete (old or new), never partial or missing; resume
and the next save finish or roll back what a killed save left.

Data parallel (distributed.py): under `mpiexec -n N` (or distributed=True) every rank builds the same
global batches of per_device_train_batch_size x N rows and trains on its own slice of rows; the
engine sums tokens, losses and the LoRA gradients over the ranks, so the run is the one-process run
with batch N x per_device_train_batch_size. Rank 0 logs, evaluates and writes checkpoints and the
final adapter; a checkpoint resumes under any N with the same global batch. A rank that fails ends
every rank (MPI_Abort) after printing its error.
"""
from __future__ import annotations

import inspect
import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from . import atomic_io, checkpoint_state
from . import io as _io
from ._core import FormatError
from ._core import train as _train
from .data import IGNORE_INDEX, Batcher, Example, default_pad_id, load_dataset, split_eval
from .lora_config import LoraConfig

__all__ = ["TrainingArguments", "Trainer", "TrainingError", "LOG_NAME", "STATE_NAME"]

LOG_NAME = "trainer_log.jsonl"
STATE_NAME = "trainer_state.json"
_OPT_TENSORS, _OPT_JSON = "optimizer.safetensors", "optimizer.json"
LR_SCHEDULES = ("constant", "linear", "cosine", "constant_with_warmup")  # the engine's (train/lr_schedule.cpp)
_CKPT_RE = re.compile(r"checkpoint-(\d+)")


class TrainingError(RuntimeError):
    """Training cannot continue (non-finite loss or gradient); the message names the step."""


@dataclass
class TrainingArguments:
    """transformers.TrainingArguments names for the subset the engine supports.

    max_steps > 0 overrides num_train_epochs (which may be fractional). warmup_steps > 0
    overrides warmup_ratio. eval_steps / save_steps / logging_steps count optimizer steps
    (None or 0: never; eval also runs once at the end when there is eval data). max_grad_norm
    None or 0 disables clipping (the norm is still computed and checked for NaN/inf).
    time_budget (seconds) ends training early after the step that exceeds it (the schedule
    still follows the planned total)."""

    output_dir: str
    learning_rate: float = 2e-4
    num_train_epochs: float = 1.0
    max_steps: int = -1
    per_device_train_batch_size: int = 4
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    warmup_ratio: float = 0.0
    warmup_steps: int = 0
    lr_scheduler_type: str = "linear"
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: Optional[float] = 1.0
    logging_steps: int = 10
    eval_steps: Optional[int] = None
    save_steps: Optional[int] = None
    seed: int = 42
    max_seq_len: int = 512
    packing: bool = False
    group_by_length: bool = False
    disable_tqdm: bool = False
    time_budget: Optional[float] = None
    # True / False set model.compute_dtype to "bfloat16" / "float32" when the Trainer is created
    # (transformers' name); None leaves the model's setting.
    bf16: Optional[bool] = None
    # Data-parallel training over MPI (distributed.py): None = on when launched by mpiexec with more than
    # one rank, True = required (mpi4py missing: ImportError naming the extra), False = off.
    distributed: Optional[bool] = None
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        def pos_int(name, allow_none=False, allow_zero=False):
            v = getattr(self, name)
            if allow_none and v is None:
                return
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < (0 if allow_zero else 1):
                raise ValueError(f"TrainingArguments.{name} must be a {'non-negative' if allow_zero else 'positive'} "
                                 f"int, got {v!r}")

        if not self.output_dir:
            raise ValueError("TrainingArguments.output_dir is required")
        for n in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                  "max_seq_len"):
            pos_int(n)
        for n in ("logging_steps", "eval_steps", "save_steps"):
            pos_int(n, allow_none=True, allow_zero=True)
        pos_int("warmup_steps", allow_zero=True)
        if isinstance(self.max_steps, bool) or not isinstance(self.max_steps, (int, np.integer)):
            raise ValueError(f"TrainingArguments.max_steps must be an int, got {self.max_steps!r}")
        if self.max_steps <= 0 and not (isinstance(self.num_train_epochs, (int, float)) and self.num_train_epochs > 0):
            raise ValueError(f"TrainingArguments: num_train_epochs must be > 0 when max_steps <= 0, "
                             f"got {self.num_train_epochs!r}")
        if self.lr_scheduler_type not in LR_SCHEDULES:
            raise ValueError(f"TrainingArguments.lr_scheduler_type must be one of {LR_SCHEDULES}, "
                             f"got {self.lr_scheduler_type!r}")
        for n in ("learning_rate", "weight_decay", "adam_epsilon"):
            v = getattr(self, n)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"TrainingArguments.{n} must be a finite number >= 0, got {v!r}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"TrainingArguments.warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if self.max_grad_norm is not None and not (self.max_grad_norm >= 0 and math.isfinite(self.max_grad_norm)):
            raise ValueError(f"TrainingArguments.max_grad_norm must be >= 0 or None, got {self.max_grad_norm!r}")
        if self.bf16 is not None and not isinstance(self.bf16, bool):
            raise ValueError(f"TrainingArguments.bf16 must be True, False or None, got {self.bf16!r}")
        if self.distributed is not None and not isinstance(self.distributed, bool):
            raise ValueError(f"TrainingArguments.distributed must be True, False or None, got {self.distributed!r}")
        if self.time_budget is not None and not self.time_budget > 0:
            raise ValueError(f"TrainingArguments.time_budget must be > 0 seconds, got {self.time_budget!r}")


def _all_ranks(exc: Exception) -> Exception:
    """Marks an error every data-parallel rank raises alike (from global values): no abort needed."""
    exc._qlora_all_ranks = True
    return exc


def _counted(labels: np.ndarray) -> int:
    """Tokens that carry loss: labels shift in the loss, so labels[:, 0] never counts."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def _accepts(fn, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


class Trainer:
    """Trains one LoRA adapter of `model` (see the module docstring for conventions).

    adapter: the name of an adapter already added to the model, or a LoraConfig (added as
    "default" with seed=args.seed). train_data / eval_data: a list of data.Example, or a JSONL
    path (tokenized with `tokenizer` or model.tokenizer, truncated to args.max_seq_len);
    eval_data may also be a fraction in (0, 1) held out of train_data (data.split_eval), or None.
    """

    def __init__(self, model, adapter, train_data, eval_data=None, args: Optional[TrainingArguments] = None, *,
                 tokenizer=None, pad_token_id: Optional[int] = None):
        if args is None:
            raise ValueError("Trainer: args (TrainingArguments with an output_dir) is required")
        args.validate()
        self.model, self.args = model, args
        self.comm = None
        if args.distributed is not False:
            from . import distributed

            if distributed.wanted(args.distributed):
                if args.packing:
                    raise ValueError("TrainingArguments: packing=True is not supported with distributed training")
                if not hasattr(model, "train_step"):
                    raise ValueError("distributed training needs a qlora_native.Model (Model.train_step)")
                self.comm = distributed.init(True)
        self.rank, self.world_size = (self.comm.rank, self.comm.size) if self.comm else (0, 1)
        self.tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        if not isinstance(adapter, LoraConfig) and (not isinstance(adapter, str) or not adapter):
            raise ValueError(f"Trainer: adapter must be an adapter name or a LoraConfig, got {adapter!r}")
        train = self._examples(train_data, "train_data")
        if isinstance(eval_data, float):
            train, eval_ex = split_eval(train, eval_fraction=eval_data, seed=args.seed)
        else:
            eval_ex = None if eval_data is None else self._examples(eval_data, "eval_data")
        self.train_examples, self.eval_examples = train, eval_ex
        if pad_token_id is None:
            pad_token_id = default_pad_id(self.tokenizer) if self.tokenizer is not None else 0
        self.pad_token_id = int(pad_token_id)
        # data parallel: every rank builds the same global batches and trains on its slice of rows
        self.global_batch_size = args.per_device_train_batch_size * self.world_size
        self.batcher = Batcher(train, self.global_batch_size, self.pad_token_id,
                               max_seq_len=args.max_seq_len, packing=args.packing, seed=args.seed,
                               group_by_length=args.group_by_length)
        self._check_context(train + (eval_ex or []))
        fb = model.forward_backward
        self._fb_scale = "grad_scale" if _accepts(fb, "grad_scale") else None
        if self._fb_scale is None and args.gradient_accumulation_steps > 1:
            raise ValueError("gradient_accumulation_steps > 1 needs model.forward_backward(..., grad_scale=) "
                             "to weigh micro-batches by their token counts")
        if args.packing and not (_accepts(fb, "segment_ids") and _accepts(fb, "position_ids")):
            raise ValueError("packing=True needs model.forward_backward to accept position_ids and segment_ids")
        if args.bf16 is not None:
            if not hasattr(model, "compute_dtype"):
                raise ValueError("TrainingArguments.bf16 needs a model with a compute_dtype setting")
            model.compute_dtype = "bfloat16" if args.bf16 else "float32"
        # the adapter is added only once the data and arguments are known to be good
        if isinstance(adapter, LoraConfig):
            adapter.validate()
            model.add_adapter("default", adapter, seed=args.seed)
            adapter = "default"
        self.adapter = adapter
        if hasattr(model, "set_active_adapter"):
            model.set_active_adapter(adapter)
        self.steps_per_epoch = self._steps_in_epoch(0)
        if args.max_steps > 0:
            self.total_steps = int(args.max_steps)
        else:
            self.total_steps = max(1, int(math.ceil(args.num_train_epochs * self.steps_per_epoch)))
        self.warmup = args.warmup_steps if args.warmup_steps > 0 else float(args.warmup_ratio)
        self.global_step = 0
        self.epoch, self.batch_in_epoch = 0, 0  # data position of the next step
        self.log_history: list[dict] = []

    def _check_context(self, examples) -> None:
        """Refuse up front (not at step N) rows longer than the model's context length: the model
        would refuse them mid-run unless model.allow_long_context is set."""
        max_pos = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        if not isinstance(max_pos, int) or getattr(self.model, "allow_long_context", False) or not examples:
            return
        longest = self.args.max_seq_len if self.args.packing else max(len(e) for e in examples)
        if longest > max_pos:
            raise ValueError(f"Trainer: rows of up to {longest} tokens exceed the model's max_position_embeddings="
                             f"{max_pos}; lower max_seq_len, or set model.allow_long_context = True")

    # ------------------------------------------------------------ data
    def _examples(self, data, what) -> list:
        if isinstance(data, (str, os.PathLike)):
            if self.tokenizer is None:
                raise ValueError(f"Trainer: {what} is a path but there is no tokenizer (pass tokenizer=)")
            return load_dataset(data, self.tokenizer, self.args.max_seq_len)
        if not isinstance(data, (list, tuple)):
            raise ValueError(f"Trainer: {what} must be a JSONL path or a list of data.Example, got {type(data).__name__}")
        if not data:
            raise ValueError(f"Trainer: {what} is empty")
        for i, e in enumerate(data):
            if not isinstance(e, Example):
                raise ValueError(f"Trainer: {what}[{i}] is a {type(e).__name__}, expected data.Example")
            if len(e) > self.args.max_seq_len:
                raise ValueError(f"Trainer: {what}[{i}] (line {e.line}) has {len(e)} tokens > max_seq_len="
                                 f"{self.args.max_seq_len} (truncate it, or load with data.load_dataset)")
        return list(data)

    def _steps_in_epoch(self, epoch: int) -> int:
        return int(math.ceil(self.batcher.num_batches(epoch) / self.args.gradient_accumulation_steps))

    def _steps(self):
        """(epoch, first batch index, [micro-batches]) per optimizer step from the saved position on.
        A step never spans epochs: the last one of an epoch takes the remaining micro-batches."""
        G = self.args.gradient_accumulation_steps
        e, b = self.epoch, self.batch_in_epoch
        while True:
            batches = list(self.batcher.epoch(e))
            while b < len(batches):
                yield e, b, batches[b:b + G]
                b += G
            e, b = e + 1, 0

    # ------------------------------------------------------------ model calls
    def _step(self, micro, counts, lr, step, epoch, b0) -> tuple[float, float]:
        """One optimizer step over `micro`: (mean loss, pre-clip gradient norm). qlora_native.Model runs
        the engine's step (Model.train_step: the C API's rule, one implementation); other models are
        driven through zero_grad / forward_backward(grad_scale=) / clip_grad_norm / optimizer_step in
        the same order."""
        a = self.args
        if self.comm is not None:
            from .distributed import shard

            mbs, rows0 = [], []
            for m in micro:  # this rank's rows of each global micro-batch (maybe none)
                lo, hi = shard(len(m["input_ids"]), self.rank, self.world_size)
                mbs.append((m["input_ids"][lo:hi], m["labels"][lo:hi], m["attention_mask"][lo:hi]) if hi > lo else None)
                rows0.append(lo)
            r = self.model.train_step(mbs, lr=lr, max_grad_norm=a.max_grad_norm, comm=self.comm, row_offsets=rows0)
            if r["bad_micro"] >= 0:  # the global loss: every rank stops here alike
                i = int(r["bad_micro"])
                raise _all_ranks(TrainingError(f"step {step}: non-finite loss ({r['bad_loss']}) on micro-batch {i} "
                                               f"(epoch {epoch}, batch {b0 + i})"))
            step_loss, norm = float(r["loss"]), float(r["grad_norm"])
            if not math.isfinite(norm):
                raise _all_ranks(TrainingError(f"step {step}: non-finite gradient norm ({norm}) (epoch {epoch}, "
                                               f"batch {b0})"))
        elif hasattr(self.model, "train_step") and not a.packing:
            r = self.model.train_step([(m["input_ids"], m["labels"], m["attention_mask"]) for m in micro], lr=lr,
                                      max_grad_norm=a.max_grad_norm)
            if r["bad_micro"] >= 0:
                i = int(r["bad_micro"])
                raise TrainingError(f"step {step}: non-finite loss ({r['bad_loss']}) on micro-batch {i} "
                                    f"(epoch {epoch}, batch {b0 + i})")
            step_loss, norm = float(r["loss"]), float(r["grad_norm"])
        else:
            N = sum(counts)
            self.model.zero_grad()
            step_loss = 0.0
            for i, (m, n) in enumerate(zip(micro, counts)):
                if n == 0:
                    continue
                loss = self._fb(m, n / N)
                if not math.isfinite(loss):
                    raise TrainingError(f"step {step}: non-finite loss ({loss}) on micro-batch {i} "
                                        f"(epoch {epoch}, batch {b0 + i})")
                step_loss += loss * n / N
            norm = float(self.model.clip_grad_norm(float(a.max_grad_norm) if a.max_grad_norm else math.inf))
            if math.isfinite(norm):
                self.model.optimizer_step(lr=lr)
        if not math.isfinite(norm):  # the step was not taken
            raise TrainingError(f"step {step}: non-finite gradient norm ({norm}) (epoch {epoch}, batch {b0})")
        return step_loss, norm

    def _fb(self, batch, scale):
        kw = {"attention_mask": batch["attention_mask"]}
        if self._fb_scale is not None:
            kw[self._fb_scale] = scale
        if self.args.packing:
            kw["position_ids"], kw["segment_ids"] = batch["position_ids"], batch["segment_ids"]
        return float(self.model.forward_backward(batch["input_ids"], batch["labels"], **kw))

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step `step` (0-based: steps already taken)."""
        a = self.args
        return float(_train.lr_at(a.lr_scheduler_type, int(step), float(a.learning_rate), self.warmup,
                                  self.total_steps))

    def _configure_optimizer(self):
        a = self.args
        self.model.configure_optimizer(lr=float(a.learning_rate), weight_decay=float(a.weight_decay),
                                       betas=(float(a.adam_beta1), float(a.adam_beta2)), eps=float(a.adam_epsilon))

    def evaluate(self) -> dict:
        """Mean loss over every counted token of eval_data (no gradients)."""
        if not self.eval_examples:
            raise ValueError("Trainer.evaluate: no eval data")
        b = Batcher(self.eval_examples, self.args.per_device_eval_batch_size, self.pad_token_id,
                    max_seq_len=self.args.max_seq_len, shuffle=False)
        total, count = 0.0, 0
        for batch in b.epoch(0):
            s, n = self.model.eval_loss(batch["input_ids"], batch["labels"], attention_mask=batch["attention_mask"])
            total, count = total + float(s), count + int(n)
        if count == 0:
            raise ValueError("Trainer.evaluate: eval data has no counted tokens")
        loss = total / count
        if not math.isfinite(loss):
            raise TrainingError(f"step {self.global_step}: non-finite eval loss ({loss})")
        return {"eval_loss": loss, "eval_tokens": count}

    # ------------------------------------------------------------ training
    def train(self, resume_from_checkpoint=None) -> dict:
        """Runs to args.max_steps / num_train_epochs (or args.time_budget); returns the summary
        {"global_step", "train_loss" and "train_tokens" (mean loss and counted tokens over
        all steps, resumed ones included), "input_tokens" (non-padding, this session), "train_seconds", "eval_loss"?, "stopped_early"?}.
        Data parallel: every rank returns rank 0's summary once the final adapter is written; an error on
        one rank ends all of them (MPI_Abort, exit status 1) unless every rank raised it alike."""
        if self.comm is None:
            return self._train(resume_from_checkpoint)
        from . import distributed

        try:
            return self._train(resume_from_checkpoint)
        except BaseException as exc:  # noqa: BLE001 - the other ranks would wait for this one forever
            if distributed.raised_on_all(exc):
                raise  # the same decision on every rank (a global loss / norm, a bad resume argument)
            distributed.abort(self.comm, exc)
            raise

    def _train(self, resume_from_checkpoint=None) -> dict:
        a = self.args
        out = Path(a.output_dir)
        lead = self.rank == 0  # rank 0 writes the log, checkpoints and the adapter
        if lead:
            out.mkdir(parents=True, exist_ok=True)
            atomic_io.cleanup(out)  # leftovers of a killed save: finished, rolled back or removed
        self._configure_optimizer()
        if resume_from_checkpoint:
            self._load_checkpoint(resume_from_checkpoint)
        else:
            self.global_step, self.epoch, self.batch_in_epoch, self.log_history = 0, 0, 0, []
            self._tokens, self._run = 0, (0.0, 0)
            if lead:
                _write_lines_atomic(out / LOG_NAME, [])
        if self.comm is not None:
            self._check_ranks_agree()
        bar = None
        if not a.disable_tqdm and lead:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total_steps, initial=self.global_step, desc="train", unit="step", dynamic_ncols=True)
        t_start = time.perf_counter()
        sess_tok = 0  # tokens (padding excluded) this session, for tokens/s
        win_loss, win_tok, win_t0 = 0.0, 0, time.perf_counter()  # logging window
        run_loss, run_tok = self._run  # loss sum and counted tokens since step 0 (restored on resume)
        summary: dict = {}
        try:
            for epoch, b0, micro in self._steps():
                if self.global_step >= self.total_steps:
                    break
                step = self.global_step + 1  # 1-based name of the step being taken
                lr = self.lr_at(self.global_step)
                counts = [_counted(m["labels"]) for m in micro]
                N = sum(counts)
                if N == 0:  # the global batch: every rank sees it
                    raise _all_ranks(TrainingError(f"step {step}: no counted tokens (epoch {epoch}, batch {b0})"))
                step_loss, norm = self._step(micro, counts, lr, step, epoch, b0)
                self.global_step = step
                self.epoch, self.batch_in_epoch = epoch, b0 + len(micro)
                ntok = int(sum(int(m["attention_mask"].sum()) for m in micro))
                win_loss, win_tok = win_loss + step_loss * N, win_tok + N
                run_loss, run_tok = run_loss + step_loss * N, run_tok + N
                self._run = (run_loss, run_tok)
                self._last = {"loss": step_loss, "learning_rate": lr, "grad_norm": norm}
                self._tokens += ntok
                sess_tok += ntok
                if bar is not None:
                    dt = time.perf_counter() - t_start
                    bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{sess_tok / max(dt, 1e-9):.0f}")
                    bar.update(1)
                if lead and a.logging_steps and step % a.logging_steps == 0:
                    now = time.perf_counter()
                    self._log({"step": step, "epoch": self._epoch_float(), "loss": win_loss / win_tok,
                               "loss_tokens": win_tok,  # counted tokens of the window (every rank's)
                               "learning_rate": lr, "grad_norm": norm,
                               "tokens_per_second": sess_tok / max(now - t_start, 1e-9),
                               "window_seconds": now - win_t0})
                    win_loss, win_tok, win_t0 = 0.0, 0, now
                if lead and a.eval_steps and self.eval_examples and step % a.eval_steps == 0:
                    self._log({"step": step, "epoch": self._epoch_float(), **self.evaluate()})
                if lead and a.save_steps and step % a.save_steps == 0:
                    self.save_checkpoint()
                if a.time_budget is not None:
                    over = time.perf_counter() - t_start >= a.time_budget
                    if self.comm is not None:  # rank 0's clock decides for all, so they stop together
                        over = self.comm.bcast(over)
                    if over:
                        summary["stopped_early"] = "time_budget"
                        break
        finally:
            if bar is not None:
                bar.close()
        secs = time.perf_counter() - t_start
        summary.update({"global_step": self.global_step, "train_loss": run_loss / run_tok if run_tok else None,
                        "train_tokens": run_tok, "input_tokens": sess_tok, "train_seconds": secs})
        if lead:
            if self.eval_examples:
                summary.update(self.evaluate())
            self._log({"step": self.global_step, "epoch": self._epoch_float(), "final": True, **summary})
            self.model.save_adapter(str(out), self.adapter)
        if self.comm is not None:  # every rank returns once the adapter is written, with rank 0's summary
            summary = self.comm.bcast(summary)
        return summary

    def _check_ranks_agree(self) -> None:
        """Data parallel: every rank must start from the same adapter (bytes of A/B), data and plan, or
        the summed gradients would mix different models (or the all-reduce sizes would not match). A
        difference is a ValueError on every rank naming it."""
        import hashlib

        h = hashlib.sha256()
        for k, v in sorted(self.model.get_adapter_state_dict(self.adapter).items()):
            h.update(k.encode())
            h.update(np.ascontiguousarray(v, np.float32).tobytes())
        mine = {"adapter A/B": h.hexdigest()[:16], "train rows": len(self.train_examples),
                "global batch": self.global_batch_size, "total steps": self.total_steps,
                "seed": self.args.seed, "step": self.global_step}
        every = self.comm.allgather(mine)
        for r, other in enumerate(every):
            diff = [k for k in mine if other[k] != every[0][k]]
            if diff:
                k = diff[0]
                raise _all_ranks(ValueError(f"data-parallel ranks disagree on {k}: rank 0 has {every[0][k]!r}, rank "
                                            f"{r} has {other[k]!r} (every rank must load the same model, adapter, "
                                            f"data and arguments)"))

    def _epoch_float(self) -> float:
        spe = self._steps_in_epoch(self.epoch)
        return self.epoch + min(1.0, math.ceil(self.batch_in_epoch / self.args.gradient_accumulation_steps) / spe)

    def _log(self, rec: dict) -> None:
        self.log_history.append(rec)
        with open(Path(self.args.output_dir) / LOG_NAME, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec, sort_keys=True) + "\n")
            f.flush()

    # ------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        """Writes output_dir/checkpoint-{global_step}/ as a unit (atomic_io.save_dir: an existing one
        is replaced by a swap, never left missing)."""
        out = Path(self.args.output_dir)
        final = out / f"checkpoint-{self.global_step}"
        atomic_io.cleanup(out)
        with atomic_io.save_dir(final) as tmp:
            self.model.save_adapter(str(tmp), self.adapter)  # straight into the staging directory
            tensors, skeleton = checkpoint_state.flatten(self.model.get_optimizer_state())
            _io.save_safetensors(tmp / _OPT_TENSORS, tensors)
            atomic_io.write_text(tmp / _OPT_JSON, json.dumps(skeleton))
            state = {"global_step": self.global_step, "total_steps": self.total_steps, "epoch": self.epoch,
                     "world_size": self.world_size, "global_batch_size": self.global_batch_size,
                     "batch_in_epoch": self.batch_in_epoch, "data_seed": self.args.seed,
                     "tokens_seen": self._tokens, "adapter": self.adapter,
                     "loss_sum": self._run[0], "loss_tokens": self._run[1],
                     "rng": self._rng_state(), "log_history": self.log_history,
                     "args": {k: v for k, v in asdict(self.args).items() if k != "extra"}}
            atomic_io.write_text(tmp / STATE_NAME, json.dumps(state, indent=1))
        return final

    def _rng_state(self) -> dict:
        st = {"data_order": {"seed": self.args.seed, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}}
        if hasattr(self.model, "get_rng_state"):
            st["model"] = self.model.get_rng_state()
        return st

    def _find_checkpoint(self, spec) -> Path:
        if spec is True:
            out = Path(self.args.output_dir)
            atomic_io.recover(out)  # a checkpoint whose re-save was killed is put back first
            found = sorted(((int(m.group(1)), p) for p in out.iterdir() if p.is_dir()
                            and (m := _CKPT_RE.fullmatch(p.name))), key=lambda t: t[0]) if out.is_dir() else []
            if not found:
                raise FileNotFoundError(f"resume_from_checkpoint=True but {out} holds no checkpoint-N directory")
            return found[-1][1]
        p = Path(spec)
        atomic_io.recover(p)
        if not (p / STATE_NAME).is_file():
            raise FileNotFoundError(f"{p}: not a checkpoint directory (no {STATE_NAME})")
        return p

    def _load_checkpoint(self, spec) -> None:
        """Resume from `spec` (True: the latest checkpoint). Data parallel: rank 0 reads it and broadcasts
        the state (no shared file system needed); an error is raised on every rank."""
        if self.comm is None:
            return self._apply_checkpoint(*self._read_checkpoint(self._find_checkpoint(spec)))
        from .distributed import raise_on_all

        self._apply_checkpoint(*raise_on_all(self.comm, lambda: self._read_checkpoint(self._find_checkpoint(spec))))

    def _read_checkpoint(self, path: Path):
        from .adapter_io import load_adapter

        try:
            state = json.loads((path / STATE_NAME).read_text(encoding="utf-8"))
            skeleton = json.loads((path / _OPT_JSON).read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as exc:
            raise FormatError(f"{path}: unreadable checkpoint ({exc})") from exc
        if not isinstance(state, dict):
            raise FormatError(f"{path / STATE_NAME}: expected a JSON object, got {type(state).__name__}")
        saved = state.get("global_batch_size")
        if saved is None:  # written before data parallelism: one process
            saved = (state.get("args") or {}).get("per_device_train_batch_size")
        ws = state.get("world_size", 1)
        for k, v in (("global_batch_size", saved), ("world_size", ws)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise FormatError(f"{path / STATE_NAME}: '{k}' must be a positive int, got {v!r}")
        if saved is not None and saved != self.global_batch_size:
            raise ValueError(f"{path}: checkpoint was trained with a global batch of {saved} rows ({ws} rank(s) x "
                             f"{saved // max(ws, 1)}), this run has {self.global_batch_size} "
                             f"({self.world_size} rank(s) x per_device_train_batch_size="
                             f"{self.args.per_device_train_batch_size}): the data order and the optimization "
                             f"would differ; choose per_device_train_batch_size so the global batch is {saved}")
        if state.get("data_seed") != self.args.seed:
            raise ValueError(f"{path}: checkpoint was written with seed {state.get('data_seed')}, args.seed is "
                             f"{self.args.seed}: the data order would differ")
        if state.get("total_steps") != self.total_steps:
            raise ValueError(f"{path}: checkpoint plans {state.get('total_steps')} steps, these args plan "
                             f"{self.total_steps}: the learning-rate schedule would differ")
        checkpoint_state.check_state(path / STATE_NAME, state, self.total_steps, self.batcher.num_batches)
        _, tensors = load_adapter(path)
        f = _io.safe_open(path / _OPT_TENSORS)
        opt = checkpoint_state.unflatten(path / _OPT_JSON, skeleton, {k: np.array(f[k]) for k in f.keys()})
        if not isinstance(opt, dict):
            raise FormatError(f"{path / _OPT_JSON}: the optimizer state must be an object")
        return state, tensors, opt

    def _apply_checkpoint(self, state, tensors, opt) -> None:
        # All or nothing: an optimizer state the engine refuses (betas out of range, moments of the
        # wrong size, ...) must not leave the checkpoint's adapter weights under this run's optimizer.
        before = self.model.get_adapter_state_dict(self.adapter)
        try:
            opt_before = self.model.get_optimizer_state()
        except ValueError:  # no optimizer configured yet: nothing to put back
            opt_before = None
        try:
            self.model.set_adapter_state_dict(self.adapter, tensors)
            self.model.set_optimizer_state(opt)
        except BaseException:
            self.model.set_adapter_state_dict(self.adapter, before)
            if opt_before is not None:
                self.model.set_optimizer_state(opt_before)
            raise
        if "model" in state.get("rng", {}) and hasattr(self.model, "set_rng_state"):
            self.model.set_rng_state(state["rng"]["model"])
        self.global_step = int(state["global_step"])
        self.epoch, self.batch_in_epoch = int(state["epoch"]), int(state["batch_in_epoch"])
        self._tokens = int(state.get("tokens_seen", 0))
        self._run = (float(state.get("loss_sum", 0.0)), int(state.get("loss_tokens", 0)))
        self.log_history = [r for r in state.get("log_history", []) if r.get("step", 0) <= self.global_step]
        if self.rank == 0:
            _write_lines_atomic(Path(self.args.output_dir) / LOG_NAME,
                                [json.dumps(r, sort_keys=True) for r in self.log_history])


def _write_lines_atomic(path: Path, lines: list) -> None:
    atomic_io.write_text(path, "".join(line + "\n" for line in lines))
