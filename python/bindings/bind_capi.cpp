// Links the C API (cpp/include/qlora/qlora.h, cpp/src/api/) into _core so that it can be
// reached with ctypes on the module's shared object (tests/test_capi.py): the functions have
// default visibility, and referencing them here pulls their objects out of the static engine.
#include "qlora/qlora.h"

namespace {
using Fn = void (*)();
__attribute__((used)) const Fn kCapiSymbols[] = {
    reinterpret_cast<Fn>(&qlora_last_error),          reinterpret_cast<Fn>(&qlora_model_default_params),
    reinterpret_cast<Fn>(&qlora_sampling_default_params), reinterpret_cast<Fn>(&qlora_model_load),
    reinterpret_cast<Fn>(&qlora_model_free),          reinterpret_cast<Fn>(&qlora_model_n_vocab),
    reinterpret_cast<Fn>(&qlora_model_forward),       reinterpret_cast<Fn>(&qlora_generate),
};
}  // namespace
