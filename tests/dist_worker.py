"""One rank of a data-parallel test run (tests/test_distributed.py starts it with `mpiexec -n N python
tests/dist_worker.py SPEC.json`, or alone for the one-process reference). SPEC: {"model", "examples":
[[ids, labels], ...], "eval": [...]?, "args": TrainingArguments fields, "lora": LoraConfig fields,
"resume": null | true | path, "fail_rank": rank that raises at its second step (or null)}.
Rank 0 writes OUTPUT_DIR/result.npz (final A/B under their PEFT names) after training."""
import json
import os
import sys

import numpy as np

from qlora_native import LoraConfig, Model  # the build the test's PYTHONPATH names (test_distributed._env)
from qlora_native.data import Example
from qlora_native.trainer import Trainer, TrainingArguments


def main(spec_path):
    with open(spec_path) as f:
        spec = json.load(f)
    kw = {}
    if spec.get("backend"):  # GPU ranks (test_distributed_nccl.py): one GPU per rank, fp32 compute
        from qlora_native.distributed import local_backend
        kw = {"backend": local_backend(spec["backend"]), "compute_dtype": "float32"}
    model = Model.from_pretrained(spec["model"], quantize="nf4", tokenizer=None, **kw)
    ex = [Example(i, l, line=k + 1) for k, (i, l) in enumerate(spec["examples"])]
    ev = [Example(i, l, line=k + 1) for k, (i, l) in enumerate(spec.get("eval") or [])] or None
    rank = int(os.environ.get("PMI_RANK", "0"))
    args = TrainingArguments(**{**spec["args"], **(spec.get("rank_args") or {}).get(str(rank), {})})
    t = Trainer(model, LoraConfig(**spec["lora"]), ex, ev, args)
    if spec.get("fail_rank") is not None and t.rank == spec["fail_rank"]:
        orig, n = model.train_step, [0]

        def step(*a, **kw):  # this rank fails while the other one waits in the step's all-reduce
            n[0] += 1
            if n[0] == 2:
                raise RuntimeError(f"injected failure on rank {t.rank}")
            return orig(*a, **kw)
        model.train_step = step
    out = t.train(resume_from_checkpoint=spec.get("resume"))
    if t.rank == 0:
        np.savez(os.path.join(args.output_dir, "result.npz"), **model.get_adapter_state_dict())
        with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
            json.dump({**out, "world_size": t.world_size, "mpi4py_loaded": "mpi4py" in sys.modules}, f)


if __name__ == "__main__":
    main(sys.argv[1])
