// The one rule for LoRA factors coming into the engine (a PEFT file, Python's lora_add / lora_set,
// the C API): finite, and an update that float32 can carry. y += s·B(A x) is multiplied by another
// such update later in the layer (q·k, gate·up) and then squared (the next RMSNorm), so finite
// but huge factors (1e30) overflow to Inf and turn the logits into NaN without any error.
#pragma once
#include <cstdint>
#include <string>

namespace qlora {
class Backend;
}

namespace qlora::model {

struct LoraAdapter;

// Bound on each stage of a LoRA update for an input with every |x_i| <= 1: ||A||, |s|·||B|| and
// |s|·||B||·||A|| (|| || the largest absolute row sum, i.e. the largest |output| on such an input).
// 2^32 = FLT_MAX^(1/4): a degree-4 product of such updates stays finite. Trained adapters are
// many orders below it (A ~ 1/sqrt(in) per element: ||A|| ~ sqrt(in); B small).
constexpr double kLoraMaxGain = 0x1p32;

// Throws ValueError "<what>: ..." when A [r, in] or B [out, r] holds NaN or Inf (naming a_name /
// b_name) or a stage of the update exceeds kLoraMaxGain (with the gain and the largest element).
void check_lora_factors(int64_t r, int64_t in, int64_t out, float scaling, const float* A, const float* B,
                        const std::string& what, const std::string& a_name = "A", const std::string& b_name = "B");

// The same rule for a runtime scale of adapter `a` (set_adapter_scale, a C API context's scales):
// `scale` must be finite as a float, and with every module's scaling multiplied by it each module
// must pass check_lora_factors. Only |scale| counts (a negative scale is legal, as llama.cpp's
// --lora-scaled and PEFT's set_scale allow). |scale| <= 1 never makes an update larger than the
// one scale 1 applies, so the factors are read back (from the backend) only when |scale| > 1.
// Throws ValueError "<what>: scale <scale>: ..." (naming the module when the bound is exceeded).
void check_lora_scale(Backend& be, const LoraAdapter& a, double scale, const std::string& what);

}  // namespace qlora::model
