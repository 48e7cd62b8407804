// An ordinary libtorch training loop against an installed zero::torch (tests/install_consumer_torch): the same MLP
// (a frozen middle layer) trained 12 steps with torch::optim::AdamW, and through zero::TorchModule at stages 0 and 3
// (stage 3 with one Forward per unit), in one process. Exits non-zero unless every zero run ends where torch's
// AdamW does: max |p - p_ref| / max(1, |p_ref|) <= 3e-6 (zero's AdamW is torch's in fp32; torch computes the step
// size in double, a few units of 2^-24 per step, as tests/torch_module_test.cc derives), while the parameters moved
// by more than 1e-2 (so the comparison sees a step that did not happen). With a GPU (a CUDA libtorch and a zero
// built with CUDA), the same on the GPU: the module on CUDA, zero's Backend::kCuda over NCCL (a world of one,
// bootstrapped through Comm::OpenMpi), against torch::optim::AdamW on the GPU, within 1e-5 (below).
#include <algorithm>
#include <cstdio>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include <torch/torch.h>

#include <zero/torch.h>
#include <zero/zero.h>

namespace {

constexpr int kSteps = 12;
constexpr double kLr = 1e-2, kWeightDecay = 1e-2;

struct NetImpl : torch::nn::Module {
  NetImpl() {
    embed = register_module("embed", torch::nn::Linear(6, 10));
    frozen = register_module("frozen", torch::nn::Linear(10, 10));
    head = register_module("head", torch::nn::Linear(10, 3));
    for (auto& p : frozen->parameters()) p.set_requires_grad(false);
  }
  torch::Tensor forward(const torch::Tensor& x) { return head(torch::tanh(frozen(torch::tanh(embed(x))))); }
  torch::Tensor forward_units(zero::TorchModule& zm, const torch::Tensor& x) {
    torch::Tensor h = x;
    const auto run = [&](int unit, const zero::TorchModule::UnitForward& fn) {
      const zero::Status s = zm.Forward(unit, h, fn, &h);
      if (!s.ok()) throw std::runtime_error(s.ToString());
    };
    run(0, [&](const torch::Tensor& in) { return torch::tanh(embed(in)); });
    run(1, [&](const torch::Tensor& in) { return torch::tanh(frozen(in)); });
    run(2, [&](const torch::Tensor& in) { return head(in); });
    return h;
  }
  torch::nn::Linear embed{nullptr}, frozen{nullptr}, head{nullptr};
};
TORCH_MODULE(Net);

Net MakeNet() {
  torch::manual_seed(3);
  return Net();
}

std::pair<torch::Tensor, torch::Tensor> Batch(int step, const torch::Device& on = torch::kCPU) {
  torch::manual_seed(100 + step);
  torch::Tensor x = torch::randn({16, 6});
  return {x.to(on), torch::randn({16, 3}).to(on)};
}

double MaxError(Net a, Net b) {
  double err = 0.0;
  auto pb = b->named_parameters();
  for (const auto& item : a->named_parameters()) {
    const torch::Tensor ref = pb[item.key()].detach().cpu();
    const double diff = (item.value().detach().cpu() - ref).abs().max().item<double>();
    err = std::max(err, diff / std::max(1.0, ref.abs().max().item<double>()));
  }
  return err;
}

bool Ok(const zero::Status& s, const char* what) {
  if (!s.ok()) std::fprintf(stderr, "install_consumer_torch: %s: %s\n", what, s.ToString().c_str());
  return s.ok();
}

// The reference: kSteps of torch::optim::AdamW on `on`.
Net TrainWithTorch(const torch::Device& on) {
  Net reference = MakeNet();
  reference->to(on);
  std::vector<torch::Tensor> trainable;
  for (auto& p : reference->parameters()) {
    if (p.requires_grad()) trainable.push_back(p);
  }
  torch::optim::AdamW opt(trainable, torch::optim::AdamWOptions(kLr).weight_decay(kWeightDecay));
  for (int step = 0; step < kSteps; ++step) {
    auto [x, y] = Batch(step, on);
    opt.zero_grad();
    torch::mse_loss(reference->forward(x), y).backward();
    opt.step();
  }
  return reference;
}

// The same through zero::TorchModule at stages 0 and 3 over `comm` (on `on`, with `backend`), each run against
// `reference` within `limit`.
bool TrainWithZero(zero::Comm* comm, zero::Backend backend, const torch::Device& on, Net reference, double moved,
                   double limit) {
  bool ok = true;
  for (int stage : {0, 3}) {
    Net net = MakeNet();
    net->to(on);
    zero::Options options;
    options.backend = backend;
    options.stage = static_cast<zero::Stage>(stage);
    options.adamw.lr = static_cast<float>(kLr);
    options.adamw.weight_decay = static_cast<float>(kWeightDecay);
    std::unique_ptr<zero::TorchModule> zm;
    if (!Ok(zero::TorchModule::Wrap(net.ptr(), options, comm, {}, &zm), "Wrap")) return false;
    for (int step = 0; step < kSteps; ++step) {
      auto [x, y] = Batch(step, on);
      if (!Ok(zm->BeginMicroStep(0, true), "BeginMicroStep")) return false;
      torch::Tensor out = stage == 3 ? net->forward_units(*zm, x) : net->forward(x);
      torch::mse_loss(out, y).backward();
      zero::StepResult result;
      if (!Ok(zm->Step(zero::StepArgs(), &result), "Step")) return false;
    }
    zm.reset();  // the module gets private copies of its parameters back
    const double err = MaxError(net, reference);
    std::printf("install_consumer_torch: %s stage %d: max relative difference from torch::optim::AdamW %.3g (limit "
                "%.0e; the parameters moved by %.3g)\n", on.str().c_str(), stage, err, limit, moved);
    ok = ok && err <= limit && net->parameters()[0].device() == on;
  }
  return ok;
}

}  // namespace

