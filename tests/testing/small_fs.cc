// SmallFs, RunQuiet, TmpfsDir (small_fs.h).
#include "testing/small_fs.h"

#include <fcntl.h>
#include <spawn.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <vector>

extern char** environ;

namespace zero::testing {

int RunQuiet(const std::string& program, const std::vector<std::string>& args) {
  std::vector<char*> argv;
  argv.push_back(const_cast<char*>(program.c_str()));
  for (const std::string& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0);
  posix_spawn_file_actions_addopen(&actions, 2, "/dev/null", O_WRONLY, 0);
  pid_t pid = 0;
  const int rc = posix_spawnp(&pid, program.c_str(), &actions, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  if (rc != 0) return -1;
  int status = 0;
  while (waitpid(pid, &status, 0) < 0) {
    if (errno != EINTR) return -1;
  }
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

Status SmallFs::Mount(const std::string& dir, int64_t bytes, bool read_only, std::unique_ptr<SmallFs>* out) {
  if (geteuid() != 0) return Status::Unavailable("mounting a file system needs root");
  std::unique_ptr<SmallFs> fs(new SmallFs());
  fs->dir_ = dir;
  fs->image_ = dir + ".img";
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return Status::Unavailable("cannot create " + dir + ": " + ec.message());
  const int fd = ::open(fs->image_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
  if (fd < 0 || ::ftruncate(fd, bytes) != 0) {
    if (fd >= 0) ::close(fd);
    return Status::Unavailable("cannot make the image " + fs->image_ + ": " + std::strerror(errno));
  }
  ::close(fd);
  // -m 0: no blocks reserved for root (root would otherwise write past "full"); nodiscard: nothing to discard.
  if (RunQuiet("mkfs.ext4", {"-q", "-F", "-m", "0", "-E", "nodiscard", fs->image_}) != 0) {
    return Status::Unavailable("mkfs.ext4 failed or is missing (Debian: e2fsprogs)");
  }
  std::vector<std::string> args = {"-o", read_only ? "loop,ro" : "loop", fs->image_, dir};
  if (RunQuiet("mount", args) != 0) return Status::Unavailable("mount -o loop failed (no loop device or no CAP_SYS_ADMIN)");
  fs->mounted_ = true;
  *out = std::move(fs);
  return Status::Ok();
}

SmallFs::~SmallFs() {
  if (mounted_) {
    // Lazy: a file still open somewhere must not keep the image mounted after the test.
    if (::umount2(dir_.c_str(), 0) != 0) (void)::umount2(dir_.c_str(), MNT_DETACH);
  }
  std::error_code ec;
  std::filesystem::remove(dir_, ec);
  std::filesystem::remove(image_, ec);
}

Status TmpfsDir::Make(std::unique_ptr<TmpfsDir>* out) {
  std::unique_ptr<TmpfsDir> t(new TmpfsDir());
  struct statfs fs;
  if (::statfs("/dev/shm", &fs) == 0 && static_cast<uint32_t>(fs.f_type) == 0x01021994u) {
    t->dir_ = "/dev/shm";
  } else {
    if (geteuid() != 0) return Status::Unavailable("/dev/shm is not tmpfs here and mounting one needs root");
    t->dir_ = "/tmp/zero-tmpfs-" + std::to_string(::getpid());
    std::error_code ec;
    std::filesystem::create_directories(t->dir_, ec);
    if (::mount("tmpfs", t->dir_.c_str(), "tmpfs", 0, "size=16m") != 0) {
      return Status::Unavailable("/dev/shm is not tmpfs and mounting one failed: " + std::string(std::strerror(errno)));
    }
    t->mounted_ = true;
  }
  *out = std::move(t);
  return Status::Ok();
}

TmpfsDir::~TmpfsDir() {
  if (!mounted_) return;
  (void)::umount2(dir_.c_str(), MNT_DETACH);
  std::error_code ec;
  std::filesystem::remove(dir_, ec);
}

}  // namespace zero::testing
