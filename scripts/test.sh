#!/usr/bin/env bash
# scripts/test.sh: everything CI checks, in one command (.ci/run runs it).
#
#   deps       install missing Debian packages (scripts/deps.sh)
#   configure  Release into build/: tests, benchmarks and examples on, warnings as errors, CUDA when nvcc is
#              present (compiled for sm_80 and sm_90; nothing CUDA runs here)
#   build      everything, -j$(nproc), through ccache
#   install    cmake --install into a temporary prefix, then build and run tests/install_consumer against it
#              (find_package(zero) + zero::zero from an outside project), and tests/install_consumer_torch
#              (find_package(zero COMPONENTS torch) + zero::torch) when zero::torch was built
#   test       ctest; multi-rank suites run under mpiexec
#   multihost  one job across hosts made of network namespaces (tests/multihost_test.sh, scripts/netns_cluster.sh):
#              Open MPI over TCP between them; the topology, ZeRO++'s collectives and engine, the example, and the
#              bytes counted across nodes against what the links carried. Skipped, saying why, where the kernel
#              forbids network namespaces
#   cuda-emulated  the CUDA cases of the suites that have them (ctest label cuda) in build-cudaemu/: Backend::kCuda's
#              host code against the host-only CUDA stand-in (ZERO_CUDA_EMULATION: tests/testing/fake_cuda), kernels
#              replaced by their CPU instantiations, StagedComm for NCCL, work deferred until waited for (so a
#              missing stream wait shows); a skipped case fails there
#   tsan       the protocol suites (ctest label tsan) again in build-tsan/: clang + ThreadSanitizer, CPU only
#   asan       every CPU suite again in build-asan/ (ctest label asan): clang + AddressSanitizer + LeakSanitizer +
#              UndefinedBehaviorSanitizer, multi-rank suites included; Open MPI's own leaks suppressed (tests/lsan.supp)
#   fuzz       the checkpoint readers under libFuzzer + ASan + UBSan (tests/fuzz, build-fuzz/): fixed seed and runs
#
# Prints each phase's wall time at the end, also when a phase fails. Exits non-zero on any failure. Re-running
# with nothing changed only re-checks: no package manager, a quick re-configure, an up-to-date build.
# Extra arguments go to ctest:  scripts/test.sh -R comm      scripts/test.sh -L mpi -V
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
build=build

# --- phase timing -----------------------------------------------------------------------------------------------
now_us() { echo "${EPOCHREALTIME//[!0-9]/}"; }  # bash 5: microseconds since the epoch, locale-proof
fmt_s() { printf '%d.%d s' $(($1 / 1000000)) $(($1 / 100000 % 10)); }
phase_names=()
phase_us=()
phase=""
phase_start=0
total_start=$(now_us)
tmp=""

end_phase() {
  if [[ -n $phase ]]; then
    phase_names+=("$phase")
    phase_us+=($(($(now_us) - phase_start)))
    phase=""
  fi
}
begin_phase() {
  end_phase
  phase=$1
  phase_start=$(now_us)
  echo "==> $phase"
}
on_exit() {
  local rc=$?
  local failed=$phase
  end_phase
  [[ -n $tmp ]] && rm -rf "$tmp"
  echo
  echo "==> wall time per phase"
  local i
  for i in "${!phase_names[@]}"; do
    printf '  %-13s %10s%s\n' "${phase_names[$i]}" "$(fmt_s "${phase_us[$i]}")" \
      "$([[ ${phase_names[$i]} == "$failed" && $rc -ne 0 ]] && echo "   FAILED")"
  done
  printf '  %-13s %10s\n' total "$(fmt_s $(($(now_us) - total_start)))"
  if ((rc == 0)); then echo "==> test.sh: OK"; else echo "==> test.sh: FAILED (exit $rc)"; fi
  exit "$rc"
}
trap on_exit EXIT

# --- deps ---------------------------------------------------------------------------------------------------------
begin_phase deps
scripts/deps.sh

# --- configure ----------------------------------------------------------------------------------------------------
begin_phase configure
# Every option is passed every time, so build/ always holds CI's configuration, whoever configured it before
# (scripts/example.sh shares build/ and never turns these off once they are on).
cmake_args=(-S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DZERO_WITH_CUDA=AUTO -DZERO_BUILD_TESTS=ON
            -DZERO_BUILD_BENCHMARKS=ON -DZERO_BUILD_EXAMPLES=ON -DZERO_WERROR=ON)
