// Real disks for the NVMe tier's fault tests: a small ext4 file system in a loop-mounted image that the test makes
// itself (to fill it up: ENOSPC), mounted read-only when asked (a directory nobody can write, root included), and a
// tmpfs directory. Mounting needs root (CAP_SYS_ADMIN) and loop devices; without them Mount says why, and each test
// provokes the same fault another real way (a directory without write permission for a non-root user, /sys for
// root) or through the I/O queue's fault hook, saying which it used: no test skips.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "zero/status.h"

namespace zero::testing {

class SmallFs {
 public:
  // Makes `dir` (which must not exist), an image of `bytes` beside it (dir + ".img"), formats it ext4 (mkfs.ext4
  // from e2fsprogs, no reserved blocks) and mounts it at `dir`, read-only when asked. Unavailable saying why when
  // this process may not mount (not root, no loop device, no mkfs.ext4).
  static Status Mount(const std::string& dir, int64_t bytes, bool read_only, std::unique_ptr<SmallFs>* out);
  ~SmallFs();  // unmounts (the loop device frees itself) and removes the image and the directory
  SmallFs(const SmallFs&) = delete;
  SmallFs& operator=(const SmallFs&) = delete;
  const std::string& dir() const { return dir_; }

 private:
  SmallFs() = default;
  std::string dir_, image_;
  bool mounted_ = false;
};

// Runs a program (PATH lookup) with arguments and waits for it; its output goes to /dev/null. The exit status, or
// -1 when it could not be started.
int RunQuiet(const std::string& program, const std::vector<std::string>& args);

// A directory on tmpfs for the duration of a test: /dev/shm when it is tmpfs, otherwise a tmpfs mounted for it
// (root; unmounted again by the destructor). Unavailable saying why when neither is possible.
class TmpfsDir {
 public:
  static Status Make(std::unique_ptr<TmpfsDir>* out);
  ~TmpfsDir();
  TmpfsDir(const TmpfsDir&) = delete;
  TmpfsDir& operator=(const TmpfsDir&) = delete;
  const std::string& dir() const { return dir_; }

 private:
  TmpfsDir() = default;
  std::string dir_;
  bool mounted_ = false;
};

}  // namespace zero::testing
