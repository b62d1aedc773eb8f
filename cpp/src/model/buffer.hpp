// An owned allocation in a backend's memory (RAII over Backend::alloc/free).
#pragma once
#include <cstddef>
#include <utility>

#include "backend.hpp"

namespace qlora::model {

class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(Backend& be, size_t bytes) : be_(&be), bytes_(bytes), p_(bytes ? be.alloc(bytes) : nullptr) {}
  // A view of `bytes` at p inside memory another DeviceBuffer owns (e.g. one tensor of an arena):
  // used like an owner, never frees; the owner must outlive it.
  static DeviceBuffer view(void* p, size_t bytes) {
    DeviceBuffer b;
    b.bytes_ = bytes, b.p_ = p;
    return b;
  }
  ~DeviceBuffer() { reset(); }
  DeviceBuffer(DeviceBuffer&& o) noexcept { *this = std::move(o); }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
      reset();
      be_ = o.be_, bytes_ = o.bytes_, p_ = o.p_;
      o.p_ = nullptr, o.bytes_ = 0;
    }
    return *this;
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  void reset() {
    if (p_ && be_) be_->free(p_);  // be_ null: a view
    p_ = nullptr, bytes_ = 0;
  }
  size_t bytes() const { return bytes_; }
  bool empty() const { return p_ == nullptr; }
  template <class T = void>
  T* data() const { return static_cast<T*>(p_); }
  float* f32() const { return static_cast<float*>(p_); }

 private:
  Backend* be_ = nullptr;
  size_t bytes_ = 0;
  void* p_ = nullptr;
};

}  // namespace qlora::model
