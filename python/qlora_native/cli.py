"""The `qlora-native` command line.

Errors end the command with one line on stderr, "qlora-native CMD: error: MESSAGE", and exit status 1
(2 for a usage error, as argparse does; 130 on Ctrl-C); `--debug` or QLORA_DEBUG=1 lets the
exception's traceback through instead.
"""
from __future__ import annotations

import argparse
import codecs
import os
import sys

DEBUG_ENV = "QLORA_DEBUG"
STDOUT_ERRORS = "qlora_native.stdout"


def _stdout_errors(exc: UnicodeError):
    """stdout's error handler where the locale's is strict: a file name's bytes that are not text (lone
    surrogates U+DC80..U+DCFF, as os.fsdecode gives them) go out as those bytes, the name the OS has
    (what `qlora-native model-path` must print for a script); any other character the encoding lacks as
    a backslash escape. Without it, printing such a path raised UnicodeEncodeError after the work was
    done (a saved adapter reported as a failed command)."""
    if isinstance(exc, UnicodeEncodeError) and all("\udc80" <= c <= "\udcff" for c in exc.object[exc.start:exc.end]):
        return codecs.lookup_error("surrogateescape")(exc)
    return codecs.backslashreplace_errors(exc)


codecs.register_error(STDOUT_ERRORS, _stdout_errors)


def _tolerant_stdout() -> None:
    """Under a strict stdout (a UTF-8 locale other than C / POSIX) print paths and text as _stdout_errors says."""
    if getattr(sys.stdout, "errors", None) == "strict" and hasattr(sys.stdout, "reconfigure"):
        try:
            sys.stdout.reconfigure(errors=STDOUT_ERRORS)
        except (ValueError, OSError):  # a closed or replaced stream: leave it
            pass


def _nvidia_driver() -> tuple[bool, str | None]:
    """(an NVIDIA driver is installed, the CUDA version it supports or None).

    The CUDA runtime reports a missing driver as "CUDA driver version is insufficient for CUDA runtime
    version" (cudaErrorInsufficientDriver, the same code as a too-old driver), so the driver library
    is probed here to tell the two apart."""
    import ctypes

    names = {"linux": ("libcuda.so.1", "libcuda.so"), "win32": ("nvcuda.dll",)}.get(sys.platform, ())
    for name in names:
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        v = ctypes.c_int(0)
        try:
            ok = lib.cuDriverGetVersion(ctypes.byref(v)) == 0 and v.value > 0
        except (AttributeError, OSError):
            ok = False
        return True, (f"{v.value // 1000}.{v.value % 1000 // 10}" if ok else None)
    return os.path.exists("/proc/driver/nvidia/version"), None  # kernel module without a loadable libcuda


def gpu_line() -> str:
    """The GPU line of `info`: the devices, or precisely why there are none."""
    from . import _core

    summary = _core.cuda_device_summary()
    if _core.cuda_device_count():
        return summary
    found, cuda = _nvidia_driver()
    if not found:
        driver = "no NVIDIA driver found"
    elif cuda is None:
        driver = "an NVIDIA driver is installed but its libcuda could not be loaded"
    else:
        driver = f"NVIDIA driver for CUDA {cuda}"
    if not _core.cuda_compiled():
        return f"none visible: {driver}; CUDA backend {summary}"
    if not found:
        return f"none visible: {driver}"  # not the runtime's "driver version is insufficient"
    if "insufficient" in summary and cuda is not None:
        return f"none usable: the {driver} is older than this build's CUDA runtime; update the driver"
    return f"none usable: {summary}; {driver}"


