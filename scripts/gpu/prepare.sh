#!/usr/bin/env bash
# prepare.sh: on a build machine (Debian 12 with scripts/deps.sh's packages and the CUDA toolkit; no GPU needed),
# makes everything a GPU run needs in .gpu/ at the repository root (git ignores it; the device tool carries it):
#   .gpu/zero-gpu.tar.xz     the bundle: this checkout built for sm_90 at a fixed path, with its shared libraries
#                            and a relocatable Open MPI (gpu_bundle.sh)
#   .gpu/nccl/               NCCL 2.30.7 for sm_90, compressed, and its checksum: lets ranks share the one GPU
#   .gpu/gpu_run.sh          the script to run there, with its helpers inside the bundle
#   .gpu/zero-prefix.tar.xz  zero installed as a CMake package, for torch_consumer.sh (zero::torch against the GPU
#                            machine's libtorch)
# then checks that what travels (the working tree and .gpu/) fits the 64 MiB a device call carries, and prints
# the command to give the device tool. scripts/gpu/README.md says how to run and read it.
#
# usage: scripts/gpu/prepare.sh [--no-build]
#   env ZGPU_NCCL_XZ   the compressed NCCL (default: ../shared/gpu/nccl/libnccl.so.2.30.7-sm90.xz beside the
#                      checkout; built by build_nccl.sh); ZGPU_NO_NCCL=1 leaves it out (no multi-rank phases)
#   env ZGPU, ZGPU_ARCH as gpu_bundle.sh
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
out=$root/.gpu
# NCCL v2.30.7-1, sm_90 only, stripped (build_nccl.sh): the sha256 of the library itself (not of its .xz).
nccl_sha256=43e2de82902302051a8dde452b7345c52ace395bda67addf79d050c16ae349b2
nccl_xz=${ZGPU_NCCL_XZ:-$root/../shared/gpu/nccl/libnccl.so.2.30.7-sm90.xz}
limit=$((64 * 1024 * 1024))

grep -qxF '/.gpu/' "$root/.gitignore" 2>/dev/null || { echo "prepare: .gitignore must list /.gpu/" >&2; exit 1; }
mkdir -p "$out"

if [[ ${ZGPU_NO_NCCL:-0} != 1 ]]; then
  [[ -f $nccl_xz ]] || { echo "prepare: no $nccl_xz (set ZGPU_NCCL_XZ, or ZGPU_NO_NCCL=1)" >&2; exit 1; }
  got=$(xz -dc "$nccl_xz" | sha256sum | cut -d' ' -f1)
  if [[ $got != "$nccl_sha256" ]]; then
    echo "prepare: $nccl_xz unpacks to sha256 $got, expected $nccl_sha256 (NCCL v2.30.7-1 sm_90)" >&2
    exit 1
  fi
  rm -rf "$out/nccl" && mkdir -p "$out/nccl"
  cp "$nccl_xz" "$out/nccl/libnccl.so.2.30.7-sm90.xz"
  echo "$nccl_sha256  libnccl.so.2" >"$out/nccl/libnccl.so.2.sha256"
  echo "prepare: NCCL 2.30.7 (sha256 checked) -> .gpu/nccl/"
else
  rm -rf "$out/nccl"
fi

"$here/gpu_bundle.sh" "$root" "$out/zero-gpu.tar.xz" "$@"
cp "$here/gpu_run.sh" "$out/gpu_run.sh"
# zero installed as a CMake package (about 1 MB), for torch_consumer.sh's build of zero::torch against the GPU
# machine's own libtorch (gpu_run.sh runs it beside the one-rank tests).
rm -f "$out/zero-prefix.tar.xz"
if [[ -f $here/torch_consumer.sh ]]; then
  tc=$(mktemp -d)
  bash "$here/torch_consumer.sh" prepare "${ZGPU:-/tmp/zero-gpu}/build" "$tc" >/dev/null
  cp "$tc/zero-prefix.tar.xz" "$out/zero-prefix.tar.xz"
  rm -rf "$tc"
fi

# What a device call carries: tracked and untracked-not-ignored files, and .gpu/.
tree_bytes=$(cd "$root" && git ls-files -co --exclude-standard -z | xargs -0 -r stat -c %s 2>/dev/null |
             awk '{s += $1} END {print s + 0}')
gpu_bytes=$(du -sb "$out" | cut -f1)
total=$((tree_bytes + gpu_bytes))
awk -v t="$tree_bytes" -v g="$gpu_bytes" 'BEGIN { m = 1048576
  printf "prepare: the working tree %.1f MiB + .gpu %.1f MiB = %.1f MiB of the 64 MiB a device call carries\n",
         t / m, g / m, (t + g) / m }' 
((total < limit)) || { echo "prepare: over the limit" >&2; exit 1; }
cat <<EOF
prepare: ready. On the GPU machine (the device tool's run, from this checkout):
    command:   bash .gpu/gpu_run.sh
    carry:     [".gpu"]
    timeout_s: 420
EOF
