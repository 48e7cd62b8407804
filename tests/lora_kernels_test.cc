// The LoRA example model's written-once functors (examples/lora_finetune/model_kernels.cuh), CPU instantiation,
// against plain double-precision references. A GPU runs the same functors, so this is where their arithmetic is
// tested; the bf16 cases store inputs and outputs as bf16 (what a GPU keeps for matrix-product inputs).
//
// Tolerances, by dtype:
//  * fp32 storage: every functor is a few float operations per element plus sums of at most ~64 terms; each
//    operation is off by at most half an ulp (6e-8 relative), so a sum of d terms is off by at most about
//    d * 6e-8 of the sum of its terms' magnitudes: 4e-6 for d = 64. The checks allow 2e-5 of the magnitude the
//    result is made of (its terms' absolute values), which no correct formula misses and a wrong sign, index or
//    factor misses by orders of magnitude.
//  * bf16 storage: the reference reads the same bf16-rounded inputs (in double), so the only extra error is the
//    output's one rounding to bf16: 8 significant bits, so at most half an ulp = 2^-8 = 3.9e-3 relative (just
//    above a power of two). The checks allow exactly 2^-8 of |reference| plus the fp32 term above, so a store
//    that truncated instead of rounding (up to 2^-7) would fail.
//  * Gradients (backward functors) are checked against central finite differences of a double-precision forward
//    (step 1e-5: truncation ~1e-10, rounding ~1e-11), i.e. against the calculus, not against the same formula.
//  * Row functors sum in the order of a GPU block (kernels::SerialRow), checked bit for bit against that order
//    rebuilt by hand; their narrow (bf16-output) variants equal the fp32 results rounded once, bit for bit.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <random>
#include <vector>

#include "examples/lora_finetune/model_kernels.cuh"

namespace lora::kernels {
namespace {

constexpr double kF32Tol = 2e-5;
constexpr double kBf16Tol = 1.0 / 256;  // 2^-8: bf16's unit roundoff (one rounding to nearest)

std::vector<float> Random(int64_t n, uint32_t seed, float lo = -1.f, float hi = 1.f) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = d(rng);
  return v;
}

std::vector<Bf16> ToBf16(const std::vector<float>& v) {
  std::vector<Bf16> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) Store(&out[i], v[i]);
  return out;
}
std::vector<float> FromBf16(const std::vector<Bf16>& v) {
  std::vector<float> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = Load(v[i]);
  return out;
}
// v rounded to bf16 and back: what a bf16 array holds.
std::vector<float> RoundBf16(const std::vector<float>& v) { return FromBf16(ToBf16(v)); }

template <typename F>
void ForAll(int64_t count, const F& f) {
  for (int64_t i = 0; i < count; ++i) f(i);
}

// |got - ref| <= rel * |ref| + f32 * scale, with scale the magnitude the value is made of.
void ExpectNear(double got, double ref, double scale, double rel, const char* what, int64_t i) {
  const double tol = rel * std::fabs(ref) + kF32Tol * scale + 1e-30;
  ASSERT_LE(std::fabs(got - ref), tol) << what << " element " << i << ": got " << got << ", reference " << ref;
}

// Central difference of a double function of x along coordinate i.
double Derivative(const std::function<double(const std::vector<double>&)>& f, std::vector<double> x, size_t i) {
  const double h = 1e-5;
  const double x0 = x[i];
  x[i] = x0 + h;
  const double up = f(x);
  x[i] = x0 - h;
  const double down = f(x);
  return (up - down) / (2 * h);
}

std::vector<double> Widen(const std::vector<float>& v) { return std::vector<double>(v.begin(), v.end()); }

TEST(LoraKernelsTest, HashIsSplitMix64) {
  // splitmix64's first output from state 0 (Vigna's reference): the masks and initial values are that generator's
  // finalizer on every device.
  EXPECT_EQ(Mix(0), 0xe220a8397b1dcdafull);
  for (uint64_t i = 0; i < 1000; ++i) {
    const float u = Uniform01(Hash(3, 5, i));
    ASSERT_GE(u, 0.f);
    ASSERT_LT(u, 1.f);
  }
}

// --- RMSNorm --------------------------------------------------------------------------------------------

struct RmsRef {
  std::vector<double> y, inv;
};
RmsRef RmsNormRef(const std::vector<double>& x, const std::vector<double>& w, int rows, int d, double eps) {
  RmsRef r{std::vector<double>(x.size()), std::vector<double>(rows)};
  for (int n = 0; n < rows; ++n) {
    double ss = 0;
    for (int j = 0; j < d; ++j) ss += x[n * d + j] * x[n * d + j];
    r.inv[n] = 1.0 / std::sqrt(ss / d + eps);
    for (int j = 0; j < d; ++j) r.y[n * d + j] = x[n * d + j] * r.inv[n] * w[j];
  }
  return r;
}

