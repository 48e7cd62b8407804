// Engine::Save, Load and Export: sharded checkpoints (format in checkpoint_format.h) and safetensors export.
//
// What a rank writes and reads is arithmetic on the partition plan, so no fragment list is communicated:
//  * Save: rank q writes, for each stored kind in order (param, master, optimizer state), the fragments it owns
//    under the saving plan (Bucket::fragments[q]), so every element is written once, in every stage. Rank 0
//    computes every rank's layout the same way and writes the index with the block hashes all ranks sent.
//  * Load: each rank reads the fragments it owns under its own plan (stage 0's optimizer state: all of it) from
//    whichever saved fragments overlap them, converting dtypes, then lets InitParams place the parameters (and
//    the full copies the stage keeps); the optimizer state is read straight into its buffers.
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "checkpoint_format.h"
#include "engine_impl.h"
#include "kernels/cpu_kernels.h"

namespace zero {
namespace {

constexpr int64_t kChunkBytes = int64_t{16} << 20;  // host staging per copy: bounds temporary memory
constexpr int kStatusBytes = 1024;                  // a status as exchanged between ranks (message truncated)

Status MakeStatus(StatusCode code, const std::string& msg) {
  switch (code) {
    case StatusCode::kOk: return Status::Ok();
    case StatusCode::kInvalidArgument: return Status::InvalidArgument(msg);
    case StatusCode::kFailedPrecondition: return Status::FailedPrecondition(msg);
    case StatusCode::kOutOfMemory: return Status::OutOfMemory(msg);
    case StatusCode::kMismatch: return Status::Mismatch(msg);
    case StatusCode::kTimeout: return Status::Timeout(msg);
    case StatusCode::kAborted: return Status::Aborted(msg);
    case StatusCode::kUnavailable: return Status::Unavailable(msg);
    case StatusCode::kIoError: return Status::IoError(msg);
    case StatusCode::kDataLoss: return Status::DataLoss(msg);
    case StatusCode::kInternal: return Status::Internal(msg);
  }
  return Status::Internal(msg);
}

std::string Join(const std::string& dir, const std::string& name) { return (std::filesystem::path(dir) / name).string(); }

std::string ShardName(int rank) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "shard-%05d.bin", rank);
  return buf;
}

// A tag is one plain directory name.
std::string CheckTag(const std::string& tag) {
  if (tag.empty()) return "the tag is empty";
  if (tag == "." || tag == ".." || tag == "latest") return "the tag '" + tag + "' is reserved";
  if (tag.find('/') != std::string::npos || tag.find('\0') != std::string::npos) {
    return "the tag '" + tag + "' must be a plain directory name (no '/')";
  }
  if (tag.size() >= 4 && tag.compare(tag.size() - 4, 4, ".tmp") == 0) return "the tag '" + tag + "' ends in .tmp";
  return "";
}

int64_t Hash52(const std::string& a, const std::string& b) {
  const std::string s = a + std::string(1, '\0') + b;
  return static_cast<int64_t>(ckpt::HashBlock(s.data(), static_cast<int64_t>(s.size())) & ((uint64_t{1} << 52) - 1));
}

}  // namespace

// The stored kinds of this engine, in file order.
struct CkptKind {
  const char* name;
  DType dtype;
  bool trainable_only;
  int which;  // 0 param, 1 master, 2 state0, 3 state1
};

static std::vector<CkptKind> Kinds(DType pdt, bool mixed, OptimizerKind optimizer) {
  std::vector<CkptKind> k;
  k.push_back({"param", pdt, false, 0});
  if (mixed) k.push_back({"master", DType::kF32, true, 1});
  if (optimizer == OptimizerKind::kAdamW) {
    k.push_back({"exp_avg", DType::kF32, true, 2});
    k.push_back({"exp_avg_sq", DType::kF32, true, 3});
  } else {
    k.push_back({"momentum", DType::kF32, true, 2});
  }
  return k;
}

