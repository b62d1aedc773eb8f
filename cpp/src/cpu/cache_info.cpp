#include "cpu/cache_info.hpp"

#include <cstdlib>
#include <fstream>
#include <sstream>

#include "common/error.hpp"

#if defined(QLORA_X86) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#endif

namespace qlora::cpu {

namespace {

bool read_line(const std::string& path, std::string& out) {
  std::ifstream f(path);
  return static_cast<bool>(std::getline(f, out));
}

// "32K", "1024K", "2M", "512" -> bytes; -1 when malformed.
int64_t parse_size(const std::string& s) {
  if (s.empty()) return -1;
  size_t i = 0;
  int64_t v = 0;
  while (i < s.size() && s[i] >= '0' && s[i] <= '9') {
    if (v > (int64_t{1} << 40)) return -1;
    v = v * 10 + (s[i++] - '0');
  }
  if (i == 0) return -1;
  std::string suf = s.substr(i);
  if (!suf.empty() && (suf.back() == 'B' || suf.back() == 'b')) suf.pop_back();
  if (suf.empty()) return v;
  if (suf.size() != 1) return -1;
  switch (suf[0]) {
    case 'K': case 'k': return v << 10;
    case 'M': case 'm': return v << 20;
    case 'G': case 'g': return v << 30;
  }
  return -1;
}

// Logical CPUs in a sysfs shared_cpu_list such as "0-7,16-23".
int count_cpu_list(const std::string& s) {
  int n = 0;
  std::stringstream ss(s);
  std::string part;
  while (std::getline(ss, part, ',')) {
    const size_t dash = part.find('-');
    if (dash == std::string::npos) {
      if (!part.empty()) ++n;
    } else {
      n += std::atoi(part.c_str() + dash + 1) - std::atoi(part.c_str()) + 1;
    }
  }
  return n > 0 ? n : 1;
}

#if defined(QLORA_X86) && (defined(__GNUC__) || defined(__clang__))
bool from_cpuid(CacheSizes& out) {
  unsigned a, b, c, d;
  if (!__get_cpuid(0, &a, &b, &c, &d)) return false;
  const bool amd = b == 0x68747541;  // "Auth"enticAMD
  unsigned leaf = 4;
  if (amd) {
    if (!__get_cpuid(0x80000000, &a, &b, &c, &d) || a < 0x8000001D) return false;
    leaf = 0x8000001D;
  }
  bool any = false;
  for (unsigned i = 0; i < 16; ++i) {
    __cpuid_count(leaf, i, a, b, c, d);
    const unsigned type = a & 31, level = (a >> 5) & 7;
    if (type == 0) break;
    if (type == 2) continue;  // instruction cache
    const int64_t line = (b & 0xfff) + 1, parts = ((b >> 12) & 0x3ff) + 1, ways = ((b >> 22) & 0x3ff) + 1;
    const int64_t size = line * parts * ways * (int64_t{c} + 1);
    const int sharing = static_cast<int>(((a >> 14) & 0xfff) + 1);
    if (level == 1) out.l1d = size, out.line = line;
    if (level == 2) out.l2 = sharing > 2 ? size / sharing : size;  // an L2 shared by a module: a core's share
    if (level == 3) out.l3 = size, out.l3_sharing = sharing;
    any = true;
  }
  return any;
}
#endif

CacheSizes detect() {
  CacheSizes cs;
  if (cache_sizes_from_sysfs("/sys/devices/system/cpu/cpu0/cache", cs)) {
    cs.source = "sysfs";
  }
#if defined(QLORA_X86) && (defined(__GNUC__) || defined(__clang__))
  else if (from_cpuid(cs)) {
    cs.source = "cpuid";
  }
#endif
  if (const char* env = std::getenv("QLORA_CACHE_SIZES")) {
    try {
      apply_cache_override(env, cs);
    } catch (const ValueError&) {
      // A bad override is ignored rather than failing at import (qlora-native info shows the sizes).
    }
  }
  return cs;
}

}  // namespace

bool cache_sizes_from_sysfs(const std::string& root, CacheSizes& out) {
  bool any = false;
  for (int i = 0; i < 16; ++i) {
    const std::string dir = root + "/index" + std::to_string(i) + "/";
    std::string level, type, size, line, shared;
    if (!read_line(dir + "level", level) || !read_line(dir + "type", type) || !read_line(dir + "size", size)) {
      if (i > 0 && any) break;
      continue;
    }
    const int64_t bytes = parse_size(size);
    if (bytes <= 0 || type == "Instruction") continue;
    const int sharing = read_line(dir + "shared_cpu_list", shared) ? count_cpu_list(shared) : 1;
    if (level == "1") {
      out.l1d = bytes;
      if (read_line(dir + "coherency_line_size", line) && parse_size(line) > 0) out.line = parse_size(line);
    } else if (level == "2") {
      out.l2 = sharing > 2 ? bytes / sharing : bytes;  // SMT siblings share a core's L2; a module's L2 is split
    } else if (level == "3") {
      out.l3 = bytes;
      out.l3_sharing = sharing;
    } else {
      continue;
    }
    any = true;
  }
  return any;
}

void apply_cache_override(const std::string& spec, CacheSizes& out) {
  std::stringstream ss(spec);
  std::string item;
  CacheSizes cs = out;
  while (std::getline(ss, item, ',')) {
    if (item.empty()) continue;
    const size_t eq = item.find('=');
    const std::string key = item.substr(0, eq);
    const int64_t v = eq == std::string::npos ? -1 : parse_size(item.substr(eq + 1));
    check_arg(v >= 1024 && v <= (int64_t{1} << 34),
              "QLORA_CACHE_SIZES: '" + item + "' is not NAME=SIZE with a size from 1K to 16G");
    if (key == "l1d") cs.l1d = v;
    else if (key == "l2") cs.l2 = v;
    else if (key == "l3") cs.l3 = v;
    else throw ValueError("QLORA_CACHE_SIZES: unknown cache '" + key + "' (expected l1d, l2 or l3)");
  }
  cs.source = out.source + "+env";
  out = cs;
}

const CacheSizes& cache_sizes() {
  static const CacheSizes cs = detect();
  return cs;
}

}  // namespace qlora::cpu