TEST(LoraKernelsTest, RmsNormForwardF32) {
  const int rows = 7, d = 40;
  const float eps = 1e-5f;
  const auto x = Random(rows * d, 1, -2.f, 2.f), w = Random(d, 2, 0.5f, 1.5f);
  std::vector<float> y(x.size()), inv(rows);
  ForAll(rows, RmsNormRow<float, float, float>{x.data(), w.data(), y.data(), inv.data(), d, eps});
  const RmsRef ref = RmsNormRef(Widen(x), Widen(w), rows, d, eps);
  for (int n = 0; n < rows; ++n) ExpectNear(inv[n], ref.inv[n], std::fabs(ref.inv[n]), 0, "inv", n);
  for (size_t i = 0; i < y.size(); ++i) ExpectNear(y[i], ref.y[i], std::fabs(ref.y[i]), 0, "y", i);
}

TEST(LoraKernelsTest, RmsNormForwardBf16) {
  const int rows = 7, d = 40;
  const float eps = 1e-5f;
  const auto x = RoundBf16(Random(rows * d, 3, -2.f, 2.f)), w = RoundBf16(Random(d, 4, 0.5f, 1.5f));
  const auto xb = ToBf16(x), wb = ToBf16(w);
  std::vector<Bf16> yb(x.size());
  std::vector<float> inv(rows);
  ForAll(rows, RmsNormRow<Bf16, Bf16, Bf16>{xb.data(), wb.data(), yb.data(), inv.data(), d, eps});
  const RmsRef ref = RmsNormRef(Widen(x), Widen(w), rows, d, eps);
  const auto y = FromBf16(yb);
  for (int n = 0; n < rows; ++n) ExpectNear(inv[n], ref.inv[n], std::fabs(ref.inv[n]), 0, "inv", n);
  for (size_t i = 0; i < y.size(); ++i) ExpectNear(y[i], ref.y[i], std::fabs(ref.y[i]), kBf16Tol, "y", i);
}

// L = sum(g . y(x, w)): the backward functors give dL/dx (accumulated onto a non-zero dx) and dL/dw.
template <typename X>
void CheckRmsNormBackward(const std::vector<float>& x, const std::vector<float>& w, uint32_t seed) {
  const int d = static_cast<int>(w.size()), rows = static_cast<int>(x.size()) / d;
  const double eps = 1e-5;
  const auto dy = Random(rows * d, seed, -1.f, 1.f);
  const auto dx0 = Random(rows * d, seed + 1, -1.f, 1.f);
  std::vector<X> xs(x.size()), ws(w.size());
  for (size_t i = 0; i < x.size(); ++i) Store(&xs[i], x[i]);
  for (size_t i = 0; i < w.size(); ++i) Store(&ws[i], w[i]);
  std::vector<float> y(x.size()), inv(rows);
  ForAll(rows, RmsNormRow<X, X, float>{xs.data(), ws.data(), y.data(), inv.data(), d, static_cast<float>(eps)});
  std::vector<float> dx = dx0, dw(d, 0.5f);
  ForAll(rows, RmsNormBackwardRow<X, X>{xs.data(), ws.data(), inv.data(), dy.data(), dx.data(), d});
  ForAll(d, RmsNormWeightGradCol<X>{xs.data(), inv.data(), dy.data(), dw.data(), rows, d});
  const auto xd = Widen(x), wd = Widen(w), gd = Widen(dy);
  auto loss_x = [&](const std::vector<double>& xv) {
    const RmsRef r = RmsNormRef(xv, wd, rows, d, eps);
    double l = 0;
    for (size_t i = 0; i < r.y.size(); ++i) l += gd[i] * r.y[i];
    return l;
  };
  auto loss_w = [&](const std::vector<double>& wv) {
    const RmsRef r = RmsNormRef(xd, wv, rows, d, eps);
    double l = 0;
    for (size_t i = 0; i < r.y.size(); ++i) l += gd[i] * r.y[i];
    return l;
  };
  // Scales: the magnitudes each gradient element is summed from (dx = dx0 + dy w inv - x inv^3/d sum_j dy w x).
  for (size_t i = 0; i < x.size(); ++i) {
    const int n = static_cast<int>(i) / d, j = static_cast<int>(i) % d;
    double dot_abs = 0;
    for (int k = 0; k < d; ++k) dot_abs += std::fabs(gd[n * d + k] * wd[k] * xd[n * d + k]);
    const double iv = inv[n];
    const double scale =
        std::fabs(dx0[i]) + std::fabs(gd[i] * wd[j] * iv) + std::fabs(xd[i]) * iv * iv * iv / d * dot_abs;
    ExpectNear(dx[i], dx0[i] + Derivative(loss_x, xd, i), scale, 0, "dx", static_cast<int64_t>(i));
  }
  for (int j = 0; j < d; ++j) {
    double scale = 0.5;
    for (int n = 0; n < rows; ++n) scale += std::fabs(gd[n * d + j] * xd[n * d + j] * inv[n]);
    ExpectNear(dw[j], 0.5 + Derivative(loss_w, wd, j), scale, 0, "dw", j);
  }
}