Status Engine::Impl::ShareStatus(const Status& local, const std::string& call) {
  std::vector<char> mine(kStatusBytes, 0), all(static_cast<size_t>(kStatusBytes) * static_cast<size_t>(world));
  if (!local.ok()) {
    mine[0] = static_cast<char>(1 + static_cast<int>(local.code()));
    const std::string& m = local.message();
    std::memcpy(mine.data() + 1, m.data(), std::min<size_t>(m.size(), kStatusBytes - 2));
  }
  CollectiveOptions co;
  co.control = true;
  const std::string what = call + " (status exchange)";
  co.what = what.c_str();
  Status s = RunComm([&](void*) { return comm->AllGather(mine.data(), all.data(), kStatusBytes, DType::kU8, co); });
  if (!s.ok()) {
    poison = s.WithContext(call + " on " + Where());
    return poison;
  }
  if (!local.ok()) return local;
  for (int r = 0; r < world; ++r) {
    const char* v = all.data() + static_cast<size_t>(r) * kStatusBytes;
    if (v[0] == 0) continue;
    const std::string msg(v + 1, strnlen(v + 1, kStatusBytes - 1));
    return MakeStatus(static_cast<StatusCode>(v[0] - 1), call + " failed on rank " + std::to_string(r) + ": " + msg);
  }
  return Status::Ok();
}

Status Engine::Impl::CheckBetweenSteps(const std::string& call) const {
  if (micro >= 0) return Status::FailedPrecondition(call + " on " + Where() + ": a step is in progress; call Step first");
  if (in_eval) return Status::FailedPrecondition(call + " on " + Where() + ": an eval pass is in progress; call EndEval");
  if (!full_scope_units.empty()) {
    return Status::FailedPrecondition(call + " on " + Where() + ": a GatherFull scope is open; close it first");
  }
  return Status::Ok();
}

// Copies `count` elements of one owned fragment of `kind` to host memory (raw, in the kind's dtype).
Status Engine::Impl::ReadOwned(const Bucket& b, const Fragment& f, int which, void* host_dst) {
  if (NvmeHolds(b, which)) return NvmeReadOwned(b, f, which, host_dst);  // the tier's records (engine_nvme.cc)
  const bool stage0 = options.stage == Stage::kDataParallel;
  const bool stage3 = options.stage == Stage::kParameters;
  const int64_t full_pos = b.offset + rank * b.shard + f.shard_off;
  const int64_t shard_pos = b.shard_offset + f.shard_off;
  const int64_t opos = stage0 ? full_pos : shard_pos;
  const void* src = nullptr;
  int64_t bytes = f.count * 4;
  switch (which) {
    case 0:
      src = stage3 ? PAt(ShardParamBase(b), f.shard_off) : PAt(FullParamBase(b), rank * b.shard + f.shard_off);
      bytes = f.count * pe;
      break;
    case 1: src = MasterAt(opos, full_pos, shard_pos); break;
    case 2: src = state0.as<float>() + opos; break;
    default: src = state1.as<float>() + opos; break;
  }
  return device->CopyToHost(host_dst, src, bytes);
}

// ---------------------------------------------------------------------------------------------------------------
// Save

