#!/usr/bin/env bash
# gpu_bundle.sh: builds zero's CUDA backend on a build machine (no GPU needed) and packs everything that a GPU
# machine without Open MPI, OpenBLAS, Highway, GoogleTest or Google Benchmark needs to run the CUDA tests, the
# LoRA example and the GPU benchmarks: binaries, the shared libraries they load, a relocatable Open MPI.
# scripts/gpu/prepare.sh calls it; README.md in this folder says how the pieces fit.
#
# usage: gpu_bundle.sh SRC_DIR OUT_TARBALL [--no-build]
#   SRC_DIR      the checkout; its tracked and untracked-not-ignored files are built (what the GPU machine gets)
#   OUT_TARBALL  e.g. SRC_DIR/.gpu/zero-gpu.tar.xz
#   env ZGPU     the fixed build path (default /tmp/zero-gpu). The binaries' RUNPATH and the CTestTestfile.cmake
#                files name it; gpu_run.sh recreates it on the GPU machine (ZGPU/src -> the working tree there).
#   env ZGPU_ARCH  CUDA architectures (default 90: the H200)
#
# Packed: the build tree without objects; every shared library that ldd finds for a binary beyond glibc,
# libstdc++ and libgcc_s, except NCCL and cuBLAS (the GPU machine's own, from its PyTorch or toolkit) and
# libzero (in the build tree); libcudart (so the runtime is the one compiled against); Open MPI 4.1's launcher,
# daemon, plugins and help files under a prefix set at run time (OPAL_PREFIX); zgpu-probe (probe/probe.cu); the
# list of test suites with CUDA cases and the rank counts CI runs them at (cuda_suites.txt); the run scripts.
# Not packed: NCCL 2.30 (prepare.sh puts it beside the bundle, already compressed).
set -euo pipefail
src=$(cd "$1" && pwd)
out=$2
do_build=1
[[ ${3:-} == --no-build ]] && do_build=0
Z=${ZGPU:-/tmp/zero-gpu}
arch=${ZGPU_ARCH:-90}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
multiarch=/usr/lib/x86_64-linux-gnu
mkdir -p "$Z"
t0=$SECONDS

if ((do_build)); then
  # 1. The sources at the fixed path, as the GPU machine gets them (tracked + untracked files git does not ignore).
  rm -rf "$Z/src.new" && mkdir -p "$Z/src.new"
  (cd "$src" && git ls-files -co --exclude-standard -z | xargs -0 -r tar -cf - --ignore-failed-read 2>/dev/null) |
    tar -xf - -C "$Z/src.new"
  rm -rf "$Z/src" && mv "$Z/src.new" "$Z/src"
  # 2. Configure once (libtorch stays out: it would not travel), build everything, warnings as errors.
  if [[ ! -f $Z/build/build.ninja ]]; then
    CUDACXX=${CUDACXX:-/usr/local/cuda/bin/nvcc} cmake -S "$Z/src" -B "$Z/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
      -DZERO_WITH_CUDA=ON "-DCMAKE_CUDA_ARCHITECTURES=$arch" -DZERO_WITH_TORCH=OFF -DZERO_BUILD_TESTS=ON \
      -DZERO_BUILD_BENCHMARKS=ON -DZERO_BUILD_EXAMPLES=ON -DZERO_WERROR=ON >"$Z/configure.log"
  fi
  nice -n 10 ninja -C "$Z/build" -j"$(nproc)"
  echo "gpu_bundle: built in $((SECONDS - t0)) s"
fi

# 3. Stage the build tree without objects, CMake's internals and test outputs.
stage=$Z/stage
rm -rf "$stage" && mkdir -p "$stage/deps/lib" "$stage/deps/bin"
tar -C "$Z" -cf - --exclude='*.o' --exclude='*.a' --exclude='CMakeFiles' --exclude='.ninja_*' \
  --exclude='build.ninja' --exclude='Testing' --exclude='lora_example_tiny' --exclude='checkpoint_export' \
  --exclude='dead_rank' --exclude='quick' --exclude='*.gbench.json' --exclude='install_consumer' build |
  tar -xf - -C "$stage"
# ctest (ZGPU_FULL_CTEST there): mpiexec, a python3 with numpy and cmake through wrappers that find them there.
while IFS= read -r -d '' f; do
  sed -i -e "s#\"/usr/bin/mpiexec\"#\"$Z/deps/bin/mpiexec\"#g" \
    -e "s#\"/usr/bin/python3\"#\"$Z/deps/bin/python3-numpy\"#g" -e "s#\"/usr/bin/cmake\"#\"$Z/deps/bin/cmake-any\"#g" "$f"