TEST(LoraKernelsTest, RmsNormBackwardF32) {
  CheckRmsNormBackward<float>(Random(6 * 24, 5, -2.f, 2.f), Random(24, 6, 0.5f, 1.5f), 7);
}
TEST(LoraKernelsTest, RmsNormBackwardBf16Input) {
  // Reads bf16 x and w (exactly the values the reference uses); gradients stay fp32.
  CheckRmsNormBackward<Bf16>(RoundBf16(Random(6 * 24, 8, -2.f, 2.f)), RoundBf16(Random(24, 9, 0.5f, 1.5f)), 10);
}

// --- RoPE -----------------------------------------------------------------------------------------------

struct RopeTables {
  std::vector<float> cos, sin;
};
RopeTables MakeTables(int seq, int hd, double theta) {
  RopeTables t;
  for (int p = 0; p < seq; ++p) {
    for (int j = 0; j < hd / 2; ++j) {
      const double angle = p * std::pow(theta, -2.0 * j / hd);
      t.cos.push_back(static_cast<float>(std::cos(angle)));
      t.sin.push_back(static_cast<float>(std::sin(angle)));
    }
  }
  return t;
}

// Hugging Face's rotate_half: out = x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1), in double.
std::vector<double> RopeRef(const std::vector<double>& x, const RopeTables& tab, int seq, int heads, int hd,
                            bool inverse) {
  std::vector<double> out(x.size());
  const int half = hd / 2, rows = static_cast<int>(x.size()) / (heads * hd);
  for (int n = 0; n < rows; ++n) {
    for (int h = 0; h < heads; ++h) {
      for (int j = 0; j < half; ++j) {
        const int64_t i = (static_cast<int64_t>(n) * heads + h) * hd + j;
        const double c = tab.cos[(n % seq) * half + j], s = (inverse ? -1 : 1) * double{tab.sin[(n % seq) * half + j]};
        out[i] = x[i] * c - x[i + half] * s;
        out[i + half] = x[i + half] * c + x[i] * s;
      }
    }
  }
  return out;
}

TEST(LoraKernelsTest, RopeForwardAndInverseF32) {
  const int batch = 2, seq = 5, heads = 3, hd = 8;
  const RopeTables tab = MakeTables(seq, hd, 10000.0);
  const auto x = Random(batch * seq * heads * hd, 11);
  for (bool inverse : {false, true}) {
    std::vector<float> y = x;
    ForAll(batch * seq, RopeRow<float>{y.data(), tab.cos.data(), tab.sin.data(), seq, heads, hd, inverse});
    const auto ref = RopeRef(Widen(x), tab, seq, heads, hd, inverse);
    for (size_t i = 0; i < y.size(); ++i) ExpectNear(y[i], ref[i], 2.0, 0, "rope", static_cast<int64_t>(i));
  }
  // The inverse undoes the forward (a rotation's transpose is its inverse).
  std::vector<float> y = x;
  ForAll(batch * seq, RopeRow<float>{y.data(), tab.cos.data(), tab.sin.data(), seq, heads, hd, false});
  ForAll(batch * seq, RopeRow<float>{y.data(), tab.cos.data(), tab.sin.data(), seq, heads, hd, true});
  for (size_t i = 0; i < y.size(); ++i) ExpectNear(y[i], x[i], 4.0, 0, "inverse(forward)", static_cast<int64_t>(i));
}

TEST(LoraKernelsTest, RopeBf16InPlace) {
  const int batch = 2, seq = 6, heads = 2, hd = 16;
  const RopeTables tab = MakeTables(seq, hd, 100000.0);
  const auto x = RoundBf16(Random(batch * seq * heads * hd, 12));
  auto xb = ToBf16(x);
  ForAll(batch * seq, RopeRow<Bf16>{xb.data(), tab.cos.data(), tab.sin.data(), seq, heads, hd, false});
  const auto ref = RopeRef(Widen(x), tab, seq, heads, hd, false);
  const auto y = FromBf16(xb);
  for (size_t i = 0; i < y.size(); ++i) ExpectNear(y[i], ref[i], 2.0, kBf16Tol, "rope bf16", static_cast<int64_t>(i));
}

