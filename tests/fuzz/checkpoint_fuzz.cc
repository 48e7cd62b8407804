// libFuzzer target for the checkpoint readers (src/checkpoint_format.cc): the index parser and the shard reader.
//
// Input: an index.json, a NUL byte, then the bytes of the checkpoint's first file (seeds/ holds real toy
// checkpoints in this form). For every input that parses, the target checks what Load relies on:
//  * the index round-trips (ToJson of a parsed index parses to the same index);
//  * every fragment lies inside its file and the fragments of a tensor cover it exactly once;
//  * the shard reader, given a file of the size the index states (Load checks sizes before reading), reads every
//    fragment of file 0 or fails with DataLoss/IoError, never reading outside the file or crashing;
//  * VerifyBuffer and the reader agree on whether file 0 is intact.
// Built and run by tests/fuzz/CMakeLists.txt (clang, -fsanitize=fuzzer,address,undefined).
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

#include "checkpoint_format.h"

namespace {

void Check(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "checkpoint_fuzz: invariant broken: %s\n", what);
    std::abort();
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace zero;
  const std::string_view in(reinterpret_cast<const char*>(data), size);
  const size_t nul = in.find('\0');
  const std::string_view json = in.substr(0, nul);
  const std::string_view file = nul == std::string_view::npos ? std::string_view() : in.substr(nul + 1);

  ckpt::Index index;
  if (!ckpt::ParseIndex(json, "fuzz", &index).ok()) return 0;

  const std::string again = ckpt::ToJson(index);
  ckpt::Index reparsed;
  Check(ckpt::ParseIndex(again, "fuzz (round trip)", &reparsed).ok(), "a parsed index does not round-trip");
  Check(ckpt::ToJson(reparsed) == again, "the round trip changed the index");

  for (const ckpt::Param& p : index.params) {
    for (const ckpt::Tensor& t : p.tensors) {
      int64_t next = 0;
      for (const ckpt::Fragment& f : t.fragments) {
        Check(f.param_offset == next && f.count > 0, "fragments do not tile the parameter");
        Check(f.byte_offset + f.count * static_cast<int64_t>(DTypeSize(t.dtype)) <= index.files[f.file].bytes,
              "a fragment reaches past its file");
        next += f.count;
      }
      Check(next == p.numel, "fragments do not cover the parameter");
    }
  }

  // The shard reader over file 0, only when the file has the stated size (as Load ensures first).
  const ckpt::File& f0 = index.files[0];
  if (static_cast<int64_t>(file.size()) != f0.bytes) return 0;
  const bool intact = ckpt::VerifyBuffer(file, f0, index.block_bytes, "file 0").ok();
  const int fd = memfd_create("shard", 0);
  if (fd < 0) return 0;
  if (!file.empty() && write(fd, file.data(), file.size()) != static_cast<ssize_t>(file.size())) {
    close(fd);
    return 0;
  }
  const std::string path = "/proc/self/fd/" + std::to_string(fd);
  bool all_read = true;
  {
    ckpt::Reader reader(path, f0, index.block_bytes);
    std::vector<char> buf;
    for (const ckpt::Param& p : index.params) {
      for (const ckpt::Tensor& t : p.tensors) {
        for (const ckpt::Fragment& g : t.fragments) {
          if (g.file != 0) continue;
          const int64_t bytes = g.count * static_cast<int64_t>(DTypeSize(t.dtype));
          buf.resize(static_cast<size_t>(bytes));
          const Status s = reader.Read(g.byte_offset, bytes, buf.data());
          if (!s.ok()) {
            Check(s.code() == StatusCode::kDataLoss || s.code() == StatusCode::kIoError, "unexpected status kind");
            all_read = false;
            continue;
          }
          Check(std::string_view(buf.data(), buf.size()) == file.substr(static_cast<size_t>(g.byte_offset), buf.size()),
                "the reader returned other bytes than the file's");
        }
      }
    }
  }
  close(fd);
  if (intact) Check(all_read, "an intact file failed to read");
  return 0;
}