done < <(find "$stage/build" -name CTestTestfile.cmake -print0)

# 4. Shared libraries beyond glibc/libstdc++/libgcc_s and the image's CUDA libraries.
libs=()
while IFS= read -r -d '' f; do
  file -b "$f" | grep -q ELF || continue
  while read -r name _ path _; do
    [[ -n ${path:-} && -f $path ]] || continue
    case $name in
      linux-vdso*|libc.so*|libm.so*|libdl.so*|libpthread.so*|librt.so*|ld-linux*|libstdc++*|libgcc_s*) ;;
      libnccl*|libcublas*|libzero*) ;;
      *) libs+=("$path") ;;
    esac
  done < <(ldd "$f" 2>/dev/null)
done < <(find "$Z/build" -type f \( -perm -u+x -o -name '*.so*' \) ! -name '*.sh' ! -name '*.py' \
         ! -path '*/CMakeFiles/*' -print0)
# Open MPI's plugins load these at run time (no binary's ldd names them).
libs+=("$multiarch/libmca_common_sm.so.40" "$multiarch/libmca_common_monitoring.so.50"
       "$multiarch/libmca_common_ompio.so.41" "$multiarch/pmix2/lib/libpmix.so.2" "$multiarch/libmunge.so.2"
       "$multiarch/libopen-pal.so.40" "$multiarch/libopen-rte.so.40")
printf '%s\n' "${libs[@]}" | sort -u | while read -r p; do
  [[ -f $p ]] && cp -L "$p" "$stage/deps/lib/$(basename "$p")"
done