// --- Causal softmax -------------------------------------------------------------------------------------

std::vector<double> SoftmaxRowRef(const double* scores, int t, int T, double scale) {
  std::vector<double> p(T, 0.0);
  double mx = -INFINITY;
  for (int s = 0; s <= t; ++s) mx = std::max(mx, scores[s] * scale);
  double sum = 0;
  for (int s = 0; s <= t; ++s) sum += std::exp(scores[s] * scale - mx);
  for (int s = 0; s <= t; ++s) p[s] = std::exp(scores[s] * scale - mx) / sum;
  return p;
}

TEST(LoraKernelsTest, CausalSoftmaxForward) {
  const int T = 9, rows = 3 * T;  // three (b, h) blocks of T rows
  const float scale = 1.f / std::sqrt(16.f);
  // Large scores: the max subtraction keeps exp finite (exp(40) alone is fine, but the test also has 300).
  auto scores = Random(rows * T, 13, -40.f, 40.f);
  scores[5 * T + 2] = 300.f;
  // Garbage above the diagonal must not leak into the probabilities.
  for (int r = 0; r < rows; ++r) {
    for (int s = r % T + 1; s < T; ++s) scores[r * T + s] = NAN;
  }
  const auto sd = Widen(scores);
  std::vector<float> p = scores;
  ForAll(rows, CausalSoftmaxRow<float>{p.data(), p.data(), T, scale});
  for (int r = 0; r < rows; ++r) {
    const int t = r % T;
    const auto ref = SoftmaxRowRef(sd.data() + r * T, t, T, scale);
    double total = 0;
    for (int s = 0; s < T; ++s) {
      if (s > t) {
        ASSERT_EQ(p[r * T + s], 0.f) << "row " << r << " above the diagonal";
        continue;
      }
      // exp's argument is off by at most half an ulp of |scale * score| <= 75 (4.5e-6), the sum by t ulps: 2e-5
      // relative bounds both.
      ExpectNear(p[r * T + s], ref[s], 0.0, 2e-5, "prob", r * T + s);
      total += p[r * T + s];
    }
    EXPECT_NEAR(total, 1.0, 1e-5) << "row " << r;
  }
}

TEST(LoraKernelsTest, CausalSoftmaxBackwardIsTheGradient) {
  const int T = 7, rows = 2 * T;
  const double scale = 1.0 / std::sqrt(8.0);
  const auto scores = Random(rows * T, 14, -3.f, 3.f), g = Random(rows * T, 15);
  std::vector<float> p = scores;
  ForAll(rows, CausalSoftmaxRow<float>{p.data(), p.data(), T, static_cast<float>(scale)});
  std::vector<float> ds = g;  // dp = dL/dp on entry
  ForAll(rows, CausalSoftmaxBackwardRow<float, float>{p.data(), ds.data(), ds.data(), T, static_cast<float>(scale)});
  for (int r = 0; r < rows; ++r) {
    const int t = r % T;
    auto loss = [&](const std::vector<double>& row) {
      const auto pr = SoftmaxRowRef(row.data(), t, T, scale);
      double l = 0;
      for (int s = 0; s <= t; ++s) l += g[r * T + s] * pr[s];
      return l;
    };
    const std::vector<double> row(scores.begin() + r * T, scores.begin() + (r + 1) * T);
    for (int s = 0; s < T; ++s) {
      if (s > t) {
        ASSERT_EQ(ds[r * T + s], 0.f);
        continue;
      }
      ExpectNear(ds[r * T + s], Derivative(loss, row, s), 1.0, 0, "dscore", r * T + s);
    }
  }
}

// --- SwiGLU ---------------------------------------------------------------------------------------------

double SiluRef(double g) { return g / (1.0 + std::exp(-g)); }

TEST(LoraKernelsTest, SwiGluForwardF32AndBf16) {
  const int n = 1000;
  const auto g = Random(n, 16, -8.f, 8.f), u = Random(n, 17, -2.f, 2.f);
  std::vector<float> h(n);
  ForAll(n, SwiGluElement<float, float>{g.data(), u.data(), h.data()});
  for (int i = 0; i < n; ++i) {
    const double ref = SiluRef(g[i]) * u[i];
    ExpectNear(h[i], ref, std::fabs(ref), 0, "h", i);
  }
  const auto gr = RoundBf16(g), ur = RoundBf16(u);
  const auto gb = ToBf16(gr), ub = ToBf16(ur);
  std::vector<Bf16> hb(n);
  ForAll(n, SwiGluElement<Bf16, Bf16>{gb.data(), ub.data(), hb.data()});
  for (int i = 0; i < n; ++i) {
    const double ref = SiluRef(gr[i]) * ur[i];
    ExpectNear(Load(hb[i]), ref, std::fabs(ref), kBf16Tol, "h bf16", i);
  }
}

