// Engine: the NVMe tier's part of the engine (Options::nvme_path): opening the rank's files, the transfers of a
// bucket's records through the pinned bounce buffers, reads for Save and Export, and stage-3 gathers of shards kept
// on the tier. The optimizer step's pipeline is in engine_step.cc (OffloadOptimizer), InitParams' and Load's writes
// in engine_step.cc and engine_checkpoint.cc; the file format in nvme_tier.h, the record sizes in buffer_plan.h.
//
// Files (per rank): 0 "optimizer.bin", one record per trainable bucket in plan order (its shard's fp32 master, then
// m and v, or momentum); 1 "params.bin" with nvme_params, one record per bucket (its shard in param_dtype). A
// bucket's records are what this rank owns of it, padding included (zero, as everywhere).
#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "engine_impl.h"

namespace zero {
namespace {
constexpr int kOptFile = 0;
constexpr int kParamFile = 1;
}  // namespace

Status Engine::Impl::OpenNvme() {
  const NvmeLayout& nv = nvme_layout;
  NvmeTierOptions o;
  o.root = options.nvme_path;
  o.rank = rank;
  o.block_bytes = options.nvme_block_bytes;
  o.queue_depth = options.nvme_queue_depth;
  // Outstanding at once: two per bounce buffer (a bucket's two records), one per gather bounce per run of buckets
  // (a unit's buckets are consecutive: one run), and the trainer thread's own.
  o.max_requests = 2 * options.nvme_buffers + 2 * nv.gather_bounces + 8;
  o.timeout = wait_timeout;
  std::vector<NvmeFileLayout> files;
  files.push_back({"optimizer.bin", "optimizer state", nv.opt_record_bytes, nv.opt_record_bucket});
  if (nv.params) {
    std::vector<int> buckets(nv.param_record_bytes.size());
    for (size_t b = 0; b < buckets.size(); ++b) buckets[b] = static_cast<int>(b);
    files.push_back({"params.bin", "parameter shard", nv.param_record_bytes, buckets});
  }
  nvme_bounce_io.assign(nvme_bounce.size(), NvmeInFlight());
  nvme_gather_io.assign(nvme_gather_bounce.size(), NvmeInFlight());
  return NvmeTier::Open(o, std::move(files), nvme_checksums.data(), nvme_checksums.bytes(), &nvme);
}

Status Engine::Impl::NvmeWaitIo(NvmeInFlight& io) {
  Status first;
  for (int i = 0; i < io.count; ++i) {
    Status s = nvme->Wait(io.ticket[i]);
    if (first.ok() && !s.ok()) first = s;
  }
  io.count = 0;
  return first;
}

Status Engine::Impl::NvmeWaitAllIo() {
  Status first;
  for (std::vector<NvmeInFlight>* v : {&nvme_bounce_io, &nvme_gather_io}) {
    for (NvmeInFlight& io : *v) {
      Status s = NvmeWaitIo(io);
      if (first.ok() && !s.ok()) first = s;
    }
  }
  return first;
}

Status Engine::Impl::NvmeReadOpt(const Bucket& b, char* at, NvmeInFlight& io) {
  const int r = nvme_layout.opt_record[static_cast<size_t>(b.index)];
  ZERO_RETURN_IF_ERROR(nvme->Read(kOptFile, r, 1, at, &io.ticket[io.count]));
  ++io.count;
  return Status::Ok();
}

Status Engine::Impl::NvmeWriteOpt(const Bucket& b, const char* at, NvmeInFlight& io) {
  const int r = nvme_layout.opt_record[static_cast<size_t>(b.index)];
  ZERO_RETURN_IF_ERROR(nvme->Write(kOptFile, r, 1, at, &io.ticket[io.count]));
  ++io.count;
  return Status::Ok();
}

Status Engine::Impl::NvmeReadParams(const Bucket& b, char* at, NvmeInFlight& io) {
  ZERO_RETURN_IF_ERROR(nvme->Read(kParamFile, b.index, 1, at, &io.ticket[io.count]));
  ++io.count;
  return Status::Ok();
}

Status Engine::Impl::NvmeWriteParams(const Bucket& b, const char* at, NvmeInFlight& io) {
  ZERO_RETURN_IF_ERROR(nvme->Write(kParamFile, b.index, 1, at, &io.ticket[io.count]));
  ++io.count;
  return Status::Ok();
}

void Engine::Impl::NvmeZeroParamPadding(const Bucket& b, char* at) const {
  int64_t covered = 0;  // fragments are ordered by shard_off
  for (const Fragment& f : b.fragments[static_cast<size_t>(rank)]) {
    if (f.shard_off > covered) std::memset(at + covered * pe, 0, static_cast<size_t>((f.shard_off - covered) * pe));
    covered = f.shard_off + f.count;
  }
  const int64_t record = nvme_layout.param_record_bytes[static_cast<size_t>(b.index)];
  std::memset(at + covered * pe, 0, static_cast<size_t>(record - covered * pe));
}

bool Engine::Impl::NvmeHolds(const Bucket& b, int which) const {
  if (nvme == nullptr) return false;
  if (which == 0) return nvme_layout.params;
  return b.trainable;
}

Status Engine::Impl::NvmeReadOwned(const Bucket& b, const Fragment& f, int which, void* host_dst) {
  if (which == 0) {
    // Frozen buckets may be larger than any trainable one: parameter records go through a gather bounce buffer,
    // which fits a whole unit. Between steps no gather is in flight.
    char* at = nvme_gather_bounce[0].as<char>();
    if (nvme_cached_param != b.index) {
      nvme_cached_param = -1;
      ZERO_RETURN_IF_ERROR(NvmeWaitIo(nvme_gather_io[0]));
      ZERO_RETURN_IF_ERROR(NvmeReadParams(b, at, nvme_gather_io[0]));
      ZERO_RETURN_IF_ERROR(NvmeWaitIo(nvme_gather_io[0]));
      nvme_cached_param = b.index;
    }
    std::memcpy(host_dst, at + f.shard_off * pe, static_cast<size_t>(f.count * pe));
    return Status::Ok();
  }
  char* at = NvmeOpt(0);
  if (nvme_cached_opt != b.index) {
    nvme_cached_opt = -1;
    ZERO_RETURN_IF_ERROR(NvmeWaitIo(nvme_bounce_io[0]));
    ZERO_RETURN_IF_ERROR(NvmeReadOpt(b, at, nvme_bounce_io[0]));
    ZERO_RETURN_IF_ERROR(NvmeWaitIo(nvme_bounce_io[0]));
    nvme_cached_opt = b.index;
  }
  // The record: master, then state0, then state1, each `shard` fp32.
  const float* region = reinterpret_cast<const float*>(at) + (which - 1) * b.shard;
  std::memcpy(host_dst, region + f.shard_off, static_cast<size_t>(f.count) * 4);
  return Status::Ok();
}

std::shared_ptr<NvmeGather> Engine::Impl::StartNvmeGather(const std::vector<int>& bucket_list, char* dst) {
  auto g = std::make_shared<NvmeGather>();
  const size_t n = nvme_gather_bounce.size();
  g->bounce = nvme_gather_next;
  nvme_gather_next = static_cast<int>((static_cast<size_t>(nvme_gather_next) + 1) % n);
  // The gather that used this buffer last must have copied out of it (on CUDA: its copies ran), and its reads
  // were waited for by that gather's task.
  Status s = WaitOnHost(*nvme_gather_free[static_cast<size_t>(g->bounce)], "the NVMe gather buffer's previous use");
  char* base = nvme_gather_bounce[static_cast<size_t>(g->bounce)].as<char>();
  int64_t used = 0;
  const int64_t capacity = nvme_gather_bounce[static_cast<size_t>(g->bounce)].bytes();
  // One read per run of consecutive buckets (a unit's buckets are consecutive in plan order: usually one read).
  for (size_t i = 0; i < bucket_list.size() && s.ok();) {
    size_t j = i + 1;
    while (j < bucket_list.size() && bucket_list[j] == bucket_list[j - 1] + 1) ++j;
    int64_t run = 0;
    for (size_t k = i; k < j; ++k) {
      const Bucket& b = plan.buckets[static_cast<size_t>(bucket_list[k])];
      const int64_t rb = nvme_layout.param_record_bytes[static_cast<size_t>(b.index)];
      char* out = PAt(dst, buckets[static_cast<size_t>(b.index)].unit_offset);
      g->pieces.push_back({PAt(out, rank * b.shard), base + used + run, b.shard * pe});
      run += rb;
    }
    if (used + run > capacity) {
      s = Status::Internal("NVMe gather of " + std::to_string(bucket_list.size()) + " buckets does not fit its buffer");
      break;
    }
    uint64_t ticket = 0;
    s = nvme->Read(kParamFile, bucket_list[i], static_cast<int>(j - i), base + used, &ticket);
    if (s.ok()) g->tickets.push_back(ticket);
    used += run;
    i = j;
  }
  g->error = s;
  return g;
}

Status Engine::Impl::FinishNvmeGather(const NvmeGather& g, void* stream) {
  Status s = g.error;
  for (uint64_t t : g.tickets) {
    Status w = nvme->Wait(t);
    if (s.ok() && !w.ok()) s = w;
  }
  if (!s.ok()) {
    // The peers are about to wait in this gather's all-gather: let them fail with this reason instead.
    comm->Abort(s);
    return s;
  }
  for (const NvmeGather::Piece& p : g.pieces) ZERO_RETURN_IF_ERROR(device->Copy(p.to, p.from, p.bytes, stream));
  return Status::Ok();
}

NvmeStats Engine::nvme_stats() const {
  NvmeStats out;
  if (impl_->nvme == nullptr) return out;
  const IoStats s = impl_->nvme->stats();
  out.bytes_read = s.bytes_read;
  out.bytes_written = s.bytes_written;
  out.busy_seconds = s.busy_seconds;
  return out;
}

}  // namespace zero
