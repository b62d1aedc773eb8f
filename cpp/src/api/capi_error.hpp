// Error reporting of the C API: every entry point runs its body through guard(), which turns
// any C++ exception into a qlora_status plus a thread-local message (nothing crosses into C).
#pragma once
#include <new>
#include <string>

#include "qlora/qlora.h"

namespace qlora::capi {

void clear_error();
// Records `msg` as this thread's last error and returns `code`.
int set_error(int code, const std::string& msg);
// The C API's message for an out-of-memory exception: its own what() when it carries one (the device
// pool's OutOfDeviceMemory names the request and the memory in use), else "out of memory".
std::string out_of_memory_message(const std::bad_alloc& e);
// Maps the exception in flight (call only inside a catch block) to a status and records it.
int set_error_from_current_exception();

// Runs fn() (returning int) and converts any exception; clears the last error first.
template <class F>
int guard(F&& fn) noexcept {
  clear_error();
  try {
    return fn();
  } catch (...) {
    return set_error_from_current_exception();
  }
}

}  // namespace qlora::capi
