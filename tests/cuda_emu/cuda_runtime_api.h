// Emulator stand-in for the CUDA runtime header (see emu.hpp): the few declarations the kernels use.
#pragma once
#include <cstddef>
#include <cstdint>
typedef struct CUstream_st* cudaStream_t;
enum cudaError_t { cudaSuccess = 0 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
template <class F>
inline cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int) { return cudaSuccess; }
#include "emu.hpp"
