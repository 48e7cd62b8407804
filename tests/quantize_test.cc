// The blockwise quantization of ZeRO++'s collectives (kernels/quantize.cuh) against a plain scalar reference.
//  * Format: the CPU instantiation's payload equals, byte for byte, a reference that computes each block's maximum
//    in double, its scale as amax / qmax in float, codes with std::nearbyint (ties to even) and packs them as the
//    header says (scales, then codes, 4-byte padding of zeros), for 8 and 4 bits, fp32 / bf16 / fp16 inputs, sizes
//    around the block size, 1 and 3 threads. Dequantizing equals the reference's code * scale bitwise.
//  * Error: every element within the header's bound A / (2 qmax) + A * 2^-22 + 2^-140 of its input, A the block's
//    largest magnitude, over random data, wide magnitude ranges, all-zero blocks and subnormal blocks; and the
//    bound is not loose: some element comes within 10% of A / (2 qmax).
//  * Non-finite values: the block that holds one dequantizes to NaN, its neighbours are untouched.
//  * The CUDA instantiation gives the same bytes and values when a GPU is present (skipped otherwise, saying so).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "kernels/cast.cuh"
#include "kernels/quantize.h"
#include "testing/device_copy.h"
#include "testing/device_memory.h"
#include "testing/random.h"

