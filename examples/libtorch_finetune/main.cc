// libtorch_finetune: an ordinary libtorch fine-tuning loop (a torch::nn MLP whose backbone is frozen, a new head
// trained with AdamW on a synthetic teacher task), made ZeRO-sharded by zero::TorchModule. The lines marked
// "// zero" are all that changed from the plain loop; README "libtorch" shows them as a diff.
//
//   mpiexec -n 2 build/examples/libtorch_finetune/libtorch_finetune [--stage 0|1|2|3] [--steps N] [--out DIR]
//                                                                  [--device cpu|cuda]
//
// Prints one line per step (rank 0's loss, the gradient norm) and `loss_first=X loss_last=Y val_loss=Z` (Z on a
// held-out batch, through TorchModule's eval pass); with --out it writes a
// sharded checkpoint and a safetensors export (state_dict names). Exits 1 if the loss did not halve. --device cuda
// (a CUDA libtorch and a zero built with CUDA): the module on this rank's GPU, zero's Backend::kCuda over NCCL
// bootstrapped through the MPI Comm (no mpi.h needed); the data is made on the CPU, the same on every device.
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>

#include <torch/torch.h>

#include "zero/torch.h"  // zero

#define CHECK_OK(expr)                                                       \
  do {                                                                       \
    const zero::Status s_ = (expr);                                          \
    if (!s_.ok()) {                                                          \
      std::fprintf(stderr, "%s failed: %s\n", #expr, s_.ToString().c_str()); \
      std::exit(1);                                                          \
    }                                                                        \
  } while (0)

constexpr int64_t kIn = 32, kHidden = 64, kOut = 4, kBatch = 64;

struct MlpImpl : torch::nn::Module {
  MlpImpl() {
    backbone = register_module("backbone", torch::nn::Sequential(torch::nn::Linear(kIn, kHidden), torch::nn::Tanh(),
                                                                 torch::nn::Linear(kHidden, kHidden), torch::nn::Tanh()));
    adapter = register_module("adapter", torch::nn::Linear(kHidden, kHidden));
    head = register_module("head", torch::nn::Linear(kHidden, kOut));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    torch::Tensor h = backbone->forward(x);
    h = h + torch::tanh(adapter(h));
    return head(h);
  }
  // Stage 3 runs each unit (top-level child) through zero::TorchModule::Forward; the same computation.
  torch::Tensor forward_units(zero::TorchModule& zm, const torch::Tensor& x) {
    torch::Tensor h;
    CHECK_OK(zm.Forward(0, x, [&](const torch::Tensor& in) { return backbone->forward(in); }, &h));
    CHECK_OK(zm.Forward(1, h, [&](const torch::Tensor& in) { return in + torch::tanh(adapter(in)); }, &h));
    CHECK_OK(zm.Forward(2, h, [&](const torch::Tensor& in) { return head(in); }, &h));
    return h;
  }
  torch::nn::Sequential backbone{nullptr};
  torch::nn::Linear adapter{nullptr}, head{nullptr};
};
TORCH_MODULE(Mlp);

int main(int argc, char** argv) {
  int stage = 2, steps = 30;
  std::string out, device = "cpu";
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    if (flag == "--stage") stage = std::atoi(argv[i + 1]);
    else if (flag == "--steps") steps = std::atoi(argv[i + 1]);
    else if (flag == "--out") out = argv[i + 1];
    else if (flag == "--device") device = argv[i + 1];
    else { std::fprintf(stderr, "usage: %s [--stage 0-3] [--steps N] [--out DIR] [--device cpu|cuda]\n", argv[0]); return 2; }
  }
  if (device != "cpu" && device != "cuda") {
    std::fprintf(stderr, "--device must be cpu or cuda, not '%s'\n", device.c_str());
    return 2;
  }
  torch::set_num_threads(1);
  torch::manual_seed(0);  // every rank builds the same model
  Mlp model;
  Mlp teacher;            // the task: match a random teacher network
  for (auto& p : model->backbone->parameters()) p.set_requires_grad(false);  // fine-tune adapter and head only
  std::unique_ptr<zero::Comm> comm;                                         // zero
  CHECK_OK(zero::Comm::OpenMpi(zero::CommOptions(), &comm));                // zero
  zero::Options options;                                                    // zero
  options.stage = static_cast<zero::Stage>(stage);                          // zero
  options.adamw.lr = 3e-3f;                                                 // zero
  options.clip_norm = 1.0;                                                  // zero
  // On GPUs: NCCL over the MPI Comm's ranks, each rank's module on its GPU (the MPI Comm outlives the NCCL one).
  std::unique_ptr<zero::Comm> nccl;                                         // zero (GPU)
  torch::Device on = torch::kCPU;
  if (device == "cuda") {
    CHECK_OK(zero::Comm::OpenNccl(*comm, zero::CommOptions(), &nccl));     // zero (GPU)
    options.backend = zero::Backend::kCuda;                                 // zero (GPU)
    on = torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(nccl->cuda_device()));
    model->to(on);
    teacher->to(on);
  }
  zero::Comm* trainer_comm = nccl ? nccl.get() : comm.get();
  std::unique_ptr<zero::TorchModule> zm;                                    // zero
  CHECK_OK(zero::TorchModule::Wrap(model.ptr(), options, trainer_comm, {}, &zm));  // zero
  const int rank = comm->rank(), world = comm->world_size();
  const int64_t rows = kBatch / world;  // this rank's slice of the global batch
  double first = 0.0, last = 0.0;
  for (int step = 0; step < steps; ++step) {
    torch::manual_seed(1000 + step);
    torch::Tensor x = torch::randn({kBatch, kIn}).to(on);
    torch::Tensor y;
    {
      torch::NoGradGuard no_grad;
      y = teacher->forward(x);
    }
    x = x.narrow(0, rank * rows, rows);  // zero: data parallel
    y = y.narrow(0, rank * rows, rows);
    CHECK_OK(zm->BeginMicroStep(0, /*is_last=*/true));                       // zero (was: optimizer.zero_grad())
    torch::Tensor pred = stage == 3 ? model->forward_units(*zm, x) : model->forward(x);
    torch::Tensor loss = torch::mse_loss(pred, y);
    loss.backward();
    zero::StepResult result;                                                 // zero
    CHECK_OK(zm->Step(zero::StepArgs(), &result));                           // zero (was: clip, optimizer.step())
    const double l = loss.item<double>();  // this rank's micro-batch
    if (step == 0) first = l;
    last = l;
    if (rank == 0) {
      std::printf("step %3d  loss %.5f  grad_norm %.4f  clip %.3f\n", step, l, result.grad_norm, result.clip_coef);
    }
  }
  // Validation on a held-out batch (every rank the whole batch): at stage 3 each unit is gathered for its Forward
  // and dropped after, as in training, without autograd.
  double val = 0.0;
  {
    torch::manual_seed(999);
    torch::Tensor x = torch::randn({kBatch, kIn}).to(on);
    torch::NoGradGuard no_grad;
    const torch::Tensor y = teacher->forward(x);
    CHECK_OK(zm->BeginEval());                                               // zero
    torch::Tensor pred = stage == 3 ? model->forward_units(*zm, x) : model->forward(x);
    CHECK_OK(zm->EndEval());                                                 // zero
    val = torch::mse_loss(pred, y).item<double>();
  }
  if (!out.empty()) {
    CHECK_OK(zm->Save(out, "step-" + std::to_string(steps)));                // zero: sharded checkpoint
    CHECK_OK(zm->Export(out + "/model.safetensors"));                        // zero: state_dict names
  }
  if (rank == 0) {
    std::printf("loss_first=%.5f loss_last=%.5f val_loss=%.5f device=%s\n", first, last, val, on.str().c_str());
  }
  zm.reset();  // the module gets private copies of its trained parameters back (stage 3: gathered)
  if (!(last < 0.5 * first)) {
    std::fprintf(stderr, "rank %d: the loss did not halve (%.5f -> %.5f)\n", rank, first, last);
    return 1;
  }
  return 0;
}