Status Engine::Impl::SaveImpl(const std::string& root, const std::string& tag, std::string_view metadata) {
  const std::string call = "Save(" + root + ", " + tag + ")";
  Status local = CheckBetweenSteps("Save");
  const std::string bad_tag = CheckTag(tag);
  if (local.ok() && !bad_tag.empty()) local = Status::InvalidArgument(call + " on " + Where() + ": " + bad_tag);
  if (local.ok() && root.empty()) local = Status::InvalidArgument(call + " on " + Where() + ": the root is empty");
  ZERO_RETURN_IF_ERROR(Agree(AgreeKind::kSave, Hash52(root, tag), local));
  ZERO_RETURN_IF_ERROR(DrainComm());
  params_pending = false;
  nvme_cached_opt = nvme_cached_param = -1;  // the tier's records are read afresh (and verified) for this save

  const std::string dir = Join(root, tag);
  const std::string tmp = dir + ".tmp";
  Status s;
  if (rank == 0) {
    std::error_code ec;
    if (std::filesystem::exists(dir, ec)) {
      s = Status::InvalidArgument(dir + " exists: checkpoints are never overwritten; use a new tag or remove it");
    }
    if (s.ok()) s = ckpt::MakeDirs(root);
    if (s.ok()) s = ckpt::RemoveAll(tmp);  // a save interrupted before its rename
    if (s.ok()) s = ckpt::MakeDirs(tmp);
  }
  ZERO_RETURN_IF_ERROR(ShareStatus(s, call));

  // This rank's shard, kind by kind, bucket by bucket, in the order of its owned fragments.
  const int64_t block_bytes = test.checkpoint_block_bytes > 0 ? test.checkpoint_block_bytes : ckpt::kDefaultBlockBytes;
  const std::vector<CkptKind> kinds = Kinds(pdt, mixed, options.optimizer);
  ckpt::Writer writer(Join(tmp, ShardName(rank)), block_bytes, rank == test.save_fail_rank ? test.save_fail_after : -1);
  s = writer.Open();
  std::vector<char> staging;
  for (const CkptKind& k : kinds) {
    const int64_t es = static_cast<int64_t>(DTypeSize(k.dtype));
    for (const Bucket& b : plan.buckets) {
      if (k.trainable_only && !b.trainable) continue;
      for (const Fragment& f : b.fragments[static_cast<size_t>(rank)]) {
        for (int64_t done = 0; done < f.count && s.ok(); done += kChunkBytes / es) {
          Fragment part = f;
          part.shard_off = f.shard_off + done;
          part.count = std::min(kChunkBytes / es, f.count - done);
          staging.resize(static_cast<size_t>(part.count * es));
          s = ReadOwned(b, part, k.which, staging.data());
          if (s.ok()) s = writer.Write(staging.data(), part.count * es);
        }
      }
    }
  }
  if (s.ok()) s = writer.Close();
  if (!s.ok()) s = s.WithContext("rank " + std::to_string(rank) + " writing its shard of " + tmp);

  // Every rank's layout (the same arithmetic on every rank): file sizes and fragments.
  std::vector<int64_t> file_bytes(static_cast<size_t>(world), 0);
  for (int q = 0; q < world; ++q) {
    for (const CkptKind& k : kinds) {
      for (const Bucket& b : plan.buckets) {
        if (k.trainable_only && !b.trainable) continue;
        for (const Fragment& f : b.fragments[static_cast<size_t>(q)]) {
          file_bytes[static_cast<size_t>(q)] += f.count * static_cast<int64_t>(DTypeSize(k.dtype));
        }
      }
    }
  }
  if (s.ok() && writer.bytes() != file_bytes[static_cast<size_t>(rank)]) {
    s = Status::Internal("rank " + std::to_string(rank) + " wrote " + std::to_string(writer.bytes()) +
                         " bytes, its layout says " + std::to_string(file_bytes[static_cast<size_t>(rank)]));
  }
  ZERO_RETURN_IF_ERROR(ShareStatus(s, call));

  // Block hashes to every rank (rank 0 needs them; an all-gather keeps to the collectives Comm has).
  int64_t max_blocks = 1;
  for (int64_t fb : file_bytes) max_blocks = std::max(max_blocks, ckpt::NumBlocks(fb, block_bytes));
  std::vector<int64_t> mine(static_cast<size_t>(max_blocks), 0);
  std::vector<int64_t> all(static_cast<size_t>(max_blocks * world), 0);
  std::copy(writer.block_hashes().begin(), writer.block_hashes().end(), mine.begin());  // may be empty
  {
    CollectiveOptions co;
    co.control = true;
    const std::string what = call + " (block hashes)";
    co.what = what.c_str();
    s = RunComm([&](void*) { return comm->AllGather(mine.data(), all.data(), max_blocks, DType::kI64, co); });
    if (!s.ok()) {
      poison = s.WithContext(call + " on " + Where());
      return poison;
    }
  }

  if (rank == 0) {
    ckpt::Index index;
    index.step = step;
    index.world_size = world;
    index.stage = static_cast<int>(options.stage);
    index.optimizer = options.optimizer == OptimizerKind::kAdamW ? "adamw" : "sgd";
    index.param_dtype = pdt;
    index.grad_dtype = gdt;
    index.offload_optimizer = offload;
    index.offload_params = offload_params;
    index.sgd_first_step = sgd_first_step;
    index.scaler = {dynamic_scale, loss_scale, scale_hysteresis, scaler_iter, last_overflow_iter};
    index.block_bytes = block_bytes;
    for (int q = 0; q < world; ++q) {
      ckpt::File file;
      file.name = ShardName(q);
      file.bytes = file_bytes[static_cast<size_t>(q)];
      const int64_t nb = ckpt::NumBlocks(file.bytes, block_bytes);
      for (int64_t i = 0; i < nb; ++i) file.block_hashes.push_back(static_cast<uint64_t>(all[static_cast<size_t>(q * max_blocks + i)]));
      index.files.push_back(std::move(file));
    }
    index.params.resize(specs.size());
    for (size_t p = 0; p < specs.size(); ++p) {
      ckpt::Param& ip = index.params[p];
      ip.name = specs[p].name;
      ip.shape = specs[p].shape;
      ip.numel = specs[p].numel();
      ip.unit = specs[p].unit;
      ip.trainable = specs[p].trainable;
      for (const CkptKind& k : kinds) {
        if (!k.trainable_only || ip.trainable) ip.tensors.push_back({k.name, k.dtype, {}});
      }
    }
    for (int q = 0; q < world; ++q) {
      int64_t off = 0;
      for (const CkptKind& k : kinds) {
        const int64_t es = static_cast<int64_t>(DTypeSize(k.dtype));
        for (const Bucket& b : plan.buckets) {
          if (k.trainable_only && !b.trainable) continue;
          for (const Fragment& f : b.fragments[static_cast<size_t>(q)]) {
            ckpt::Param& ip = index.params[static_cast<size_t>(f.param)];
            for (ckpt::Tensor& t : ip.tensors) {
              if (t.kind == k.name) t.fragments.push_back({q, off, f.param_off, f.count});
            }
            off += f.count * es;
          }
        }
      }
    }
    for (ckpt::Param& ip : index.params) {
      for (ckpt::Tensor& t : ip.tensors) {
        std::sort(t.fragments.begin(), t.fragments.end(),
                  [](const ckpt::Fragment& a, const ckpt::Fragment& b) { return a.param_offset < b.param_offset; });
      }
    }
    index.metadata_bytes = static_cast<int64_t>(metadata.size());
    index.metadata_hash = ckpt::HashBlock(metadata.data(), index.metadata_bytes);
    ckpt::Writer mw(Join(tmp, "metadata.bin"), block_bytes);
    s = mw.Open();
    if (s.ok()) s = mw.Write(metadata.data(), index.metadata_bytes);
    if (s.ok()) s = mw.Close();
    const std::string json = ckpt::ToJson(index);
    ckpt::Writer iw(Join(tmp, "index.json"), block_bytes);
    if (s.ok()) s = iw.Open();
    if (s.ok()) s = iw.Write(json.data(), static_cast<int64_t>(json.size()));
    if (s.ok()) s = iw.Close();
    if (s.ok()) s = ckpt::FsyncDir(tmp);
    if (s.ok() && std::rename(tmp.c_str(), dir.c_str()) != 0) {
      s = Status::IoError("cannot rename " + tmp + " to " + dir + ": " + std::strerror(errno));
    }
    if (s.ok()) s = ckpt::FsyncDir(root);
    if (s.ok()) s = ckpt::WriteFileAtomic(Join(root, "latest"), tag + "\n");
  }
  return ShareStatus(s, call);
}

