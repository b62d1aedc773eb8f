#include "io/mapped_file.hpp"

#include "common/error.hpp"
#include "io/atomic_dir.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <cerrno>
#include <cstring>
#include <algorithm>

namespace qlora::io {

FileError::FileError(int e, std::string p, const std::string& doing)
    : std::runtime_error(doing + " '" + p + "': " + std::strerror(e)), err(e), path(std::move(p)),
      reason(std::strerror(e)) {}

namespace {

// Closes a descriptor on scope exit unless released.
struct Fd {
  int fd = -1;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

int open_regular_readonly(const std::string& path, struct stat& st) {
  // O_NONBLOCK: a fifo would block the open until a writer came (forever); it is refused below.
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) throw FileError(errno, path, "cannot open");
  if (::fstat(fd, &st) != 0) {
    const int e = errno;
    ::close(fd);
    throw FileError(e, path, "cannot stat");
  }
  if (S_ISDIR(st.st_mode)) {
    ::close(fd);
    throw FileError(EISDIR, path, "cannot open");
  }
  if (!S_ISREG(st.st_mode)) {  // a device (/dev/zero reads until memory runs out), fifo or socket: as the GGUF reader
    ::close(fd);
    throw FormatError(path + ": not a regular file (a device, pipe or socket)");
  }
  return fd;
}

// The absolute path under which temporaries are registered as in flight (atomic_dir's registry).
std::string abs_tmp(const std::string& p) {
  std::error_code ec;
  std::filesystem::path a = std::filesystem::absolute(p, ec);
  return ec ? p : a.lexically_normal().string();
}

}  // namespace

std::shared_ptr<MappedFile> MappedFile::open(const std::string& path) {
  struct stat st {};
  Fd fd{open_regular_readonly(path, st)};
  std::shared_ptr<MappedFile> f(new MappedFile());
  f->path_ = path;
  f->size_ = static_cast<size_t>(st.st_size);
  if (f->size_ > 0) {  // mmap of length 0 is an error; an empty file simply has no data
    void* p = ::mmap(nullptr, f->size_, PROT_READ, MAP_PRIVATE, fd.fd, 0);
    if (p == MAP_FAILED) throw FileError(errno, path, "cannot mmap");
    f->data_ = static_cast<const uint8_t*>(p);
  }
  return f;
}

MappedFile::~MappedFile() {
  if (data_) ::munmap(const_cast<uint8_t*>(data_), size_);
}

std::string read_file(const std::string& path) {
  struct stat st {};
  Fd fd{open_regular_readonly(path, st)};
  std::string out;
  out.reserve(static_cast<size_t>(st.st_size));
  char buf[1 << 16];
  for (;;) {
    const ssize_t n = ::read(fd.fd, buf, sizeof buf);
    if (n < 0) {
      if (errno == EINTR) continue;
      throw FileError(errno, path, "cannot read");
    }
    if (n == 0) break;
    out.append(buf, static_cast<size_t>(n));
  }
  return out;
}

// ---------------------------------------------------------------- AtomicFileWriter

void check_replaceable(const std::string& path, const char* what) {
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0) return;  // nothing there (or unreachable: the open says why)
  const char* kind = S_ISCHR(st.st_mode) ? "a character device" : S_ISBLK(st.st_mode) ? "a block device"
                     : S_ISFIFO(st.st_mode) ? "a fifo" : S_ISSOCK(st.st_mode) ? "a socket" : nullptr;
  if (kind)
    throw ValueError(std::string(what) + ": '" + path + "' is " + kind +
                     ", not a regular file: an atomic save would replace it with a file");
}

AtomicFileWriter::AtomicFileWriter(std::string path) : path_(std::move(path)) {
  check_replaceable(path_, "cannot save");  // before any work (checked again just before the rename)
  // `.NAME.qlora-tmp.HOST-PID-RANDOM` beside the target: atomic_io.py's name for a temporary, so
  // the next save (C++ or Python) removes it once its owner is gone, and a host sharing the
  // directory (NFS) does not take our live temporary for its own dead process's.
  const size_t slash = path_.rfind('/');
  const std::string dir = slash == std::string::npos ? "" : path_.substr(0, slash + 1);
  const std::string base = slash == std::string::npos ? path_ : path_.substr(slash + 1);
  for (int attempt = 0; attempt < 16 && fd_ < 0; ++attempt) {
    tmp_ = dir + "." + base + ".qlora-tmp." + unique_tag();
    abs_tmp_ = abs_tmp(tmp_);
    register_inflight(abs_tmp_);  // before it exists: a cleanup in another thread keeps it
    fd_ = ::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);  // 0666 & ~umask
    if (fd_ < 0) {
      const int e = errno;
      unregister_inflight(abs_tmp_);
      if (e != EEXIST) throw FileError(e, tmp_, "cannot create");
    }
  }
  if (fd_ < 0) throw FileError(EEXIST, tmp_, "cannot create a unique temporary file");
}

AtomicFileWriter::~AtomicFileWriter() {
  if (!committed_) discard();
  unregister_inflight(abs_tmp_);
}

void AtomicFileWriter::discard() noexcept {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
  ::unlink(tmp_.c_str());
}

void AtomicFileWriter::write_direct(const char* p, size_t left) {
  while (left > 0) {
    const ssize_t n = ::write(fd_, p, std::min<size_t>(left, size_t(1) << 30));
    if (n < 0) {
      if (errno == EINTR) continue;
      throw FileError(errno, tmp_, "cannot write");
    }
    p += n;
    left -= static_cast<size_t>(n);
  }
}

void AtomicFileWriter::flush() {
  write_direct(buf_.data(), buf_.size());
  buf_.clear();
}

void AtomicFileWriter::write(const void* data, size_t n) {
  constexpr size_t kBatch = 1 << 20;  // batch small tensors; big ones go straight from memory
  if (buf_.size() + n > kBatch) flush();
  if (n > kBatch) {
    write_direct(static_cast<const char*>(data), n);
  } else {
    buf_.append(static_cast<const char*>(data), n);
  }
}

void AtomicFileWriter::commit() {
  flush();
  if (::fsync(fd_) != 0) throw FileError(errno, tmp_, "cannot fsync");
  const int fd = fd_;
  fd_ = -1;
  if (::close(fd) != 0) throw FileError(errno, tmp_, "cannot close");
  test_fault("file-rename");  // the temporary is complete, the name not yet taken (kill sweeps)
  check_replaceable(path_, "cannot save");  // a node put there while writing (the destructor removes the temporary)
  if (::rename(tmp_.c_str(), path_.c_str()) != 0) throw FileError(errno, path_, "cannot rename temporary file to");
  committed_ = true;
  // Persist the rename itself (best effort: some filesystems refuse fsync on directories).
  const size_t slash = path_.rfind('/');
  const std::string dir = slash == std::string::npos ? "." : (slash == 0 ? "/" : path_.substr(0, slash));
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
}

}  // namespace qlora::io
