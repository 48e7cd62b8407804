// zgpu-probe: facts about a GPU machine's CUDA runtime and NCCL that zero's CUDA backend relies on, settled in
// seconds at the start of a GPU run (scripts/gpu/gpu_run.sh) so that its other results can be read against them.
// Built by scripts/gpu/gpu_bundle.sh:  nvcc -O2 -arch=sm_90 probe.cu -o zgpu-probe -lnccl
//   zgpu-probe versions          the loaded NCCL, the CUDA runtime and driver, the devices
//   zgpu-probe basics            cudaErrorNotReady and the last-error state, cudaHostRegister on THP memory, a
//                                pageable cudaMemcpy against a non-blocking stream, NCCL world-1 semantics
//   zgpu-probe nccl2 RANK DIR [BLOCKING]   two processes on one GPU (the id travels through DIR/id): whether the
//                                loaded NCCL lets them share it, and what a non-blocking communicator answers to two
//                                collectives issued back to back (what NcclComm must settle)
// Every line it prints is "probe: <name>: <result>" so that the log can be grepped.
#include <cuda_runtime.h>
#include <nccl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <thread>

#define P(...) (std::printf("probe: " __VA_ARGS__), std::printf("\n"), std::fflush(stdout))

__global__ void Spin(long long cycles) {
  const long long start = clock64();
  while (clock64() - start < cycles) {
  }
}

__global__ void Fill(float* p, float v, size_t n) {
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < n; i += size_t{gridDim.x} * blockDim.x) p[i] = v;
}

static const char* E(cudaError_t e) { return cudaGetErrorName(e); }

static void NotReadyProbe() {
  cudaStream_t s;
  cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
  cudaEvent_t ev;
  cudaEventCreateWithFlags(&ev, cudaEventDisableTiming);
  (void)cudaGetLastError();
  Spin<<<1, 1, 0, s>>>(2000LL * 1000 * 1000);  // ~1 s at 2 GHz
  cudaEventRecord(ev, s);
  const cudaError_t q = cudaStreamQuery(s);
  const cudaError_t peek1 = cudaPeekAtLastError();
  const cudaError_t eq = cudaEventQuery(ev);
  const cudaError_t peek2 = cudaPeekAtLastError();
  // What zero's launch check (cudaGetLastError right after a launch) would see after such polls:
  Fill<<<1, 32, 0, s>>>(nullptr, 0.f, 0);
  const cudaError_t after_launch = cudaGetLastError();
  P("notready: cudaStreamQuery=%s peek=%s | cudaEventQuery=%s peek=%s | cudaGetLastError after next launch=%s "
    "(cudaErrorNotReady here means zero's Launched()/LORA_CUDA(cudaGetLastError()) checks fail after every poll)",
    E(q), E(peek1), E(eq), E(peek2), E(after_launch));
  cudaStreamSynchronize(s);
  cudaEventDestroy(ev);
  cudaStreamDestroy(s);
}

static void HostRegisterProbe() {
  const size_t bytes = size_t{64} << 20;
  void* raw = mmap(nullptr, bytes + (2 << 20), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  char* p = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(raw) + (2 << 20) - 1) & ~uintptr_t((2 << 20) - 1));
  const int adv = madvise(p, bytes, MADV_HUGEPAGE);
  const int pop = madvise(p, bytes, 23 /* MADV_POPULATE_WRITE */);
  const auto t0 = std::chrono::steady_clock::now();
  const cudaError_t reg = cudaHostRegister(p, bytes, cudaHostRegisterPortable);
  const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  (void)cudaGetLastError();
  cudaPointerAttributes attr{};
  const cudaError_t pa = cudaPointerGetAttributes(&attr, p);
  float* d = nullptr;
  cudaMalloc(&d, bytes);
  Fill<<<1024, 256>>>(d, 3.f, bytes / 4);
  cudaStream_t s;
  cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
  cudaDeviceSynchronize();
  const auto t1 = std::chrono::steady_clock::now();
  cudaError_t cp = cudaMemcpyAsync(p, d, bytes, cudaMemcpyDeviceToHost, s);
  if (cp == cudaSuccess) cp = cudaStreamSynchronize(s);
  const double cms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t1).count();
  P("hostregister: madvise(HUGEPAGE)=%d populate=%d cudaHostRegister(64 MiB)=%s in %.1f ms; attr=%s type=%d; "
    "D2H 64 MiB=%s %.2f GB/s, value %.1f",
    adv, pop, E(reg), ms, E(pa), static_cast<int>(attr.type), E(cp), bytes / cms / 1e6,
    reinterpret_cast<float*>(p)[bytes / 8]);
  if (reg == cudaSuccess) cudaHostUnregister(p);
  cudaFree(d);
  cudaStreamDestroy(s);
  munmap(raw, bytes + (2 << 20));
}

