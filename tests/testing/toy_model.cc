// The toy model's forward and backward (see toy_model.h). Plain loops in a fixed order, so that the same
// inputs give the same bits whether parameters come from the engine or a reference.
#include "testing/toy_model.h"

#include <algorithm>

namespace zero::testing {

namespace {

struct Acts {
  int n = 0;
  std::vector<float> x0, h1, x1, t2, x2, t3, x3, dlogits;  // per token: D, H, D, D, D, D, D, V
  std::vector<float> dx;                                     // running input gradient, per token D
};

// y[j] = sum_i x[i] * w[i * cols + j]
void MatVec(const float* x, const float* w, int rows, int cols, float* y) {
  for (int j = 0; j < cols; ++j) {
    float s = 0.0f;
    for (int i = 0; i < rows; ++i) s += x[i] * w[i * cols + j];
    y[j] = s;
  }
}

// y[i] = sum_j w[i * cols + j] * dy[j]   (input gradient through x W)
void MatTVec(const float* dy, const float* w, int rows, int cols, float* y) {
  for (int i = 0; i < rows; ++i) {
    float s = 0.0f;
    for (int j = 0; j < cols; ++j) s += w[i * cols + j] * dy[j];
    y[i] = s;
  }
}

// dw[i * cols + j] += x[i] * dy[j]
void Outer(const float* x, const float* dy, int rows, int cols, float* dw) {
  for (int i = 0; i < rows; ++i) {
    for (int j = 0; j < cols; ++j) dw[i * cols + j] += x[i] * dy[j];
  }
}

void EmbedForward(const float* e, const ToyBatch& b, Acts& a) {
  a.n = static_cast<int>(b.tokens.size());
  a.x0.assign(static_cast<size_t>(a.n) * kDim, 0.0f);
  for (int t = 0; t < a.n; ++t) {
    for (int d = 0; d < kDim; ++d) a.x0[t * kDim + d] = e[b.tokens[t] * kDim + d];
  }
}

void Block1Forward(const float* w1, const float* b1, const float* w2, Acts& a) {
  a.h1.assign(static_cast<size_t>(a.n) * kHidden, 0.0f);
  a.x1.assign(static_cast<size_t>(a.n) * kDim, 0.0f);
  float tmp[kDim];
  for (int t = 0; t < a.n; ++t) {
    float* h = &a.h1[t * kHidden];
    MatVec(&a.x0[t * kDim], w1, kDim, kHidden, h);
    for (int j = 0; j < kHidden; ++j) h[j] = ToyTanh(h[j] + b1[j]);
    MatVec(h, w2, kHidden, kDim, tmp);
    for (int d = 0; d < kDim; ++d) a.x1[t * kDim + d] = a.x0[t * kDim + d] + tmp[d];
  }
}

void FrozenForward(const float* f, Acts& a) {
  a.t2.assign(static_cast<size_t>(a.n) * kDim, 0.0f);
  a.x2.assign(static_cast<size_t>(a.n) * kDim, 0.0f);
  for (int t = 0; t < a.n; ++t) {
    MatVec(&a.x1[t * kDim], f, kDim, kDim, &a.t2[t * kDim]);
    for (int d = 0; d < kDim; ++d) {
      a.t2[t * kDim + d] = ToyTanh(a.t2[t * kDim + d]);
      a.x2[t * kDim + d] = a.x1[t * kDim + d] + a.t2[t * kDim + d];
    }
  }
}

void Block2Forward(const float* w3, const float* gain, Acts& a) {
  a.t3.assign(static_cast<size_t>(a.n) * kDim, 0.0f);
  a.x3.assign(static_cast<size_t>(a.n) * kDim, 0.0f);
  for (int t = 0; t < a.n; ++t) {
    MatVec(&a.x2[t * kDim], w3, kDim, kDim, &a.t3[t * kDim]);
    for (int d = 0; d < kDim; ++d) {
      a.t3[t * kDim + d] = ToyTanh(a.t3[t * kDim + d]);
      a.x3[t * kDim + d] = a.x2[t * kDim + d] + gain[0] * a.t3[t * kDim + d];
    }
  }
}

// Returns the mean loss; leaves d(mean loss)/d logits in a.dlogits.
float HeadForward(const float* e, const ToyBatch& b, Acts& a) {
  a.dlogits.assign(static_cast<size_t>(a.n) * kVocab, 0.0f);
  double total = 0.0;
  const float inv_n = 1.0f / static_cast<float>(a.n);
  for (int t = 0; t < a.n; ++t) {
    float* logits = &a.dlogits[t * kVocab];
    for (int v = 0; v < kVocab; ++v) {
      float s = 0.0f;
      for (int d = 0; d < kDim; ++d) s += a.x3[t * kDim + d] * e[v * kDim + d];
      logits[v] = s;
    }
    float mx = logits[0];
    for (int v = 1; v < kVocab; ++v) mx = std::max(mx, logits[v]);
    float z = 0.0f;
    for (int v = 0; v < kVocab; ++v) z += ToyExp(logits[v] - mx);
    total += static_cast<double>(ToyLog(z) + mx - logits[b.targets[t]]);
    for (int v = 0; v < kVocab; ++v) {
      const float p = ToyExp(logits[v] - mx) / z;
      logits[v] = (p - (v == b.targets[t] ? 1.0f : 0.0f)) * inv_n;
    }
  }
  return static_cast<float>(total / a.n);
}

void HeadBackward(const float* e, float* de, Acts& a) {
  a.dx.assign(static_cast<size_t>(a.n) * kDim, 0.0f);
  for (int t = 0; t < a.n; ++t) {
    const float* dl = &a.dlogits[t * kVocab];
    // logits = x3 E^T: dx3 = dl E, dE += dl^T x3
    for (int d = 0; d < kDim; ++d) {
      float s = 0.0f;
      for (int v = 0; v < kVocab; ++v) s += dl[v] * e[v * kDim + d];
      a.dx[t * kDim + d] = s;
    }
    Outer(dl, &a.x3[t * kDim], kVocab, kDim, de);
  }
}

void Block2Backward(const float* w3, const float* gain, float* dw3, float* dgain, Acts& a) {
  float da[kDim], dxin[kDim];
  for (int t = 0; t < a.n; ++t) {
    float* dx = &a.dx[t * kDim];
    const float* th = &a.t3[t * kDim];
    for (int d = 0; d < kDim; ++d) {
      dgain[0] += dx[d] * th[d];
      da[d] = dx[d] * gain[0] * (1.0f - th[d] * th[d]);
    }
    Outer(&a.x2[t * kDim], da, kDim, kDim, dw3);
    MatTVec(da, w3, kDim, kDim, dxin);
    for (int d = 0; d < kDim; ++d) dx[d] += dxin[d];
  }
}

void FrozenBackward(const float* f, Acts& a) {
  float da[kDim], dxin[kDim];
  for (int t = 0; t < a.n; ++t) {
    float* dx = &a.dx[t * kDim];
    const float* th = &a.t2[t * kDim];
    for (int d = 0; d < kDim; ++d) da[d] = dx[d] * (1.0f - th[d] * th[d]);
    MatTVec(da, f, kDim, kDim, dxin);
    for (int d = 0; d < kDim; ++d) dx[d] += dxin[d];
  }
}

void Block1Backward(const float* w1, const float* w2, float* dw1, float* db1, float* dw2, Acts& a) {
  float dh[kHidden], dxin[kDim];
  for (int t = 0; t < a.n; ++t) {
    float* dx = &a.dx[t * kDim];
    const float* h = &a.h1[t * kHidden];
    Outer(h, dx, kHidden, kDim, dw2);
    MatTVec(dx, w2, kHidden, kDim, dh);
    for (int j = 0; j < kHidden; ++j) {
      dh[j] *= 1.0f - h[j] * h[j];
      db1[j] += dh[j];
    }
    Outer(&a.x0[t * kDim], dh, kDim, kHidden, dw1);
    MatTVec(dh, w1, kDim, kHidden, dxin);
    for (int d = 0; d < kDim; ++d) dx[d] += dxin[d];
  }
}

void EmbedBackward(float* de, const ToyBatch& b, Acts& a) {
  for (int t = 0; t < a.n; ++t) {
    for (int d = 0; d < kDim; ++d) de[b.tokens[t] * kDim + d] += a.dx[t * kDim + d];
  }
}

float Forward(ToyAccess& m, const ToyBatch& batch, Acts& a) {
  m.Acquire(0, false);
  EmbedForward(m.Param(kToyEmbed), batch, a);
  m.Release(0, false);
  m.Acquire(1, false);
  Block1Forward(m.Param(kToyW1), m.Param(kToyB1), m.Param(kToyW2), a);
  m.Release(1, false);
  m.Acquire(2, false);
  FrozenForward(m.Param(kToyFrozen), a);
  m.Release(2, false);
  m.Acquire(3, false);
  Block2Forward(m.Param(kToyW3), m.Param(kToyGain), a);
  m.Release(3, false);
  m.Acquire(0, false);  // tied head
  const float loss = HeadForward(m.Param(kToyEmbed), batch, a);
  m.Release(0, false);
  return loss;
}

}  // namespace

std::vector<ParamSpec> ToySpecs() {
  std::vector<ParamSpec> s(kToyParams);
  s[kToyEmbed] = {"embed", {kVocab, kDim}, 0, true, 1.0f, 1.0f};
  s[kToyW1] = {"b1.w1", {kDim, kHidden}, 1, true, 1.0f, 1.0f};
  s[kToyB1] = {"b1.b1", {kHidden}, 1, true, 1.0f, 0.0f};
  s[kToyW2] = {"b1.w2", {kHidden, kDim}, 1, true, 1.0f, 1.0f};
  s[kToyFrozen] = {"frozen.f", {kDim, kDim}, 2, false, 1.0f, 1.0f};
  s[kToyW3] = {"b2.w3", {kDim, kDim}, 3, true, 0.5f, 1.0f};
  s[kToyGain] = {"b2.gain", {1}, 3, true, 1.0f, 0.0f};
  return s;
}

float ToyInit(int param, int64_t off) {
  if (param == kToyGain) return 0.75f;
  // A fixed pseudo-random value in [-0.5, 0.5), scaled down for the wider matrices.
  uint32_t h = static_cast<uint32_t>(param) * 2654435761u ^ static_cast<uint32_t>(off) * 2246822519u;
  h ^= h >> 15;
  h *= 2654435761u;
  h ^= h >> 13;
  const float u = static_cast<float>(h & 0xffff) / 65536.0f - 0.5f;
  return param == kToyEmbed ? u : 0.6f * u;
}

std::vector<std::vector<float>> ToyInitialParams() {
  std::vector<std::vector<float>> out;
  const std::vector<ParamSpec> specs = ToySpecs();
  for (size_t p = 0; p < specs.size(); ++p) {
    std::vector<float> v(static_cast<size_t>(specs[p].numel()));
    for (size_t i = 0; i < v.size(); ++i) v[i] = ToyInit(static_cast<int>(p), static_cast<int64_t>(i));
    out.push_back(std::move(v));
  }
  return out;
}

ToyBatch ToyMicroBatch(int step, int micro, int rank, int world, int global) {
  ToyBatch b;
  const int per_rank = global / world;
  b.tokens.resize(static_cast<size_t>(per_rank));
  b.targets.resize(static_cast<size_t>(per_rank));
  for (int i = 0; i < per_rank; ++i) ToyTokenAt(step, micro, rank, world, global, i, &b.tokens[i], &b.targets[i]);
  return b;
}

float ToyForwardBackward(ToyAccess& m, const ToyBatch& batch, float loss_scale) {
  Acts a;
  const float loss = Forward(m, batch, a);
  // The trainer's loss * LossScale(): a power of two, so every gradient is scaled exactly.
  if (loss_scale != 1.0f) {
    for (float& d : a.dlogits) d *= loss_scale;
  }
  m.Acquire(0, true);  // tied head first
  HeadBackward(m.Param(kToyEmbed), m.Grad(kToyEmbed), a);
  m.Release(0, true);
  m.Acquire(3, true);
  Block2Backward(m.Param(kToyW3), m.Param(kToyGain), m.Grad(kToyW3), m.Grad(kToyGain), a);
  m.GradsReady(3);
  m.Release(3, true);
  m.Acquire(2, true);
  FrozenBackward(m.Param(kToyFrozen), a);
  m.GradsReady(2);
  m.Release(2, true);
  m.Acquire(1, true);
  Block1Backward(m.Param(kToyW1), m.Param(kToyW2), m.Grad(kToyW1), m.Grad(kToyB1), m.Grad(kToyW2), a);
  m.GradsReady(1);
  m.Release(1, true);
  m.Acquire(0, true);  // then the lookup
  EmbedBackward(m.Grad(kToyEmbed), batch, a);
  m.GradsReady(0);
  m.Release(0, true);
  return loss;
}

float ToyForward(ToyAccess& m, const ToyBatch& batch) {
  Acts a;
  return Forward(m, batch, a);
}

}  // namespace zero::testing
