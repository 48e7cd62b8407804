#!/usr/bin/env bash
# scripts/gpu/torch_consumer.sh: zero::torch built against PyTorch's own libtorch (the GPU machine's, e.g. 2.11+cu130)
# and used from an installed zero with CUDA, the way a user's project would. Two halves:
#
#   prepare BUILD_DIR OUT_DIR      here (the build machine, no GPU): installs a configured and built zero (the GPU
#                                  bundle's CUDA build, e.g. /tmp/zero-gpu/build from scripts/gpu/gpu_bundle.sh) into
#                                  OUT_DIR/zero-prefix and packs it as OUT_DIR/zero-prefix.tar.xz (about 1 MB: headers,
#                                  libzero, zero-estimate, the CMake package). libzero knows nothing of torch, so
#                                  the Debian libtorch of this machine does not travel.
#   run PREFIX [OUT_DIR]           there (repository root = this working tree): PREFIX is that tarball or an unpacked
#                                  prefix. Prints the torch it finds (python3: torch.__version__, CUDA, the C++ ABI,
#                                  torch.utils.cmake_prefix_path), builds src/torch/CMakeLists.txt alone against
#                                  PREFIX + that libtorch and installs zero::torch into PREFIX, then builds
#                                  tests/install_consumer_torch with find_package(zero COMPONENTS torch) and runs it
#                                  (an MLP through zero::TorchModule at stages 0 and 3 against torch::optim::AdamW, and
#                                  with a GPU the same on CUDA against torch's AdamW on CUDA), and the libtorch example
#                                  (examples/libtorch_finetune) under mpiexec -n 2 at stages 0 and 3 when an mpiexec is
#                                  found (below), and with a GPU again with --device cuda at ZERO_TORCH_CUDA_RANKS
#                                  ranks (default 1: two ranks on one GPU need an NCCL that lets them share it). Logs go to OUT_DIR (default $OUT, else
#                                  /tmp/zero-torch-out): torch_consumer.log and one line per step in
#                                  torch_consumer_summary.txt.
#
# For the GPU run script (scripts/gpu/gpu_run.sh): after its deps are set up (its deps/env.sh: LD_LIBRARY_PATH with
# the bundle's Open MPI and the image's NCCL/cuBLAS, which libzero needs even to link against), call
#     bash scripts/gpu/torch_consumer.sh run .gpu/zero-prefix.tar.xz "$OUT"
# with .gpu/ carried, having run here
#     scripts/gpu/torch_consumer.sh prepare /tmp/zero-gpu/build .gpu
# It needs on the device: python3 with torch, cmake, a C++20 compiler (g++ >= 10), ninja or make, and, for a CUDA
# torch, the CUDA toolkit (nvcc) that torch's CMake files look for. About 1-2 minutes on 16 cores (torch's headers
# dominate). Exit status: 0 when every step passed; otherwise the number of failed steps.
#
# Env: ZERO_TORCH_PYTHON (default python3) the interpreter with torch; ZERO_TORCH_WORK (default /tmp/zero-torch) the
# build directory; ZERO_TORCH_ENV a file to source first (default: /tmp/zero-gpu/deps/env.sh when it exists);
# ZERO_TORCH_MPIEXEC the mpiexec for the example (default: mpiexec on PATH, else /tmp/zero-gpu/deps/bin/mpiexec).
# Tried here (no GPU) with Debian's torch 1.13 in place of PyTorch's: every step passes, 2 min 10 s on 2 cores.
set -uo pipefail

die() {
  echo "torch_consumer.sh: $*" >&2
  exit 2
}

