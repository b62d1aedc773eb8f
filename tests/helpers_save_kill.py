"""Kill -9 sweep of the multi-file saves (used by test_save_kill.py).

    python tests/helpers_save_kill.py ROOT SCENARIO:MODE ...     (MODE: exchange | rename)

For each SCENARIO:MODE, in R = ROOT/SCENARIO-MODE: writes a tiny random checkpoint to R/base, the
reference saves R/ref_old and R/ref_new (the old save, then the old save overwritten by the new
one, no kill), then for k = 1..N, with N
the number of filesystem mutations the new save makes under its trial directory (renames, removes,
mkdirs, opens for writing, rmtree, renameat2 exchanges, seen through a sys.addaudithook) plus the
number of fault points the engine's writers reach (adapter saves are C++, cpp/src/io/adapter_write.cpp:
every step of io::DirSaver has a test_fault point, and QLORA_TEST_FAULT=#j kills at the j-th one), a
trial directory R/tK holding the old save and a new save killed with SIGKILL just before step k
(k <= Python's count: the k-th Python mutation; after it: C++ fault point k - that count).
Every save runs in a forked child of this single-threaded process (cheap: no re-import). Prints
{"spec", "events": N, "py_events", "cpp_points", "killed": [k whose child died of SIGKILL],
"other": [[k, status], ...]} as JSON. MODE rename disables renameat2 (Python's and, through
QLORA_TEST_NO_EXCHANGE, the engine's), so directory swaps take the two-rename path.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path

import numpy as np

from qlora_native import LoraConfig, Model, atomic_io, io
from qlora_native.data import IGNORE_INDEX, Example
from qlora_native.trainer import Trainer, TrainingArguments

H, I, V, L = 32, 64, 64, 2
_PROJ = {"self_attn.q_proj": (32, 32), "self_attn.k_proj": (16, 32), "self_attn.v_proj": (16, 32),
         "self_attn.o_proj": (32, 32), "mlp.gate_proj": (I, H), "mlp.up_proj": (I, H), "mlp.down_proj": (H, I)}


def make_base(d: Path) -> Path:
    """A tiny Llama checkpoint (config.json + model.safetensors) written without torch."""
    d.mkdir(parents=True, exist_ok=True)
    cfg = dict(vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=4,
               num_key_value_heads=2, tie_word_embeddings=False, rms_norm_eps=1e-5, rope_theta=10000.0,
               max_position_embeddings=256, hidden_act="silu", bos_token_id=1, eos_token_id=2, pad_token_id=0,
               model_type="llama", architectures=["LlamaForCausalLM"])
    (d / "config.json").write_text(json.dumps(cfg))
    g = np.random.default_rng(0)
    t = {"model.embed_tokens.weight": g.standard_normal((V, H)), "model.norm.weight": np.ones(H),
         "lm_head.weight": 0.1 * g.standard_normal((V, H))}
    for layer in range(L):
        p = f"model.layers.{layer}."
        t[p + "input_layernorm.weight"] = np.ones(H)
        t[p + "post_attention_layernorm.weight"] = np.ones(H)
        for n, s in _PROJ.items():
            t[p + n + ".weight"] = 0.1 * g.standard_normal(s)
    io.save_safetensors(d / "model.safetensors", {k: v.astype(np.float32) for k, v in t.items()})
    return d


def examples():
    g = np.random.default_rng(1)
    out = []
    for i in range(8):
        ids = g.integers(3, V, 10).tolist()
        out.append(Example(ids, [IGNORE_INDEX] * 4 + ids[4:], line=i + 1))
    return out


# ---------------------------------------------------------------- the saves (old, then new)
def _model(base, quantize="nf4"):
    return Model.from_pretrained(base, quantize=quantize, tokenizer=None)


def adapter(trial: Path, base: Path, new: bool, shared: bool = False) -> None:
    m = _model(base)
    if new:
        m.add_adapter("a", LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights="gaussian"),
                      seed=2)
    else:
        m.add_adapter("a", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                      init_lora_weights="gaussian"), seed=1)
    if shared and not new:
        (trial / "adapter").mkdir(parents=True, exist_ok=True)
        (trial / "adapter" / "README.md").write_text("user notes\n")
    m.save_adapter(trial / "adapter", "a")


def pretrained(trial: Path, base: Path, new: bool, shared: bool = False) -> None:
    m = _model(base, quantize="nf4" if new else None)
    if shared and not new:
        (trial / "model").mkdir(parents=True, exist_ok=True)
        (trial / "model" / "README.md").write_text("user notes\n")
    m.save_pretrained(trial / "model")


def trainer(trial: Path, base: Path, new: bool, shared: bool = False) -> None:
    m = _model(base)
    cfg = LoraConfig(r=4 if new else 2, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    args = TrainingArguments(output_dir=str(trial / "out"), learning_rate=5e-3 if new else 1e-2, max_steps=2,
                             save_steps=2, logging_steps=1, per_device_train_batch_size=4, disable_tqdm=True,
                             max_seq_len=16, seed=3)
    Trainer(m, cfg, examples(), None, args).train()


SCENARIOS = {"adapter": adapter, "adapter_shared": lambda t, b, n: adapter(t, b, n, shared=True),
             "pretrained": pretrained, "pretrained_shared": lambda t, b, n: pretrained(t, b, n, shared=True),
             "trainer": trainer}

# ---------------------------------------------------------------- fork + audit hook
_MUTATIONS = {"os.rename", "os.remove", "os.rmdir", "os.mkdir", "shutil.rmtree", "qlora_native.atomic_io.exchange"}


def _under(arg, root: str) -> bool:
    if isinstance(arg, bytes):
        arg = os.fsdecode(arg)
    if isinstance(arg, os.PathLike):
        arg = os.fspath(arg)
    return isinstance(arg, str) and os.path.abspath(arg).startswith(root + os.sep)


def _hook(root: str, kill_at: int, counter: list):
    def hook(event, args):
        if event == "open":
            if not (len(args) >= 3 and isinstance(args[2], int) and args[2] & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)):
                return
        elif event not in _MUTATIONS:
            return
        if not args or not _under(args[0], root):
            return
        counter[0] += 1
        if counter[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    return hook


def in_child(fn, root: Path | None = None, kill_at: int = 0) -> tuple[int, int]:
    """Runs fn() in a forked child; returns (wait status, mutations counted under root)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(r)
            counter = [0]
            if root is not None:
                sys.addaudithook(_hook(os.path.abspath(root), kill_at, counter))
            fn()
            os.write(w, str(counter[0]).encode())
        except BaseException as exc:  # noqa: BLE001 - reported through the exit status
            print(f"child failed: {exc!r}", file=sys.stderr)
            code = 3
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r) as f:
        out = f.read()
    _, status = os.waitpid(pid, 0)
    return status, int(out) if out else -1


