#include "model/lora_infer.hpp"

#include <mutex>

namespace qlora::model {

std::shared_ptr<const LoraBf16Copy> lora_bf16_copy(Backend& be, LoraAdapter& a) {
  std::lock_guard<std::mutex> lk(a.bf16_mu);
  // Read before packing: a write racing with the build bumps the version after it, so this copy is
  // seen stale next time rather than kept.
  const uint64_t v = a.factors_version.load(std::memory_order_acquire);
  if (a.bf16 && a.bf16->version == v) return a.bf16;
  a.bf16.reset();  // the stale copy goes as soon as no pass holds it
  size_t total = 0;
  for (const auto& m : a.modules) {
    if (!m) continue;
    const size_t b = be.lora_bf16_bytes(m->r, m->in, m->out);
    if (b == 0) return nullptr;  // no bf16 LoRA kernels on this backend (at its level)
    total += (b + 63) / 64 * 64;
  }
  auto c = std::make_shared<LoraBf16Copy>();
  c->version = v;
  c->mod.assign(a.modules.size(), nullptr);
  if (total) c->buf = DeviceBuffer(be, total);
  size_t off = 0;
  for (size_t i = 0; i < a.modules.size(); ++i) {
    const LoraModule* m = a.modules[i].get();
    if (!m) continue;
    void* dst = static_cast<char*>(c->buf.data()) + off;
    be.lora_pack_bf16(m->r, m->in, m->out, m->A.f32(), m->B.f32(), dst);
    c->mod[i] = dst;
    off += (be.lora_bf16_bytes(m->r, m->in, m->out) + 63) / 64 * 64;
  }
  a.bf16 = std::move(c);
  return a.bf16;
}

void lora_factors_changed(LoraAdapter& a) {
  a.factors_version.fetch_add(1, std::memory_order_acq_rel);
  std::lock_guard<std::mutex> lk(a.bf16_mu);
  a.bf16.reset();
}

size_t lora_bf16_copy_bytes(const LoraAdapter& a) {
  std::lock_guard<std::mutex> lk(a.bf16_mu);
  return a.bf16 ? a.bf16->buf.bytes() : 0;
}

}  // namespace qlora::model