nvcc=$(command -v nvcc || true)
if [[ -z $nvcc && -x /usr/local/cuda/bin/nvcc ]]; then
  nvcc=/usr/local/cuda/bin/nvcc
fi
if [[ -n $nvcc ]]; then
  export CUDACXX=${CUDACXX:-$nvcc}  # read by CMake on the first configure only
  cmake_args+=("-DCMAKE_CUDA_ARCHITECTURES=80;90")
fi
cmake "${cmake_args[@]}"

# --- build --------------------------------------------------------------------------------------------------------
begin_phase build
cmake --build "$build" --parallel "$(nproc)"

# --- install ------------------------------------------------------------------------------------------------------
begin_phase install
tmp=$(mktemp -d "${TMPDIR:-/tmp}/zero-install.XXXXXX")
cmake --install "$build" --prefix "$tmp/prefix" >"$tmp/install.log" 2>&1 || { cat "$tmp/install.log"; false; }
echo "installed into a temporary prefix: $(cd "$tmp/prefix" && find . ! -type d | sort | tr '\n' ' ')"
cmake -S tests/install_consumer -B "$tmp/consumer" -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$tmp/prefix" \
  >"$tmp/consumer.log" 2>&1 || { cat "$tmp/consumer.log"; false; }
cmake --build "$tmp/consumer" >>"$tmp/consumer.log" 2>&1 || { cat "$tmp/consumer.log"; false; }
"$tmp/consumer/app"
# zero::torch from the same install (when libtorch was found): a libtorch trainer through find_package(zero
# COMPONENTS torch), checked against torch::optim::AdamW. About 15 s (torch's headers).
if [[ -f $tmp/prefix/lib/cmake/zero/zero-torch.cmake ]]; then
  cmake -S tests/install_consumer_torch -B "$tmp/consumer_torch" -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_PREFIX_PATH="$tmp/prefix" >"$tmp/consumer_torch.log" 2>&1 || { cat "$tmp/consumer_torch.log"; false; }
  cmake --build "$tmp/consumer_torch" >>"$tmp/consumer_torch.log" 2>&1 || { cat "$tmp/consumer_torch.log"; false; }
  "$tmp/consumer_torch/torch_app"
fi
# The installed estimator runs from the prefix alone (its RUNPATH finds libzero there).
"$tmp/prefix/bin/zero-estimate" --params 7.5e9 --world 64 --grad-dtype fp16 | grep '^stage 0 .* 120\.0 ' >/dev/null ||
  { echo "installed zero-estimate did not print the ZeRO paper's 120.0 GB for stage 0"; false; }

# --- test ---------------------------------------------------------------------------------------------------------
begin_phase test
# --no-tests=error: a filter that matches nothing is a failure, not a silent pass.
ctest --test-dir "$build" --output-on-failure --no-tests=error --parallel "$(nproc)" "$@"

