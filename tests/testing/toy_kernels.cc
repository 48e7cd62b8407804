// The CPU instantiation of the toy model's work items (toy_math.cuh), compiled by g++ with -ffp-contract=off, and
// the dispatch to the CUDA one (toy_kernels.cu) when this build has CUDA.
#include "testing/toy_kernels.h"

#include <string>

#if defined(ZERO_WITH_CUDA)
#include "testing/toy_kernels_cuda.h"
#endif

namespace zero::testing {

Status RunToyOp(ToyExec exec, ToyOp op, const ToyArgs& args, [[maybe_unused]] void* stream) {
  if (exec == ToyExec::kCpu) {
    const int64_t n = ToyOpCount(op, args);
    for (int64_t i = 0; i < n; ++i) RunToyOpItem(op, args, i);
    return Status::Ok();
  }
#if defined(ZERO_WITH_CUDA)
  const std::string error = LaunchToyOpCuda(op, args, stream);
  return error.empty() ? Status::Ok() : Status::Internal(error);
#else
  return Status::Unavailable("RunToyOp: this build has no CUDA (ZERO_WITH_CUDA=OFF or no toolkit)");
#endif
}

}  // namespace zero::testing
