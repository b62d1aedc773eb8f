#include "cpu/tuning.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <map>
#include <mutex>
#include <sstream>

#include "io/atomic_dir.hpp"

#if defined(QLORA_X86) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#endif

namespace qlora::cpu::tuning {

namespace {

struct State {
  std::mutex mu;
  std::map<std::string, Entry> chosen;  // by key
};
State& state() {
  static State s;
  return s;
}

bool tune_enabled() {
  const char* e = std::getenv("QLORA_TUNE");
  return !(e && std::strcmp(e, "0") == 0);
}

std::string one_field(std::string s) {  // no tab / newline inside a field of the file
  for (char& c : s)
    if (c == '\t' || c == '\n' || c == '\r') c = ' ';
  while (!s.empty() && s.back() == ' ') s.pop_back();
  while (!s.empty() && s.front() == ' ') s.erase(s.begin());
  return s;
}

struct Line {
  std::string machine, key, choice;
};

// A tuning file is a few lines; a larger one is not ours (a path given by mistake): it is neither
// read (seconds and gigabytes on the first GEMV) nor replaced.
constexpr off_t kMaxFile = 1 << 20;

// The file to read and rewrite for QLORA_TUNE_CACHE = `path`: itself when nothing is there, the file
// a symlink leads to (the link stays a link), else "" (leave it alone): a directory or a link to
// one, a dangling or looping link, a device (QLORA_TUNE_CACHE=/dev/null would become a regular file
// by the rename, as root), a fifo, a file larger than kMaxFile.
std::string file_to_use(const std::string& path) {
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0) return errno == ENOENT ? path : "";
  std::string target = path;
  if (S_ISLNK(st.st_mode)) {
    char* r = ::realpath(path.c_str(), nullptr);
    if (!r) return "";
    target = r;
    std::free(r);
    if (::stat(target.c_str(), &st) != 0) return "";
  }
  return S_ISREG(st.st_mode) && st.st_size <= kMaxFile ? target : "";
}

// The bytes of a regular file of at most kMaxFile bytes, else "" (O_NONBLOCK: a fifo put there since
// file_to_use looked does not block the open).
std::string read_small(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) return "";
  std::string out;
  struct stat st {};
  if (::fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && st.st_size <= kMaxFile) {
    char buf[1 << 14];
    for (;;) {
      const ssize_t n = ::read(fd, buf, sizeof buf);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0 || out.size() + static_cast<size_t>(n) > static_cast<size_t>(kMaxFile)) break;
      out.append(buf, static_cast<size_t>(n));
    }
  }
  ::close(fd);
  return out;
}

// Every well-formed line of the file (three non-empty tab-separated fields); nothing if it is
// missing or unreadable.
std::vector<Line> read_lines(const std::string& path) {
  std::vector<Line> out;
  std::istringstream in(read_small(path));
  std::string s;
  while (std::getline(in, s)) {
    const size_t a = s.find('\t'), b = a == std::string::npos ? a : s.find('\t', a + 1);
    if (b == std::string::npos || s.find('\t', b + 1) != std::string::npos) continue;
    Line l{s.substr(0, a), s.substr(a + 1, b - a - 1), s.substr(b + 1)};
    if (!l.machine.empty() && !l.key.empty() && !l.choice.empty()) out.push_back(std::move(l));
  }
  return out;
}

// Best effort: a read-only home or a full disk leaves the choice for this process only.
void write_choice(const std::string& path, const std::string& machine, const std::string& key,
                  const std::string& choice) {
  std::vector<Line> lines = read_lines(path);
  lines.erase(std::remove_if(lines.begin(), lines.end(),
                             [&](const Line& l) { return l.machine == machine && l.key == key; }),
              lines.end());
  lines.push_back({machine, key, choice});
  std::string data;
  for (const Line& l : lines) data += l.machine + "\t" + l.key + "\t" + l.choice + "\n";
  try {
    std::error_code ec;
    const std::filesystem::path parent = std::filesystem::path(path).parent_path();
    if (!parent.empty()) std::filesystem::create_directories(parent, ec);
    io::write_file_atomic(path, data);
  } catch (...) {
  }
}

}  // namespace

