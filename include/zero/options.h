// zero::Options and zero::ParamSpec: everything an Engine is configured with, validated once in Engine::Open.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "zero/transformer.h"
#include "zero/types.h"

namespace zero {

// How much training state is partitioned across the ranks (Rajbhandari et al., "ZeRO", 2019).
enum class Stage : uint8_t {
  kDataParallel = 0,     // nothing partitioned; gradients all-reduced; the baseline
  kOptimizerStates = 1,  // optimizer state partitioned; gradients reduce-scattered after the last micro-step
  kGradients = 2,        // + gradients partitioned; reduce-scattered every micro-step into shard accumulators
  kParameters = 3,       // + parameters partitioned; gathered per unit at Acquire, freed at Release
  // Engine::Open chooses: the first configuration of the preference order (on the device: stage 0, 1, 2, 3; then
  // offloaded: 2 + optimizer offload, 3 + optimizer offload, 3 + parameter offload; then, with Options::nvme_path,
  // the same three with the optimizer state on NVMe and 3 + parameter offload with the shards there too) whose
  // device bytes (zero::Estimate) fit in the smallest free device memory of any rank minus the reserve
  // (Options::reserved_bytes, plus the activation estimate of Options::activation_model), and whose host bytes fit
  // Options::host_budget_bytes when that is given. Every rank makes the same choice; Engine::options() and
  // Engine::auto_choice() report it. See include/zero/estimate.h.
  kAuto = 255,
};
const char* StageName(Stage stage);

enum class OptimizerKind : uint8_t {
  kAdamW,        // torch.optim.AdamW: bias correction, decoupled weight decay; state m, v (8 bytes/param)
  kSgdMomentum,  // torch.optim.SGD with momentum (coupled weight decay); state: momentum (4 bytes/param)
};

struct AdamWOptions {
  float lr = 1e-3f;
  float beta1 = 0.9f;
  float beta2 = 0.999f;
  float eps = 1e-8f;
  float weight_decay = 1e-2f;
};

struct SgdOptions {
  float lr = 1e-2f;
  float momentum = 0.9f;
  float dampening = 0.0f;
  float weight_decay = 0.0f;
  bool nesterov = false;
};

// One parameter tensor as the trainer registers it. Every rank passes identical specs, in the same order.
struct ParamSpec {
  std::string name;            // unique; used in errors and checkpoints
  std::vector<int64_t> shape;  // row-major; numel = product (an empty shape is a scalar)
  int unit = 0;                // gather/reduce granularity (a block, the embedding); number units in forward order
  bool trainable = true;       // false: frozen (no gradient, no optimizer state; e.g. a LoRA base weight)
  float lr_mult = 1.0f;        // this parameter's learning rate = lr * lr_mult
  float wd_mult = 1.0f;        // this parameter's weight decay = weight_decay * wd_mult (0 for norms, biases)

  int64_t numel() const;
};

// Loss scaling for low-precision gradients. kAuto: DeepSpeed's dynamic scaler when param_dtype or grad_dtype is
// kF16, a fixed scale of 1 otherwise. Dynamic: start at `initial`; an overflow (any rank) skips the step and, after
// `hysteresis` overflows, halves the scale (not below min_scale); every growth_interval clean steps since the
// last overflow double it. kStatic: always `initial`. Scales are powers of two so that unscaling is exact.
struct LossScaleOptions {
  enum class Mode : uint8_t { kAuto, kDynamic, kStatic } mode = Mode::kAuto;
  float initial = 65536.0f;
  int growth_interval = 1000;
  int hysteresis = 2;
  float min_scale = 1.0f;
};

// ZeRO++ (Wang et al., 2023): less traffic between nodes, where the slow links are. A node is what the Comm's
// topology says (CommOptions::ranks_per_node, or the ranks that share memory). Each technique is off by default;
// any combination works. They need an explicit stage (not kAuto); hpz and qgz_bits need the same number of ranks
// on every node. README ("ZeRO++") has the traffic per step and the error bounds.
struct ZeroPlusPlusOptions {
  // hpZ, stage 3: a gather from the primary shards (across nodes) also keeps this rank's slice of the gathered unit
  // in a secondary partition over its node's L ranks; until the parameters change (Step, InitParams, Load) the
  // unit's next gathers (backward, later micro-steps, eval) come from there, inside the node, with the same values.
  // Costs p bytes per parameter of every non-persistent unit / L per rank (zero::Estimate counts it).
  bool hpz = false;
  // qwZ, stage 3: gathers from the primary shards move blockwise int8 (256 elements and an fp32 scale per block:
  // 1.016 bytes per parameter instead of p) and dequantize on arrival into param_dtype; every rank then computes
  // with the same values, within max|block| / 254 (+ half an ulp of param_dtype) of the parameters. The shards,
  // the fp32 master, the optimizer, persistent units and GatherFull are never quantized.
  bool qwz = false;
  // qgZ, stages 1-3: gradient reduce-scatters move blockwise int8 (8) or int4 (4) values, reduced inside each node
  // first and then across nodes, summed in fp32 in a fixed order (reproducible bit for bit). 0: off (default).
  // Costs staging of about (2 + 2/L) * bits/8 + 4/L bytes per element of the largest trainable bucket.
  int qgz_bits = 0;
};

struct Options {
  Stage stage = Stage::kGradients;
  Backend backend = Backend::kCpu;
  // Backend::kCuda: the trainer's compute stream, a cudaStream_t of the Comm's device (Comm::cuda_device()) that
  // outlives the engine. The trainer launches its kernels there; the engine records GradsReady/Release/Step on
  // it, makes it wait for gathers (Acquire, Param) and runs its own compute-side work there (the optimizer,
  // gradient zeroing, the norm). Its synchronous calls (InitParams, Load, Save, GatherFull's host reads) first
  // wait for the work already on it. nullptr (default): the legacy default stream, which is what kernels
  // launched without a stream use and PyTorch's default stream (cudaStreamLegacy means the same). A stream of
  // another device is refused at Open (an event of the device recorded on it must succeed), and so is
  // cudaStreamPerThread, which names another stream in each host thread. Per rank: ranks may pass different
  // streams. Must be null with Backend::kCpu.
  void* cuda_stream = nullptr;