namespace zero::kernels {
namespace {

using zero::testing::RandomFloats;

const int64_t kSizes[] = {0, 1, 2, 7, 255, 256, 257, 4 * 256, 4096 + 3, (int64_t{1} << 18) + 5};
const QuantElem kKinds[] = {QuantElem::kF32, QuantElem::kBf16, QuantElem::kF16};

const char* KindName(QuantElem k) { return k == QuantElem::kF32 ? "f32" : k == QuantElem::kBf16 ? "bf16" : "f16"; }

// `values` stored as `kind` (rounded to nearest even), and their exact widening back to fp32.
struct Stored {
  std::vector<uint8_t> bytes;
  std::vector<float> widened;
};
Stored Store(const std::vector<float>& values, QuantElem kind) {
  Stored s;
  const size_t es = kind == QuantElem::kF32 ? 4 : 2;
  s.bytes.resize(values.size() * es);
  for (size_t i = 0; i < values.size(); ++i) {
    if (kind == QuantElem::kF32) {
      std::memcpy(s.bytes.data() + 4 * i, &values[i], 4);
      s.widened.push_back(values[i]);
    } else {
      const uint16_t h = kind == QuantElem::kBf16 ? FloatToBf16(values[i]) : FloatToF16(values[i]);
      std::memcpy(s.bytes.data() + 2 * i, &h, 2);
      s.widened.push_back(kind == QuantElem::kBf16 ? Bf16ToFloat(h) : F16ToFloat(h));
    }
  }
  return s;
}

// The reference payload, built from the format's description alone.
std::vector<uint8_t> ReferencePayload(const std::vector<float>& x, int bits) {
  const int64_t n = static_cast<int64_t>(x.size());
  const int64_t blocks = (n + 255) / 256;
  const int64_t code_bytes = bits == 8 ? n : (n + 1) / 2;
  std::vector<uint8_t> out(static_cast<size_t>(4 * blocks + (code_bytes + 3) / 4 * 4), 0);
  const float qmax = bits == 8 ? 127.0f : 7.0f;
  for (int64_t b = 0; b < blocks; ++b) {
    double amax = 0;
    bool finite = true;
    for (int64_t i = b * 256; i < std::min(n, b * 256 + 256); ++i) {
      if (std::isfinite(x[static_cast<size_t>(i)])) {
        amax = std::max(amax, std::fabs(static_cast<double>(x[static_cast<size_t>(i)])));
      } else {
        finite = false;
      }
    }
    const float scale = finite ? static_cast<float>(amax) / qmax : std::numeric_limits<float>::quiet_NaN();
    std::memcpy(out.data() + 4 * b, &scale, 4);
    for (int64_t i = b * 256; i < std::min(n, b * 256 + 256); ++i) {
      long q = 0;  // NOLINT(runtime/int): lround's type
      if (scale > 0) q = std::lround(std::nearbyint(x[static_cast<size_t>(i)] / scale));
      q = std::clamp<long>(q, static_cast<long>(-qmax), static_cast<long>(qmax));  // NOLINT(runtime/int)
      uint8_t* codes = out.data() + 4 * blocks;
      if (bits == 8) {
        codes[i] = static_cast<uint8_t>(static_cast<int8_t>(q));
      } else {
        codes[i / 2] |= static_cast<uint8_t>((q & 0xF) << (i % 2 ? 4 : 0));
      }
    }
  }
  return out;
}

// Element i of a reference payload, dequantized.
float ReferenceValue(const std::vector<uint8_t>& payload, int64_t n, int64_t i, int bits) {
  const int64_t blocks = (n + 255) / 256;
  float scale;
  std::memcpy(&scale, payload.data() + 4 * (i / 256), 4);
  const uint8_t* codes = payload.data() + 4 * blocks;
  int q = bits == 8 ? static_cast<int8_t>(codes[i]) : ((codes[i / 2] >> (i % 2 ? 4 : 0)) & 0xF);
  if (bits == 4 && q >= 8) q -= 16;
  return static_cast<float>(q) * scale;
}

// Random values whose magnitudes span several orders per block, with an all-zero block, a block of fp32
// subnormals and single outliers.
std::vector<float> TestValues(int64_t n, uint32_t seed) {
  std::vector<float> v = RandomFloats(n, seed, -1.0f, 1.0f);
  const std::vector<float> e = RandomFloats(n, seed + 1, -6.0f, 3.0f);
  for (int64_t i = 0; i < n; ++i) v[static_cast<size_t>(i)] *= std::pow(10.0f, e[static_cast<size_t>(i)]);
  for (int64_t i = 256; i < std::min<int64_t>(n, 512); ++i) v[static_cast<size_t>(i)] = 0.0f;
  for (int64_t i = 1024; i < std::min<int64_t>(n, 1280); ++i) v[static_cast<size_t>(i)] *= 1e-39f;
  if (n > 3000) v[3000] = 6.5e4f;  // an outlier: its block's other values lose precision, no other block does
  return v;
}

double Bound(double amax, int bits) { return amax / (2.0 * (bits == 8 ? 127 : 7)) + amax * 0x1p-22 + 0x1p-140; }

TEST(QuantizeTest, PayloadEqualsTheReferenceAndStaysWithinTheBound) {
  for (QuantElem kind : kKinds) {
    for (int bits : {8, 4}) {
      for (int64_t n : kSizes) {
        SCOPED_TRACE(std::string(KindName(kind)) + " bits " + std::to_string(bits) + " n " + std::to_string(n));
        const Stored in = Store(TestValues(n, static_cast<uint32_t>(n) + 11), kind);
        const std::vector<uint8_t> want = ReferencePayload(in.widened, bits);
        ASSERT_EQ(QuantPayloadBytes(n, bits), static_cast<int64_t>(want.size()));
        for (int threads : {1, 3}) {
          std::vector<uint8_t> got(want.size(), 0xAB);
          QuantizeCpu(in.bytes.data(), kind, n, bits, got.data(), threads);
          int64_t bad = 0;
          for (size_t i = 0; i < want.size(); ++i) bad += got[i] != want[i];
          ASSERT_EQ(bad, 0) << "payload bytes differ from the reference (threads " << threads << ")";
        }
        // Dequantized to fp32, and accumulated: the reference's code * scale, bitwise.
        std::vector<float> deq(static_cast<size_t>(n)), acc(static_cast<size_t>(n), 0.0f);
        DequantizeCpu(want.data(), n, bits, deq.data(), QuantElem::kF32, 3);
        DequantizeAddCpu(want.data(), n, bits, acc.data(), 3);
        double worst_ratio = 0;
        int64_t bad = 0, out_of_bound = 0;
        for (int64_t i = 0; i < n; ++i) {
          const float ref = ReferenceValue(want, n, i, bits);
          bad += std::memcmp(&ref, &deq[static_cast<size_t>(i)], 4) != 0 || acc[static_cast<size_t>(i)] != ref;
          double amax = 0;
          for (int64_t j = i / 256 * 256; j < std::min(n, i / 256 * 256 + 256); ++j) {
            amax = std::max(amax, std::fabs(static_cast<double>(in.widened[static_cast<size_t>(j)])));
          }
          const double err = std::fabs(static_cast<double>(ref) - in.widened[static_cast<size_t>(i)]);
          out_of_bound += err > Bound(amax, bits);
          if (amax > 1e-30) worst_ratio = std::max(worst_ratio, err / (amax / (2.0 * (bits == 8 ? 127 : 7))));
        }
        EXPECT_EQ(bad, 0) << "dequantized values differ from the reference";
        EXPECT_EQ(out_of_bound, 0) << "elements beyond the stated error bound";
        if (n >= 4096) {
          EXPECT_GT(worst_ratio, 0.9) << "the bound is loose: it should be nearly reached";
        }
        // Dequantized into the input's own dtype: the fp32 value rounded to it.
        std::vector<uint8_t> back(in.bytes.size());
        DequantizeCpu(want.data(), n, bits, back.data(), kind, 1);
        bad = 0;
        for (int64_t i = 0; i < n; ++i) {
          const float ref = ReferenceValue(want, n, i, bits);
          const Stored r = Store({ref}, kind);
          bad += std::memcmp(back.data() + static_cast<size_t>(i) * r.bytes.size(), r.bytes.data(), r.bytes.size()) != 0;
        }
        EXPECT_EQ(bad, 0) << "dequantized into " << KindName(kind) << " differs from the rounded reference";
      }
    }
  }
}

TEST(QuantizeTest, NonFiniteBlockBecomesNaNAndOnlyIt) {
  for (int bits : {8, 4}) {
    std::vector<float> x = RandomFloats(3 * 256, 5, -1.0f, 1.0f);
    x[256 + 17] = std::numeric_limits<float>::infinity();
    x[2 * 256 + 3] = std::numeric_limits<float>::quiet_NaN();
    std::vector<uint8_t> payload(static_cast<size_t>(QuantPayloadBytes(768, bits)));
    QuantizeCpu(x.data(), QuantElem::kF32, 768, bits, payload.data(), 1);
    std::vector<float> y(768);
    DequantizeCpu(payload.data(), 768, bits, y.data(), QuantElem::kF32, 1);
    for (int64_t i = 0; i < 768; ++i) {
      EXPECT_EQ(std::isnan(y[static_cast<size_t>(i)]), i >= 256) << "element " << i << " bits " << bits;
    }
  }
}

TEST(QuantizeTest, WidenAddAndConvert) {
  const std::vector<float> x = RandomFloats(1003, 9, -3.0f, 3.0f);
  for (QuantElem kind : kKinds) {
    const Stored in = Store(x, kind);
    std::vector<float> acc(1003, 0.5f);
    WidenAddCpu(in.bytes.data(), kind, 1003, acc.data(), 3);
    std::vector<uint8_t> out(in.bytes.size());
    ConvertCpu(acc.data(), QuantElem::kF32, out.data(), kind, 1003, 3);
    for (size_t i = 0; i < x.size(); ++i) {
      ASSERT_EQ(acc[i], 0.5f + in.widened[i]);
      const Stored r = Store({acc[i]}, kind);
      ASSERT_EQ(std::memcmp(out.data() + i * r.bytes.size(), r.bytes.data(), r.bytes.size()), 0);
    }
  }
}

// The CUDA instantiation against the CPU one: the same payload bytes and dequantized values.
TEST(QuantizeCudaTest, EqualsTheCpuInstantiation) {
  int devices = 0;
  const Status have = zero::testing::CudaDeviceCount(&devices);
  if (!have.ok()) GTEST_SKIP() << "the CUDA quantization kernels cannot run here: " << have.ToString();
#if defined(ZERO_WITH_CUDA)
  ASSERT_TRUE(zero::testing::CudaSetDevice(0).ok());
  for (QuantElem kind : kKinds) {
    for (int bits : {8, 4}) {
      for (int64_t n : kSizes) {
        SCOPED_TRACE(std::string(KindName(kind)) + " bits " + std::to_string(bits) + " n " + std::to_string(n));
        const Stored in = Store(TestValues(n, 3), kind);
        const int64_t pb = QuantPayloadBytes(n, bits);
        std::vector<uint8_t> want(static_cast<size_t>(pb));
        QuantizeCpu(in.bytes.data(), kind, n, bits, want.data(), 1);
        std::vector<float> want_acc(static_cast<size_t>(n), 1.0f);
        DequantizeAddCpu(want.data(), n, bits, want_acc.data(), 1);
        void *src = nullptr, *payload = nullptr, *acc = nullptr;
        ASSERT_TRUE(zero::testing::DeviceMalloc(std::max<int64_t>(1, in.bytes.size()), &src).ok());
        ASSERT_TRUE(zero::testing::DeviceMalloc(std::max<int64_t>(1, pb), &payload).ok());
        ASSERT_TRUE(zero::testing::DeviceMalloc(std::max<int64_t>(4, 4 * n), &acc).ok());
        ASSERT_TRUE(zero::testing::CopyToDevice(src, in.bytes.data(), static_cast<int64_t>(in.bytes.size())).ok());
        std::vector<float> ones(static_cast<size_t>(n), 1.0f);
        ASSERT_TRUE(zero::testing::CopyToDevice(acc, ones.data(), 4 * n).ok());
        EXPECT_EQ(QuantizeCuda(src, kind, n, bits, payload, nullptr), 0);
        EXPECT_EQ(DequantizeAddCuda(payload, n, bits, static_cast<float*>(acc), nullptr), 0);
        ASSERT_TRUE(zero::testing::DeviceSynchronize().ok());
        std::vector<uint8_t> got(static_cast<size_t>(pb));
        std::vector<float> got_acc(static_cast<size_t>(n));
        ASSERT_TRUE(zero::testing::CopyFromDevice(got.data(), payload, pb).ok());
        ASSERT_TRUE(zero::testing::CopyFromDevice(got_acc.data(), acc, 4 * n).ok());
        EXPECT_EQ(got, want);
        EXPECT_EQ(std::memcmp(got_acc.data(), want_acc.data(), static_cast<size_t>(4 * n)), 0);
        zero::testing::DeviceFree(src);
        zero::testing::DeviceFree(payload);
        zero::testing::DeviceFree(acc);
      }
    }
  }
#else
  GTEST_SKIP() << "this build has no CUDA";
#endif
}

}  // namespace
}  // namespace zero::kernels
