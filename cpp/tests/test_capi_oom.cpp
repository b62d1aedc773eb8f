// ctest: the C API keeps the engine's message for an out-of-memory error (QLORA_ERR_OUT_OF_MEMORY).
// A device OOM (the caching pool's OutOfDeviceMemory, here from cpu:devsim's pool, which runs the
// CUDA backend's pool over host memory) names the request and the memory in use; the C API used to
// replace it with a bare "out of memory". A messageless std::bad_alloc still reads "out of memory".
#include <cstdint>
#include <new>
#include <string>

#include "api/capi_error.hpp"
#include "backend.hpp"
#include "check.hpp"
#include "device_pool.hpp"
#include "qlora/qlora.h"

int main() {
  using qlora::capi::guard;
  // 1. A real device-pool OOM: a request no raw allocator can serve.
  qlora::Backend& be = qlora::get_backend("cpu:devsim");
  int rc = guard([&] {
    void* p = be.alloc(static_cast<size_t>(1) << 62);
    be.free(p);
    return QLORA_OK;
  });
  CHECK(rc == QLORA_ERR_OUT_OF_MEMORY, "status %d", rc);
  CHECK(qlora_last_status() == QLORA_ERR_OUT_OF_MEMORY, "last status %d", qlora_last_status());
  CHECK(contains(qlora_last_error(), "out of device memory"), "message: %s", qlora_last_error());
  CHECK(contains(qlora_last_error(), "bytes"), "message names no size: %s", qlora_last_error());

  // 2. An OutOfDeviceMemory as the CUDA pool words it: kept verbatim.
  const std::string msg = "out of device memory: cudaMalloc failed for 2147483648 bytes (in use 7 bytes, reserved 9 bytes)";
  rc = guard([&]() -> int { throw qlora::OutOfDeviceMemory(msg); });
  CHECK(rc == QLORA_ERR_OUT_OF_MEMORY, "status %d", rc);
  CHECK(std::string(qlora_last_error()) == msg, "message: %s", qlora_last_error());

  // 3. The library's bare bad_alloc: the generic text (its what() says nothing useful).
  rc = guard([]() -> int { throw std::bad_alloc(); });
  CHECK(rc == QLORA_ERR_OUT_OF_MEMORY, "status %d", rc);
  CHECK(std::string(qlora_last_error()) == "out of memory", "message: %s", qlora_last_error());

  // 4. A bad_alloc subclass with a message that does not say it is about memory: prefixed.
  struct Custom : std::bad_alloc {
    const char* what() const noexcept override { return "pinned staging for 8 layers"; }
  };
  rc = guard([]() -> int { throw Custom(); });
  CHECK(rc == QLORA_ERR_OUT_OF_MEMORY, "status %d", rc);
  CHECK(std::string(qlora_last_error()) == "out of memory: pinned staging for 8 layers", "message: %s",
        qlora_last_error());

  // 5. A success clears the error.
  rc = guard([] { return QLORA_OK; });
  CHECK(rc == QLORA_OK && qlora_last_status() == QLORA_OK && qlora_last_error()[0] == '\0', "not cleared");
  if (g_failures) std::fprintf(stderr, "%d failure(s)\n", g_failures);
  return g_failures ? 1 : 0;
}