  // Parameters as the trainer computes with them: kF32, kBF16 or kF16. With bf16/fp16 the engine keeps an fp32
  // master copy (counted as optimizer state, so AdamW costs 12 bytes per trainable parameter on its owner) and
  // writes the low-precision copy in the optimizer's pass; frozen parameters exist only in param_dtype.
  DType param_dtype = DType::kF32;
  // Gradients as the trainer accumulates them, and as they are reduced and accumulated across micro-steps:
  // kF32, kBF16 or kF16 (16-bit reductions add in fp32 and round every hop, as NCCL does; the optimizer widens
  // them exactly). kF16 turns on the dynamic loss scaler under kAuto, like a kF16 param_dtype.
  DType grad_dtype = DType::kF32;
  LossScaleOptions loss_scale;

  OptimizerKind optimizer = OptimizerKind::kAdamW;
  AdamWOptions adamw;
  SgdOptions sgd;

  // Global-norm gradient clipping (torch.nn.utils.clip_grad_norm_ semantics); 0 disables. Costs one fp64
  // sum of squares over the owned gradient shard and one 2-double all-reduce per step (done anyway).
  double clip_norm = 0.0;

  // Parameters per bucket (elements). A unit's parameters are split into buckets of at most this many
  // elements (a larger parameter gets a bucket of its own); each bucket is padded to a multiple of 64 * world
  // and is one collective. Default 2^25 (128 MiB in fp32): large enough to be bandwidth-bound.
  int64_t bucket_elements = int64_t{1} << 25;

  // Stages 2-3: full-size gradient buffers in the pool, each as large as the largest trainable unit. A unit
  // holds one from Acquire(u, kBackward) to GradsReady(u); a tied unit holds its buffer across the units in
  // between, so 2 is the minimum for models with tied weights. Default 2.
  int grad_pool_buffers = 2;

  // Issue each unit's reductions as soon as its GradsReady (and those of the units before it in reduction
  // order) arrives, so they run during the rest of backward. false: issue them all after the micro-step's last
  // GradsReady (stages 2-3 then need a gradient pool buffer per trainable unit, which Open allocates). Default true.
  bool overlap_reductions = true;
  // At most this many bucket reductions queued or running; GradsReady waits for the oldest beyond it. Default 4.
  int reductions_in_flight = 4;

  // Stage 3: buffers for gathered units (acquired or prefetched): at most this many units are resident at once.
  // Default 2: the unit in use and the next one, prefetched (FSDP2's default too). Raise it to 3 when the trainer
  // holds a unit while later ones are gathered (a tied embedding kept acquired until the head, keep_gathered_units),
  // or to prefetch further: each slot costs a unit's bytes, and with few large units at 2 ranks a third slot costs
  // more than sharding the parameters saves. large_gather_slots of them are as large as the largest non-persistent
  // unit, the others as large as the largest unit the large ones leave out, so that one oversized unit (a 108 MiB
  // tied embedding beside 14 MiB blocks) costs its size once, not gather_slots times. Never more slots than
  // non-persistent units.
  int gather_slots = 2;
  // Stage 3: how many gather slots fit every unit. 0 (default): the count in 1..gather_slots that needs the fewest
  // bytes (the most slots among equals). Any number of resident units up to gather_slots works, but at most this
  // many of them larger than the other slots; set it to gather_slots for slots that each fit every unit.
  int large_gather_slots = 0;
  // Stage 3: prefetch the next units of the recorded order while their gathered-but-unused bytes stay
  // within this budget. 0 disables prefetch. Default 256 MiB.
  int64_t prefetch_bytes = int64_t{256} << 20;
  // Stage 3: units whose full parameters take at most this many bytes stay gathered for the whole run
  // (they cost full memory, save two gathers per micro-step). Default 0: none.
  int64_t persist_bytes = 0;
  // Stage 3: units that stay gathered from their forward Acquire until their next backward Release, across
  // the forward -> backward turn (the last block; a tied embedding used again by the head). Default none.
  std::vector<int> keep_gathered_units;

