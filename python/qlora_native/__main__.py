import sys

# `python -m qlora_native --cmake-dir` (as `python -m pybind11 --cmakedir`) prints where the
# installed C/C++ package is; any other arguments run the CLI.
_PATH_FLAGS = {"--cmake-dir": "get_cmake_dir", "--include-dir": "get_include", "--lib-dir": "get_library_dir"}

if len(sys.argv) == 2 and sys.argv[1] in _PATH_FLAGS:
    from . import cpp_package

    try:
        print(getattr(cpp_package, _PATH_FLAGS[sys.argv[1]])())
    except FileNotFoundError as e:
        print(f"qlora_native: {e}", file=sys.stderr)
        sys.exit(1)
    sys.exit(0)

from .cli import main  # noqa: E402

sys.exit(main())
