// The cooperative CUDA kernels' own source, run on the CPU through tests/testing/cuda_emulation.h (blocks of real
// threads meeting at __syncthreads), against the CPU instantiations they must equal bit for bit:
//  * the batched sum of squares (kernels/sum_squares_kernels.cuh: BlockPartialsKernel, FindTask,
//    RangeTotalsKernel) equals SumSquaresCpu for fp32 / bf16 / fp16 batches with empty ranges, lengths around
//    kSumBlock, non-finite values, and more blocks than grid x kRows so that the grid-stride loop repeats (its last
//    tile part empty);
//  * quantizing (QuantizeKernel: a shared-memory max tree per block) equals QuantizeCpu's payload byte for byte
//    (padding included) for 4 and 8 bits, tails and blocks holding inf / NaN / only zeros; dequantizing, adding,
//    widening and converting kernels equal their CPU twins;
//  * every row functor of the LoRA model (model_kernels.cuh) through RowKernel / BlockRow (model_cuda_kernels.cuh)
//    equals the same functor on SerialRow, with the types model_cuda.cu instantiates and row lengths below, equal
//    to and above kRowLanes; element and column functors through ForEachKernel equal a serial loop.
// Grids are chosen small so that every grid-stride loop takes several iterations. The tsan build runs this suite:
// a missing barrier between a shared-memory write and another thread's read is a reported race.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

// First among the project's headers: the kernel headers below compile as emulated device code.
// clang-format off
#include "testing/cuda_emulation.h"
// clang-format on

#include "examples/lora_finetune/model_cuda_kernels.cuh"
#include "examples/lora_finetune/model_kernels.cuh"
#include "kernels/cast.cuh"
#include "kernels/cpu_kernels.h"
#include "kernels/quantize.h"
#include "kernels/quantize_kernels.cuh"
#include "kernels/sum_squares_kernels.cuh"
#include "testing/random.h"
#include "zero/types.h"

