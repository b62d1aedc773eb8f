#include "api/capi_error.hpp"

#include <exception>
#include <new>
#include <stdexcept>

#include "common/error.hpp"
#include "io/mapped_file.hpp"

namespace qlora::capi {

namespace {
thread_local std::string t_last_error;
thread_local int t_last_status = QLORA_OK;
}

void clear_error() {
  t_last_error.clear();
  t_last_status = QLORA_OK;
}

int set_error(int code, const std::string& msg) {
  t_last_status = code;
  try {
    t_last_error = msg;
  } catch (...) {  // out of memory while copying the message: keep the status at least
    t_last_error.clear();
  }
  return code;
}

std::string out_of_memory_message(const std::bad_alloc& e) {
  const char* w = e.what();
  const std::string what = w ? w : "";
  // libstdc++ / libc++ spellings of the library's own, messageless bad_alloc family
  if (what.empty() || what == "std::bad_alloc" || what == "bad_alloc" || what == "std::bad_array_new_length" ||
      what == "bad_array_new_length")
    return "out of memory";
  if (what.find("out of") != std::string::npos || what.find("memory") != std::string::npos) return what;
  return "out of memory: " + what;
}

int set_error_from_current_exception() {
  // Most specific first: FormatError derives from ValueError.
  try {
    throw;
  } catch (const FormatError& e) {
    return set_error(QLORA_ERR_FORMAT, e.what());
  } catch (const ValueError& e) {
    return set_error(QLORA_ERR_INVALID_ARGUMENT, e.what());
  } catch (const io::FileError& e) {
    return set_error(QLORA_ERR_IO, e.what());
  } catch (const std::bad_alloc& e) {
    // Keep the engine's message (a device OOM names the request, what is in use and reserved);
    // a bare std::bad_alloc's what() ("std::bad_alloc") says nothing, so it gets the generic text.
    return set_error(QLORA_ERR_OUT_OF_MEMORY, out_of_memory_message(e));
  } catch (const std::exception& e) {
    return set_error(QLORA_ERR_RUNTIME, e.what());
  } catch (...) {
    return set_error(QLORA_ERR_RUNTIME, "unknown error");
  }
}

}  // namespace qlora::capi

extern "C" QLORA_API const char* qlora_last_error(void) { return qlora::capi::t_last_error.c_str(); }
extern "C" QLORA_API int qlora_last_status(void) { return qlora::capi::t_last_status; }
