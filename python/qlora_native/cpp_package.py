"""Where an installed wheel keeps the C/C++ package (as pybind11.get_cmake_dir does): the headers
qlora/qlora.h and qlora/qlora.hpp, libqlora (shared and static) and qloraConfig.cmake, all inside
the qlora_native package directory. `python -m qlora_native --cmake-dir` prints get_cmake_dir()
for CMAKE_PREFIX_PATH (or qlora_DIR)."""
from __future__ import annotations

from pathlib import Path

_PKG = Path(__file__).resolve().parent


def _existing(path: Path, what: str) -> str:
    if not path.is_dir():
        raise FileNotFoundError(
            f"{what} not found: {path} does not exist. This qlora_native ({_PKG}) is not an installed wheel "
            "(a source checkout or a dev build has no C/C++ package): install it with `pip install .`, or "
            "install a CMake build with `cmake --install BUILD_DIR --prefix PREFIX` and use PREFIX")
    return str(path)


def get_cmake_dir() -> str:
    """The directory of qloraConfig.cmake: pass it as CMAKE_PREFIX_PATH or qlora_DIR."""
    return _existing(_PKG / "lib" / "cmake" / "qlora", "the qlora CMake package")


def get_include() -> str:
    """The include directory (holding qlora/qlora.h), for builds without CMake."""
    return _existing(_PKG / "include", "the qlora headers")


def get_library_dir() -> str:
    """The directory of libqlora.so and libqlora.a, for builds without CMake (-L... -lqlora)."""
    return _existing(_PKG / "lib", "the qlora libraries")