# 5. Open MPI 4.1 (Debian's layout under a relocatable prefix: OPAL_PREFIX) and PMIx (PMIX_PREFIX).
om=$stage/deps/ompi
plugins=$om/lib/x86_64-linux-gnu/openmpi/lib/openmpi3
mkdir -p "$om/bin" "$plugins" "$om/share/openmpi" "$om/etc"
cp -L /usr/bin/orterun /usr/bin/orted /usr/bin/ompi_info "$om/bin/"  # singleton MPI_Init needs orted
ln -s orterun "$om/bin/mpiexec" && ln -s orterun "$om/bin/mpirun"
# Plugins whose libraries are not packed (UCX, libfabric, verbs, PSM, netlink) and OpenSHMEM's stay out, so that
# Open MPI prints no load errors; btl self/vader and pml ob1 are what the tests use.
for p in "$multiarch"/openmpi/lib/openmpi3/*.so; do
  case $(basename "$p") in
    *ucx*|*ofi*|*openib*|*psm*|*reachable_netlink*|mca_atomic_*|mca_memheap_*|mca_scoll_*|mca_spml_*|mca_sshmem_*|\
    libompi_dbg_msgq.so) ;;
    *) cp -L "$p" "$plugins/" ;;
  esac
done
cp -rL /usr/share/openmpi/. "$om/share/openmpi/"
cp /etc/openmpi/openmpi-mca-params.conf "$om/etc/" 2>/dev/null || true
pm=$stage/deps/pmix
mkdir -p "$pm/lib/pmix" "$pm/share"
cp -L "$multiarch"/pmix2/lib/pmix/*.so "$pm/lib/pmix/"
cp -rL "$multiarch"/pmix2/share/. "$pm/share/"

# 6. Environment and wrappers.
cat >"$stage/deps/env.sh" <<EOF
# Sourced by gpu_run.sh (and usable by hand): the packed libraries and a relocated Open MPI.
export ZGPU=$Z
export LD_LIBRARY_PATH=$Z/deps/lib:$Z/build/src\${ZGPU_CUDA_LIBS:+:\$ZGPU_CUDA_LIBS}\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}
export PATH=$Z/deps/bin:$Z/deps/ompi/bin:\$PATH
export OPAL_PREFIX=$Z/deps/ompi OPAL_SYSCONFDIR=$Z/deps/ompi/etc
export PMIX_PREFIX=$Z/deps/pmix PMIX_PKGLIBDIR=$Z/deps/pmix/lib/pmix PMIX_PKGDATADIR=$Z/deps/pmix/share/pmix
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
export OMPI_MCA_btl=self,vader OMPI_MCA_pml=ob1 OMPI_MCA_btl_vader_single_copy_mechanism=none
export OMPI_MCA_plm_rsh_agent=false OMPI_MCA_hwloc_base_binding_policy=none
EOF
cat >"$stage/deps/bin/mpiexec" <<EOF
#!/usr/bin/env bash
. $Z/deps/env.sh
exec $Z/deps/ompi/bin/orterun "\$@"
EOF
cat >"$stage/deps/bin/python3-numpy" <<'EOF'
#!/usr/bin/env bash
# The first python3 that has numpy (the GPU image: /opt/torch/.venv; Debian: /usr/bin/python3).
for py in python3 /opt/torch/.venv/bin/python3 /usr/bin/python3; do
  if "$py" -c 'import numpy' >/dev/null 2>&1; then exec "$py" "$@"; fi
done
echo "python3-numpy: no python3 with numpy" >&2
exit 1
EOF
cat >"$stage/deps/bin/cmake-any" <<'EOF'
#!/usr/bin/env bash
exec cmake "$@"
EOF
chmod +x "$stage/deps/bin/"*

# 7. The device probes (one nvcc call; against the toolkit's NCCL headers, the image's NCCL at run time).
nvcc=${CUDACXX:-/usr/local/cuda/bin/nvcc}
cuda_root=$(dirname "$(dirname "$(readlink -f "$nvcc")")")
nccl_lib=$(dirname "$(find "$cuda_root"/lib* /usr/lib/x86_64-linux-gnu -maxdepth 1 -name 'libnccl.so*' -print -quit)")
nice -n 10 "$nvcc" -O2 -std=c++17 "-arch=sm_$arch" "$here/probe/probe.cu" -o "$stage/deps/bin/zgpu-probe" \
  -L"$nccl_lib" -lnccl

# 8. Which test suites have CUDA cases, and at which rank counts CI runs them (gpu_run.sh reads this):
#    "NAME CASES RANKS" with RANKS like 1,2,4 ("-": a plain process). Suites named *cuda* or *nccl* count whole.
#    The suites that emulate CUDA on the CPU (the runtime stand-ins, the kernel emulation) need no GPU: CI runs them.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
ctest_names=$(cd "$Z/build" && ctest -N 2>/dev/null | sed -n 's/^ *Test *#[0-9]*: //p')
: >"$stage/cuda_suites.txt"
for bin in "$Z"/build/tests/*_test; do
  name=$(basename "$bin")
  [[ $name == fake_cuda_test || $name == *emulat* ]] && continue
  filter='*cuda*:*Cuda*:*CUDA*'
  [[ $name == *cuda* || $name == *nccl* ]] && filter='*'
  cases=$(timeout 60 "$bin" --gtest_list_tests "--gtest_filter=$filter" 2>/dev/null | grep -c '^  ' || true)
  ((cases > 0)) || continue
  ranks=$( (grep -oE "^$name\\.np[0-9]+\$" <<<"$ctest_names" || true) | sed 's/.*\.np//' | sort -n | paste -sd, -)
  echo "$name $cases ${ranks:--}" >>"$stage/cuda_suites.txt"
done

# 9. The run scripts and what this was built from.
cp "$here/gpu_run.sh" "$here/lora_check.sh" "$here/expect_line.sh" "$stage/"
{
  echo "commit=$(git -C "$src" rev-parse HEAD 2>/dev/null || echo unknown)"
  echo "describe=$(git -C "$src" log -1 --format='%h %ad %s' --date=short 2>/dev/null)"
  echo "dirty_files=$(git -C "$src" status --porcelain 2>/dev/null | grep -vc '^?? .gpu' || true)"
  echo "built=$(date -u +%FT%TZ) on $(. /etc/os-release && echo "$PRETTY_NAME"), $("$nvcc" --version | tail -2 | head -1)"
  echo "cuda_arch=sm_$arch"
} >"$stage/BUILT_FROM"

# 10. Pack (xz -9e: the GPU machine unpacks it with tar -xJ, or Python's lzma where xz is missing).
mkdir -p "$(dirname "$out")"
tar -C "$stage" -cf - . | xz -T0 -9e >"$out.tmp"
mv "$out.tmp" "$out"
echo "gpu_bundle: $(du -sh "$stage" | cut -f1) staged, $(du -h "$out" | cut -f1) packed -> $out ($((SECONDS - t0)) s)"