def _cmd_info(args: argparse.Namespace) -> int:
    from . import _core
    from .cli_common import SMOLLM2_INSTALL, smollm2_path

    print(f"qlora_native {_core.__version__}")
    print(f"CPU SIMD level : {_core.simd_level()} (supported: {', '.join(_core.supported_simd_levels())})")
    print(f"CPU threads    : {_core.num_threads()} (physical cores: {_core.physical_cores()})")
    c = _core.cache_sizes()  # what the GEMM blocking and GEMV chunking are derived from
    print(f"CPU caches     : L1d {c['l1d'] >> 10} KiB, L2 {c['l2'] >> 10} KiB per core, L3 {c['l3'] >> 10} KiB "
          f"(shared by {c['l3_sharing']} CPUs; from {c['source']})")
    print(f"CUDA backend   : {'compiled' if _core.cuda_compiled() else 'not compiled'}")
    print(f"GPU            : {gpu_line()}")
    print(f"backends       : {', '.join(_core.available_backends())}")
    all_ops = _core.all_backend_ops()
    for be in ("cpu", "cuda"):  # the capability table (Backend::supports_op)
        if be == "cuda" and not _core.cuda_compiled():
            print("ops cuda       : none (not compiled)")
            continue
        try:
            have = _core.backend_ops(be)
        except ValueError as e:  # e.g. a CUDA build without its runtime
            print(f"ops {be:<11}: unknown ({e})")
            continue
        missing = [op for op in all_ops if op not in have]
        tail = f"; not: {', '.join(missing)}" if missing else ""
        print(f"ops {be:<11}: {len(have)} of {len(all_ops)}: {', '.join(have)}{tail}")
    smol = smollm2_path()
    print(f"SmolLM2 model  : {smol or 'not installed (' + SMOLLM2_INSTALL + ')'}")
    return 0


def _cmd_model_path(args: argparse.Namespace) -> int:
    from .cli_common import resolve_model

    path = resolve_model(args.model)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{args.model}: no such file or directory")
    print(os.path.abspath(path))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .cli_common import MODEL_HELP, HelpFormatter

    p = argparse.ArgumentParser(
        prog="qlora-native", description="QLoRA engine: NF4 base, LoRA adapters, no PyTorch.",
        epilog="C/C++ apps: `python -m qlora_native --cmake-dir` (or --include-dir, --lib-dir) prints where the "
        "installed CMake package, headers and libqlora are.")
    p.add_argument("--version", action="version", version=f"qlora-native {__version__}")
    p.add_argument("--debug", action="store_true", help=f"show the traceback of an error (or set {DEBUG_ENV}=1)")
    sub = p.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="version, SIMD level, threads, GPU status, where SmolLM2 is")
    info.set_defaults(func=_cmd_info)
    mp = sub.add_parser("model-path", help="print the file or directory a --model value names",
                        formatter_class=HelpFormatter)
    mp.add_argument("model", nargs="?", default="smollm2", help=MODEL_HELP)
    mp.set_defaults(func=_cmd_model_path)
    from . import cli_generate

    cli_generate.add_parser(sub)
    from . import cli_train

    cli_train.add_parser(sub)
    cli_train.add_demo_parser(sub)
    from . import cli_merge

    cli_merge.add_parser(sub)
    for sp in sub.choices.values():  # also accepted after the subcommand; SUPPRESS keeps the top-level value
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help=f"show the traceback of an error (or set {DEBUG_ENV}=1)")
        sp.set_defaults(_parser=sp)
    return p


def error_line(e: BaseException) -> str:
    """One line for an exception: its message (which names the file and field), with the exception's
    class where the message alone would not say what went wrong."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror and str(e).startswith("["):
        msg = f"{e.filename}: {e.strerror}"  # "[Errno 2] No such file ..." -> "PATH: No such file ..."
    else:
        msg = " ".join(part.strip() for part in str(e).splitlines() if part.strip())
    if isinstance(e, MemoryError):
        return f"out of memory{': ' + msg if msg else ''}"
    if not msg or not isinstance(e, (ValueError, OSError, RuntimeError)):
        msg = f"{type(e).__name__}: {msg}" if msg else type(e).__name__
    return msg


def main(argv: list[str] | None = None) -> int:
    from .cli_common import UsageError

    _tolerant_stdout()
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False) or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # `qlora-native ... | head`: the reader left; stop quietly
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 141
    except Exception as e:
        if debug:
            raise
        if isinstance(e, UsageError):
            args._parser.error(error_line(e))  # usage, "PROG: error: MESSAGE", exit 2 (as argparse's own)
        print(f"qlora-native {args.command}: error: {error_line(e)}  [--debug shows the traceback]", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