// zero's InitParams: cudaMemcpy (legacy stream) from pageable memory, then work on a non-blocking stream with no
// event between them. Counts how often the non-blocking stream saw stale data.
static void PageableCopyRaceProbe() {
  const size_t n = size_t{64} << 20;  // 256 MiB of floats
  float* d = nullptr;
  float* out = nullptr;
  cudaMalloc(&d, n * 4);
  cudaMalloc(&out, 4);
  float* h = static_cast<float*>(std::malloc(n * 4));
  cudaStream_t s;
  cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
  int stale = 0;
  for (int it = 1; it <= 8; ++it) {
    for (size_t i = 0; i < n; ++i) h[i] = static_cast<float>(it);
    cudaMemcpy(d, h, n * 4, cudaMemcpyHostToDevice);  // legacy stream, pageable source
    cudaMemcpyAsync(out, d + n - 1, 4, cudaMemcpyDeviceToDevice, s);  // non-blocking stream: no ordering
    float got = 0;
    cudaMemcpyAsync(&got, out, 4, cudaMemcpyDeviceToHost, s);
    cudaStreamSynchronize(s);
    stale += got != static_cast<float>(it);
  }
  P("pageable-h2d-vs-nonblocking-stream: %d of 8 reads of the last element saw stale data", stale);
  std::free(h);
  cudaFree(d);
  cudaFree(out);
  cudaStreamDestroy(s);
}

static const char* N(ncclResult_t r) { return ncclGetErrorString(r); }

static void NcclWorld1Probe(int blocking) {
  ncclUniqueId id;
  ncclResult_t r = ncclGetUniqueId(&id);
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = blocking;
  ncclComm_t comm = nullptr;
  const auto t0 = std::chrono::steady_clock::now();
  if (r == ncclSuccess) r = ncclCommInitRankConfig(&comm, 1, id, 0, &config);
  ncclResult_t state = r;
  while (state == ncclInProgress) ncclCommGetAsyncError(comm, &state);
  const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  float* d = nullptr;
  cudaMalloc(&d, 1 << 20);
  cudaStream_t s;
  cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
  ncclResult_t a = state == ncclSuccess ? ncclAllReduce(d, d, 1000, ncclFloat, ncclSum, comm, s) : state;
  ncclResult_t b = state == ncclSuccess ? ncclAllReduce(d, d, 1000, ncclFloat, ncclSum, comm, s) : state;
  ncclResult_t g1 = ncclGroupStart();
  ncclResult_t g2 = state == ncclSuccess ? ncclAllGather(d, d, 10, ncclFloat, comm, s) : state;
  ncclResult_t g3 = ncclGroupEnd();
  cudaStreamSynchronize(s);
  P("nccl world 1 (blocking=%d): init=%s after polling %s in %.0f ms; allreduce=%s, immediately again=%s; "
    "group=%s/%s/%s",
    blocking, N(r), N(state), ms, N(a), N(b), N(g1), N(g2), N(g3));
  if (comm != nullptr) {
    ncclResult_t f = ncclCommFinalize(comm);
    while (f == ncclInProgress) ncclCommGetAsyncError(comm, &f);
    ncclCommDestroy(comm);
  }
  cudaFree(d);
  cudaStreamDestroy(s);
}

static int Basics() {
  int version = 0, runtime = 0, driver = 0, count = 0;
  ncclGetVersion(&version);
  cudaRuntimeGetVersion(&runtime);
  cudaDriverGetVersion(&driver);
  const cudaError_t c = cudaGetDeviceCount(&count);
  P("versions: nccl %d, cudart %d, driver %d, devices %d (%s)", version, runtime, driver, count, E(c));
  if (count == 0) return 1;
  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, 0);
  int least = 0, greatest = 0;
  cudaDeviceGetStreamPriorityRange(&least, &greatest);
  P("device: %s cc %d.%d, %d SMs, %.1f GiB, stream priorities %d..%d", prop.name, prop.major, prop.minor,
    prop.multiProcessorCount, prop.totalGlobalMem / 1073741824.0, least, greatest);
  // Stream-ordered memory pools: NcclComm's buffers and the LoRA model's workspace use them where the device has
  // them, cudaMalloc/cudaFree where not.
  int pools = 0;
  const cudaError_t pa = cudaDeviceGetAttribute(&pools, cudaDevAttrMemoryPoolsSupported, 0);
  void* pool_probe = nullptr;
  const cudaError_t pm = cudaMallocAsync(&pool_probe, 1 << 20, nullptr);
  const cudaError_t pf = pm == cudaSuccess ? cudaFreeAsync(pool_probe, nullptr) : cudaSuccess;
  const cudaError_t ps = cudaStreamSynchronize(nullptr);
  cudaGetLastError();
  P("pools: cudaDevAttrMemoryPoolsSupported=%d (%s); cudaMallocAsync(1 MiB)=%s, cudaFreeAsync=%s, sync=%s", pools,
    E(pa), E(pm), E(pf), E(ps));
  NotReadyProbe();
  HostRegisterProbe();
  PageableCopyRaceProbe();
  NcclWorld1Probe(1);
  NcclWorld1Probe(0);
  return 0;
}

