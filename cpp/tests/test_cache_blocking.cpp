// ctest for the cache-derived blocking (issue 15): the sysfs cache parser on a fake tree, the
// QLORA_CACHE_SIZES override, and gemm_blocking's rules (which reproduce the values measured on
// a 1 MiB-L2 host and follow other cache sizes).
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

#include <unistd.h>

#include "check.hpp"
#include "common/error.hpp"
#include "cpu/cache_info.hpp"
#include "cpu/gemm.hpp"
#include "cpu/gemm_kernels.hpp"

using namespace qlora;
using namespace qlora::cpu;
namespace fs = std::filesystem;

namespace {

void put(const fs::path& dir, const char* name, const std::string& value) {
  fs::create_directories(dir);
  std::ofstream(dir / name) << value << "\n";
}

void index_dir(const fs::path& root, int i, const char* level, const char* type, const char* size, const char* shared) {
  const fs::path d = root / ("index" + std::to_string(i));
  put(d, "level", level);
  put(d, "type", type);
  put(d, "size", size);
  put(d, "shared_cpu_list", shared);
  put(d, "coherency_line_size", "64");
}

void test_sysfs() {
  const fs::path root = fs::temp_directory_path() / ("qlora_cache_test_" + std::to_string(::getpid()));
  fs::remove_all(root);
  index_dir(root, 0, "1", "Data", "48K", "0,56");
  index_dir(root, 1, "1", "Instruction", "32K", "0,56");
  index_dir(root, 2, "2", "Unified", "2048K", "0,56");  // SMT siblings: still one core's L2
  index_dir(root, 3, "3", "Unified", "107520K", "0-55,56-111");
  CacheSizes c;
  CHECK(cache_sizes_from_sysfs(root.string(), c), "parse");
  CHECK(c.l1d == 48 << 10, "l1d %lld", static_cast<long long>(c.l1d));
  CHECK(c.l2 == 2 << 20, "l2 %lld", static_cast<long long>(c.l2));
  CHECK(c.l3 == int64_t{107520} << 10, "l3 %lld", static_cast<long long>(c.l3));
  CHECK(c.l3_sharing == 112, "sharing %d", c.l3_sharing);
  CacheSizes none;
  CHECK(!cache_sizes_from_sysfs((root / "absent").string(), none), "absent dir");
  fs::remove_all(root);
}

void test_override() {
  CacheSizes c;
  apply_cache_override("l1d=48K,l2=2M", c);
  CHECK(c.l1d == 48 << 10 && c.l2 == 2 << 20 && c.l3 == 8 << 20, "override");
  for (const char* bad : {"l2=lots", "l4=1M", "l2", "l1d=12"}) {
    bool threw = false;
    try {
      CacheSizes d;
      apply_cache_override(bad, d);
    } catch (const ValueError& e) {
      threw = contains(e.what(), "QLORA_CACHE_SIZES");
    }
    CHECK(threw, "%s must raise a ValueError naming QLORA_CACHE_SIZES", bad);
  }
}

void test_blocking() {
  using namespace gemm_k;
  CacheSizes zen;  // Zen 4 / Zen 5 class: 1 MiB L2, 32 MiB L3 shared by 2 (this VM) or 16
  zen.l1d = 32 << 10, zen.l2 = 1 << 20, zen.l3 = 32 << 20, zen.l3_sharing = 2;
  GemmBlocking b = gemm_blocking(kAvx512MR, kAvx512NR, true, zen);
  CHECK(b.kc == 1024 && b.mc == 168 && b.nc == 1024, "avx512 on 1 MiB L2: %lld %lld %lld",
        static_cast<long long>(b.kc), static_cast<long long>(b.mc), static_cast<long long>(b.nc));
  b = gemm_blocking(kAvx2MR, kAvx2NR, true, zen);  // AVX2 serves its B micro-panel from L2 too
  CHECK(b.kc == 1024 && b.mc == 168 && b.nc == 1024, "avx2 on 1 MiB L2: kc %lld mc %lld",
        static_cast<long long>(b.kc), static_cast<long long>(b.mc));
  b = gemm_blocking(kGenericMR, kGenericNR, false, zen);
  CHECK(b.kc == 256 && b.mc == 144 && b.nc == 1024, "generic on 32 KiB L1d, 1 MiB L2: kc %lld mc %lld",
        static_cast<long long>(b.kc), static_cast<long long>(b.mc));
  CacheSizes small = zen;  // Zen 2/3 or Skylake-client class: 512 KiB / 256 KiB L2
  small.l2 = 512 << 10;
  b = gemm_blocking(kAvx512MR, kAvx512NR, true, small);
  CHECK(b.kc == 512 && b.mc * b.kc * 4 <= small.l2 * 2 / 3 && b.mc % kAvx512MR == 0, "512 KiB L2: %lld %lld",
        static_cast<long long>(b.kc), static_cast<long long>(b.mc));
  small.l2 = 256 << 10;
  b = gemm_blocking(kAvx512MR, kAvx512NR, true, small);
  CHECK(b.kc == 256 && b.mc * b.kc * 4 <= small.l2 * 2 / 3, "256 KiB L2: %lld %lld", static_cast<long long>(b.kc),
        static_cast<long long>(b.mc));
  CacheSizes big = zen;  // Sapphire Rapids class: 48 KiB L1d, 2 MiB L2, 105 MiB L3 over 112 CPUs
  big.l1d = 48 << 10, big.l2 = 2 << 20, big.l3 = int64_t{105} << 20, big.l3_sharing = 112;
  b = gemm_blocking(kAvx512MR, kAvx512NR, true, big);
  CHECK(b.kc == 1024 && b.mc > 168 && b.nc >= 256 && b.nc <= 1024, "2 MiB L2: %lld %lld %lld",
        static_cast<long long>(b.kc), static_cast<long long>(b.mc), static_cast<long long>(b.nc));
  b = gemm_blocking(kGenericMR, kGenericNR, false, big);
  CHECK(b.kc == 384, "generic on 48 KiB L1d: kc %lld", static_cast<long long>(b.kc));
  // The blocking in use comes from the detected caches.
  const GemmBlocking used = gemm_blocking_in_use(SimdLevel::Generic);
  const GemmBlocking want = gemm_blocking(kGenericMR, kGenericNR, false, cache_sizes());
  CHECK(used.kc == want.kc && used.mc == want.mc && used.nc == want.nc, "in use");
#ifdef QLORA_X86
  const GemmBlocking used2 = gemm_blocking_in_use(SimdLevel::AVX2);
  const GemmBlocking want2 = gemm_blocking(kAvx2MR, kAvx2NR, true, cache_sizes());
  CHECK(used2.kc == want2.kc && used2.mc == want2.mc && used2.nc == want2.nc, "avx2 in use: the L2-panel blocking");
#endif
  CHECK(cache_sizes().l1d > 0 && cache_sizes().l2 > 0 && cache_sizes().l3 > 0, "detected");
}

}  // namespace

int main() {
  test_sysfs();
  test_override();
  test_blocking();
  if (g_failures) std::fprintf(stderr, "%d failure(s)\n", g_failures);
  return g_failures ? 1 : 0;
}
