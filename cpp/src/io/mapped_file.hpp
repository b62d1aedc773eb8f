// POSIX file helpers: read-only memory maps, whole-file reads and atomic (temp + rename) writes.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>

namespace qlora::io {

// An operating-system error on a path. The bindings raise it as OSError(errno, strerror, path),
// which Python turns into FileNotFoundError / PermissionError / ... by errno.
struct FileError : std::runtime_error {
  FileError(int err, std::string path, const std::string& doing);
  int err;
  std::string path;
  std::string reason;  // strerror(err)
};

// A whole file mapped read-only (PROT_READ, MAP_PRIVATE). The mapping lives as long as the
// object; a file truncated by another process while mapped can still fault (SIGBUS), as with
// any mmap reader.
class MappedFile {
 public:
  static std::shared_ptr<MappedFile> open(const std::string& path);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const uint8_t* data() const { return data_; }  // [size()]; nullptr for an empty file
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  MappedFile() = default;
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
  std::string path_;
};

std::string read_file(const std::string& path);

// Throws ValueError naming `path` when it is a device, fifo or socket: an atomic write renames a
// regular file over its target, which would replace the node itself (save_safetensors("/dev/null")
// run as root would destroy /dev/null). Nothing there, a regular file, a symlink (the rename replaces
// the link, not what it leads to) and a directory (the rename fails) pass. The one rule for
// AtomicFileWriter and Python's atomic_io.write_file (_core.io.check_replaceable). `what`: the call.
void check_replaceable(const std::string& path, const char* what);

// Writes `path` atomically: data goes to a unique temporary `.NAME.qlora-tmp.HOST-PID-RANDOM`
// in the same directory (created 0666 & ~umask; python/qlora_native/atomic_io.py's name, so either
// side's next save removes it once its owner is gone), which is fsync'ed and renamed over `path`
// by commit(). Destroyed without commit() (an exception), the temporary is removed and `path` is
// untouched.
class AtomicFileWriter {
 public:
  explicit AtomicFileWriter(std::string path);
  ~AtomicFileWriter();
  AtomicFileWriter(const AtomicFileWriter&) = delete;
  AtomicFileWriter& operator=(const AtomicFileWriter&) = delete;

  void write(const void* data, size_t n);
  void commit();
  const std::string& temp_path() const { return tmp_; }

 private:
  void flush();
  void write_direct(const char* p, size_t n);
  void discard() noexcept;
  std::string path_, tmp_, abs_tmp_;  // abs_tmp_: registered as in flight (io/atomic_dir.hpp)
  int fd_ = -1;
  std::string buf_;  // small writes are batched; large ones go straight to the file
  bool committed_ = false;
};

}  // namespace qlora::io