TEST(LoraKernelsTest, SwiGluBackwardIsTheGradient) {
  const int n = 500;
  const auto g = Random(n, 18, -8.f, 8.f), u = Random(n, 19, -2.f, 2.f), dh = Random(n, 20);
  std::vector<float> dg(n), du(n);
  ForAll(n, SwiGluBackwardElement<float, float>{g.data(), u.data(), dh.data(), dg.data(), du.data()});
  for (int i = 0; i < n; ++i) {
    auto f = [&](const std::vector<double>& v) { return dh[i] * SiluRef(v[0]) * v[1]; };
    const std::vector<double> at = {g[i], u[i]};
    const double scale = std::fabs(dh[i]) * (1 + std::fabs(g[i])) * (1 + std::fabs(u[i]));
    ExpectNear(dg[i], Derivative(f, at, 0), scale, 0, "dg", i);
    ExpectNear(du[i], Derivative(f, at, 1), scale, 0, "du", i);
  }
}

// --- Cross-entropy --------------------------------------------------------------------------------------

TEST(LoraKernelsTest, SoftmaxCrossEntropyAndGradient) {
  const int rows = 6, V = 300;
  auto logits = Random(rows * V, 21, -10.f, 10.f);
  logits[2 * V + 7] = 80.f;  // one dominant logit: the other probabilities underflow toward 0
  const std::vector<int32_t> targets = {3, -1, 7, 299, 0, -1};  // row 2: the dominant logit, p ~ 1
  std::vector<float> p = logits;
  std::vector<double> loss(rows, -1.0);
  ForAll(rows, SoftmaxXentRow{p.data(), targets.data(), loss.data(), V});
  for (int n = 0; n < rows; ++n) {
    double mx = -INFINITY, sum = 0;
    for (int v = 0; v < V; ++v) mx = std::max(mx, double{logits[n * V + v]});
    for (int v = 0; v < V; ++v) sum += std::exp(logits[n * V + v] - mx);
    for (int v = 0; v < V; ++v) {
      const double ref = std::exp(logits[n * V + v] - mx) / sum;
      // Each probability: exp of a float difference (|x - max| <= 90: off by 5.4e-6 at most) over a float sum of
      // V terms (V ulps: 1.8e-5); 1e-30 absolute covers the subnormals of row 2.
      ExpectNear(p[n * V + v], ref, 0.0, 1e-5 + 2 * V * 6e-8, "prob", n * V + v);
    }
    const int t = targets[n];
    const double ref_loss = t < 0 ? 0.0 : std::log(sum) + mx - logits[n * V + t];
    EXPECT_NEAR(loss[n], ref_loss, 1e-5 * (1 + std::fabs(ref_loss))) << "row " << n;
  }
  // The gradient of loss_scale * mean loss over the 4 counted rows, in place.
  const float coef = 128.f / 4;
  std::vector<float> d = p;
  ForAll(rows, XentGradRow<float>{d.data(), d.data(), targets.data(), V, coef});
  for (int n = 0; n < rows; ++n) {
    for (int v = 0; v < V; ++v) {
      const int64_t i = n * V + v;
      if (targets[n] < 0) {
        ASSERT_EQ(d[i], 0.f) << "ignored row " << n;
        continue;
      }
      const double ref = (double{p[i]} - (v == targets[n] ? 1.0 : 0.0)) * coef;
      ExpectNear(d[i], ref, coef, 0, "dlogit", i);
    }
  }
}

// --- Embedding ------------------------------------------------------------------------------------------

