// The C API's registries of live handles (models, tokenizers, adapters, contexts): a handle is live
// from the call that made it until the call that frees it, so a call given a freed, double-freed or
// foreign pointer gets an error instead of dereferencing it. One rule, one template.
#pragma once
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <unordered_map>

namespace qlora::capi {

// Info: what the registry keeps with each handle (the tokenizer's "its model owns it"). Thread-safe
// on its own; callers that check a handle together with other state (capi_context.cpp's g_mu) hold
// their own lock around these calls (lock order: theirs, then this one's).
template <class H, class Info = bool>
class LiveHandles {
 public:
  void add(const H* h, Info info = Info{}) {
    std::unique_lock<std::shared_mutex> lk(mu_);
    live_.emplace(h, std::move(info));
  }
  bool live(const H* h) const {
    std::shared_lock<std::shared_mutex> lk(mu_);
    return h && live_.count(h) != 0;
  }
  // A free's check and removal in one step: nullopt when h is not live (nothing changes), else its
  // Info; h stays live when keep(Info) (a free the handle's kind refuses, e.g. a model's tokenizer).
  template <class Keep>
  std::optional<Info> remove_unless(const H* h, Keep keep) {
    std::unique_lock<std::shared_mutex> lk(mu_);
    auto it = live_.find(h);
    if (it == live_.end()) return std::nullopt;
    Info info = it->second;
    if (!keep(info)) live_.erase(it);
    return info;
  }
  bool remove(const H* h) {  // false when h was not live
    return remove_unless(h, [](const Info&) { return false; }).has_value();
  }

 private:
  mutable std::shared_mutex mu_;
  std::unordered_map<const H*, Info> live_;
};

}  // namespace qlora::capi