// Two processes, one GPU. Rank 0 writes the unique id to DIR/id; rank 1 waits for it.
static int Nccl2(int rank, const std::string& dir, int blocking) {
  ncclUniqueId id;
  const std::string path = dir + "/id";
  if (rank == 0) {
    ncclGetUniqueId(&id);
    std::ofstream(path + ".tmp", std::ios::binary).write(reinterpret_cast<char*>(&id), sizeof(id));
    std::rename((path + ".tmp").c_str(), path.c_str());
  } else {
    for (int i = 0; i < 2000; ++i) {
      std::ifstream f(path, std::ios::binary);
      if (f.read(reinterpret_cast<char*>(&id), sizeof(id))) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  }
  cudaSetDevice(0);
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = blocking;
  ncclComm_t comm = nullptr;
  ncclResult_t r = ncclCommInitRankConfig(&comm, 2, id, rank, &config);
  ncclResult_t state = r;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (state == ncclInProgress && std::chrono::steady_clock::now() < deadline) ncclCommGetAsyncError(comm, &state);
  P("nccl2 rank %d (blocking=%d, NCCL_MULTI_RANK_GPU_ENABLE=%s): init=%s -> %s%s%s", rank, blocking,
    std::getenv("NCCL_MULTI_RANK_GPU_ENABLE") ? std::getenv("NCCL_MULTI_RANK_GPU_ENABLE") : "unset", N(r), N(state),
    state != ncclSuccess && comm ? " last error: " : "", state != ncclSuccess && comm ? ncclGetLastError(comm) : "");
  if (state != ncclSuccess) {
    if (comm != nullptr) ncclCommAbort(comm);
    return 1;
  }
  float* d = nullptr;
  cudaMalloc(&d, 1 << 20);
  cudaMemset(d, 0, 1 << 20);
  cudaDeviceSynchronize();
  cudaStream_t s;
  cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
  // zero's asynchronous path: enqueue, record an event at once, enqueue the next collective at once.
  ncclResult_t a = ncclAllReduce(d, d, 1000, ncclFloat, ncclSum, comm, s);
  ncclResult_t b = ncclAllReduce(d, d, 1000, ncclFloat, ncclSum, comm, s);
  ncclResult_t st = ncclSuccess;
  ncclCommGetAsyncError(comm, &st);
  while (st == ncclInProgress) ncclCommGetAsyncError(comm, &st);
  cudaStreamSynchronize(s);
  P("nccl2 rank %d: first allreduce=%s, second issued at once=%s, state after=%s (ncclInProgress then an error at "
    "once: zero's Track() path is wrong for world >= 2)",
    rank, N(a), N(b), N(st));
  ncclCommAbort(comm);
  return 0;
}

static int Versions() {
  int version = 0, runtime = 0, driver = 0, count = 0;
  const ncclResult_t v = ncclGetVersion(&version);
  cudaRuntimeGetVersion(&runtime);
  cudaDriverGetVersion(&driver);
  const cudaError_t c = cudaGetDeviceCount(&count);
  std::string names;
  for (int d = 0; d < count; ++d) {
    cudaDeviceProp prop{};
    if (cudaGetDeviceProperties(&prop, d) == cudaSuccess) {
      names += std::string(d ? ", " : "") + prop.name + " (cc " + std::to_string(prop.major) + "." +
               std::to_string(prop.minor) + ")";
    }
  }
  P("versions: nccl %d (%s), cudart %d, driver API %d, devices %d (%s) %s", version, N(v), runtime, driver, count,
    E(c), names.c_str());
  return c == cudaSuccess && count > 0 ? 0 : 1;
}

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "basics";
  if (mode == "versions") return Versions();
  if (mode == "basics") return Basics();
  if (mode == "nccl2" && argc >= 4) return Nccl2(std::atoi(argv[2]), argv[3], argc >= 5 ? std::atoi(argv[4]) : 0);
  std::fprintf(stderr, "usage: zgpu-probe versions | basics | nccl2 RANK DIR [BLOCKING]\n");
  return 2;
}