def no_fsync() -> None:
    """fsync only matters for power loss, not for kill -9 (the page cache survives): skipped to
    keep the sweep fast (it dominates the time of these tiny saves)."""
    os.fsync = lambda fd: None


def _cpp_fault(fn, j: int):
    def go():
        os.environ["QLORA_TEST_FAULT"] = f"#{j}"  # the engine reads it at each fault point
        fn()
    return go


def run(scenario: str, root: Path, mode: str) -> dict:
    atomic_io._renameat2 = _RENAMEAT2 if mode == "exchange" else None
    if mode == "exchange":
        os.environ.pop("QLORA_TEST_NO_EXCHANGE", None)
    else:
        os.environ["QLORA_TEST_NO_EXCHANGE"] = "1"
    base = make_base(root / "base")
    fn = SCENARIOS[scenario]

    def trial(d: Path, kill_at: int | None, cpp_fault: int = 0):
        d.mkdir(parents=True)
        st, _ = in_child(lambda: fn(d, base, False))
        assert st == 0, f"old save failed: {st}"
        new = lambda: fn(d, base, True)  # noqa: E731
        if cpp_fault:
            return in_child(_cpp_fault(new, cpp_fault))
        if kill_at is None:
            return in_child(new)
        return in_child(new, d, kill_at)

    st, _ = in_child(lambda: (root / "ref_old").mkdir() or fn(root / "ref_old", base, False))
    assert st == 0
    st, _ = trial(root / "ref_new", None)
    assert st == 0
    st, n_py = trial(root / "count", 0)
    assert st == 0, st
    killed, other = [], []
    for k in range(1, n_py + 1):
        st, _ = trial(root / f"t{k}", k)
        if os.WIFSIGNALED(st) and os.WTERMSIG(st) == signal.SIGKILL:
            killed.append(k)
        else:
            other.append([k, st])
    j = 0  # the engine's fault points, one after the other until a save runs through
    while j < 500:
        j += 1
        st, _ = trial(root / f"t{n_py + j}", None, j)
        if not (os.WIFSIGNALED(st) and os.WTERMSIG(st) == signal.SIGKILL):
            assert st == 0, f"new save failed: {st}"
            shutil.rmtree(root / f"t{n_py + j}")
            j -= 1
            break
        killed.append(n_py + j)
    n = n_py + j
    assert n > 0
    return {"events": n, "py_events": n_py, "cpp_points": j, "killed": killed, "other": other}


_RENAMEAT2 = atomic_io._renameat2

if __name__ == "__main__":
    # ROOT SCENARIO:MODE ...: one process (one import) for several sweeps; one JSON line each.
    no_fsync()
    for spec in sys.argv[2:]:
        sc, mode = spec.split(":")
        print(json.dumps({"spec": spec, **run(sc, Path(sys.argv[1]) / f"{sc}-{mode}", mode)}), flush=True)
