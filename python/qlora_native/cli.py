"""The `qlora-native` command line."""
from __future__ import annotations

import argparse
import sys


def _cmd_info(args: argparse.Namespace) -> int:
    from . import _core

    print(f"qlora_native {_core.__version__}")
    print(f"CPU SIMD level : {_core.simd_level()} (supported: {', '.join(_core.supported_simd_levels())})")
    print(f"CPU threads    : {_core.num_threads()} (physical cores: {_core.physical_cores()})")
    print(f"CUDA backend   : {'compiled' if _core.cuda_compiled() else 'not compiled'}")
    n = _core.cuda_device_count()
    print(f"GPU            : {_core.cuda_device_summary() if n else 'none visible (' + _core.cuda_device_summary() + ')'}")
    print(f"backends       : {', '.join(_core.available_backends())}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="qlora-native", description="QLoRA engine: NF4 base, LoRA adapters, no PyTorch.")
    p.add_argument("--version", action="version", version=f"qlora-native {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="version, SIMD level, threads, CUDA status")
    info.set_defaults(func=_cmd_info)
    from . import cli_generate

    cli_generate.add_parser(sub)
    from . import cli_train

    cli_train.add_parser(sub)
    cli_train.add_demo_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
