"""Interleaved step timing for the training bench (bench_train.py's default with >= 2 engines).

Why: this host's speed drifts 30-60% between minutes, so a ratio of two engines timed one after the
other in separate minutes measures the drift as much as the engines. Here every engine child loads its
model and runs its warm-up step first (one child after the other, so load and warm-up times stay
uncontended), then waits on a pipe; the parent drives rounds in which each engine runs one timed step,
in a rotated order, while the others sleep in a blocking read. The ratio of two engines' steps in the
same round (a few seconds apart) is a paired sample: `paired()` gives their median and range.

Protocol (one JSON line per message on a dedicated pipe pair; the child's stdout / stderr go to a log
file, so library prints cannot block it):
  child -> parent  READY {"warmup_s": ...}                after load + warm-up (+ VmHWM reset)
  parent -> child  STEP                                   run one timed step
  child -> parent  STEP {"s": wall, "cpu_s": cpu, "loss": loss}
  parent -> child  DONE                                   finish
  child -> parent  RESULT {...}                           the engine's result dict (or {"error": ...})
A child may send RESULT instead of READY (e.g. an engine that cannot load: {"error": ...}). EOF, a
malformed line or a child over its time budget (seconds of its own work, not of the others' steps) ends
that engine with an "error" entry; the others go on.
"""
import json
import os
import select
import statistics
import subprocess
import sys
import time


# ---------------------------------------------------------------- child side
class ChildChannel:
    """The child's end: commands arrive on fd `rfd`, replies leave on fd `wfd`."""

    def __init__(self, rfd: int, wfd: int):
        self.r = os.fdopen(rfd, "r")
        self.w = os.fdopen(wfd, "w")

    def send(self, kind: str, payload: dict) -> None:
        self.w.write(kind + " " + json.dumps(payload) + "\n")
        self.w.flush()

    def recv(self) -> str:
        """The next command; blocks (sleeping in read) until the parent sends one. '' at EOF."""
        return self.r.readline().strip()


def serve_steps(chan: ChildChannel, step):
    """After READY was sent: runs one timed step per STEP until DONE or EOF. Returns the steps' wall
    seconds, their losses, and the CPU seconds this process used while it waited (should be ~0: an
    idle engine must not steal the stepping one's cores)."""
    times, losses, idle_cpu = [], [], 0.0
    c_wait = time.process_time()
    while True:
        cmd = chan.recv()
        if cmd != "STEP":  # DONE, or EOF: the parent is gone or finished
            break
        idle_cpu += time.process_time() - c_wait
        c0, t0 = time.process_time(), time.perf_counter()
        loss = step()
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        times.append(dt)
        losses.append(loss)
        chan.send("STEP", {"s": dt, "cpu_s": dc, "loss": loss})
        c_wait = time.process_time()
    idle_cpu += time.process_time() - c_wait
    return times, losses, idle_cpu


# ---------------------------------------------------------------- parent side
class ChildError(Exception):
    pass


class Child:
    """One engine's process in the round protocol. `argv` gets `--rounds-fds R,W` appended."""

    def __init__(self, name: str, argv: list, env: dict, log_path: str, budget_s: float):
        self.name, self.log_path, self.budget = name, log_path, budget_s
        c_r, p_w = os.pipe()  # parent -> child commands
        p_r, c_w = os.pipe()  # child -> parent replies
        try:
            self.log = open(log_path, "w")
            self.proc = subprocess.Popen(argv + ["--rounds-fds", f"{c_r},{c_w}"], env=env, pass_fds=(c_r, c_w),
                                         stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)
        except OSError:
            for fd in (p_w, p_r):
                os.close(fd)
            if getattr(self, "log", None) is not None:
                self.log.close()
            raise
        finally:
            os.close(c_r)
            os.close(c_w)
        self.wfd, self.rfd, self.buf = p_w, p_r, b""

    def _readline(self) -> str:
        """One reply line, waiting at most the child's remaining budget (its wait time is charged)."""
        while b"\n" not in self.buf:
            t0 = time.perf_counter()
            ready, _, _ = select.select([self.rfd], [], [], max(self.budget, 0.0))
            self.budget -= time.perf_counter() - t0
            if not ready:
                raise ChildError("timed out (its time budget is spent)")
            chunk = os.read(self.rfd, 65536)
            if not chunk:
                raise ChildError(self._exit_text())
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()

    def _exit_text(self) -> str:
        try:
            rc = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            rc = None
        self.log.flush()
        try:
            with open(self.log_path, errors="replace") as f:
                tail = [s for s in f.read().strip().splitlines() if s.strip()][-3:]
        except OSError:
            tail = []
        return f"exit {rc}: " + " | ".join(tail)

    def request(self, cmd: str | None):
        """Sends cmd (None: send nothing), returns (kind, payload) of the child's next message."""
        if cmd is not None:
            try:
                os.write(self.wfd, (cmd + "\n").encode())
            except OSError:  # the child is gone: its exit status says why
                raise ChildError(self._exit_text()) from None
        line = self._readline()
        kind, _, rest = line.partition(" ")
        try:
            return kind, json.loads(rest)
        except ValueError:
            raise ChildError(f"malformed reply {line[:200]!r}") from None

    def close(self, kill: bool = False) -> None:
        for fd in (self.wfd, self.rfd):
            try:
                os.close(fd)
            except OSError:
                pass
        if kill and self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def round_order(engines: list, i: int) -> list:
    """Round i's order, from a Williams design (a row-complete Latin square, as in crossover trials):
    over every 2n rounds each engine runs first twice and directly follows each other engine twice, so
    no engine is always timed right after the same one. Rows: 0, 1, n-1, 2, n-2, ... shifted by the row
    number mod n; for odd n the reversed rows follow."""
    n = len(engines)
    if n == 0:
        return []
    seq, lo, hi = [0], 1, n - 1
    while len(seq) < n:
        seq.append(lo)
        lo += 1
        if len(seq) < n:
            seq.append(hi)
            hi -= 1
    rows = [[(s + r) % n for s in seq] for r in range(n)]
    if n % 2:
        rows += [row[::-1] for row in rows]
    return [engines[k] for k in rows[i % len(rows)]]