// ---------------------------------------------------------------------------------------------------------------
// Load

// Reads elements [off, off + n) of a stored tensor as fp32 into dst, from whichever fragments hold them.
static Status ReadTensorF32(const ckpt::Tensor& t, int64_t off, int64_t n, float* dst,
                            std::vector<std::unique_ptr<ckpt::Reader>>& readers, std::vector<char>& raw) {
  const int64_t es = static_cast<int64_t>(DTypeSize(t.dtype));
  auto it = std::upper_bound(t.fragments.begin(), t.fragments.end(), off,
                             [](int64_t v, const ckpt::Fragment& g) { return v < g.param_offset; });
  if (it != t.fragments.begin()) --it;
  const int64_t end = off + n;
  for (; it != t.fragments.end() && off < end; ++it) {
    const int64_t lo = std::max(off, it->param_offset);
    const int64_t hi = std::min(end, it->param_offset + it->count);
    if (hi <= lo) continue;
    ckpt::Reader& reader = *readers[static_cast<size_t>(it->file)];
    const int64_t byte = it->byte_offset + (lo - it->param_offset) * es;
    float* out = dst + (lo - (end - n));
    if (t.dtype == DType::kF32) {
      ZERO_RETURN_IF_ERROR(reader.Read(byte, (hi - lo) * 4, out));
    } else {
      raw.resize(static_cast<size_t>((hi - lo) * es));
      ZERO_RETURN_IF_ERROR(reader.Read(byte, (hi - lo) * es, raw.data()));
      kernels::CastCpu(raw.data(), t.dtype, out, DType::kF32, hi - lo, 1);
    }
    off = hi;
  }
  if (off != end) return Status::Internal("checkpoint tensor " + t.kind + " does not cover a requested range");
  return Status::Ok();
}