TEST(LoraKernelsTest, EmbeddingGatherAndScatterAdd) {
  const int V = 11, d = 6, rows = 9;
  const std::vector<int32_t> tokens = {4, 0, 4, 10, 3, 4, 0, 7, 10};  // repeats accumulate
  const auto emb = Random(V * d, 22);
  std::vector<float> x(rows * d);
  ForAll(rows, EmbedGatherRow<float, float>{emb.data(), tokens.data(), x.data(), d});
  for (int n = 0; n < rows; ++n) {
    for (int j = 0; j < d; ++j) ASSERT_EQ(x[n * d + j], emb[tokens[n] * d + j]);
  }
  // bf16 table into fp32 activations: widening is exact.
  const auto embb = ToBf16(emb);
  ForAll(rows, EmbedGatherRow<Bf16, float>{embb.data(), tokens.data(), x.data(), d});
  for (int n = 0; n < rows; ++n) {
    for (int j = 0; j < d; ++j) ASSERT_EQ(x[n * d + j], Load(embb[tokens[n] * d + j]));
  }
  // Scatter-add: bitwise the serial loop over positions (the order a CPU trainer would use), on top of de.
  const auto dx = Random(rows * d, 23);
  std::vector<float> de = Random(V * d, 24), serial = de;
  ForAll(d, EmbedScatterCol{dx.data(), tokens.data(), de.data(), rows, d});
  for (int n = 0; n < rows; ++n) {
    for (int j = 0; j < d; ++j) serial[tokens[n] * d + j] += dx[n * d + j];
  }
  EXPECT_EQ(0, std::memcmp(de.data(), serial.data(), de.size() * sizeof(float)));
}

// --- LoRA dropout, residual add -------------------------------------------------------------------------

TEST(LoraKernelsTest, DropoutMaskScaleAndBackward) {
  const int64_t n = 200000;
  const float dropout = 0.25f, keep_scale = 1.f / (1.f - dropout);
  const auto x = Random(n, 25, 0.5f, 1.f);  // no zeros: a zero output means dropped
  std::vector<float> y(n);
  ForAll(n, DropoutElement<float, float>{x.data(), y.data(), 42, 3, dropout, keep_scale});
  int64_t kept = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (y[i] != 0.f) {
      ++kept;
      ASSERT_EQ(y[i], x[i] * keep_scale);
    }
  }
  // Binomial(n, 0.75): standard deviation sqrt(n * 0.75 * 0.25) = 194; allow 5 of them.
  EXPECT_NEAR(static_cast<double>(kept), 0.75 * n, 5 * std::sqrt(n * 0.75 * 0.25));
  // The backward uses the same mask: dx += dxd * keep_scale exactly where the forward kept.
  const auto dxd = Random(n, 26);
  std::vector<float> dx(n, 1.f);
  ForAll(n, DropoutBackwardElement{dxd.data(), dx.data(), 42, 3, dropout, keep_scale});
  for (int64_t i = 0; i < n; ++i) ASSERT_EQ(dx[i], y[i] != 0.f ? 1.f + dxd[i] * keep_scale : 1.f) << i;
  // Another adapter (stream) draws another mask; bf16 storage keeps the same mask.
  std::vector<float> other(n);
  ForAll(n, DropoutElement<float, float>{x.data(), other.data(), 42, 4, dropout, keep_scale});
  int64_t same = 0;
  for (int64_t i = 0; i < n; ++i) same += (other[i] != 0.f) == (y[i] != 0.f);
  EXPECT_LT(same, n * 0.7);  // independent masks agree on 0.75^2 + 0.25^2 = 62.5%
  const auto xb = ToBf16(x);
  std::vector<Bf16> yb(n);
  ForAll(n, DropoutElement<Bf16, Bf16>{xb.data(), yb.data(), 42, 3, dropout, keep_scale});
  for (int64_t i = 0; i < n; ++i) {
    ASSERT_EQ(Load(yb[i]) != 0.f, y[i] != 0.f) << i;
    if (y[i] != 0.f) ExpectNear(Load(yb[i]), double{Load(xb[i])} * keep_scale, 0, kBf16Tol, "dropout bf16", i);
  }
}

TEST(LoraKernelsTest, ResidualAdd) {
  const int n = 100;
  const auto a = Random(n, 27), b = Random(n, 28);
  std::vector<float> x = a;
  ForAll(n, AddElement<float>{x.data(), b.data()});
  for (int i = 0; i < n; ++i) ASSERT_EQ(x[i], a[i] + b[i]);
  const auto bb = ToBf16(b);
  x = a;
  ForAll(n, AddElement<Bf16>{x.data(), bb.data()});
  for (int i = 0; i < n; ++i) ASSERT_EQ(x[i], a[i] + Load(bb[i]));
}

