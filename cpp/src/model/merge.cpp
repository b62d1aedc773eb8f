// LlamaModel::merge_adapter (merge.hpp): W' = deq(W) + scaling * B·A per projection, with the
// engine's own NF4 dequantization and GEMM, then rounding and storage (fp32 or NF4 via the codec).
#include "model/merge.hpp"

#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "common/error.hpp"
#include "model/llama.hpp"

namespace qlora::model {

float round_to_bf16(float x) {
  if (std::isnan(x)) return x;
  uint32_t b;
  std::memcpy(&b, &x, 4);
  b = (b + 0x7fffu + ((b >> 16) & 1u)) & 0xffff0000u;  // nearest, ties to even (overflows to inf)
  float y;
  std::memcpy(&y, &b, 4);
  return y;
}

float round_to_f16(float x) {
  if (!std::isfinite(x)) return x;
  const float a = std::fabs(x);
  if (a >= 65520.0f) return std::copysign(std::numeric_limits<float>::infinity(), x);  // ties to even -> inf
  int e = 0;
  if (a < 6.103515625e-05f) {
    e = -13;  // subnormals: quantum 2^-24 (= 2^(e - 11))
  } else {
    std::frexp(a, &e);  // a in [2^(e-1), 2^e): 11 significant bits, quantum 2^(e - 11)
  }
  // x / quantum is exact (power of two, in range); nearbyint rounds to even in the default mode.
  return static_cast<float>(std::ldexp(std::nearbyint(std::ldexp(static_cast<double>(x), 11 - e)), e - 11));
}

namespace {

const char* round_name(MergeRound r) { return r == MergeRound::BF16 ? "bfloat16" : r == MergeRound::F16 ? "float16" : "float32"; }

}  // namespace

void LlamaModel::merge_adapter(const std::string& name, const MergeOptions& opt,
                               const std::function<void(int64_t)>& progress) {
  // Weights are immutable while any pass runs (they take weights_mu_ shared): refuse, never wait
  // (a stream callback of a running generation would otherwise deadlock).
  std::unique_lock<std::shared_mutex> wl(weights_mu_, std::try_to_lock);
  check_arg(wl.owns_lock() && open_contexts_.load() == 0,
            "merge: a forward, training pass or generation is running on this model; merge after it has finished");
  const AdapterRef ad = adapter(name);  // ValueError when unknown
  // The runtime scale (set_adapter_scale) is merged too, as PEFT merges its scaled term; unmerge
  // subtracts what was merged even if the scale changed meanwhile.
  const float scale = opt.subtract ? merged_scale_ : adapter_scale(name);
  LlamaWeights& w = *w_;
  const int64_t L = w.cfg.num_layers;
  const std::string what = opt.subtract ? "unmerge" : "merge";
  if (opt.subtract)
    for (int64_t l = 0; l < L; ++l)
      for (int p = 0; p < kNumProj; ++p)
        check_arg(!ad->at(l, p) || !proj(w.layers[l], p).is_nf4,
                  "unmerge: layer " + std::to_string(l) + " " + proj_name(p) +
                      " is stored NF4 (the merge was re-quantized, or the adapter is not merged): the adapter "
                      "cannot be subtracted exactly; reload the model and the adapter instead");

  struct Staged {
    Linear* dst;
    Linear lin;
  };
  std::vector<Staged> staged;
  std::vector<float> host;
  for (int64_t l = 0; l < L; ++l) {
    for (int p = 0; p < kNumProj; ++p) {
      Linear& lin = proj(w.layers[l], p);
      const LoraModule* m = ad->at(l, p);
      if (opt.subtract && !m) continue;
      // Untouched projections that would be stored exactly as they are: keep them.
      if (!m && (opt.requantize ? lin.is_nf4 : (!lin.is_nf4 && opt.round == MergeRound::F32))) continue;
      const int64_t out = lin.out, in = lin.in, n = out * in;
      host.resize(n);
      DeviceBuffer W(be_, sizeof(float) * n);  // [out, in] fp32 base
      if (lin.is_nf4) {
        be_.nf4_dequantize(lin.nf4, W.f32());
      } else {
        be_.download(host.data(), lin.weight.data(), sizeof(float) * n);
        be_.upload(W.data(), host.data(), sizeof(float) * n);
      }
      if (m)  // W += (±scale * scaling) * B[out, r] · A[r, in]
        be_.gemm_nn(out, in, m->r, (opt.subtract ? -scale : scale) * m->scaling, m->B.f32(), m->r, m->A.f32(), in,
                    1.0f, W.f32(), in);
      be_.download(host.data(), W.data(), sizeof(float) * n);
      W.reset();
      const std::string where = "layer " + std::to_string(l) + " " + proj_name(p);
      for (int64_t i = 0; i < n; ++i) {
        float v = host[i];
        if (opt.round == MergeRound::BF16) v = round_to_bf16(v);
        else if (opt.round == MergeRound::F16) v = round_to_f16(v);
        if (!std::isfinite(v))
          throw ValueError(what + ": " + where + ": merged weight " + std::to_string(host[i]) + " at [" +
                           std::to_string(i / in) + ", " + std::to_string(i % in) + "] is not finite in " +
                           round_name(opt.round) + "; nothing was changed");
        host[i] = v;
      }
      QuantSpec spec;  // the base's own codec parameters (model-wide spec for an fp32 base)
      spec.nf4 = opt.requantize;
      spec.blocksize = lin.is_nf4 ? lin.nf4.blocksize : w.quant.blocksize;
      spec.double_quant = lin.is_nf4 ? lin.nf4.double_quant : w.quant.double_quant;
      Staged s{&lin, Linear{}};
      s.lin.out = out, s.lin.in = in;
      s.lin.set_weight(be_, host.data(), DType::F32, spec);
      staged.push_back(std::move(s));
    }
    if (progress) progress(l + 1);
  }
  // Commit: nothing above changed the model, so an error left it as it was.
  for (Staged& s : staged) {
    s.lin.bias = std::move(s.dst->bias);
    *s.dst = std::move(s.lin);  // DeviceBuffer moves keep the Nf4Ref pointers valid
  }
  if (!opt.subtract) {
    merged_scale_ = scale;
    std::lock_guard<std::mutex> lk(adapters_mu_);
    if (active_ == ad) active_.reset(), active_name_.clear();  // merged: applying it again would double it
  }
}

}  // namespace qlora::model