Status Engine::Impl::LoadImpl(const std::string& root, const std::string& tag_arg, std::string* metadata) {
  const std::string call = "Load(" + root + (tag_arg.empty() ? "" : ", " + tag_arg) + ")";
  Status local = CheckBetweenSteps("Load");
  if (local.ok() && root.empty()) local = Status::InvalidArgument(call + " on " + Where() + ": the root is empty");
  if (local.ok() && !tag_arg.empty() && !CheckTag(tag_arg).empty()) {
    local = Status::InvalidArgument(call + " on " + Where() + ": " + CheckTag(tag_arg));
  }
  ZERO_RETURN_IF_ERROR(Agree(AgreeKind::kLoad, Hash52(root, tag_arg), local));
  ZERO_RETURN_IF_ERROR(DrainComm());
  params_pending = false;

  // 1. Everything checkable without the data, on every rank, agreed before any state changes.
  std::string tag = tag_arg;
  Status s;
  if (tag.empty()) {
    std::string latest;
    s = ckpt::ReadWholeFile(Join(root, "latest"), 4096, &latest);
    if (!s.ok()) s = s.WithContext("no checkpoint to load in " + root + " (ROOT/latest names the newest)");
    while (!latest.empty() && (latest.back() == '\n' || latest.back() == '\r')) latest.pop_back();
    if (s.ok() && !CheckTag(latest).empty()) s = Status::DataLoss(Join(root, "latest") + ": " + CheckTag(latest));
    tag = latest;
  }
  const std::string dir = Join(root, tag);
  ckpt::Index index;
  std::string text;
  if (s.ok()) s = ckpt::ReadWholeFile(Join(dir, "index.json"), int64_t{1} << 32, &text);
  if (s.ok()) s = ckpt::ParseIndex(text, Join(dir, "index.json"), &index);
  std::vector<const ckpt::Param*> saved(specs.size(), nullptr);
  const char* opt = options.optimizer == OptimizerKind::kAdamW ? "adamw" : "sgd";
  if (s.ok()) {
    std::map<std::string, const ckpt::Param*> by_name;
    for (const ckpt::Param& p : index.params) by_name.emplace(p.name, &p);
    if (index.params.size() != specs.size()) {
      s = Status::InvalidArgument(dir + " has " + std::to_string(index.params.size()) + " parameters; this engine has " +
                                  std::to_string(specs.size()));
    }
    for (size_t p = 0; p < specs.size() && s.ok(); ++p) {
      auto it = by_name.find(specs[p].name);
      if (it == by_name.end()) {
        s = Status::InvalidArgument(dir + " has no parameter '" + specs[p].name + "'");
        break;
      }
      const ckpt::Param& cp = *it->second;
      if (cp.shape != specs[p].shape) {
        s = Status::InvalidArgument(dir + ": parameter '" + cp.name + "' has another shape than this engine's spec");
      } else if (cp.trainable != specs[p].trainable) {
        s = Status::InvalidArgument(dir + ": parameter '" + cp.name + "' was saved " +
                                    (cp.trainable ? "trainable" : "frozen") + "; this engine's spec says " +
                                    (specs[p].trainable ? "trainable" : "frozen"));
      } else if (cp.trainable) {
        if (index.optimizer != opt) {
          s = Status::InvalidArgument(dir + " holds " + index.optimizer + " state; this engine's optimizer is " + opt);
        }
        for (const char* k : options.optimizer == OptimizerKind::kAdamW ? std::vector<const char*>{"exp_avg", "exp_avg_sq"}
                                                                       : std::vector<const char*>{"momentum"}) {
          if (s.ok() && cp.Find(k) == nullptr) s = Status::DataLoss(dir + ": parameter '" + cp.name + "' has no " + k);
        }
      }
      saved[p] = &cp;
    }
  }
  for (size_t i = 0; s.ok() && i < index.files.size(); ++i) {
    int64_t bytes = 0;
    s = ckpt::FileSize(Join(dir, index.files[i].name), &bytes);
    if (s.ok() && bytes != index.files[i].bytes) {
      s = Status::DataLoss(Join(dir, index.files[i].name) + " has " + std::to_string(bytes) + " bytes; the index says " +
                           std::to_string(index.files[i].bytes) + " (truncated or replaced)");
    }
  }
  std::string meta;
  if (s.ok()) s = ckpt::ReadWholeFile(Join(dir, "metadata.bin"), index.metadata_bytes, &meta);
  if (s.ok() && (static_cast<int64_t>(meta.size()) != index.metadata_bytes ||
                 ckpt::HashBlock(meta.data(), index.metadata_bytes) != index.metadata_hash)) {
    s = Status::DataLoss(Join(dir, "metadata.bin") + " does not match its size and hash in the index");
  }
  if (!s.ok()) s = s.WithContext("rank " + std::to_string(rank));
  ZERO_RETURN_IF_ERROR(ShareStatus(s, call));

  std::vector<std::unique_ptr<ckpt::Reader>> readers;
  for (const ckpt::File& f : index.files) {
    readers.push_back(std::make_unique<ckpt::Reader>(Join(dir, f.name), f, index.block_bytes));
  }
  std::vector<char> raw;

  // 2. This rank's parameter fragments as fp32 (trainable ones from the saved fp32 master when there is one).
  std::vector<float> values;
  std::map<std::pair<int, int64_t>, int64_t> at;  // (param, param_off) -> position in values
  for (const Bucket& b : plan.buckets) {
    for (const Fragment& f : b.fragments[static_cast<size_t>(rank)]) {
      const ckpt::Param& cp = *saved[static_cast<size_t>(f.param)];
      const ckpt::Tensor* t = cp.trainable && cp.Find("master") != nullptr ? cp.Find("master") : cp.Find("param");
      at[{f.param, f.param_off}] = static_cast<int64_t>(values.size());
      values.resize(values.size() + static_cast<size_t>(f.count));
      if (s.ok()) s = ReadTensorF32(*t, f.param_off, f.count, values.data() + values.size() - f.count, readers, raw);
    }
  }
  if (!s.ok()) s = s.WithContext("rank " + std::to_string(rank) + " reading its parameters");
  ZERO_RETURN_IF_ERROR(ShareStatus(s, call));

  // 3. Parameters in place (and the full copies the stage keeps); this also zeroes the optimizer state.
  bool missing = false;
  ZERO_RETURN_IF_ERROR(InitParamsImpl([&](int param, int64_t off, int64_t n, float* dst) {
    auto it = at.find({param, off});
    if (it == at.end()) {
      missing = true;
      return;
    }
    std::memcpy(dst, values.data() + it->second, static_cast<size_t>(n) * 4);
  }));
  values = {};
  if (missing) s = Status::Internal("Load: InitParams asked for a fragment this rank did not read");

  // 4. Optimizer state, straight into its buffers (stage 0 holds all of it on every rank). On the NVMe tier, each
  // trainable bucket's record (its master written by InitParams above) is read, given the saved state, and written
  // back, a few buckets in flight.
  const std::vector<CkptKind> kinds = Kinds(pdt, mixed, options.optimizer);
  const bool stage0 = options.stage == Stage::kDataParallel;
  std::vector<float> staging;
  if (nvme != nullptr) {
    size_t next = 0;
    for (const Bucket& b : plan.buckets) {
      if (!b.trainable || !s.ok()) continue;
      const size_t i = next++ % nvme_bounce.size();
      char* rec = NvmeOpt(static_cast<int>(i));
      s = NvmeWaitIo(nvme_bounce_io[i]);
      if (s.ok()) s = NvmeReadOpt(b, rec, nvme_bounce_io[i]);
      if (s.ok()) s = NvmeWaitIo(nvme_bounce_io[i]);
      for (const CkptKind& k : kinds) {
        if (k.which < 2) continue;
        float* region = reinterpret_cast<float*>(rec) + (k.which - 1) * b.shard;  // [master | state0 | state1]
        for (const Fragment& f : b.fragments[static_cast<size_t>(rank)]) {
          if (s.ok()) s = ReadTensorF32(*saved[static_cast<size_t>(f.param)]->Find(k.name), f.param_off, f.count,
                                        region + f.shard_off, readers, raw);
        }
      }
      if (s.ok()) s = NvmeWriteOpt(b, rec, nvme_bounce_io[i]);
    }
    if (Status w = NvmeWaitAllIo(); s.ok()) s = w;
  }
  for (const CkptKind& k : kinds) {
    if (k.which < 2 || !s.ok() || nvme != nullptr) continue;
    DeviceBuffer& buf = k.which == 2 ? state0 : state1;
    const bool direct = device->host_addressable() || buf.kind() != MemoryKind::kDevice;
    for (const Bucket& b : plan.buckets) {
      if (!b.trainable) continue;
      for (int q = stage0 ? 0 : rank; q < (stage0 ? world : rank + 1) && s.ok(); ++q) {
        for (const Fragment& f : b.fragments[static_cast<size_t>(q)]) {
          const int64_t opos = stage0 ? b.offset + q * b.shard + f.shard_off : b.shard_offset + f.shard_off;
          const ckpt::Tensor& t = *saved[static_cast<size_t>(f.param)]->Find(k.name);
          for (int64_t done = 0; done < f.count && s.ok(); done += kChunkBytes / 4) {
            const int64_t n = std::min(kChunkBytes / 4, f.count - done);
            float* dst = buf.as<float>() + opos + done;
            if (direct) {
              s = ReadTensorF32(t, f.param_off + done, n, dst, readers, raw);
            } else {
              staging.resize(static_cast<size_t>(n));
              s = ReadTensorF32(t, f.param_off + done, n, staging.data(), readers, raw);
              if (s.ok()) s = device->CopyToDevice(dst, staging.data(), n * 4);
            }
          }
        }
      }
    }
  }
  if (!s.ok()) s = s.WithContext("rank " + std::to_string(rank) + " reading its optimizer state");
  s = ShareStatus(s, call);
  if (!s.ok()) {
    if (poison.ok()) {
      incomplete = s.WithContext("the engine's state is incomplete after a failed " + call +
                                 "; call Load (another checkpoint) or InitParams before training");
    }
    return s;
  }
  step = index.step;
  sgd_first_step = index.sgd_first_step;
  if (dynamic_scale && index.scaler.dynamic) {  // the saved scaler's state carries over; otherwise it starts fresh
    loss_scale = index.scaler.scale;
    scale_hysteresis = index.scaler.hysteresis;
    scaler_iter = index.scaler.iter;
    last_overflow_iter = index.scaler.last_overflow;
  }
  if (metadata != nullptr) *metadata = std::move(meta);
  return Status::Ok();
}

