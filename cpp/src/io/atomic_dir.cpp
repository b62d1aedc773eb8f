#include "io/atomic_dir.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <filesystem>
#include <map>
#include <mutex>
#include <random>
#include <regex>
#include <set>
#include <thread>

#include "io/mapped_file.hpp"
#include "json/json.hpp"

namespace qlora::io {

namespace fs = std::filesystem;

namespace {

// ---------------------------------------------------------------- names (atomic_io.py's)
const char* const kRemoveList = ".qlora-remove.json";  // in a commit directory: names the roll-forward deletes
constexpr double kOwnedAge = 24 * 3600.0;  // a temporary whose owner looks alive is still stale after this
constexpr double kUnownedAge = 600.0;      // a temporary without an owner we can check
constexpr double kWaitSwap = 2.0;          // wait this long for a live saver to finish its two-rename swap

const std::regex& re_ours() {  // .NAME.qlora-KIND.HOST-PID-RANDOM
  static const std::regex r(R"(\.(.+)\.qlora-(tmp|old|commit)\.([0-9a-f]{8})-(\d+)-[0-9a-f]{8})");
  return r;
}
const std::regex& re_cpp_tmp() {  // earlier versions of AtomicFileWriter
  static const std::regex r(R"(.+\.safetensors\.tmp\.(\d+)\.\d+\.\d+)");
  return r;
}
const std::regex& re_legacy_tmp() {  // mkstemp / mkdtemp names of earlier versions, and our old fixed name
  static const std::regex r(
      R"((?:\.checkpoint-\d+\.[a-z0-9_]{8}\.tmp|\.(?:adapter_config\.json|trainer_log\.jsonl)\.[a-z0-9_]{8}\.tmp|\.config\.json\.[a-z0-9_]{8}|adapter_config\.json\.tmp))");
  return r;
}
const std::regex& re_legacy_old() {  // holds the old directory as "x"
  static const std::regex r(R"(\.(checkpoint-\d+)\.old\.[a-z0-9_]{8})");
  return r;
}

// ---------------------------------------------------------------- host tag
// FNV-1a (32 bit) of the host name, 8 hex digits: the same as atomic_io.py's _host_tag, so either side
// tells its own host's temporaries (whose owner pid it can check) from another machine's.
std::string fnv1a_hex(const std::string& msg) {
  uint32_t h = 0x811c9dc5u;
  for (unsigned char c : msg) h = (h ^ c) * 0x01000193u;
  char out[9];
  std::snprintf(out, sizeof out, "%08x", h);
  return std::string(out, 8);
}

const std::string& host_hash() {
  static const std::string h = [] {
    char buf[HOST_NAME_MAX + 1] = {};
    if (::gethostname(buf, sizeof buf - 1) != 0) buf[0] = '\0';
    return fnv1a_hex(buf);
  }();
  return h;
}

// ---------------------------------------------------------------- small helpers
std::mutex g_inflight_mu;
std::multiset<std::string> g_inflight;  // keys (inflight_key), one per registration

struct Inflight {  // registered for its lifetime
  std::string p;
  explicit Inflight(std::string path) : p(std::move(path)) { register_inflight(p); }
  ~Inflight() { unregister_inflight(p); }
};

std::string join(const std::string& d, const std::string& n) { return d == "/" ? "/" + n : d + "/" + n; }

bool lexists(const std::string& p) {
  struct stat st {};
  return ::lstat(p.c_str(), &st) == 0;
}

bool is_real_dir(const std::string& p) {  // a directory, not a symlink to one
  struct stat st {};
  return ::lstat(p.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

void fsync_dir(const std::string& d) {  // best effort: some filesystems refuse fsync on directories
  const int fd = ::open(d.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return;
  ::fsync(fd);
  ::close(fd);
}

void fsync_file(const std::string& p) {
  const int fd = ::open(p.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
  if (fd < 0) throw FileError(errno, p, "cannot open");
  const int rc = ::fsync(fd), e = errno;
  ::close(fd);
  if (rc != 0) throw FileError(e, p, "cannot fsync");
}

std::vector<std::string> list_dir(const std::string& d) {  // throws FileError
  DIR* dir = ::opendir(d.c_str());
  if (!dir) throw FileError(errno, d, "cannot list");
  std::vector<std::string> out;
  while (const dirent* e = ::readdir(dir)) {
    const std::string n = e->d_name;
    if (n != "." && n != "..") out.push_back(n);
  }
  ::closedir(dir);
  std::sort(out.begin(), out.end());
  return out;
}

void remove_path(const std::string& p) noexcept {
  std::error_code ec;
  fs::remove_all(p, ec);  // does not follow symlinks
}

void rename_or_throw(const std::string& a, const std::string& b) {
  if (::rename(a.c_str(), b.c_str()) != 0) throw FileError(errno, a, "cannot rename (to '" + b + "')");
}

bool alive(long pid) {
  if (pid <= 0 || pid > INT_MAX) return false;
  if (::kill(static_cast<pid_t>(pid), 0) == 0) return true;
  return errno == EPERM;  // exists, another user's
}

double age(const std::string& p) {
  struct stat st {};
  if (::lstat(p.c_str(), &st) != 0) return 0.0;
  return std::difftime(std::time(nullptr), st.st_mtime);
}

// True when the save that made p is over: its pid is dead here, or p is too old to matter.
// host / pid empty: unknown (atomic_io._stale).
bool stale(const std::string& p, const std::string* host, long pid, bool have_pid) {
  if (!have_pid) return age(p) > kUnownedAge;
  if (age(p) > kOwnedAge) return true;
  if (host && *host != host_hash()) return false;  // another host's: its pids mean nothing here
  if (pid == static_cast<long>(::getpid())) return host != nullptr && !is_inflight(p);
  return !alive(pid);
}

bool mount_point(const std::string& p) {  // os.path.ismount
  struct stat a {}, b {};
  if (::lstat(p.c_str(), &a) != 0 || S_ISLNK(a.st_mode)) return false;
  if (::lstat((p + "/..").c_str(), &b) != 0) return false;
  return a.st_dev != b.st_dev || a.st_ino == b.st_ino;
}

bool holds_cwd(const std::string& d) {  // swapping away our own working directory would strand relative paths
  char cwd[PATH_MAX], real[PATH_MAX];
  if (!::getcwd(cwd, sizeof cwd) || !::realpath(d.c_str(), real)) return false;
  std::string c = cwd, r = real;
  while (r.size() > 1 && r.back() == '/') r.pop_back();
  return c == r || c.rfind(r + "/", 0) == 0 || r == "/";
}

bool leftover(const std::string& n) {
  return std::regex_match(n, re_ours()) || std::regex_match(n, re_cpp_tmp()) ||
         std::regex_match(n, re_legacy_tmp()) || std::regex_match(n, re_legacy_old());
}

// renameat2(RENAME_EXCHANGE) (Linux >= 3.15); false when the system cannot (the caller falls back).
bool exchange_dirs(const std::string& a, const std::string& b) {
#if defined(__linux__) && defined(SYS_renameat2)
  const char* no = std::getenv("QLORA_TEST_NO_EXCHANGE");  // test-only: exercise the two-rename fallback
  if (no && *no && std::string(no) != "0") return false;
  constexpr unsigned kRenameExchange = 2;
  if (::syscall(SYS_renameat2, AT_FDCWD, a.c_str(), AT_FDCWD, b.c_str(), kRenameExchange) == 0) return true;
  const int e = errno;
  if (e == EINVAL || e == ENOSYS || e == EOPNOTSUPP || e == ENOTSUP || e == EPERM) return false;
  throw FileError(e, a, "cannot exchange (with '" + b + "')");
#else
  (void)a, (void)b;
  return false;
#endif
}

// Move a committed set of files into d (idempotent: a killed roll-forward is simply rerun).
void roll_forward(const std::string& commit, const std::string& d) {
  std::vector<std::string> remove;
  try {
    const json::Value v = json::parse(read_file(join(commit, kRemoveList)));
    if (v.is_array())
      for (const auto& x : v.as_array())
        if (x.is_string()) remove.push_back(x.as_string());
  } catch (...) {  // absent (nothing to remove) or unreadable
  }
  std::vector<std::string> entries;
  try {
    entries = list_dir(commit);
  } catch (const FileError& e) {
    if (e.err == ENOENT) return;  // finished meanwhile by a concurrent roll-forward
    throw;
  }
  bool first = true;
  for (const std::string& e : entries) {
    if (e == kRemoveList) continue;
    if (::rename(join(commit, e).c_str(), join(d, e).c_str()) != 0 && errno != ENOENT)  // ENOENT: moved meanwhile
      throw FileError(errno, join(commit, e), "cannot rename (to '" + join(d, e) + "')");
    if (first) test_fault("roll-forward-mid"), first = false;
  }
  for (const std::string& r : remove)
    if (!r.empty() && r.find('/') == std::string::npos && r != "." && r != "..") ::unlink(join(d, r).c_str());
  fsync_dir(d);
  test_fault("roll-forward-end");
  remove_path(commit);
}

// A displaced old copy whose target is missing: the swap was killed between its renames. Put it
// back once the saver is gone (a live one finishes within microseconds; wait, but not forever).
void restore(const std::string& old, const std::string& target, const std::string* host, long pid, bool have_pid,
             const char* inner) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(kWaitSwap);
  while (!stale(old, host, pid, have_pid) && std::chrono::steady_clock::now() < deadline) {
    if (lexists(target)) return;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  if (lexists(target)) return;
  const std::string src = inner ? join(old, inner) : old;
  if (!lexists(src)) return;
  if (::rename(src.c_str(), target.c_str()) != 0) return;
  fsync_dir(fs::path(target).parent_path().string());
  if (inner) remove_path(old);
}

std::string absolute_normal(const std::string& p) {
  // FileError (OSError in Python), not fs::absolute's filesystem_error (a bare RuntimeError): ""
  // names nothing (as open("")), and a relative path fails when the working directory was removed.
  if (p.empty()) throw FileError(ENOENT, p, "cannot save to");
  std::error_code ec;
  fs::path a = fs::absolute(fs::path(p), ec);
  if (ec) throw FileError(ec.value(), p, "cannot make an absolute path of");
  a = a.lexically_normal();
  std::string s = a.string();
  while (s.size() > 1 && s.back() == '/') s.pop_back();
  return s;
}

}  // namespace

// ---------------------------------------------------------------- public helpers
std::string unique_tag() {
  static std::mutex mu;
  static std::random_device rd;
  uint32_t r;
  {
    std::lock_guard<std::mutex> lock(mu);
    r = rd();
  }
  char rnd[9];
  std::snprintf(rnd, sizeof rnd, "%08x", r);
  return host_hash() + "-" + std::to_string(::getpid()) + "-" + rnd;
}

namespace {
// The registry's key for a path: its directory's identity (device, inode) and its name, so every
// spelling of one temporary (a symlinked directory, "..", "//": Python's os.path.abspath and the
// engine's normalization differ there) is one key. The text itself where the directory cannot be
// stat'ed.
std::string inflight_key(const std::string& p) {
  const size_t slash = p.find_last_of('/');
  const std::string dir = slash == std::string::npos ? "." : slash == 0 ? "/" : p.substr(0, slash);
  struct stat st {};
  if (::stat(dir.c_str(), &st) != 0) return p;
  return std::to_string(st.st_dev) + ":" + std::to_string(st.st_ino) + "/" + p.substr(slash + 1);
}
std::map<std::string, std::string> g_key_of;  // registered text -> its key (its directory may go first)
}  // namespace

void register_inflight(const std::string& p) {
  const std::string k = inflight_key(p);
  std::lock_guard<std::mutex> lock(g_inflight_mu);
  g_key_of[p] = k;
  g_inflight.insert(k);
}

void unregister_inflight(const std::string& p) {
  std::lock_guard<std::mutex> lock(g_inflight_mu);
  const auto it = g_key_of.find(p);
  if (it == g_key_of.end()) return;
  if (const auto k = g_inflight.find(it->second); k != g_inflight.end()) g_inflight.erase(k);
  g_key_of.erase(it);
}

bool is_inflight(const std::string& p) {
  const std::string k = inflight_key(p);
  std::lock_guard<std::mutex> lock(g_inflight_mu);
  return g_inflight.count(k) != 0;
}

void test_fault(const char* step) {
  const char* env = std::getenv("QLORA_TEST_FAULT");
  if (!env || !*env) return;
  if (env[0] == '#') {  // "#N": the N-th fault point this process reaches, whatever its name (kill sweeps)
    static std::atomic<long> reached{0};
    if (++reached == std::atol(env + 1)) ::kill(::getpid(), SIGKILL);
    return;
  }
  const std::string s = env, want = step;
  size_t pos = 0;
  while (pos <= s.size()) {
    const size_t end = std::min(s.find(',', pos), s.size());
    if (s.compare(pos, end - pos, want) == 0 && end - pos == want.size()) ::kill(::getpid(), SIGKILL);
    pos = end + 1;
  }
}

void write_file_atomic(const std::string& path, const std::string& data) {
  AtomicFileWriter w(path);
  w.write(data.data(), data.size());
  w.commit();
}

void cleanup_dir(const std::string& d, const std::string* name) {
  std::vector<std::string> entries;
  try {
    entries = list_dir(d);
  } catch (...) {
    return;
  }
  for (const std::string& e : entries) {
    const std::string p = join(d, e);
    try {
      std::smatch m;
      if (std::regex_match(e, m, re_ours())) {
        if (name && m[1].str() != *name) continue;
        const std::string host = m[3].str();
        long pid = 0;
        try {
          pid = std::stol(m[4].str());
        } catch (...) {
          pid = -1;  // out of range: no such process
        }
        const std::string kind = m[2].str(), target = join(d, m[1].str());
        if (kind == "commit") {
          roll_forward(p, d);  // complete and durable: anyone may finish it
        } else if (kind == "old" && !lexists(target)) {
          restore(p, target, &host, pid, true, nullptr);
        } else if (stale(p, &host, pid, true)) {
          remove_path(p);
        }
        continue;
      }
      if (name) continue;
      if (std::regex_match(e, m, re_legacy_old())) {
        const std::string target = join(d, m[1].str());
        if (!lexists(target)) restore(p, target, nullptr, 0, false, "x");
        else if (stale(p, nullptr, 0, false)) remove_path(p);
        continue;
      }
      if (std::regex_match(e, m, re_cpp_tmp())) {
        long pid = -1;
        try {
          pid = std::stol(m[1].str());
        } catch (...) {
        }
        if (stale(p, nullptr, pid, true)) remove_path(p);
      } else if (std::regex_match(e, re_legacy_tmp()) && stale(p, nullptr, 0, false)) {
        remove_path(p);
      }
    } catch (...) {  // best effort, like atomic_io.cleanup
      continue;
    }
  }
}

void recover_dir(const std::string& dir) {
  const std::string p = absolute_normal(dir);
  const fs::path fp(p);
  const std::string name = fp.filename().string();
  cleanup_dir(fp.parent_path().string(), &name);
  struct stat st {};
  if (::stat(p.c_str(), &st) == 0 && S_ISDIR(st.st_mode)) cleanup_dir(p);
}

// ---------------------------------------------------------------- DirSaver
DirSaver::DirSaver(const std::string& final_dir, std::vector<std::string> obsolete) : obsolete_(std::move(obsolete)) {
  final_ = absolute_normal(final_dir);
  const fs::path fp(final_);
  parent_ = fp.parent_path().string();
  name_ = fp.filename().string();
  if (name_.empty() || name_ == "." || name_ == "..") throw FileError(EINVAL, final_dir, "cannot save a directory to");
  struct stat st {};
  if (::stat(final_.c_str(), &st) == 0 && !S_ISDIR(st.st_mode))
    throw FileError(ENOTDIR, final_, "cannot save a directory to (it exists and is not a directory)");
  std::error_code ec;
  fs::create_directories(parent_, ec);  // mode 0777 & ~umask
  if (ec) throw FileError(ec.value(), parent_, "cannot create directory");
  cleanup_dir(parent_, &name_);
  if (::stat(final_.c_str(), &st) == 0 && S_ISDIR(st.st_mode)) cleanup_dir(final_);
  tag_ = unique_tag();
  // Beside the target, so that it can be swapped in; inside it when it is a symlink or mount
  // point (its own filesystem) or when the parent is not writable (then only a journal commit).
  const bool inside = (::lstat(final_.c_str(), &st) == 0 && S_ISLNK(st.st_mode)) || mount_point(final_);
  const std::string leaf = "." + name_ + ".qlora-tmp." + tag_;
  staging_ = join(inside ? final_ : parent_, leaf);
  register_inflight(staging_);  // before mkdir: a concurrent cleanup in this process keeps it
  if (::mkdir(staging_.c_str(), 0777) != 0) {
    const int e = errno;
    unregister_inflight(staging_);
    if (!((e == EACCES || e == EPERM) && !inside && is_real_dir(final_))) throw FileError(e, staging_, "cannot create directory");
    staging_ = join(final_, leaf);
    register_inflight(staging_);
    if (::mkdir(staging_.c_str(), 0777) != 0) {
      const int e2 = errno;
      unregister_inflight(staging_);
      throw FileError(e2, staging_, "cannot create directory");
    }
  }
}

DirSaver::~DirSaver() {
  if (!done_) remove_path(staging_);
  unregister_inflight(staging_);
}

void DirSaver::commit() {
  test_fault("commit");
  const std::vector<std::string> fresh = list_dir(staging_);
  for (const std::string& e : fresh) {  // writers may not have fsync'ed; ours did (cheap again)
    struct stat st {};
    if (::lstat(join(staging_, e).c_str(), &st) != 0) throw FileError(errno, join(staging_, e), "cannot stat");
    if (S_ISDIR(st.st_mode)) throw FileError(EISDIR, join(staging_, e), "DirSaver saves files only, not the directory");
    if (S_ISREG(st.st_mode)) fsync_file(join(staging_, e));
  }
  fsync_dir(staging_);
  const bool beside = fs::path(staging_).parent_path().string() == parent_;
  if (beside && !lexists(final_)) {
    test_fault("rename-fresh");
    if (::rename(staging_.c_str(), final_.c_str()) == 0) {
      done_ = true;
      fsync_dir(parent_);
      return;
    }
    if (errno != EEXIST && errno != ENOTEMPTY) throw FileError(errno, staging_, "cannot rename (to '" + final_ + "')");
    // created meanwhile by someone else: replace it like any other
  }
  const std::vector<std::string> have = list_dir(final_);
  auto listed = [](const std::vector<std::string>& v, const std::string& n) {
    return std::find(v.begin(), v.end(), n) != v.end();
  };
  bool only_ours = beside && !holds_cwd(final_);
  for (const std::string& e : have)
    if (!(listed(fresh, e) || listed(obsolete_, e) || leftover(e))) only_ours = false;

  if (only_ours) {
    // Swap: the directory keeps its mode (like open() of an existing file).
    struct stat st {};
    if (::stat(final_.c_str(), &st) == 0) ::chmod(staging_.c_str(), st.st_mode & 07777);
    test_fault("exchange");
    if (exchange_dirs(staging_, final_)) {
      done_ = true;
      fsync_dir(parent_);
      test_fault("remove-old");
      remove_path(staging_);  // now the old save
      return;
    }
    const std::string old = join(parent_, "." + name_ + ".qlora-old." + tag_);
    Inflight reg(old);
    rename_or_throw(final_, old);
    test_fault("rename-new");  // the window recover_dir() / atomic_io.recover() repairs
    if (::rename(staging_.c_str(), final_.c_str()) != 0) {
      const int e = errno;
      ::rename(old.c_str(), final_.c_str());
      throw FileError(e, staging_, "cannot rename (to '" + final_ + "')");
    }
    done_ = true;
    fsync_dir(parent_);
    test_fault("remove-old");
    remove_path(old);
    return;
  }

  // Journal: the target holds other files, which must survive.
  std::vector<std::string> remove;
  for (const std::string& e : have)
    if (listed(obsolete_, e) && !listed(fresh, e)) remove.push_back(e);
  if (!remove.empty()) {
    json::Array arr;
    for (const std::string& r : remove) arr.emplace_back(r);
    write_file_atomic(join(staging_, kRemoveList), json::dump(json::Value(arr)));
  }
  const std::string commit = join(final_, "." + name_ + ".qlora-commit." + tag_);
  test_fault("journal-commit");
  rename_or_throw(staging_, commit);  // the commit point
  done_ = true;
  fsync_dir(final_);
  fsync_dir(fs::path(staging_).parent_path().string());
  roll_forward(commit, final_);
}

}  // namespace qlora::io
