#!/usr/bin/env bash
# chroot_check.sh: runs .gpu/gpu_run.sh in a bare Debian 13 (trixie) minbase chroot before any GPU time is spent:
# no Open MPI, OpenBLAS, Highway, GoogleTest, Google Benchmark, libgomp or python there, glibc 2.41 (the GPU image's
# is unknown: newer than the 2.36 that Debian 12's libevent needs, by its Python 3.12). It proves that the bundle
# is self-contained: every binary and Open MPI plugin resolves from it, mpiexec and singleton MPI_Init work
# relocated, the LoRA example runs end to end (on the CPU here) and the run script's phases, verdicts and result
# files come out right. No GPU here: the CUDA steps skip or fail, saying so; the multi-rank phases are walked
# anyway (ZGPU_FORCE_MULTIRANK=1), so that their command lines run (their suites skip, the LoRA example runs on
# the CPU, the killed-rank step fails for want of a GPU).
#
# usage: scripts/gpu/chroot_check.sh        (as root, after prepare.sh; prints the summary and the timings)
#   env ROOTFS (default /tmp/zero-gpu-rootfs): made once with debootstrap --variant=minbase trixie (apt-get install
#   debootstrap; about a minute); xz-utils is added to it (the GPU image's unpacker; python's lzma otherwise).
#   env ZGPU_PHASES as gpu_run.sh (default: every phase).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
R=${ROOTFS:-/tmp/zero-gpu-rootfs}
[[ -f $root/.gpu/zero-gpu.tar.xz && -f $root/.gpu/gpu_run.sh ]] || { echo "run scripts/gpu/prepare.sh first" >&2; exit 1; }
t0=$SECONDS
[[ -d $R/usr ]] || debootstrap --variant=minbase trixie "$R"
if ! chroot "$R" sh -c 'command -v xz' >/dev/null 2>&1; then
  cp /etc/resolv.conf "$R/etc/resolv.conf"
  chroot "$R" sh -c 'apt-get update -qq && apt-get install -y -qq xz-utils' >/dev/null 2>&1
fi
mkdir -p "$R/proc" "$R/sys" "$R/dev" "$R/usr/local/cuda/lib64" "$R/work/repo"
mounted=()
mnt() { mountpoint -q "$R/$2" || { mount "${@:3}" "$1" "$R/$2"; mounted+=("$R/$2"); }; }
cleanup() { local i; for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do umount "${mounted[$i]}" || true; done; }
trap cleanup EXIT
mnt proc proc -t proc
mnt /sys sys --bind
mnt /dev dev --bind
mnt /dev/shm dev/shm --bind
# Stand-ins for the GPU image's NCCL and cuBLAS (its PyTorch's, or its toolkit's): this machine's toolkit folder.
mnt /usr/local/cuda/lib usr/local/cuda/lib64 --bind -o ro
# The working tree as the device tool sends it (tracked and untracked-not-ignored files) and .gpu/.
rm -rf "$R/work/repo" && mkdir -p "$R/work/repo"
(cd "$root" && git ls-files -co --exclude-standard -z | xargs -0 -r tar -cf - --ignore-failed-read 2>/dev/null) |
  tar -xf - -C "$R/work/repo"
cp -r "$root/.gpu" "$R/work/repo/"
rm -rf "$R/tmp/out" "$R/tmp/zero-gpu" "$R/tmp/zgpu-work"
setup_s=$((SECONDS - t0))

t1=$SECONDS
chroot "$R" /usr/bin/env -i PATH=/usr/local/bin:/usr/bin:/bin HOME=/root OUT=/tmp/out ZGPU_LORA_DEVICE=cpu \
  ZGPU_FORCE_MULTIRANK=1 ZGPU_CUDA_LIBS=/usr/local/cuda/lib64 \
  ${ZGPU_PHASES:+ZGPU_PHASES="$ZGPU_PHASES"} bash -c 'cd /work/repo && bash .gpu/gpu_run.sh' >/dev/null 2>&1 || true
run_s=$((SECONDS - t1))
# Two ranks through the relocated Open MPI (the GPU phases need the carried NCCL and a GPU, so they skipped).
t2=$SECONDS
mpi2=$(chroot "$R" /usr/bin/env -i PATH=/usr/bin:/bin HOME=/root ZGPU_CUDA_LIBS=/usr/local/cuda/lib64 bash -c \
  '. /tmp/zero-gpu/deps/env.sh && mpiexec -n 2 /tmp/zero-gpu/build/tests/comm_test --gtest_brief=1 2>&1 | tail -n 3')
mpi2_s=$((SECONDS - t2))
echo "===== summary.txt (chroot, no GPU)"
cat "$R/tmp/out/summary.txt"
echo "===== result files"
ls -la "$R/tmp/out"
echo "===== two ranks, relocated Open MPI (comm_test, CPU): ${mpi2_s}s"
echo "$mpi2"
echo "===== timings: chroot setup ${setup_s}s, gpu_run.sh ${run_s}s"
echo "chroot_check: full log in $R/tmp/out/run.log, per-step logs in $R/tmp/out/logs.tgz"
