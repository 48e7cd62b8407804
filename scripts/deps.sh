#!/usr/bin/env bash
# scripts/deps.sh: installs the Debian packages that zero builds, tests and runs with, and the few pinned pip
# packages Debian lacks (transformers and PEFT for tests/hf_load_check.py), if any is missing. Used by
# scripts/test.sh and scripts/example.sh; safe to run by itself. When everything is present it is one dpkg-query,
# one python start and no apt or pip. Otherwise it runs apt-get update once and installs only what is missing
# (through sudo when not root).
#
# CUDA is not among them: the toolkit does not come from Debian. The build uses it when nvcc is on PATH or at
# /usr/local/cuda/bin/nvcc (CMake option ZERO_WITH_CUDA=AUTO) and builds the CPU backend alone otherwise.
set -euo pipefail

packages=(
  cmake g++ make                   # the build
  libopenmpi-dev openmpi-bin       # Open MPI: the CPU backend's communicator, and mpiexec for tests and examples
  iproute2                         # ip and tc: the namespace hosts of scripts/netns_cluster.sh (multihost phase)
  libgtest-dev libgmock-dev        # tests
  libbenchmark-dev                 # benchmarks
  libhwy-dev                       # Google Highway: SIMD with run-time dispatch for the CPU AdamW kernel
  nlohmann-json3-dev               # checkpoints: the JSON index
  libxxhash-dev                    # checkpoints and the NVMe tier: XXH3 block checksums
  liburing-dev                     # the NVMe tier: asynchronous O_DIRECT reads and writes through io_uring
  fio                              # scripts/bench.sh: the disk's own O_DIRECT throughput beside the tier's
  e2fsprogs                        # tests: mkfs.ext4 for the small loop-mounted disks of the tier's fault tests
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
  # tests/hf_load_check.py: the LoRA example's outputs loaded by transformers and PEFT (the pip packages below).
  # torch 1.13 and the pure-python dependencies from Debian: 18 MB download, 109 MB installed, ~10 s here.
  python3-torch python3-pip python3-yaml python3-packaging python3-regex python3-requests python3-tqdm
  python3-filelock python3-psutil python3-typing-extensions
)

# What Debian 12 does not package, from pip, pinned: transformers 4.40 and PEFT 0.10 (they work with Debian's torch
# 1.13), and the versions of their dependencies of the same months. --no-deps because pip would otherwise replace Debian's torch
# ("1.13.0a0" reads as a pre-release, so peft's torch>=1.13 asks for torch 2.x); every dependency they import is in
# the Debian list above or here. Installed for Debian's /usr/bin/python3 into /usr/local (pip's place, outside
# dpkg's files; --break-system-packages is what Debian 12's pip asks for that), nothing Debian installed is replaced.
# 14 MB download, 115 MB installed (with bytecode), ~5 s here.
pip_packages=(
  transformers==4.40.2
  peft==0.10.0
  tokenizers==0.19.1
  safetensors==0.4.3
  huggingface_hub==0.23.0
  accelerate==0.29.3
)
pip_python=/usr/bin/python3

if ! command -v dpkg-query >/dev/null 2>&1; then
  echo "deps: not a Debian system (no dpkg-query); install these yourself: ${packages[*]}; pip: ${pip_packages[*]}" >&2
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

# The pinned pip packages whose installed version differs (one python start, ~0.1 s).
pip_missing() {
  [[ -x $pip_python ]] || { echo "${pip_packages[*]}"; return; }
  "$pip_python" - "${pip_packages[@]}" <<'PY'
import sys
from importlib import metadata
missing = []
for spec in sys.argv[1:]:
    name, version = spec.split("==")
    try:
        if metadata.version(name) != version:
            missing.append(spec)
    except metadata.PackageNotFoundError:
        missing.append(spec)
print(" ".join(missing))
PY
}

sudo=()
need_root() {
  if [[ $(id -u) -ne 0 && ${#sudo[@]} -eq 0 ]]; then
    if ! command -v sudo >/dev/null 2>&1; then
      echo "deps: missing $1, not root, and no sudo; install them as root" >&2
      exit 1
    fi
    sudo=(sudo)
  fi
}

if ((${#missing[@]} == 0)); then
  echo "deps: all ${#packages[@]} Debian packages present"
else
  echo "deps: installing ${missing[*]}"
  need_root "packages (${missing[*]})"
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

read -r -a pip_todo <<<"$(pip_missing)"
if ((${#pip_todo[@]} == 0)); then
  echo "deps: all ${#pip_packages[@]} pip packages present"
  exit 0
fi
echo "deps: pip installing ${pip_todo[*]}"
need_root "pip packages (${pip_todo[*]})"
"${sudo[@]}" env PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore "$pip_python" -m pip install -q \
  --no-deps --no-cache-dir --break-system-packages "${pip_todo[@]}"
