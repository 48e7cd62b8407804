// Adapter folding (merge.h).
#include "examples/lora_finetune/merge.h"

#include <cblas.h>

#include <map>
#include <string>

extern "C" void openblas_set_num_threads(int) __attribute__((weak));

namespace lora {

MergedModel Merge(const ModelConfig& m, const LoraConfig& l, const std::vector<const float*>& adapted, int threads) {
  if (openblas_set_num_threads != nullptr) openblas_set_num_threads(threads);
  const std::vector<ParamInfo> from = Parameters(m, l), to = Parameters(m, LoraConfig());
  std::map<std::string, int> index;
  for (size_t p = 0; p < from.size(); ++p) index[from[p].name] = static_cast<int>(p);
  const float scale = l.alpha / static_cast<float>(l.r);
  MergedModel out;
  out.params.resize(to.size());
  out.folded.resize(to.size());
  for (size_t p = 0; p < to.size(); ++p) {
    const std::string& name = to[p].name;
    out.params[p] = adapted[static_cast<size_t>(index.at(name))];
    const std::string stem = name.substr(0, name.size() - std::string(".weight").size());
    auto a = index.find(stem + ".lora_A.weight"), b = index.find(stem + ".lora_B.weight");
    if (a == index.end() || b == index.end()) continue;
    const int rows = static_cast<int>(to[p].shape[0]), cols = static_cast<int>(to[p].shape[1]);
    std::vector<float>& w = out.folded[p];
    w.assign(out.params[p], out.params[p] + static_cast<size_t>(rows) * cols);
    // w[rows, cols] += scale * B[rows, r] A[r, cols]
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, cols, l.r, scale,
                adapted[static_cast<size_t>(b->second)], l.r, adapted[static_cast<size_t>(a->second)], cols, 1.0f,
                w.data(), cols);
    out.params[p] = w.data();
  }
  return out;
}

}  // namespace lora
