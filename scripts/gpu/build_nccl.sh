#!/usr/bin/env bash
# build_nccl.sh: NCCL >= 2.30 for sm_90 only, so that two (or four) ranks may share the one H200 of a GPU run
# (NCCL_MULTI_RANK_GPU_ENABLE=1; NCCL <= 2.29, what PyTorch brings there, refuses: "Duplicate GPU detected").
# PyPI's nvidia-nccl-cu13 2.30.7 carries a 252 MB libnccl.so.2 (every architecture): too large for the 64 MiB a
# device call carries. One architecture, stripped, is 33 MB (30 MB xz). The result of this script for v2.30.7-1 is
# kept in ../shared/gpu/nccl/ (prepare.sh checks its sha256), so nobody needs to run it again: 21 minutes on 2
# cores, 514 MB of memory.
#
# usage: NCCL_REPO=<git dir of NVIDIA/nccl> build_nccl.sh [TAG]      (default TAG v2.30.7-1)
# Output: $NCCL_SRC/build/lib/libnccl.so.2 (NCCL_SRC default /tmp/zero-nccl-src) and, stripped and compressed,
# $NCCL_SRC/libnccl.so.<version>-sm90.xz with its sha256 (of the library) beside it.
set -euo pipefail
tag=${1:-v2.30.7-1}
repo=${NCCL_REPO:?set NCCL_REPO to a git clone of NVIDIA/nccl}
src=${NCCL_SRC:-/tmp/zero-nccl-src}
if [[ ! -f $src/makefiles/version.mk ]]; then
  mkdir -p "$src"
  git -C "$repo" archive "$tag" | tar -x -C "$src"
fi
cd "$src"
# The toolkit's include/ carries NCCL 2.28's nccl_device/ headers, which shadow the source's own newer ones
# ("NCCL_GIN_MAX_CONNECTIONS was not declared"): build against a CUDA_HOME of symlinks to the toolkit without them.
cuda=${CUDA_DIR:-/usr/local/cuda}
shadow=$(mktemp -d)
for f in "$cuda"/*; do [[ $(basename "$f") == include ]] || ln -s "$f" "$shadow/"; done
mkdir "$shadow/include"
for f in "$cuda"/include/*; do case $(basename "$f") in nccl*) ;; *) ln -s "$f" "$shadow/include/" ;; esac; done
nice -n 15 make -j"$(nproc)" src.build NVCC_GENCODE="-gencode=arch=compute_90,code=sm_90" CUDA_HOME="$shadow"
version=${tag#v}
version=${version%-*}
strip --strip-unneeded -o "$src/libnccl.so.2.stripped" "$(readlink -f build/lib/libnccl.so.2)"
sha256sum "$src/libnccl.so.2.stripped" | cut -d' ' -f1 >"$src/libnccl.so.$version-sm90.sha256"
xz -T0 -9e -c "$src/libnccl.so.2.stripped" >"$src/libnccl.so.$version-sm90.xz"
ls -la "$src"/libnccl.so.*
