// Saving a directory of files as a unit, with the same on-disk protocol and names as
// python/qlora_native/atomic_io.py (save_dir / recover), so that a directory a killed C program
// left is finished or rolled back by Python's loaders, and the reverse:
//
//   io::DirSaver s(dir);                       // staging directory .NAME.qlora-tmp.HOST-PID-RANDOM beside dir
//   write_safetensors(s.file("adapter_model.safetensors"), ...); write_file(s.file("adapter_config.json"), ...);
//   s.commit();                                // fsync, then swap / rename / journal commit
//
// commit(): the target is absent -> one rename. The target holds only files this save writes (and
// our leftovers): renameat2(RENAME_EXCHANGE) swaps the two directories in one step; without it,
// target -> .NAME.qlora-old.TAG, staging -> target (a kill between them leaves a complete old
// copy that recover_dir() / Python's recover() renames back). The target holds other files (or is
// a symlink, a mount point, our working directory): the staging directory is renamed into it as
// .NAME.qlora-commit.TAG (the commit point), then each file is renamed over its old version;
// a kill after the commit point is rolled forward by the next save or loader.
// Files are created 0666 and directories 0777, so the umask decides; a replaced directory keeps
// its mode.
#pragma once
#include <string>
#include <vector>

namespace qlora::io {

// HOST-PID-RANDOM as atomic_io._tag(): HOST = FNV-1a (32 bit, 8 hex digits) of gethostname(),
// RANDOM = 8 hex digits.
std::string unique_tag();

// Temporaries of saves in progress in this process (absolute paths): a cleanup in another thread
// must not take them for a killed process's leftovers (they carry our own pid). The process's one
// registry: python/qlora_native/atomic_io.py registers its own saves here too (_core.io), so either
// side's cleanup keeps the other's live temporaries.
void register_inflight(const std::string& abs_path);
void unregister_inflight(const std::string& abs_path);
bool is_inflight(const std::string& abs_path);

// Test-only fault point: when the environment variable QLORA_TEST_FAULT (a comma-separated list)
// names `step`, the process kills itself with SIGKILL there (the kill -9 tests). "#N" kills at the
// N-th fault point reached, whatever its name (a sweep over every step of a save).
void test_fault(const char* step);

// Writes `data` to `path` atomically (temporary beside it, fsync, rename, fsync of the directory).
void write_file_atomic(const std::string& path, const std::string& data);

class DirSaver {
 public:
  // Creates the parent directories and the staging directory; finishes or rolls back what a
  // killed save of `final_dir` left. Throws FileError(ENOTDIR) when final_dir is a file.
  // obsolete: names of files an earlier save may have left in final_dir that must not survive.
  explicit DirSaver(const std::string& final_dir, std::vector<std::string> obsolete = {});
  ~DirSaver();  // without commit() (an exception): the staging directory is removed
  DirSaver(const DirSaver&) = delete;
  DirSaver& operator=(const DirSaver&) = delete;

  const std::string& staging() const { return staging_; }
  std::string file(const std::string& name) const { return staging_ + "/" + name; }
  void commit();

 private:
  std::string final_, parent_, name_, tag_, staging_;
  std::vector<std::string> obsolete_;
  bool done_ = false;
};

// Before reading directory `dir`: finish or roll back a killed save of it (atomic_io.recover).
void recover_dir(const std::string& dir);

// Finish or undo what killed saves left in directory d (atomic_io.cleanup); name: only the
// leftovers of entry `name` of d. Best effort: errors are ignored.
void cleanup_dir(const std::string& d, const std::string* name = nullptr);

}  // namespace qlora::io