// The mixed instantiations the CUDA model uses (model_cuda.cu): an fp32 residual stream, bf16 weights, bf16
// outputs that feed matrix products, fp32 gradients.
TEST(LoraKernelsTest, GpuMixedPrecisionInstantiations) {
  const int rows = 5, d = 32;
  const float eps = 1e-5f;
  const auto x = Random(rows * d, 29, -2.f, 2.f);  // fp32 residual stream: not rounded
  const auto w = RoundBf16(Random(d, 30, 0.5f, 1.5f));
  const auto wb = ToBf16(w);
  std::vector<Bf16> yb(x.size());
  std::vector<float> inv(rows);
  ForAll(rows, RmsNormRow<float, Bf16, Bf16>{x.data(), wb.data(), yb.data(), inv.data(), d, eps});
  const RmsRef ref = RmsNormRef(Widen(x), Widen(w), rows, d, eps);
  for (size_t i = 0; i < yb.size(); ++i) {
    ExpectNear(Load(yb[i]), ref.y[i], std::fabs(ref.y[i]), kBf16Tol, "rmsnorm fp32->bf16", static_cast<int64_t>(i));
  }
  // Backward reading fp32 x and bf16 w equals the all-fp32 functor on the same values, bit for bit.
  const auto dy = Random(rows * d, 31);
  std::vector<float> dx_mixed(x.size(), 0.f), dx_f32(x.size(), 0.f);
  ForAll(rows, RmsNormBackwardRow<float, Bf16>{x.data(), wb.data(), inv.data(), dy.data(), dx_mixed.data(), d});
  ForAll(rows, RmsNormBackwardRow<float, float>{x.data(), w.data(), inv.data(), dy.data(), dx_f32.data(), d});
  EXPECT_EQ(0, std::memcmp(dx_mixed.data(), dx_f32.data(), x.size() * sizeof(float)));
  // SwiGLU from the fp32 gate/up products to a bf16 input of down_proj.
  const auto g = Random(rows * d, 32, -6.f, 6.f), u = Random(rows * d, 33);
  std::vector<Bf16> hb(g.size());
  ForAll(rows * d, SwiGluElement<float, Bf16>{g.data(), u.data(), hb.data()});
  for (size_t i = 0; i < hb.size(); ++i) {
    const double ref_h = SiluRef(g[i]) * u[i];
    ExpectNear(Load(hb[i]), ref_h, std::fabs(ref_h), kBf16Tol, "swiglu fp32->bf16", static_cast<int64_t>(i));
  }
  // The cast rounds to nearest even, as kernels/cast.cuh (tested exhaustively in kernels_test) does.
  std::vector<Bf16> cb(x.size());
  ForAll(rows * d, CastElement<float, Bf16>{x.data(), cb.data()});
  for (size_t i = 0; i < cb.size(); ++i) {
    ASSERT_EQ(cb[i].bits, zero::kernels::FloatToBf16(x[i])) << i;
    ExpectNear(Load(cb[i]), x[i], 0, kBf16Tol, "cast", static_cast<int64_t>(i));
  }
}

// --- Row executor, narrow outputs, head permutation ------------------------------------------------------

// SerialRow sums in the order a GPU block of kRowLanes threads does: per lane, then the pairwise tree. Rebuilt
// here by hand, bit for bit, for rows shorter and longer than a block.
TEST(LoraKernelsTest, SerialRowSumsInTheBlockOrder) {
  for (int64_t n : {1, 7, 255, 256, 257, 1000, 49152}) {
    const auto x = Random(n, 40 + static_cast<uint32_t>(n), -3.f, 3.f);
    std::vector<float> lane(kRowLanes, 0.f);
    for (int64_t i = 0; i < n; ++i) lane[static_cast<size_t>(i % kRowLanes)] += x[static_cast<size_t>(i)];
    for (int s = kRowLanes / 2; s > 0; s >>= 1) {
      for (int l = 0; l < s; ++l) lane[l] += lane[l + s];
    }
    const float got = SerialRow().Sum(n, [&](int64_t i) { return x[static_cast<size_t>(i)]; });
    EXPECT_EQ(std::memcmp(&got, &lane[0], sizeof(float)), 0) << "n = " << n;
    double ref = 0;
    for (float v : x) ref += v;
    EXPECT_NEAR(got, ref, 1e-4 * static_cast<double>(n));
    const float mx = SerialRow().Max(n, [&](int64_t i) { return x[static_cast<size_t>(i)]; });
    EXPECT_EQ(mx, *std::max_element(x.begin(), x.end()));
  }
}

