// Emulator stand-in for the CUDA runtime header (see emu.hpp).
#pragma once
#include "cuda_runtime_api.h"
