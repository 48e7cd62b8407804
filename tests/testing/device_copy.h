// Copies between host memory and CUDA device memory for tests that drive the engine on Backend::kCuda (views
// are device pointers there). Without CUDA in the build these return Unavailable; the suites that need them
// skip before getting here.
#pragma once

#include <cstdint>

#include "zero/status.h"

namespace zero::testing {

Status CopyFromDevice(void* host_dst, const void* device_src, int64_t bytes);
Status CopyToDevice(void* device_dst, const void* host_src, int64_t bytes);

}  // namespace zero::testing