# --- multihost ----------------------------------------------------------------------------------------------------
# Real multi-host runs on this machine: hosts are network namespaces joined by veth links, Open MPI reaches them
# through `ip netns exec` and talks TCP between them (about 30 s). Skipped (like fuzz) when ctest arguments were
# given; ZERO_SKIP_MULTIHOST=1 skips it. Where namespaces are forbidden the script says so and passes.
if [[ ${ZERO_SKIP_MULTIHOST:-0} != 1 && $# -eq 0 ]]; then
  begin_phase multihost
  tests/multihost_test.sh "$build"
fi

# --- cuda-emulated ------------------------------------------------------------------------------------------------
# The CUDA backend has no GPU here: its host code (src/cuda_device.cc, the pinned host memory it registers, the
# tests' CUDA helpers) runs against the host-only CUDA runtime stand-in instead, which keeps device memory
# unreadable from host code, checks copy directions and stream/event handles, and (deferred mode, set by the
# tests' CMakeLists) runs each stream's work only when something waits for it, so a missing wait reads stale
# bytes (tests/testing/fake_cuda/cuda_runtime.h says what it still does not cover). Only the suites with CUDA
# cases are built, and only those cases run (the test phase ran the CPU ones), with the tests' StagedComm as their
# Comm, and again (*.nccl) with NcclComm over the host-only NCCL stand-in (tests/testing/fake_nccl), which also
# runs nccl_comm_test. About 2 min on 2 cores: the runs' serial time 188 s (half of it NcclComm's), the build 2 s
# through ccache (90 s without).
# ZERO_SKIP_CUDA_EMULATED=1 skips it; like tsan, with ctest arguments only the matching tests run.
if [[ ${ZERO_SKIP_CUDA_EMULATED:-0} != 1 ]]; then
  begin_phase cuda-emulated
  cmake -S . -B build-cudaemu -DCMAKE_BUILD_TYPE=Release -DZERO_WITH_CUDA=OFF -DZERO_CUDA_EMULATION=ON \
    -DZERO_BUILD_TESTS=ON -DZERO_BUILD_BENCHMARKS=OFF -DZERO_BUILD_EXAMPLES=OFF -DZERO_WITH_TORCH=OFF \
    -DZERO_WERROR=ON >/dev/null
  cmake --build build-cudaemu --parallel "$(nproc)" --target cuda_emulated_suites
  ctest --test-dir build-cudaemu -L cuda --output-on-failure \
    --no-tests="$([[ $# -gt 0 ]] && echo ignore || echo error)" --parallel "$(nproc)" "$@"
fi

# --- tsan ---------------------------------------------------------------------------------------------------------
# The protocol suites again, built with clang and ThreadSanitizer (CPU backend only): streams are worker threads,
# so a missing wait is a data race that TSan reports, and a report fails the test. ZERO_SKIP_TSAN=1 skips it.
if [[ ${ZERO_SKIP_TSAN:-0} != 1 ]]; then
  begin_phase tsan
  cmake -S . -B build-tsan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++ \
    -DZERO_SANITIZE=thread -DZERO_WITH_CUDA=OFF -DZERO_BUILD_TESTS=ON -DZERO_BUILD_BENCHMARKS=OFF \
    -DZERO_BUILD_EXAMPLES=OFF -DZERO_WERROR=OFF >/dev/null  # TSan defeats '#pragma omp simd': clang warns
  cmake --build build-tsan --parallel "$(nproc)"
  # With a ctest filter from the command line the intersection may be empty: that is not a failure here.
  ctest --test-dir build-tsan -L tsan --output-on-failure --no-tests="$([[ $# -gt 0 ]] && echo ignore || echo error)" \
    --parallel "$(nproc)" "$@"
fi

# --- asan ---------------------------------------------------------------------------------------------------------
# Every suite of the CPU build again under ASan + LSan + UBSan (clang); any report fails its test. ZERO_SKIP_ASAN=1
# skips it; like tsan, with ctest arguments only the matching tests run.
if [[ ${ZERO_SKIP_ASAN:-0} != 1 ]]; then
  begin_phase asan
  cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++ \
    -DZERO_SANITIZE=address -DZERO_WITH_CUDA=OFF -DZERO_BUILD_TESTS=ON -DZERO_BUILD_BENCHMARKS=OFF \
    -DZERO_BUILD_EXAMPLES=OFF -DZERO_WERROR=ON >/dev/null
  cmake --build build-asan --parallel "$(nproc)"
  ctest --test-dir build-asan -L asan --output-on-failure --no-tests="$([[ $# -gt 0 ]] && echo ignore || echo error)" \
    --parallel "$(nproc)" "$@"
fi

# --- fuzz ---------------------------------------------------------------------------------------------------------
# The checkpoint index parser and shard reader under libFuzzer with AddressSanitizer and UBSan (tests/fuzz is a
# project of its own: clang, no MPI). A fixed seed and run count: the same inputs every time, and any finding
# fails. Skipped (like tsan) when ctest arguments were given. ZERO_SKIP_FUZZ=1 skips it.
if [[ ${ZERO_SKIP_FUZZ:-0} != 1 && $# -eq 0 ]]; then
  begin_phase fuzz
  cmake -S tests/fuzz -B build-fuzz -DCMAKE_CXX_COMPILER=clang++ >/dev/null
  cmake --build build-fuzz --parallel "$(nproc)"
  ctest --test-dir build-fuzz --output-on-failure --no-tests=error
fi
end_phase
