#!/usr/bin/env bash
# scripts/deps.sh: installs the Debian packages that zero builds, tests and runs with, if any is missing.
# Used by scripts/test.sh and scripts/example.sh; safe to run by itself. When everything is present it is one
# dpkg-query and no apt. Otherwise it runs apt-get update once and installs only what is missing (through sudo
# when not root).
#
# CUDA is not among them: the toolkit does not come from Debian. The build uses it when nvcc is on PATH or at
# /usr/local/cuda/bin/nvcc (CMake option ZERO_WITH_CUDA=AUTO) and builds the CPU backend alone otherwise.
set -euo pipefail

packages=(
  cmake g++ make                   # the build
  libopenmpi-dev openmpi-bin       # Open MPI: the CPU backend's communicator, and mpiexec for tests and examples
  libgtest-dev libgmock-dev        # tests
  libbenchmark-dev                 # benchmarks
  libhwy-dev                       # Google Highway: SIMD with run-time dispatch for the CPU AdamW kernel
  nlohmann-json3-dev               # checkpoints: the JSON index
  libxxhash-dev                    # checkpoints: XXH3 block checksums
  libopenblas-dev                  # OpenBLAS: CBLAS sgemm for the LoRA example's CPU model
  ccache                           # fast rebuilds; CMakeLists.txt uses it when found
  clang libomp-dev                 # the ThreadSanitizer build (scripts/test.sh's tsan phase)
  python3                          # benchmark reports
  python3-matplotlib               # scripts/bench.sh: the charts of docs/BENCHMARKS.md (bench/report.py)
  python3-numpy                    # tests/safetensors_numpy_check.py reads safetensors files with numpy alone
  fortunes                         # the LoRA example's pretraining corpus (/usr/share/games/fortunes)
  bible-kjv                        # the LoRA example's fine-tuning corpus (the `bible` program and its KJV text)
  libtorch-dev                     # zero::torch, the optional libtorch wrapper (1.13, CPU): 123 MB download,
                                   # 507 MB installed (OpenCV, GDAL, Qt come with it); measured ~35 s here
)

if ! command -v dpkg-query >/dev/null 2>&1; then
  echo "deps: not a Debian system (no dpkg-query); install these yourself: ${packages[*]}" >&2
  exit 0
fi

# One query for all; a package dpkg has never heard of prints nothing (and an error we do not need).
installed=$(dpkg-query -W -f='${Package} ${db:Status-Status}\n' "${packages[@]}" 2>/dev/null || true)
missing=()
for pkg in "${packages[@]}"; do
  if ! grep -qxF "$pkg installed" <<<"$installed"; then
    missing+=("$pkg")
  fi
done

if ((${#missing[@]} == 0)); then
  echo "deps: all ${#packages[@]} Debian packages present"
  exit 0
fi

echo "deps: installing ${missing[*]}"
sudo=()
if [[ $(id -u) -ne 0 ]]; then
  if ! command -v sudo >/dev/null 2>&1; then
    echo "deps: missing packages (${missing[*]}), not root, and no sudo; install them as root" >&2
    exit 1
  fi
  sudo=(sudo)
fi
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