  // CPU offload (stages 1-3): the fp32 master and the optimizer state live in pinned host memory and the
  // optimizer runs on the CPU (the SIMD AdamW), bucket by bucket: the reduced gradient shard is copied to the
  // host after the last micro-step, updated, and the new parameters copied back, pipelined so that the CPU
  // update of bucket b overlaps the copies of its neighbours and the all-gather of earlier buckets. Device
  // memory drops by (4 + K) bytes per owned trainable parameter; host memory grows by as much plus two staging
  // buffers of the largest bucket shard.
  bool offload_optimizer = false;
  // Stage 3, with offload_optimizer: parameter shards live in pinned host memory too; each gather first copies
  // this rank's shard to the device. Device memory keeps only gathered units, persistent units and buffers.
  bool offload_params = false;

  // The NVMe tier (stages 1-3, with offload_optimizer): the fp32 master and the optimizer state live in files on a
  // local disk instead of host memory, streamed bucket by bucket through nvme_buffers pinned bounce buffers behind
  // the CPU AdamW (bucket k+1 is read while bucket k is updated and bucket k-1 written back). Host memory then does
  // not grow with the model: it holds the bounce buffers (nvme_buffers x one bucket's state), the gradient staging
  // and 9 bytes of checksum per nvme_block_bytes of state. Each rank works in its own directory,
  // nvme_path/zero-nvme-r<rank>-p<pid>-<n>, created at Open (files preallocated: a full disk fails Open) and removed
  // with the engine: working storage, not a checkpoint (Save writes the usual shards from it, Load fills it). The
  // path must be on a local disk file system that supports O_DIRECT (ext4, xfs), not tmpfs. Cost: every step reads
  // and writes (4 + K) bytes per owned trainable parameter (K = 8 for AdamW, 4 for SGD) at the disk's speed. With
  // Stage::kAuto a path makes the tier a candidate, tried after every configuration that keeps the state in host
  // memory. Default empty: no tier.
  std::string nvme_path;
  // Stage 3 with offload_params and a tier: the parameter shards live in the tier too, read at every gather of a
  // unit and written by the optimizer. Default false (the shards stay in pinned host memory).
  bool nvme_params = false;
  // Bytes per read or write and per checksummed block of the tier: a multiple of 4096 (fio's block size). Default
  // 1 MiB.
  int64_t nvme_block_bytes = int64_t{1} << 20;
  // Reads and writes in flight per rank (fio's iodepth). Default 8.
  int nvme_queue_depth = 8;
  // Pinned bounce buffers of the tier, each one bucket's master and optimizer state (and parameter shard with
  // nvme_params). 3, the default, overlaps the read of bucket k+1, the update of k and the write of k-1; each one
  // more reads a bucket further ahead; 2 reads a bucket only after the one before it was written. At least 2.
  int nvme_buffers = 3;
  // Host memory per rank the engine may take (pinned and pageable: offloaded state, staging, the tier's bounce
  // buffers and checksums; what zero::Estimate lists as host bytes). 0 (default): not checked. Open fails with
  // OutOfMemory when the configuration needs more; Stage::kAuto takes the first configuration that fits both this
  // and the device.
  int64_t host_budget_bytes = 0;

  // ZeRO++'s hierarchical partitioning and quantized collectives (above). Default: all off.
  ZeroPlusPlusOptions zeropp;

  // Capacity of device memory in bytes (0: unlimited on the CPU backend; the free memory on CUDA). Exceeding it
  // fails with an OutOfMemory status that carries the per-category breakdown.
  int64_t device_capacity_bytes = 0;
  // Device bytes per rank the trainer needs besides the engine's buffers (activations, workspace, its own
  // kernels' scratch). Required (>= 0) with Stage::kAuto unless activation_model is given; kAuto fits the engine
  // into free memory minus this; otherwise used only by the configuration an out-of-memory status suggests.
  // Default -1: not given.
  int64_t reserved_bytes = -1;
  // Stage::kAuto's reserve by estimate: when activation_model.layers > 0, the activation memory of this LLaMA-style
  // model and micro-batch (zero::EstimateActivations, estimate.h) is kept free, on top of reserved_bytes when that
  // is given too (then for anything else: workspace, the CUDA context). Default: not given.
  TransformerShape activation_model;
  ActivationOptions activation_options;

  // Threads for CPU kernels on this rank. 0: cores per node / local ranks. Default 0.
  int cpu_threads = 0;
};

}  // namespace zero
