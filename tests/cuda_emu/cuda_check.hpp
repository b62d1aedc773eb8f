// Emulator stand-in for cuda/cuda_check.hpp (see emu.hpp): nothing to check on the host.
#pragma once
#define QLORA_CUDA_CHECK(x, what) (void)(x)
#define QLORA_CUDA_CHECK_LAUNCH(what) (void)0