prepare() {
  local build=${1:?usage: torch_consumer.sh prepare BUILD_DIR OUT_DIR} out=${2:?usage: prepare BUILD_DIR OUT_DIR}
  [[ -f $build/cmake_install.cmake ]] || die "$build is not a configured CMake build of zero (no cmake_install.cmake)"
  mkdir -p "$out"
  out=$(cd "$out" && pwd)
  rm -rf "$out/zero-prefix"
  cmake --install "$build" --prefix "$out/zero-prefix" >"$out/zero-prefix.log" 2>&1 ||
    { cat "$out/zero-prefix.log"; die "cmake --install $build failed"; }
  # A prefix built with Debian's libtorch would carry zero::torch for 1.13: the device builds its own.
  rm -f "$out"/zero-prefix/lib/libzero_torch.so* "$out/zero-prefix/include/zero/torch.h" \
    "$out"/zero-prefix/lib/cmake/zero/zeroTorchTargets*.cmake "$out/zero-prefix/lib/cmake/zero/zero-torch.cmake"
  tar -C "$out" -cJf "$out/zero-prefix.tar.xz" zero-prefix || die "packing $out/zero-prefix.tar.xz failed"
  echo "torch_consumer.sh: $out/zero-prefix.tar.xz ($(du -h "$out/zero-prefix.tar.xz" | cut -f1)):" \
    "$(cd "$out/zero-prefix" && find . ! -type d | sort | tr '\n' ' ')"
}