// The out-of-place narrow variants a GPU uses write exactly the in-place fp32 results, rounded once.
TEST(LoraKernelsTest, NarrowOutputsAreTheFp32ResultsRounded) {
  const int T = 11, rows = 2 * T;
  const float scale = 0.25f;
  const auto scores = Random(rows * T, 41, -4.f, 4.f);
  std::vector<float> p32 = scores, s = scores;
  std::vector<Bf16> pb(scores.size());
  ForAll(rows, CausalSoftmaxRow<float>{p32.data(), p32.data(), T, scale});
  ForAll(rows, CausalSoftmaxRow<Bf16>{s.data(), pb.data(), T, scale});
  for (size_t i = 0; i < pb.size(); ++i) ASSERT_EQ(pb[i].bits, zero::kernels::FloatToBf16(p32[i])) << i;
  // Backward from bf16 probabilities into bf16 score gradients: the fp32 functor on the same (rounded) inputs.
  const auto g = Random(rows * T, 42);
  std::vector<float> pr(pb.size());
  for (size_t i = 0; i < pb.size(); ++i) pr[i] = Load(pb[i]);
  std::vector<float> ds32 = g, dp = g;
  std::vector<Bf16> dsb(g.size());
  ForAll(rows, CausalSoftmaxBackwardRow<float, float>{pr.data(), ds32.data(), ds32.data(), T, scale});
  ForAll(rows, CausalSoftmaxBackwardRow<Bf16, Bf16>{pb.data(), dp.data(), dsb.data(), T, scale});
  for (size_t i = 0; i < dsb.size(); ++i) ASSERT_EQ(dsb[i].bits, zero::kernels::FloatToBf16(ds32[i])) << i;
  // Cross-entropy's gradient into bf16 dlogits.
  const int V = 300, n = 3;
  std::vector<float> probs = Random(n * V, 43, 0.f, 1.f), d32 = probs;
  const std::vector<int32_t> targets = {5, -1, 299};
  std::vector<Bf16> db(probs.size());
  ForAll(n, XentGradRow<float>{d32.data(), d32.data(), targets.data(), V, 3.f});
  ForAll(n, XentGradRow<Bf16>{probs.data(), db.data(), targets.data(), V, 3.f});
  for (size_t i = 0; i < db.size(); ++i) ASSERT_EQ(db[i].bits, zero::kernels::FloatToBf16(d32[i])) << i;
  // SwiGLU's backward into bf16 operands.
  const int m = 257;
  const auto gg = Random(m, 44, -5.f, 5.f), uu = Random(m, 45), dh = Random(m, 46);
  std::vector<float> dg(m), du(m);
  std::vector<Bf16> dgb(m), dub(m);
  ForAll(m, SwiGluBackwardElement<float, float>{gg.data(), uu.data(), dh.data(), dg.data(), du.data()});
  ForAll(m, SwiGluBackwardElement<float, Bf16>{gg.data(), uu.data(), dh.data(), dgb.data(), dub.data()});
  for (int i = 0; i < m; ++i) {
    ASSERT_EQ(dgb[i].bits, zero::kernels::FloatToBf16(dg[i])) << i;
    ASSERT_EQ(dub[i].bits, zero::kernels::FloatToBf16(du[i])) << i;
  }
}

// Token-major [B, T, heads, hd] to head-major [B, heads, T, hd] and back; every element lands where the index
// formula says, and RopeRow with heads = 1 on the head-major copy rotates exactly as on the token-major one.
TEST(LoraKernelsTest, PermuteHeadsAndHeadMajorRope) {
  const int B = 2, T = 5, heads = 3, hd = 4;
  const int64_t total = int64_t{B} * T * heads * hd;
  std::vector<float> tok(static_cast<size_t>(total)), hm(tok.size()), back(tok.size());
  for (int64_t i = 0; i < total; ++i) tok[static_cast<size_t>(i)] = static_cast<float>(i);
  ForAll(total, PermuteHeads<float, float>{tok.data(), hm.data(), T, heads, hd, true});
  for (int b = 0; b < B; ++b) {
    for (int t = 0; t < T; ++t) {
      for (int h = 0; h < heads; ++h) {
        for (int j = 0; j < hd; ++j) {
          ASSERT_EQ(hm[static_cast<size_t>(((b * heads + h) * T + t) * hd + j)],
                    tok[static_cast<size_t>(((b * T + t) * heads + h) * hd + j)]);
        }
      }
    }
  }
  ForAll(total, PermuteHeads<float, float>{hm.data(), back.data(), T, heads, hd, false});
  EXPECT_EQ(back, tok);
  const RopeTables tables = MakeTables(T, hd, 10000.0);
  std::vector<float> x = Random(total, 47), xh(x.size()), rotated_then_permuted(x.size());
  ForAll(total, PermuteHeads<float, float>{x.data(), xh.data(), T, heads, hd, true});
  ForAll(B * T, RopeRow<float>{x.data(), tables.cos.data(), tables.sin.data(), T, heads, hd, false});
  ForAll(int64_t{B} * heads * T, RopeRow<float>{xh.data(), tables.cos.data(), tables.sin.data(), T, 1, hd, false});
  ForAll(total, PermuteHeads<float, float>{x.data(), rotated_then_permuted.data(), T, heads, hd, true});
  EXPECT_EQ(xh, rotated_then_permuted);
}

}  // namespace
}  // namespace lora::kernels