namespace zero::kernels {
namespace {

using zero::testing::Emulate;
using zero::testing::RandomFloats;

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNan = std::numeric_limits<float>::quiet_NaN();

template <typename T>
bool SameBytes(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

// ---------------------------------------------------------------------------------------------------------------
// Sum of squares.

// n values in [-2, 2) with a few non-finite ones where `nonfinite` (inf, -inf, NaN), stored as `dtype`.
std::vector<uint8_t> SumSquaresData(int64_t n, DType dtype, uint32_t seed, bool nonfinite) {
  std::vector<float> v = RandomFloats(n, seed, -2.f, 2.f);
  if (nonfinite && n > 2) {
    v[0] = kInf;
    v[static_cast<size_t>(n / 2)] = kNan;
    v[static_cast<size_t>(n - 1)] = -kInf;
  }
  const size_t elem = dtype == DType::kF32 ? 4 : 2;
  std::vector<uint8_t> bytes(static_cast<size_t>(n) * elem);
  for (int64_t i = 0; i < n; ++i) {
    if (dtype == DType::kF32) {
      std::memcpy(bytes.data() + i * 4, &v[static_cast<size_t>(i)], 4);
    } else {
      const uint16_t h =
          dtype == DType::kBF16 ? FloatToBf16(v[static_cast<size_t>(i)]) : FloatToF16(v[static_cast<size_t>(i)]);
      std::memcpy(bytes.data() + i * 2, &h, 2);
    }
  }
  return bytes;
}

// The batch through BlockPartialsKernel<E> on `grid` blocks of kRows threads, then RangeTotalsKernel on
// totals_grid blocks of totals_threads: SumSquaresCuda's two launches, with the scratch in host memory.
template <typename E>
std::vector<SumSquares> EmulatedSumSquares(const std::vector<SumSquaresRange>& ranges, unsigned grid,
                                           unsigned totals_grid, unsigned totals_threads) {
  const auto count = static_cast<int64_t>(ranges.size());
  std::vector<SumSquaresTask> tasks(ranges.size());
  const int64_t blocks = BuildSumSquaresTasks(ranges.data(), count, tasks.data());
  const SumSquares poison{kNan, -1};  // every partial and total must be written
  std::vector<SumSquares> partials(static_cast<size_t>(blocks), poison), totals(ranges.size(), poison);
  if (blocks > 0) {
    Emulate(dim3(grid), dim3(kRows), BlockPartialsKernel<E>, tasks.data(), count, blocks, partials.data());
  }
  Emulate(dim3(totals_grid), dim3(totals_threads), RangeTotalsKernel, tasks.data(), count, partials.data(),
          totals.data());
  return totals;
}

// Ranges of the given lengths (data kept in *storage) through the emulated kernels and SumSquaresCpu: bitwise equal.
template <typename E>
void ExpectSumSquaresLikeCpu(DType dtype, const std::vector<int64_t>& lengths, unsigned grid) {
  std::vector<std::vector<uint8_t>> storage;
  std::vector<SumSquaresRange> ranges;
  for (size_t r = 0; r < lengths.size(); ++r) {
    storage.push_back(SumSquaresData(lengths[r], dtype, static_cast<uint32_t>(r + 1), /*nonfinite=*/r % 3 == 2));
  }
  for (size_t r = 0; r < lengths.size(); ++r) ranges.push_back(SumSquaresRange{storage[r].data(), lengths[r]});
  std::vector<SumSquares> cpu(ranges.size());
  ASSERT_TRUE(SumSquaresCpu(ranges.data(), static_cast<int64_t>(ranges.size()), dtype, 1, cpu.data()));
  const std::vector<SumSquares> emulated = EmulatedSumSquares<E>(ranges, grid, 2, 3);
  int64_t nonfinite = 0;
  for (size_t r = 0; r < ranges.size(); ++r) {
    EXPECT_EQ(std::memcmp(&cpu[r].sum, &emulated[r].sum, sizeof(double)), 0)
        << "range " << r << " (" << lengths[r] << " elements): cpu " << cpu[r].sum << ", emulated " << emulated[r].sum;
    EXPECT_EQ(cpu[r].nonfinite, emulated[r].nonfinite) << "range " << r;
    nonfinite += cpu[r].nonfinite;
  }
  // The data is what the test means it to be: non-finite values present, sums not trivially zero.
  EXPECT_GT(nonfinite, 0);
}

// Lengths: empty ranges first, inside and last (FindTask's shared first_block), one element, one short of a block,
// exactly one block, one past it, several blocks with a tail.
const std::vector<int64_t> kSmallBatch = {0, 1, kSumBlock - 1, kSumBlock, 0, kSumBlock + 1, 3 * kSumBlock + 17, 5, 0};

// The small batch on reduce.cu's own grid (SumSquaresGrid: one CUDA block for these few blocks).
int64_t BatchBlocks(const std::vector<int64_t>& lengths) {
  int64_t blocks = 0;
  for (const int64_t n : lengths) blocks += SumBlocks(n);
  return blocks;
}

TEST(CudaEmulationTest, SumSquaresF32EqualsCpuBitwise) {
  ExpectSumSquaresLikeCpu<F32Elem>(DType::kF32, kSmallBatch, SumSquaresGrid(BatchBlocks(kSmallBatch)));
}
TEST(CudaEmulationTest, SumSquaresF16EqualsCpuBitwise) {
  ExpectSumSquaresLikeCpu<F16Elem>(DType::kF16, kSmallBatch, SumSquaresGrid(BatchBlocks(kSmallBatch)));
}

// kRows + 3 blocks on one CUDA block: the grid-stride loop runs twice, the second time with only 3 rows holding a
// block (the rest must write nothing and still meet every barrier). bf16 (the small batch above is fp32 and fp16:
// each launch of kRows threads costs about a second of context switches, so each dtype gets one).
TEST(CudaEmulationTest, SumSquaresGridStrideRepeats) {
  const std::vector<int64_t> lengths = {2 * kSumBlock + 1, 0, (kRows - 2) * kSumBlock + 100, 7};
  ASSERT_EQ(BatchBlocks(lengths), kRows + 3);
  ExpectSumSquaresLikeCpu<Bf16Elem>(DType::kBF16, lengths, 1);
}

// ---------------------------------------------------------------------------------------------------------------
// Quantization.

const QuantElem kKinds[] = {QuantElem::kF32, QuantElem::kBf16, QuantElem::kF16};

size_t ElemBytes(QuantElem k) { return k == QuantElem::kF32 ? 4 : 2; }

// n values stored as `kind`, with block-dependent magnitudes; block 1 holds an inf, block 2 only zeros, block 3 a
// NaN (where n reaches them).
std::vector<uint8_t> QuantData(int64_t n, QuantElem kind, uint32_t seed) {
  std::vector<float> v = RandomFloats(n, seed, -1.f, 1.f);
  for (int64_t i = 0; i < n; ++i) v[static_cast<size_t>(i)] *= static_cast<float>(1 + (i / kQuantBlock) * 3);
  if (n > kQuantBlock + 10) v[kQuantBlock + 10] = -kInf;
  for (int64_t i = 2 * kQuantBlock; i < std::min<int64_t>(n, 3 * kQuantBlock); ++i) v[static_cast<size_t>(i)] = 0.f;
  if (n > 4 * kQuantBlock - 1) v[4 * kQuantBlock - 1] = kNan;
  std::vector<uint8_t> bytes(static_cast<size_t>(n) * ElemBytes(kind));
  for (int64_t i = 0; i < n; ++i) StoreFromFloat(bytes.data(), i, v[static_cast<size_t>(i)], kind);
  return bytes;
}

// 1: a block of one element; 257: a full block and a one-element tail (4 bits: a half byte); 4 * 256 + 5: five
// blocks on a grid of two, so each CUDA block quantizes two or three.
const int64_t kQuantSizes[] = {1, 257, 4 * kQuantBlock + 5};

TEST(CudaEmulationTest, QuantizeEqualsCpuBytes) {
  for (const int bits : {4, 8}) {
    for (const QuantElem kind : kKinds) {
      for (const int64_t n : kQuantSizes) {
        SCOPED_TRACE(::testing::Message() << bits << " bits, kind " << static_cast<int>(kind) << ", n " << n);
        const std::vector<uint8_t> src = QuantData(n, kind, static_cast<uint32_t>(n));
        const auto bytes = static_cast<size_t>(QuantPayloadBytes(n, bits));
        std::vector<uint8_t> cpu(bytes, 0xA5), emulated(bytes, 0x5A);  // different garbage: every byte is written
        QuantizeCpu(src.data(), kind, n, bits, cpu.data(), 1);
        const int64_t blocks = QuantBlocks(n);
        Emulate(dim3(2), dim3(kPairThreads), QuantizeKernel, src.data(), kind, n, bits,
                reinterpret_cast<float*>(emulated.data()), emulated.data() + 4 * blocks, QuantCodeBytes(n, bits),
                QuantPayloadBytes(n, bits) - 4 * blocks);
        EXPECT_TRUE(SameBytes(cpu, emulated));
        if (n > kQuantBlock) {  // again on quantize.cu's own grid (QuantizeGrid: a CUDA block per block here)
          std::vector<uint8_t> launcher(bytes, 0x5A);
          Emulate(dim3(QuantizeGrid(n)), dim3(kPairThreads), QuantizeKernel, src.data(), kind, n, bits,
                  reinterpret_cast<float*>(launcher.data()), launcher.data() + 4 * blocks, QuantCodeBytes(n, bits),
                  QuantPayloadBytes(n, bits) - 4 * blocks);
          EXPECT_TRUE(SameBytes(cpu, launcher)) << "on the launcher's grid of " << QuantizeGrid(n);
        }

        // Dequantizing the CPU payload: into each kind, and added to an fp32 accumulator.
        for (const QuantElem out : kKinds) {
          std::vector<uint8_t> d_cpu(static_cast<size_t>(n) * ElemBytes(out), 0xA5), d_emu(d_cpu.size(), 0x5A);
          DequantizeCpu(cpu.data(), n, bits, d_cpu.data(), out, 1);
          Emulate(dim3(3), dim3(32), DequantizeKernel, cpu.data() + 4 * blocks,
                  reinterpret_cast<const float*>(cpu.data()), n, bits, d_emu.data(), out);
          EXPECT_TRUE(SameBytes(d_cpu, d_emu)) << "dequantized to kind " << static_cast<int>(out);
        }
        std::vector<float> acc_cpu = RandomFloats(n, 7, -1.f, 1.f), acc_emu = acc_cpu;
        DequantizeAddCpu(cpu.data(), n, bits, acc_cpu.data(), 1);
        Emulate(dim3(3), dim3(32), DequantizeAddKernel, cpu.data() + 4 * blocks,
                reinterpret_cast<const float*>(cpu.data()), n, bits, acc_emu.data());
        EXPECT_TRUE(SameBytes(acc_cpu, acc_emu));
      }
    }
  }
}

TEST(CudaEmulationTest, WidenAndConvertEqualCpu) {
  const int64_t n = 200;  // grid 3 x 32 threads: the grid-stride loop runs three times
  for (const QuantElem kind : kKinds) {
    const std::vector<uint8_t> src = QuantData(n, kind, 11);
    std::vector<float> acc_cpu = RandomFloats(n, 12, -1.f, 1.f), acc_emu = acc_cpu;
    WidenAddCpu(src.data(), kind, n, acc_cpu.data(), 1);
    Emulate(dim3(3), dim3(32), WidenAddKernel, src.data(), kind, n, acc_emu.data());
    EXPECT_TRUE(SameBytes(acc_cpu, acc_emu)) << "kind " << static_cast<int>(kind);
    for (const QuantElem to : kKinds) {
      std::vector<uint8_t> c_cpu(static_cast<size_t>(n) * ElemBytes(to), 0xA5), c_emu(c_cpu.size(), 0x5A);
      ConvertCpu(src.data(), kind, c_cpu.data(), to, n, 1);
      Emulate(dim3(3), dim3(32), ConvertKernel, src.data(), kind, c_emu.data(), to, n);
      EXPECT_TRUE(SameBytes(c_cpu, c_emu)) << "kind " << static_cast<int>(kind) << " to " << static_cast<int>(to);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Launch configurations.

__global__ void WritesItsBlock(unsigned* out) {
  const bool first = threadIdx.x == 0 && threadIdx.y == 0 && threadIdx.z == 0;  // one writer a block
  if (first) out[blockIdx.y * gridDim.x + blockIdx.x] = blockIdx.x + 1;
}

// What the runtime refuses with cudaErrorInvalidConfiguration (and then runs nothing) the emulation refuses too
// (Emulate aborts, naming the configuration), so that no suite passes a launch a GPU would fail: an empty grid (the
// n == 0 launch every launcher must skip), more than 1024 threads a block, grid.y beyond 65535, block.z beyond 64.
// Launches at the limits run.
TEST(CudaEmulationTest, LaunchConfigurationsAsTheRuntimeChecksThem) {
  using zero::testing::emulation_detail::LaunchRefusal;
  EXPECT_NE(LaunchRefusal(dim3(0), dim3(32)).find("grid (0, 1, 1) x block (32, 1, 1)"), std::string::npos);
  EXPECT_NE(LaunchRefusal(dim3(1), dim3(1025)).find("cudaErrorInvalidConfiguration"), std::string::npos);
  EXPECT_NE(LaunchRefusal(dim3(1), dim3(32, 33)), "");
  EXPECT_NE(LaunchRefusal(dim3(1, 65536), dim3(1)), "");
  EXPECT_NE(LaunchRefusal(dim3(1, 1, 65536), dim3(1)), "");
  EXPECT_NE(LaunchRefusal(dim3(1), dim3(1, 1, 65)), "");
  EXPECT_NE(LaunchRefusal(dim3(1u << 31), dim3(1)), "");
  EXPECT_EQ(LaunchRefusal(dim3((1u << 31) - 1, 65535, 65535), dim3(1024)), "");
  EXPECT_EQ(LaunchRefusal(dim3(1), dim3(1, 16, 64)), "");
  std::vector<unsigned> out(4, 0);
  Emulate(dim3(2, 2), dim3(1, 1, 64), WritesItsBlock, out.data());  // block.z at its limit: runs
  EXPECT_EQ(out, (std::vector<unsigned>{1, 2, 1, 2}));
  // Every launcher's configuration is within them (BlocksFor's largest grid, the kernels' fixed blocks).
  EXPECT_EQ(LaunchRefusal(dim3(BlocksFor(int64_t{1} << 40)), dim3(kThreads)), "");
  EXPECT_EQ(LaunchRefusal(dim3(SumSquaresGrid(int64_t{1} << 40)), dim3(kRows)), "");
  EXPECT_EQ(LaunchRefusal(dim3(QuantizeGrid(int64_t{1} << 40)), dim3(kPairThreads)), "");
}

}  // namespace
}  // namespace zero::kernels

// ---------------------------------------------------------------------------------------------------------------
// The LoRA model's row, column and element functors.
namespace lora {
namespace {

using kernels::Bf16;
using kernels::kRowLanes;
using zero::testing::Emulate;

template <typename T>
std::vector<T> Values(int64_t n, uint32_t seed, float lo, float hi) {
  const std::vector<float> f = zero::testing::RandomFloats(n, seed, lo, hi);
  std::vector<T> v(f.size());
  for (size_t i = 0; i < f.size(); ++i) kernels::Store(&v[i], f[i]);
  return v;
}

template <typename T>
bool SameBytes(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

// Rows of each test: 5 on a grid of 2, so a block's grid-stride loop runs rows b, b + 2, b + 4.
constexpr int64_t kRows = 5;
constexpr unsigned kRowGrid = 2;

// f on SerialRow (its operator()) for every row, and RowKernel<F> emulated: make(state) builds the functor over a
// state (its buffers); both states start equal and must end with equal bytes (compared by same(a, b)).
template <typename State, typename Make, typename Same>
void ExpectRowKernelLikeSerial(int64_t rows, const State& initial, Make make, Same same) {
  State serial = initial, emulated = initial;
  const auto f = make(serial);
  for (int64_t n = 0; n < rows; ++n) f(n);
  Emulate(dim3(kRowGrid), dim3(kRowLanes), RowKernel<decltype(make(emulated))>, rows, make(emulated));
  same(serial, emulated);
}

// Row lengths below, equal to and above the block's lanes (above: lanes take 2 or 3 elements each).
const int kLengths[] = {5, kRowLanes, 2 * kRowLanes + 37};

TEST(CudaEmulationRowTest, RmsNormForwardAndBackward) {
  for (const int d : kLengths) {
    SCOPED_TRACE(::testing::Message() << "d " << d);
    struct Fwd {
      std::vector<float> x;
      std::vector<Bf16> w, y;
      std::vector<float> inv;
    };
    const Fwd fwd{Values<float>(kRows * d, 1, -3.f, 3.f), Values<Bf16>(d, 2, 0.5f, 1.5f),
                  std::vector<Bf16>(static_cast<size_t>(kRows * d), Bf16{0x7fc1}), std::vector<float>(kRows, -1.f)};
    ExpectRowKernelLikeSerial(
        kRows, fwd,
        [d](Fwd& s) {
          return kernels::RmsNormRow<float, Bf16, Bf16>{s.x.data(), s.w.data(), s.y.data(), s.inv.data(), d, 1e-5f};
        },
        [](const Fwd& a, const Fwd& b) {
          EXPECT_TRUE(SameBytes(a.y, b.y));
          EXPECT_TRUE(SameBytes(a.inv, b.inv));
        });

    struct Bwd {
      std::vector<float> x;
      std::vector<Bf16> w;
      std::vector<float> inv, dy, dx;
    };
    const Bwd bwd{Values<float>(kRows * d, 3, -3.f, 3.f), Values<Bf16>(d, 4, 0.5f, 1.5f),
                  Values<float>(kRows, 5, 0.2f, 2.f), Values<float>(kRows * d, 6, -1.f, 1.f),
                  Values<float>(kRows * d, 7, -1.f, 1.f)};
    ExpectRowKernelLikeSerial(
        kRows, bwd,
        [d](Bwd& s) {
          return kernels::RmsNormBackwardRow<float, Bf16>{s.x.data(),  s.w.data(),  s.inv.data(),
                                                          s.dy.data(), s.dx.data(), d};
        },
        [](const Bwd& a, const Bwd& b) { EXPECT_TRUE(SameBytes(a.dx, b.dx)); });
  }
}

// A row functor on chosen rows: RowKernel's row n is f's row rows[n] (on SerialRow too). Reaches rows deep into a
// causal score matrix, the long ones, without running every row before them.
template <typename F>
struct ChosenRows {
  F f;
  const int64_t* rows;
  template <typename R>
  void Row(const R& r, int64_t n) const {
    f.Row(r, rows[n]);
  }
  void operator()(int64_t n) const { f(rows[n]); }
};

// Causal softmax rows have t + 1 live elements (t = row % T) and T stored ones: rows t = 0, 4, 254, 255, 256 and 258
// of a T = 259 matrix cover sums below, equal to and above kRowLanes, with every row's tail of zeros written.
TEST(CudaEmulationRowTest, CausalSoftmaxForwardAndBackward) {
  const int T = kRowLanes + 3;
  const int64_t all = T;  // rows of one (batch, head)
  const std::vector<int64_t> chosen = {0, 4, kRowLanes - 2, kRowLanes - 1, kRowLanes, kRowLanes + 2};
  const auto rows = static_cast<int64_t>(chosen.size());
  struct Fwd {
    std::vector<float> s;
    std::vector<Bf16> p;
  };
  const Fwd fwd{Values<float>(all * T, 8, -4.f, 4.f), std::vector<Bf16>(static_cast<size_t>(all * T), Bf16{0x7fc1})};
  ExpectRowKernelLikeSerial(
      rows, fwd,
      [&](Fwd& s) {
        return ChosenRows<kernels::CausalSoftmaxRow<Bf16>>{{s.s.data(), s.p.data(), T, 0.125f}, chosen.data()};
      },
      [](const Fwd& a, const Fwd& b) {
        EXPECT_TRUE(SameBytes(a.p, b.p));
        EXPECT_TRUE(SameBytes(a.s, b.s));
      });

  struct Bwd {
    std::vector<Bf16> p;
    std::vector<float> dp;
    std::vector<Bf16> ds;
  };
  const Bwd bwd{Values<Bf16>(all * T, 9, 0.f, 0.05f), Values<float>(all * T, 10, -1.f, 1.f),
                std::vector<Bf16>(static_cast<size_t>(all * T), Bf16{0x7fc1})};
  ExpectRowKernelLikeSerial(
      rows, bwd,
      [&](Bwd& s) {
        return ChosenRows<kernels::CausalSoftmaxBackwardRow<Bf16, Bf16>>{
            {s.p.data(), s.dp.data(), s.ds.data(), T, 0.125f}, chosen.data()};
      },
      [](const Bwd& a, const Bwd& b) { EXPECT_TRUE(SameBytes(a.ds, b.ds)); });
}

TEST(CudaEmulationRowTest, CrossEntropyAndItsGradient) {
  for (const int V : kLengths) {
    SCOPED_TRACE(::testing::Message() << "V " << V);
    // Targets: valid ones (the first and last class included) and ignored rows (-1).
    const std::vector<int32_t> targets = {0, -1, V - 1, V / 2, -1};
    struct Xent {
      std::vector<float> logits;
      std::vector<double> loss;
    };
    const Xent xent{Values<float>(kRows * V, 11, -6.f, 6.f), std::vector<double>(kRows, -1.0)};
    ExpectRowKernelLikeSerial(
        kRows, xent,
        [&](Xent& s) {
          return kernels::SoftmaxXentRow{s.logits.data(), targets.data(), s.loss.data(), V};
        },
        [](const Xent& a, const Xent& b) {
          EXPECT_TRUE(SameBytes(a.logits, b.logits));
          EXPECT_TRUE(SameBytes(a.loss, b.loss));
        });

    struct Grad {
      std::vector<float> p;
      std::vector<Bf16> d;
    };
    const Grad grad{Values<float>(kRows * V, 12, 0.f, 1.f),
                    std::vector<Bf16>(static_cast<size_t>(kRows * V), Bf16{0x7fc1})};
    ExpectRowKernelLikeSerial(
        kRows, grad,
        [&](Grad& s) {
          return kernels::XentGradRow<Bf16>{s.p.data(), s.d.data(), targets.data(), V, 0.25f};
        },
        [](const Grad& a, const Grad& b) { EXPECT_TRUE(SameBytes(a.d, b.d)); });
  }
}

// Element and column functors through ForEachKernel (grid 2 x 32 threads: several grid-stride iterations) equal a
// serial loop over the same indices.
TEST(CudaEmulationRowTest, ForEachKernelEqualsSerialLoop) {
  const int64_t rows = 6, d = 150, n = rows * d;
  const std::vector<float> g = Values<float>(n, 13, -4.f, 4.f), u = Values<float>(n, 14, -2.f, 2.f);
  std::vector<Bf16> h_serial(static_cast<size_t>(n), Bf16{0x7fc1}), h_emulated = h_serial;
  const auto swiglu = [&](std::vector<Bf16>& h) {
    return kernels::SwiGluElement<float, Bf16>{g.data(), u.data(), h.data()};
  };
  for (int64_t i = 0; i < n; ++i) swiglu(h_serial)(i);
  Emulate(dim3(2), dim3(32), ForEachKernel<decltype(swiglu(h_emulated))>, n, swiglu(h_emulated));
  EXPECT_TRUE(SameBytes(h_serial, h_emulated));

  // One thread per column, rows summed in order.
  const std::vector<float> inv = Values<float>(rows, 15, 0.5f, 2.f), dy = Values<float>(n, 16, -1.f, 1.f);
  std::vector<float> dw_serial = Values<float>(d, 17, -1.f, 1.f), dw_emulated = dw_serial;
  const auto col = [&](std::vector<float>& dw) {
    return kernels::RmsNormWeightGradCol<float>{g.data(), inv.data(), dy.data(), dw.data(), rows, static_cast<int>(d)};
  };
  for (int64_t j = 0; j < d; ++j) col(dw_serial)(j);
  Emulate(dim3(2), dim3(32), ForEachKernel<decltype(col(dw_emulated))>, d, col(dw_emulated));
  EXPECT_TRUE(SameBytes(dw_serial, dw_emulated));
}

}  // namespace
}  // namespace lora