run() {
  local prefix=${1:?usage: torch_consumer.sh run PREFIX [OUT_DIR]}
  local out=${2:-${OUT:-/tmp/zero-torch-out}}
  local work=${ZERO_TORCH_WORK:-/tmp/zero-torch}
  local python=${ZERO_TORCH_PYTHON:-python3}
  local env_file=${ZERO_TORCH_ENV:-/tmp/zero-gpu/deps/env.sh}
  local src
  src=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
  mkdir -p "$out" "$work"
  local log=$out/torch_consumer.log summary=$out/torch_consumer_summary.txt failed=0
  : >"$log"
  : >"$summary"
  note() { echo "$*" | tee -a "$summary"; }
  # step NAME COMMAND...: runs it with its output appended to the log, and records PASS/FAIL.
  step() {
    local name=$1
    shift
    echo "===== $name: $*" >>"$log"
    local t0=$SECONDS
    if "$@" >>"$log" 2>&1; then
      note "PASS $name ($((SECONDS - t0)) s)"
    else
      note "FAIL $name ($((SECONDS - t0)) s; see torch_consumer.log)"
      failed=$((failed + 1))
      return 1
    fi
  }

  # shellcheck disable=SC1090
  [[ -f $env_file ]] && source "$env_file"
  if [[ -f $prefix && $prefix == *.tar.* ]]; then
    rm -rf "$work/unpacked" && mkdir -p "$work/unpacked"
    tar -C "$work/unpacked" -xf "$prefix" || die "unpacking $prefix failed"
    prefix=$work/unpacked/zero-prefix
  fi
  [[ -f $prefix/lib/cmake/zero/zeroConfig.cmake ]] || die "$prefix holds no installed zero (lib/cmake/zero)"
  prefix=$(cd "$prefix" && pwd)

  local facts
  facts=$("$python" - <<'PY' 2>&1
import torch, torch.utils
print(torch.__version__, torch.version.cuda or "cpu", torch.cuda.is_available(), torch.compiled_with_cxx11_abi(),
      torch.utils.cmake_prefix_path)
PY
) || die "$python cannot import torch: $facts"
  local version cuda available abi torch_prefix
  read -r version cuda available abi torch_prefix <<<"$facts"
  note "torch $version (CUDA $cuda, GPU available: $available, C++11 ABI: $abi), CMake files under $torch_prefix"
  note "compiler: $(c++ --version 2>/dev/null | head -n 1); cmake: $(cmake --version | head -n 1);" \
    "nvcc: $(command -v nvcc || echo none)"
  # libzero and libzero_torch pass std::string across their API: a libtorch built with the old ABI cannot link
  # against a libzero built with the new one (PyTorch's wheels use the new ABI since 2.7).
  [[ $abi == True ]] || { note "FAIL abi: torch was built with _GLIBCXX_USE_CXX11_ABI=0, libzero with 1"; return 1; }

  local generator=()
  command -v ninja >/dev/null 2>&1 && generator=(-G Ninja)
  # torch's own folder first as a prefix too: TorchConfig.cmake's find_library searches the system's folders before
  # the torch install it came from, so a machine that also has a system libtorch (Debian's libtorch-dev) would
  # link that one's libtorch.so and libc10.so with this torch's headers.
  local torch_root
  torch_root=$(cd "$torch_prefix/../.." && pwd)
  local cmake_common=(-DCMAKE_BUILD_TYPE=Release "-DCMAKE_PREFIX_PATH=$prefix;$torch_root;$torch_prefix" "${generator[@]}")
  local nvcc
  nvcc=$(command -v nvcc || true)
  [[ -z $nvcc && -x /usr/local/cuda/bin/nvcc ]] && nvcc=/usr/local/cuda/bin/nvcc
  if [[ -n $nvcc ]]; then
    # torch's Caffe2 CMake files look for the CUDA toolkit (and enable CUDA) when torch was built with CUDA.
    cmake_common+=("-DCMAKE_CUDA_COMPILER=$nvcc" "-DCUDAToolkit_ROOT=$(dirname "$(dirname "$nvcc")")"
                   -DCMAKE_CUDA_ARCHITECTURES=native "-DTORCH_CUDA_ARCH_LIST=9.0")
  fi
  rm -rf "$work/build-torch" "$work/consumer"
  step zero_torch_configure cmake -S "$src/src/torch" -B "$work/build-torch" "${cmake_common[@]}" &&
    step zero_torch_build cmake --build "$work/build-torch" --parallel "$(nproc)" &&
    step zero_torch_install cmake --install "$work/build-torch" --prefix "$prefix" &&
    step consumer_configure cmake -S "$src/tests/install_consumer_torch" -B "$work/consumer" "${cmake_common[@]}" \
      -DZERO_CONSUMER_EXAMPLE=ON &&
    step consumer_build cmake --build "$work/consumer" --parallel "$(nproc)" &&
    step consumer_run "$work/consumer/torch_app"
  grep '^install_consumer_torch:' "$log" | tee -a "$summary"
  local mpiexec=${ZERO_TORCH_MPIEXEC:-$(command -v mpiexec || true)}
  [[ -z $mpiexec && -x /tmp/zero-gpu/deps/bin/mpiexec ]] && mpiexec=/tmp/zero-gpu/deps/bin/mpiexec
  if [[ -x $work/consumer/libtorch_finetune && -n $mpiexec ]]; then
    local mpi_flags=(--oversubscribe --bind-to none)
    [[ $(id -u) -eq 0 ]] && export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
    local stage
    for stage in 0 3; do
      step "libtorch_finetune_stage$stage" "$mpiexec" -n 2 "${mpi_flags[@]}" "$work/consumer/libtorch_finetune" \
        --stage "$stage"
    done
    if [[ $available == True ]]; then
      for stage in 0 3; do
        step "libtorch_finetune_cuda_stage$stage" "$mpiexec" -n "${ZERO_TORCH_CUDA_RANKS:-1}" "${mpi_flags[@]}" \
          "$work/consumer/libtorch_finetune" --stage "$stage" --device cuda
      done
    fi
    grep '^loss_first=' "$log" | tee -a "$summary"
  elif [[ -x $work/consumer/libtorch_finetune ]]; then
    note "SKIP libtorch_finetune (no mpiexec on PATH)"
  fi
  note "torch_consumer.sh: $failed step(s) failed; prefix $prefix now holds zero::torch for torch $version"
  return "$failed"
}

case ${1:-} in
  prepare) shift; prepare "$@" ;;
  run) shift; run "$@" ;;
  *) die "usage: torch_consumer.sh prepare BUILD_DIR OUT_DIR | run PREFIX [OUT_DIR]" ;;
esac
