// ctest for io::DirSaver / recover_dir (cpp/src/io/atomic_dir): a fresh save, a re-save by
// renameat2 swap and by the two-rename fallback (the directory keeps its mode), a journal commit
// into a directory with other files (kept; obsolete files removed), an abandoned save leaves the
// target untouched, recover_dir restores a displaced old copy and rolls a commit directory forward
// (atomic_io.py's names), and a save killed (SIGKILL, QLORA_TEST_FAULT) between the two renames is
// recovered to the complete old directory.
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <set>
#include <string>

#include "check.hpp"
#include "io/atomic_dir.hpp"
#include "io/mapped_file.hpp"

namespace fs = std::filesystem;
using qlora::io::DirSaver;

namespace {

std::string slurp(const fs::path& p) {
  try {
    return qlora::io::read_file(p.string());
  } catch (...) {
    return "<missing>";
  }
}

void put(const fs::path& p, const std::string& s) { std::ofstream(p, std::ios::binary) << s; }

std::set<std::string> names(const fs::path& d) {
  std::set<std::string> out;
  for (const auto& e : fs::directory_iterator(d)) out.insert(e.path().filename().string());
  return out;
}

void save(const fs::path& d, const std::string& v, std::vector<std::string> obsolete = {}) {
  DirSaver s(d.string(), std::move(obsolete));
  qlora::io::write_file_atomic(s.file("a.txt"), "a" + v);
  qlora::io::write_file_atomic(s.file("b.txt"), "b" + v);
  s.commit();
}

bool holds(const fs::path& d, const std::string& v) { return slurp(d / "a.txt") == "a" + v && slurp(d / "b.txt") == "b" + v; }

pid_t dead_pid() {
  const pid_t p = fork();
  if (p == 0) _exit(0);
  int st = 0;
  waitpid(p, &st, 0);
  return p;
}

std::string host() { return qlora::io::unique_tag().substr(0, 8); }

}  // namespace

int main() {
  const fs::path root = fs::temp_directory_path() / ("qlora_test_atomic_dir_" + std::to_string(getpid()));
  fs::remove_all(root);
  fs::create_directories(root);
  const fs::path d = root / "ad";
  try {
    save(d, "1");
    CHECK(holds(d, "1") && names(root) == std::set<std::string>{"ad"}, "fresh save");
    chmod(d.c_str(), 0750);
    save(d, "2");
    struct stat st {};
    stat(d.c_str(), &st);
    CHECK(holds(d, "2") && (st.st_mode & 07777) == 0750, "swap keeps the mode: %o", st.st_mode & 07777);
    CHECK(names(root) == std::set<std::string>{"ad"} && names(d).size() == 2, "no leftovers after the swap");
    setenv("QLORA_TEST_NO_EXCHANGE", "1", 1);
    save(d, "3");
    unsetenv("QLORA_TEST_NO_EXCHANGE");
    CHECK(holds(d, "3") && names(root) == std::set<std::string>{"ad"}, "two-rename fallback");

    {  // abandoned: the target is untouched, the staging directory removed
      DirSaver s(d.string());
      qlora::io::write_file_atomic(s.file("a.txt"), "ax");
    }
    CHECK(holds(d, "3") && names(root) == std::set<std::string>{"ad"}, "abandoned save");

    put(d / "README", "mine");
    put(d / "stale.bin", "old");
    save(d, "4", {"stale.bin"});
    CHECK(holds(d, "4") && slurp(d / "README") == "mine", "journal commit keeps other files");
    CHECK((names(d) == std::set<std::string>{"README", "a.txt", "b.txt"}), "obsolete removed, commit dir gone");
    fs::remove(d / "README");

    try {
      save(d / "a.txt", "x");
      CHECK(false, "saving over a file must throw");
    } catch (const qlora::io::FileError& e) {
      CHECK(e.err == ENOTDIR, "err %d", e.err);
    }

    // A displaced old copy (killed between the two renames), in atomic_io's name: restored.
    const std::string tag = host() + "-" + std::to_string(dead_pid()) + "-0badc0de";
    fs::rename(d, root / (".ad.qlora-old." + tag));
    qlora::io::recover_dir(d.string());
    CHECK(holds(d, "4") && names(root) == std::set<std::string>{"ad"}, "old copy restored");

    // A commit directory (killed after the commit point): rolled forward, its remove list applied.
    const fs::path commit = d / (".ad.qlora-commit." + tag);
    fs::create_directory(commit);
    put(commit / "a.txt", "a5");
    put(commit / "b.txt", "b5");
    put(d / "gone.txt", "x");
    put(commit / ".qlora-remove.json", "[\"gone.txt\"]");
    qlora::io::recover_dir(d.string());
    CHECK(holds(d, "5") && (names(d) == std::set<std::string>{"a.txt", "b.txt"}), "commit rolled forward");

    // kill -9 between the two renames of the fallback, then recover: the complete old directory.
    const pid_t child = fork();
    if (child == 0) {
      setenv("QLORA_TEST_NO_EXCHANGE", "1", 1);
      setenv("QLORA_TEST_FAULT", "rename-new", 1);
      try {
        save(d, "6");
      } catch (...) {
      }
      _exit(3);  // not reached: the fault point kills the process
    }
    int wst = 0;
    waitpid(child, &wst, 0);
    CHECK(WIFSIGNALED(wst) && WTERMSIG(wst) == SIGKILL, "child status %d", wst);
    CHECK(!fs::exists(d), "the window: no target");
    qlora::io::recover_dir(d.string());
    CHECK(holds(d, "5") && names(root) == std::set<std::string>{"ad"}, "recovered to the old save");
  } catch (const std::exception& e) {
    CHECK(false, "exception: %s", e.what());
  }
  fs::remove_all(root);
  if (g_failures) std::fprintf(stderr, "%d failure(s)\n", g_failures);
  else std::printf("test_atomic_dir: OK\n");
  return g_failures ? 1 : 0;
}
