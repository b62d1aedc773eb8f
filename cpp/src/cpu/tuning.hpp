// Kernel variants whose best choice depends on the microarchitecture and cannot be derived from
// the cache sizes or the feature flags (e.g. how many ports run a shuffle): picked by a short
// measurement on first use, remembered for the process and per machine in a small text file.
// Only for variants with the same results bit for bit, so a choice changes speed, never output.
//
// The file: QLORA_TUNE_CACHE (a path; "off": none), else $XDG_CACHE_HOME/qlora_native/tuning.txt
// or ~/.cache/qlora_native/tuning.txt. One line per (machine, key): "machine<TAB>key<TAB>choice",
// machine = cpu_signature(); lines of other machines are kept (a home shared by several hosts),
// unreadable lines are ignored, the file is rewritten atomically (temporary + rename) and a
// failure to write it is ignored (the choice stays for the process). Only a regular file of at most
// 1 MiB (through a symlink: its target) or nothing is read / written: a device, fifo, directory or
// larger file at the path is left alone. QLORA_TUNE=0: no measurement
// and no file, every key takes its default.
#pragma once
#include <functional>
#include <string>
#include <vector>

namespace qlora::cpu::tuning {

// The variant to run for `key` (a name with a version, e.g. "nf4_gemv_avx2_decode.v1"): a name
// from `names`, as an index. `forced` >= 0 (an env switch the caller read): that one. Else the
// process's earlier choice, the file's, or a measurement: `time_once(i)` runs variant i once on a
// small fixed problem and returns its seconds; rounds alternate the variants, each keeps its
// fastest run, and a variant other than `fallback` must beat it by 3% to be chosen. Thread-safe;
// the first caller of a key measures while the others wait.
int choose(const std::string& key, const std::vector<std::string>& names, int fallback, int forced,
           const std::function<double(int)>& time_once);

struct Entry {
  std::string key, choice;
  std::string source;                // "measured", "file", "env", "default" (QLORA_TUNE=0)
  std::vector<std::string> names;    // the variants
  std::vector<double> best_seconds;  // per variant where measured in this process, else empty
};
std::vector<Entry> report();  // this process's choices, by key
void reset();                 // forget them (tests: the next choose() reads the file or measures)

// "vendor family model stepping | brand string | flags" of the running CPU: the file's machine key.
std::string cpu_signature();
std::string cache_path();  // the file's path now ("" when off)

}  // namespace qlora::cpu::tuning
