// A test backend with the core ops and a chosen list of optional ones; it runs nothing: alloc
// throws, so a test can check that a refusal comes before any allocation (allocs counts tries);
// refusal_of(fn): the ValueError message fn throws.
// Not a ctest program itself: CMake makes programs of cpp/tests/*.cpp only.
#pragma once
#include <algorithm>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "backend.hpp"
#include "common/error.hpp"

namespace qlora::test {

class FakeBackend final : public Backend {
 public:
  explicit FakeBackend(std::vector<std::string> extra) : extra_(std::move(extra)) {}
  std::string name() const override { return "fake"; }
  bool host_memory() const override { return false; }
  bool supports_op(const std::string& op) const override {
    return Backend::supports_op(op) || std::find(extra_.begin(), extra_.end(), op) != extra_.end();
  }
  void* alloc(size_t) override {
    ++allocs;
    throw std::runtime_error("fake: alloc must not be reached");
  }
  void free(void*) override {}
  void upload(void*, const void*, size_t) override { ++allocs; }
  void download(void*, const void*, size_t) override {}
  void synchronize() override {}
  void gemm_nt(int64_t, int64_t, int64_t, float, const float*, int64_t, const float*, int64_t, float, float*,
               int64_t) override {}
  void gemm_nn(int64_t, int64_t, int64_t, float, const float*, int64_t, const float*, int64_t, float, float*,
               int64_t) override {}
  void gemm_tn(int64_t, int64_t, int64_t, float, const float*, int64_t, const float*, int64_t, float, float*,
               int64_t) override {}
  void nf4_gemm_nt(int64_t, float, const float*, int64_t, const Nf4Ref&, float, float*, int64_t) override {}
  void nf4_gemm_nn(int64_t, float, const float*, int64_t, const Nf4Ref&, float, float*, int64_t) override {}
  void nf4_dequantize(const Nf4Ref&, float*) override {}
  int allocs = 0;  // alloc and upload calls: a refusal must come before either

 private:
  std::vector<std::string> extra_;
};

// The message of the ValueError fn() throws: "" when it returns, "wrong exception: ..." for another.
template <class Fn>
std::string refusal_of(const Fn& fn) {
  try {
    fn();
  } catch (const ValueError& e) {
    return e.what();
  } catch (const std::exception& e) {
    return std::string("wrong exception: ") + e.what();
  }
  return "";
}

}  // namespace qlora::test
