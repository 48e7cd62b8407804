#!/usr/bin/env bash
# scripts/example.sh: from a fresh Debian 12 machine to zero's main job: the LoRA fine-tune
# (examples/lora_finetune) on 2 ranks with ZeRO stage 3. Installs missing Debian packages, builds the example in
# Release into build/ (the build time is printed on its own), prepares the corpora, pretrains a small base on
# the fortunes collection (or reuses it), and fine-tunes LoRA adapters on the King James Bible under
# `mpiexec -n 2`. The last two lines are machine-readable: `val_loss_before=X val_loss_after=Y` and
# `adapter=PATH`. Extra arguments go to the example:  scripts/example.sh --lora-steps 100
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
build=build
target=lora_finetune
binary=$build/examples/lora_finetune/lora_finetune

die() {
  echo "example.sh: $*" >&2
  exit 1
}

scripts/deps.sh

have_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU '; }

# build/ is shared with scripts/test.sh, so that whichever runs second reuses the first one's objects:
#  * In a fresh build/ this configures the lean set: examples only, no tests or benchmarks, and CUDA only when a
#    GPU is present (without one, CUDA code could not run anyway and nvcc for two architectures is slow).
#  * In a build/ that scripts/test.sh configured (tests, benchmarks, CUDA when nvcc exists) it changes nothing:
#    turning options off here would make the next test.sh rebuild libzero. It builds only the example's target,
#    so tests and benchmarks are not built by this script either way. A libzero with CUDA compiled in still runs
#    the CPU backend without a GPU (it links the CUDA runtime only, never the driver).
cmake_args=(-S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DZERO_BUILD_EXAMPLES=ON)
cuda=$(sed -n 's/^ZERO_WITH_CUDA:[A-Z]*=//p' "$build/CMakeCache.txt" 2>/dev/null || true)
if [[ ! -f $build/CMakeCache.txt ]]; then
  cmake_args+=(-DZERO_BUILD_TESTS=OFF -DZERO_BUILD_BENCHMARKS=OFF)
  if have_gpu; then cmake_args+=(-DZERO_WITH_CUDA=AUTO); else cmake_args+=(-DZERO_WITH_CUDA=OFF); fi
elif [[ $cuda == OFF ]] && have_gpu; then
  cmake_args+=(-DZERO_WITH_CUDA=AUTO)
fi
if have_gpu && ! command -v nvcc >/dev/null 2>&1 && [[ -x /usr/local/cuda/bin/nvcc ]]; then
  export CUDACXX=${CUDACXX:-/usr/local/cuda/bin/nvcc}  # read by CMake on the first configure only
fi
cmake "${cmake_args[@]}"

# Ask the build system for the target first, so a checkout without the example says so instead of "No rule".
targets=$(cmake --build "$build" --target help)
if ! grep -qE "(^|[ ])${target}(:|$)" <<<"$targets"; then
  die "this checkout has no '$target' target yet (examples/$target/ missing or not in examples/CMakeLists.txt)"
fi
build_start=$SECONDS
cmake --build "$build" --target "$target" --parallel "$(nproc)"
[[ -x $binary ]] || die "built '$target' but found no executable at $binary"
echo "==> build took $((SECONDS - build_start)) s"

# Open MPI refuses to run as root unless told; --oversubscribe lets 2 ranks share fewer cores; shared memory only.
if [[ $(id -u) -eq 0 ]]; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
# shellcheck disable=SC2054  # "self,vader" is one argument
run=(mpiexec -n 2 --oversubscribe --bind-to none --mca btl self,vader "$binary" all --stage 3 --out runs/lora "$@")
echo "==> ${run[*]}"
run_start=$SECONDS
"${run[@]}"
echo "==> the run took $((SECONDS - run_start)) s" >&2