std::string cache_path() {
  if (const char* e = std::getenv("QLORA_TUNE_CACHE"); e && *e) return std::strcmp(e, "off") == 0 ? "" : e;
  if (const char* x = std::getenv("XDG_CACHE_HOME"); x && *x) return std::string(x) + "/qlora_native/tuning.txt";
  if (const char* h = std::getenv("HOME"); h && *h) return std::string(h) + "/.cache/qlora_native/tuning.txt";
  return "";
}

std::string cpu_signature() {
  static const std::string sig = [] {
    std::string s = "unknown cpu";
#if defined(QLORA_X86) && (defined(__GNUC__) || defined(__clang__))
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (__get_cpuid(0, &a, &b, &c, &d)) {
      char vendor[13] = {};
      std::memcpy(vendor, &b, 4), std::memcpy(vendor + 4, &d, 4), std::memcpy(vendor + 8, &c, 4);
      __get_cpuid(1, &a, &b, &c, &d);
      const unsigned base_family = (a >> 8) & 0xf, base_model = (a >> 4) & 0xf;
      const unsigned family = base_family == 0xf ? base_family + ((a >> 20) & 0xff) : base_family;
      const unsigned model = base_family >= 6 ? base_model | (((a >> 16) & 0xf) << 4) : base_model;
      s = std::string(vendor) + " family " + std::to_string(family) + " model " + std::to_string(model) +
          " stepping " + std::to_string(a & 0xf);
      unsigned brand[12] = {};
      if (__get_cpuid(0x80000000, &a, &b, &c, &d) && a >= 0x80000004) {
        for (unsigned i = 0; i < 3; ++i)
          __get_cpuid(0x80000002 + i, &brand[4 * i], &brand[4 * i + 1], &brand[4 * i + 2], &brand[4 * i + 3]);
        char text[49] = {};
        std::memcpy(text, brand, 48);
        s += " | " + std::string(text);
      }
    }
#endif
    return one_field(s);
  }();
  return sig;
}

int choose(const std::string& key, const std::vector<std::string>& names, int fallback, int forced,
           const std::function<double(int)>& time_once) {
  const int n = static_cast<int>(names.size());
  State& st = state();
  std::lock_guard<std::mutex> lock(st.mu);
  auto index_of = [&](const std::string& name) {
    const auto it = std::find(names.begin(), names.end(), name);
    return it == names.end() ? -1 : static_cast<int>(it - names.begin());
  };
  auto record = [&](int i, const char* source, std::vector<double> times = {}) {
    Entry& e = st.chosen[key];
    e = Entry{key, names[static_cast<size_t>(i)], source, names, std::move(times)};
    return i;
  };
  if (forced >= 0 && forced < n) return record(forced, "env");
  if (const auto it = st.chosen.find(key); it != st.chosen.end() && it->second.source != "env") {
    const int i = index_of(it->second.choice);
    if (i >= 0) return i;
  }
  if (!tune_enabled()) return record(fallback, "default");
  const std::string wanted = cache_path(), machine = cpu_signature();
  const std::string path = wanted.empty() ? wanted : file_to_use(wanted);
  if (!path.empty())
    for (const Line& l : read_lines(path))
      if (l.machine == machine && l.key == key && index_of(l.choice) >= 0) return record(index_of(l.choice), "file");
  // Measure: rounds alternate the order; each variant keeps its fastest run (the least disturbed).
  std::vector<double> best(static_cast<size_t>(n), 1e300);
  for (int r = 0; r < 7; ++r)
    for (int j = 0; j < n; ++j) {
      const int i = r % 2 ? n - 1 - j : j;
      best[static_cast<size_t>(i)] = std::min(best[static_cast<size_t>(i)], time_once(i));
    }
  int pick = fallback;
  for (int i = 0; i < n; ++i)
    if (i != fallback && best[static_cast<size_t>(i)] < 0.97 * best[static_cast<size_t>(fallback)] &&
        best[static_cast<size_t>(i)] < best[static_cast<size_t>(pick)])
      pick = i;
  if (!path.empty()) write_choice(path, machine, key, names[static_cast<size_t>(pick)]);
  return record(pick, "measured", best);
}

std::vector<Entry> report() {
  State& st = state();
  std::lock_guard<std::mutex> lock(st.mu);
  std::vector<Entry> out;
  for (const auto& kv : st.chosen) out.push_back(kv.second);
  return out;
}

void reset() {
  State& st = state();
  std::lock_guard<std::mutex> lock(st.mu);
  st.chosen.clear();
}

}  // namespace qlora::cpu::tuning
