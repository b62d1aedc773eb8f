"""A cheap engine child for bench/_rounds.py's protocol tests (tests/test_bench_train.py), run as
`python helpers_rounds_child.py MODE SPEC --rounds-fds R,W`. It goes through bench_train's own child side
(time_steps with CHANNEL set, the RESULT reply) with a step that sleeps instead of training.
MODE: ok[:SECONDS] | unavailable (ImportError at load, as a missing peer) | crash_load | crash_at:K (exits in
its K-th timed step) | hang_at:K (sleeps past any budget in its K-th timed step)."""
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "bench"))
import _rounds  # noqa: E402
import bench_train as bt  # noqa: E402


def main():
    mode, spec_path, flag, fds = sys.argv[1:5]
    assert flag == "--rounds-fds"
    with open(spec_path) as f:
        spec = json.load(f)
    bt.CHANNEL = _rounds.child_channel_from_arg(fds)
    kind, _, arg = mode.partition(":")
    res = {"engine": mode}
    if kind == "unavailable":
        bt.CHANNEL.send("RESULT", {"engine": mode, "error": "unavailable: ImportError: No module named 'peft'"})
        return
    if kind == "crash_load":
        raise RuntimeError("load failed")
    calls = [0]

    def step():
        calls[0] += 1  # call 1 is the warm-up
        if kind == "crash_at" and calls[0] == int(arg) + 1:
            os._exit(3)
        if kind == "hang_at" and calls[0] == int(arg) + 1:
            time.sleep(3600)
        time.sleep(float(arg) if kind == "ok" and arg else 0.01)
        return 10.0 - calls[0]

    bt.time_steps(step, spec, res)
    res["env"] = {k: os.environ.get(k) for k in ("ATEN_CPU_CAPABILITY", "QLORA_NUM_THREADS")}
    bt.CHANNEL.send("RESULT", res)


if __name__ == "__main__":
    main()