// ---------------------------------------------------------------------------------------------------------------
// Export

Status Engine::Impl::ExportImpl(const std::string& path, const ExportOptions& eo) {
  const std::string call = "Export(" + path + ")";
  Status local = CheckBetweenSteps("Export");
  auto bad = [&](const std::string& what) {
    if (local.ok()) local = Status::InvalidArgument(call + " on " + Where() + ": " + what);
  };
  if (path.empty()) bad("the path is empty");
  if (!eo.names.empty() && eo.names.size() != specs.size()) {
    bad("names has " + std::to_string(eo.names.size()) + " entries; give one per parameter (" +
        std::to_string(specs.size()) + ") or none");
  }
  if (eo.dtype != DType::kF32 && eo.dtype != DType::kBF16 && eo.dtype != DType::kF16) {
    bad(std::string("dtype ") + DTypeName(eo.dtype) + " is not f32, bf16 or f16");
  }
  std::set<std::string> seen;
  const bool names_ok = eo.names.empty() || eo.names.size() == specs.size();
  for (size_t p = 0; p < specs.size() && names_ok; ++p) {
    const std::string& n = eo.names.empty() ? specs[p].name : eo.names[p];
    if (eo.trainable_only && !specs[p].trainable) continue;
    if (n.empty() || n == "__metadata__") bad("parameter " + std::to_string(p) + " has the tensor name '" + n + "'");
    if (!seen.insert(n).second) bad("the tensor name '" + n + "' is used twice");
  }
  ZERO_RETURN_IF_ERROR(Agree(AgreeKind::kExport, Hash52(path, ""), local));
  ZERO_RETURN_IF_ERROR(DrainComm());
  params_pending = false;
  nvme_cached_opt = nvme_cached_param = -1;

  // The header (the same on every rank): tensors in spec order, contiguous.
  const int64_t es = static_cast<int64_t>(DTypeSize(eo.dtype));
  const char* dname = eo.dtype == DType::kF32 ? "F32" : eo.dtype == DType::kBF16 ? "BF16" : "F16";
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!eo.metadata.empty()) {
    nlohmann::ordered_json m = nlohmann::ordered_json::object();
    for (const auto& [k, v] : eo.metadata) m[k] = v;
    header["__metadata__"] = std::move(m);
  }
  std::vector<int64_t> begin(specs.size(), -1);
  int64_t data_bytes = 0;
  for (size_t p = 0; p < specs.size(); ++p) {
    if (eo.trainable_only && !specs[p].trainable) continue;
    begin[p] = data_bytes;
    data_bytes += specs[p].numel() * es;
    header[eo.names.empty() ? specs[p].name : eo.names[p]] = {
        {"dtype", dname}, {"shape", specs[p].shape}, {"data_offsets", {begin[p], data_bytes}}};
  }
  std::string h = header.dump();
  while (h.size() % 8 != 0) h.push_back(' ');
  const int64_t data_start = 8 + static_cast<int64_t>(h.size());
  const std::string tmp = path + ".tmp";
  Status s;
  auto fail = [&](const std::string& what) {
    s = Status::IoError(what + " " + tmp + " on rank " + std::to_string(rank) + ": " + std::strerror(errno));
  };
  if (rank == 0) {
    const std::string parent = std::filesystem::path(path).parent_path().string();
    if (!parent.empty()) s = ckpt::MakeDirs(parent);
    const int fd = s.ok() ? ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644) : -1;
    if (s.ok() && fd < 0) fail("cannot create");
    if (fd >= 0) {
      unsigned char len[8];
      for (int i = 0; i < 8; ++i) len[i] = static_cast<unsigned char>((h.size() >> (8 * i)) & 0xff);
      if (::pwrite(fd, len, 8, 0) != 8 || ::pwrite(fd, h.data(), h.size(), 8) != static_cast<ssize_t>(h.size())) {
        fail("cannot write the header of");
      } else if (::ftruncate(fd, data_start + data_bytes) != 0) {
        fail("cannot size");
      }
      ::close(fd);
    }
  }
  ZERO_RETURN_IF_ERROR(ShareStatus(s, call));

  // Each rank writes what it owns: trainable parameters from the fp32 master, frozen ones as stored.
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CLOEXEC);
  if (fd < 0) fail("cannot open");
  std::vector<char> raw;
  std::vector<float> wide;
  std::vector<char> out;
  for (const Bucket& b : plan.buckets) {
    if (!s.ok()) break;
    if (eo.trainable_only && !b.trainable) continue;
    for (const Fragment& f : b.fragments[static_cast<size_t>(rank)]) {
      const int which = b.trainable ? 1 : 0;
      const DType src_dt = which == 1 ? DType::kF32 : pdt;
      const int64_t chunk = kChunkBytes / 4;
      for (int64_t done = 0; done < f.count && s.ok(); done += chunk) {
        Fragment part = f;
        part.shard_off = f.shard_off + done;
        part.count = std::min(chunk, f.count - done);
        raw.resize(static_cast<size_t>(part.count * static_cast<int64_t>(DTypeSize(src_dt))));
        s = ReadOwned(b, part, which, raw.data());
        if (!s.ok()) break;
        const char* bytes = raw.data();
        if (src_dt != eo.dtype) {
          wide.resize(static_cast<size_t>(part.count));
          kernels::CastCpu(raw.data(), src_dt, wide.data(), DType::kF32, part.count, 1);
          out.resize(static_cast<size_t>(part.count * es));
          kernels::CastCpu(wide.data(), DType::kF32, out.data(), eo.dtype, part.count, 1);
          bytes = out.data();
        }
        const int64_t at = data_start + begin[static_cast<size_t>(f.param)] + (f.param_off + done) * es;
        const int64_t len = part.count * es;
        if (::pwrite(fd, bytes, static_cast<size_t>(len), at) != len) fail("cannot write");
      }
    }
  }
  if (fd >= 0) {
    if (s.ok() && ::fsync(fd) != 0) fail("cannot fsync");
    ::close(fd);
  }
  ZERO_RETURN_IF_ERROR(ShareStatus(s, call));
  if (rank == 0) {
    if (std::rename(tmp.c_str(), path.c_str()) != 0) {
      s = Status::IoError("cannot rename " + tmp + " to " + path + ": " + std::strerror(errno));
    } else {
      const std::string parent = std::filesystem::path(path).parent_path().string();
      s = ckpt::FsyncDir(parent.empty() ? "." : parent);
    }
  }
  return ShareStatus(s, call);
}

// ---------------------------------------------------------------------------------------------------------------

Status Engine::Save(const std::string& root, const std::string& tag, std::string_view metadata) {
  ZERO_RETURN_IF_ERROR(impl_->CheckUsable());
  return impl_->SaveImpl(root, tag, metadata);
}

Status Engine::Load(const std::string& root, const std::string& tag, std::string* metadata) {
  ZERO_RETURN_IF_ERROR(impl_->CheckUsable(/*allow_incomplete=*/true));
  return impl_->LoadImpl(root, tag, metadata);
}

Status Engine::Export(const std::string& path, const ExportOptions& options) {
  ZERO_RETURN_IF_ERROR(impl_->CheckUsable());
  return impl_->ExportImpl(path, options);
}

}  // namespace zero