def run_rounds(starts: dict, steps: int, log=print, probes=()) -> dict:
    """Drives the protocol. starts: engine -> (argv, env, log_path, budget_s), started in this order, each
    after the previous is READY; the names in `probes` (e.g. an sgemm probe) are not engines: they step
    once at the end of every round, after the engines. Returns {"results": engine -> result dict (the child's RESULT, or
    {"engine", "error"} with any steps it did as "partial_step_s"), "orders": each round's order,
    "step_s" / "step_cpu_s" / "values": engine -> its steps' wall / process CPU seconds / returned values
    (an engine's losses, a probe's rates) in round order, "ready_s": engine -> seconds from start to READY}."""
    results, alive, step_s, step_cpu_s, values, ready_s, orders = {}, {}, {}, {}, {}, {}, []

    def fail(e, why):
        results[e] = {"engine": e, "error": why}
        if step_s.get(e):
            results[e]["partial_step_s"] = step_s[e]
        c = alive.pop(e, None)
        if c is not None:
            c.close(kill=True)
        log(f"  {e}: error: {why}")

    try:
        for e, (argv, env, log_path, budget) in starts.items():
            t0 = time.perf_counter()
            try:
                c = Child(e, argv, env, log_path, budget)
            except OSError as ex:
                results[e] = {"engine": e, "error": f"cannot start: {ex}"}
                log(f"  {e}: error: {results[e]['error']}")
                continue
            alive[e] = c
            try:
                kind, payload = c.request(None)
            except ChildError as ex:
                fail(e, str(ex))
                continue
            if kind == "RESULT":  # could not load: its error
                results[e] = dict(payload, engine=e) if "error" in payload else {"engine": e, "error": "no READY"}
                alive.pop(e).close(kill=True)
                log(f"  {e}: error: {results[e]['error']}")
                continue
            if kind != "READY":
                fail(e, f"unexpected {kind!r} before READY")
                continue
            ready_s[e] = time.perf_counter() - t0
            step_s[e], step_cpu_s[e], values[e] = [], [], []
            log(f"  {e}: loaded, warm-up done, waiting ({ready_s[e]:.0f} s)")
        for i in range(steps if alive else 0):
            order = round_order([e for e in alive if e not in probes], i)  # alive keeps the start order
            order += [e for e in alive if e in probes]
            orders.append(order)
            for e in order:
                try:
                    kind, payload = alive[e].request("STEP")
                    if kind != "STEP":
                        raise ChildError(f"unexpected {kind!r} for STEP: {str(payload)[:200]}")
                except ChildError as ex:
                    fail(e, f"in round {i + 1}: {ex}")
                    continue
                step_s[e].append(payload["s"])
                step_cpu_s[e].append(payload.get("cpu_s"))
                values[e].append(payload.get("loss"))
            log(f"  round {i + 1}/{steps}: " + ", ".join(f"{e} {step_s[e][-1]:.2f} s" for e in order if e in alive))
        for e in list(alive):
            try:
                kind, payload = alive[e].request("DONE")
                if kind != "RESULT":
                    raise ChildError(f"unexpected {kind!r} for DONE")
            except ChildError as ex:
                fail(e, f"at the end: {ex}")
                continue
            results[e] = payload
            alive.pop(e).close()
    finally:
        for c in alive.values():  # an exception (or ^C) above: no child outlives the parent
            c.close(kill=True)
    return {"results": results, "orders": orders, "step_s": step_s, "step_cpu_s": step_cpu_s, "values": values,
            "ready_s": ready_s}


def stats(vs):
    """{median, min, max, n} of a list, None when empty."""
    vs = [v for v in vs if v is not None]
    if not vs:
        return None
    return {"median": statistics.median(vs), "min": min(vs), "max": max(vs), "n": len(vs)}


def paired(ours_s, peer_s):
    """Per-round ratios ours / peer in tokens/s (= peer's step seconds / ours, same tokens per step) over
    the rounds both ran: {median, min, max, n}, or None without a common round."""
    return stats([p / o for o, p in zip(ours_s or [], peer_s or []) if o and p])


def fmt_paired(p) -> str:
    return "n/a" if not p else f"{p['median']:.2f}x ({p['min']:.2f}-{p['max']:.2f}, n={p['n']})"


def child_channel_from_arg(arg: str | None):
    if not arg:
        return None
    r, w = (int(v) for v in arg.split(","))
    return ChildChannel(r, w)


if __name__ == "__main__":
    sys.exit("a helper module of bench_train.py")