int main() {
  Net reference = TrainWithTorch(torch::kCPU);
  const double moved = MaxError(reference, MakeNet());
  std::unique_ptr<zero::Comm> single = zero::Comm::Single();
  bool ok = moved > 1e-2 && TrainWithZero(single.get(), zero::Backend::kCpu, torch::kCPU, reference, moved, 3e-6);
  // With a GPU: zero on CUDA against torch on CUDA. Both compute forward and backward with the same kernels; the
  // optimizers differ in rounding only (torch's CUDA elementwise kernels may contract into FMAs, zero's AdamW is
  // built with --fmad=false), a few fp32 ulps per step, which the 12 steps carry through the network: 1e-5.
  if (torch::cuda::is_available()) {
    std::unique_ptr<zero::Comm> mpi, nccl;
    ok = Ok(zero::Comm::OpenMpi(zero::CommOptions(), &mpi), "Comm::OpenMpi") &&
         Ok(zero::Comm::OpenNccl(*mpi, zero::CommOptions(), &nccl), "Comm::OpenNccl") && ok;
    if (nccl) {
      const torch::Device gpu(torch::kCUDA, static_cast<c10::DeviceIndex>(nccl->cuda_device()));
      Net gpu_reference = TrainWithTorch(gpu);
      ok = TrainWithZero(nccl.get(), zero::Backend::kCuda, gpu, gpu_reference, MaxError(gpu_reference, MakeNet()),
                         1e-5) && ok;
    }
  } else {
    std::printf("install_consumer_torch: no GPU visible to torch: the CUDA runs are not tried\n");
  }
  std::printf("install_consumer_torch: %s (libtorch %d.%d.%d)\n", ok ? "OK" : "FAILED", TORCH_VERSION_MAJOR,
              TORCH_VERSION_MINOR, TORCH_VERSION_PATCH);
  return ok ? 0 : 1;
}
