#!/usr/bin/env bash
# gpu_run.sh: zero's CUDA verdict on a one-GPU machine that lacks the build dependencies, in one command, from the
# files scripts/gpu/prepare.sh put in .gpu/ (the bundle, NCCL 2.30, this script). From the repository root there:
#     bash .gpu/gpu_run.sh                   (the device tool: carry [".gpu"], timeout_s 420)
# Every step runs under a timeout, within its phase's share and the whole run's budget (ZGPU_BUDGET, default
# 380 s); a step that does not fit is skipped and says so. Phases, in the default order (ZGPU_PHASES picks and
# orders them; scripts/gpu/README.md says what each line of the summary means):
#   setup       always: facts (GPU, driver, CUDA, NCCL, glibc, commit), unpack, the GPU machine's NCCL and
#               cuBLAS, every binary and Open MPI plugin resolving its libraries
#   probes      zgpu-probe: versions, the CUDA runtime's error state, pinning, pageable copies, NCCL's answers
#   np1         in parallel (ZGPU_JOBS): every CUDA test case at one rank (cuda_suites.txt: the suites with CUDA
#               cases, in ZGPU_SUITE_ORDER's order first; ZGPU_SUITES keeps only the ones it names),
#               compute-sanitizer memcheck/racecheck/synccheck on a stage-3 + offload engine case and on the LoRA
#               model, the LoRA example end to end on --device cuda at one rank
#   multirank   NCCL 2.30 with NCCL_MULTI_RANK_GPU_ENABLE=1 (two ranks share the GPU): the NCCL probe, then
#               nccl_comm_test (asynchronous path, Duplicate, a stalled peer) and every suite's CUDA cases at 2 ranks
#   lora2       the LoRA example end to end at 2 ranks on the GPU
#   kill        a rank killed (SIGKILL) in a collective: the survivor must end in Timeout/Aborted, not hang
#   multirank4  nccl_comm_test and the suites' CUDA cases at 4 ranks (3 where CI runs a suite at 3, not 4)
#               (multirank and multirank4: when two ranks cannot share the GPU through NCCL, the suites run over
#               the tests' StagedComm instead, steps named SUITE.npN.staged)
#   staged      not by default: the suites' CUDA cases at 2 ranks over StagedComm
#   bench       not by default (a second run, ZGPU_PHASES=bench, about 3 minutes by estimate; the device tool's
#               timeout_s 420 as for the first): bench/gpu/run.sh --quick, i.e. zero_bench_gpu (three processes),
#               zero_bench_gpu_card24 and lora_vs_torch.sh (issue 16's rows; ZGPU_BENCH_SECONDS is its share and
#               its step's timeout: 300 when bench runs alone, else 200; the phases before it keep
#               ZGPU_BENCH_RESERVE for it)
#   torch       scripts/gpu/torch_consumer.sh: zero::torch built against the machine's own libtorch and used from
#               an installed zero (.gpu/zero-prefix.tar.xz); by default it runs inside np1's pool (its compile
#               keeps the CPU cores busy while the GPU tests run); ZGPU_TORCH=0 leaves it out
# Results in $OUT (at most 8 files): summary.txt (facts, then one PASS/FAIL/SKIP/TIMEOUT line per step),
# run.log (everything), logs.tgz (each step's log, gtest XML, the example's outputs), facts.json, and the
# benchmarks' JSON as bench/report.py reads them (zero_bench_gpu.json, zero_bench_gpu_card24.json,
# lora_vs_torch.json, gpu_run.json). Per-step logs live in ZGPU_WORK until the end, so a run killed by its timeout
# still leaves run.log and summary.txt.
set -u
start=$SECONDS
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
bundle=${1:-$here/zero-gpu.tar.xz}
budget=${ZGPU_BUDGET:-380}
Z=${ZGPU:-/tmp/zero-gpu}
O=${OUT:-/tmp/zgpu-out}
L=${ZGPU_WORK:-/tmp/zgpu-work}
jobs_max=${ZGPU_JOBS:-6}
# The benchmarks take about 3 minutes of their own: a second run (ZGPU_PHASES=bench) in the same visit.
phases=${ZGPU_PHASES:-probes np1 multirank lora2 kill multirank4}
# Alone, the bench phase may take 300 s of the run's budget (their estimate is 150-175 s, never measured yet).
bench_default=200
[[ $phases == bench ]] && bench_default=300
rm -rf "$L"
mkdir -p "$O" "$L/logs" "$L/xml" "$L/verdicts" "$L/runs" "$L/bench"
exec > >(tee "$O/run.log") 2>&1
tee_pid=$!
summary=$O/summary.txt
: >"$summary"
note() { echo "$*" | tee -a "$summary"; }
left() { echo $((budget - (SECONDS - start))); }

# --- steps ---------------------------------------------------------------------------------------------------
# A phase has a share of the budget; a step's timeout is cut to what is left of its phase and of the run.
phase_end=0
begin_phase() {  # begin_phase NAME SECONDS
  local cap=$2
  ((cap > $(left))) && cap=$(left)
  phase_end=$((SECONDS + cap))
  echo "===== phase $1 (up to ${cap}s, $(left)s left in the run)"
}
phase_left() { local p=$((phase_end - SECONDS)) r; r=$(left); echo $((p < r ? p : r)); }

# run_step NAME TIMEOUT COMMAND...: the command's output goes to logs/NAME.log; its verdict line to verdicts/NAME.
run_step() {
  local name=$1 t=$2
  shift 2
  local log=$L/logs/$name.log t0=$SECONDS rc verdict counts
  timeout -k 5 "$t" "$@" >"$log" 2>&1 </dev/null  # mpiexec forwards stdin: it must not eat a caller's loop input
  rc=$?
  verdict=PASS
  ((rc == 124 || rc == 137)) && verdict=TIMEOUT
  ((rc != 0 && rc != 124 && rc != 137)) && verdict="FAIL(rc=$rc)"
  # A suite whose every case skipped has shown nothing (a GPU test skips only when it finds no GPU).
  if grep -qE '^\[  SKIPPED \]' "$log" && ! grep -qE '^\[  PASSED  \] [1-9]' "$log" && [[ $verdict == PASS ]]; then
    verdict=SKIP
  fi
  if grep -qE 'Device not supported|Unable to find injection library|unsupported on this (device|platform)' "$log" &&
     [[ $name == sanitize-* ]]; then
    verdict="SKIP(compute-sanitizer does not support this machine)"
  fi
  counts=$(grep -hE '^\[  (PASSED|FAILED|SKIPPED) +\] [0-9]+ test' "$log" | tr -s ' ' | tr '\n' ' ')
  if [[ $verdict == TIMEOUT ]]; then
    counts="$(grep -c '^\[       OK \]' "$log") ok and $(grep -c '^\[  FAILED  \]' "$log") failed before the timeout"
  fi
  local extra
  extra=$(grep -hE '^(lora_check|expect_line): |^ERROR SUMMARY|^\[ cuda comm \]' "$log" | sort -u | tail -n 3 |
          tr '\n' ' ')
  echo "$verdict $name $((SECONDS - t0))s ${counts}${extra:+ | $extra}" >"$L/verdicts/$name"
}

report_step() {  # the verdict line into the summary; the failure's evidence into the run log
  local name=$1 log=$L/logs/$1.log
  note "$(cat "$L/verdicts/$name" 2>/dev/null || echo "FAIL $name (no verdict)")"
  if ! grep -q '^PASS' "$L/verdicts/$name" 2>/dev/null; then
    grep -E '\[  FAILED  \]|Failure$|Expected|Which is|error|Error|SKIPPED \]|FAIL' "$log" 2>/dev/null | head -n 25 |
      sed 's/^/    /'
    tail -n 12 "$log" 2>/dev/null | sed 's/^/    | /'
  fi
}

step() {  # step NAME TIMEOUT COMMAND...: in the foreground
  local name=$1 t=$2 pl
  shift 2
  pl=$(phase_left)
  if ((pl < 10)); then note "SKIP $name (the phase's time is spent)"; return 1; fi
  ((t > pl)) && t=$pl
  echo "--- $name (timeout ${t}s)"
  run_step "$name" "$t" "$@"
  report_step "$name"
  grep -q '^PASS' "$L/verdicts/$name"
}

queued=()
pids=()
bg() {  # bg NAME TIMEOUT COMMAND...: in the background, at most ZGPU_JOBS at once; `collect` reports them
  local name=$1 t=$2 pl
  shift 2
  while (($(jobs -rp | wc -l) >= jobs_max)); do wait -n 2>/dev/null || true; done
  pl=$(phase_left)
  if ((pl < 10)); then
    echo "SKIP $name (the phase's time is spent)" >"$L/verdicts/$name"
  else
    ((t > pl)) && t=$pl
    echo "--- $name (background, timeout ${t}s)"
    run_step "$name" "$t" "$@" &
    pids+=($!)
  fi
  queued+=("$name")
}
collect() {
  local p n
  for p in "${pids[@]}"; do wait "$p"; done
  pids=()
  for n in "${queued[@]}"; do report_step "$n"; done
  queued=()
}

# --- setup ---------------------------------------------------------------------------------------------------
export PATH=$PATH:/usr/local/cuda/bin
echo "===== facts"
commit=unknown
unpack_t0=$SECONDS
mkdir -p "$Z"
ln -sfn "$PWD" "$Z/src"  # the CTestTestfiles and the examples' sources name ZGPU/src
if [[ $bundle == *.gz ]]; then
  tar -xzf "$bundle" -C "$Z"
elif command -v xz >/dev/null; then
  tar -xJf "$bundle" -C "$Z"
else  # no xz binary: Python's lzma
  python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' "$bundle" "$Z"
fi || { note "FAIL unpack $bundle"; exit 1; }
commit=$(sed -n 's/^commit=//p' "$Z/BUILT_FROM")
# NCCL >= 2.30 for ranks sharing the GPU: prepare.sh put it beside the bundle, compressed (xz, or lzma by python).
nccl230=""
nccl_xz=$(ls "$here"/nccl/libnccl.so.*.xz 2>/dev/null | head -n 1)
if [[ -n $nccl_xz ]]; then
  mkdir -p "$Z/nccl"
  if command -v xz >/dev/null; then
    xz -dc "$nccl_xz" >"$Z/nccl/libnccl.so.2"
  else
    python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
      "$nccl_xz" "$Z/nccl/libnccl.so.2"
  fi
  # The library prepare.sh checked, or none: a damaged copy would fail every multi-rank step for the wrong reason.
  if [[ $(sha256sum "$Z/nccl/libnccl.so.2" | cut -d' ' -f1) == $(cut -d' ' -f1 "$here/nccl/libnccl.so.2.sha256" 2>/dev/null) ]]; then
    nccl230=$Z/nccl
  else
    note "FAIL nccl-2.30 (the unpacked library does not match .gpu/nccl/libnccl.so.2.sha256; multi-rank phases skip)"
  fi
fi
unpack_s=$((SECONDS - unpack_t0))

# The GPU machine's own NCCL and cuBLAS: its Python packages (PyTorch's), then the toolkit's folders.
libdir_of() {
  local d f
  for d in $(python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null) /usr/local/cuda/lib64 \
           /usr/local/cuda/lib /usr/lib/x86_64-linux-gnu /opt; do
    [[ -d $d ]] || continue
    f=$(find "$d" -name "$1" -print -quit 2>/dev/null)
    if [[ -n $f ]]; then dirname "$f"; return 0; fi
  done
  return 1
}
nccl_dir=$(libdir_of libnccl.so.2) || nccl_dir=""
cublas_dir=$(libdir_of libcublas.so.13) || cublas_dir=""
cublaslt_dir=$(libdir_of libcublasLt.so.13) || cublaslt_dir=""
export ZGPU_CUDA_LIBS=$nccl_dir:$cublas_dir:$cublaslt_dir
. "$Z/deps/env.sh"
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# One machine: NCCL's bootstrap over loopback (a VM may have no other interface, and ncclGetUniqueId fails then).
export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-lo}
probe=$Z/deps/bin/zgpu-probe
B=$Z/build
MPI=("$Z/deps/bin/mpiexec" --bind-to none)
# Two or four ranks on one GPU: the carried NCCL, allowed to share (NCCL's guide: up to 2 ranks per GPU by default,
# fewer channels per rank for more).
MR=(env "ZGPU_CUDA_LIBS=$nccl230:$ZGPU_CUDA_LIBS" "LD_LIBRARY_PATH=$nccl230:$LD_LIBRARY_PATH"
    NCCL_MULTI_RANK_GPU_ENABLE=1 "NCCL_MAX_CTAS=${ZGPU_NCCL_MAX_CTAS:-2}")

gpu=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n 1)
image_versions=$("$probe" versions 2>&1 | sed -n 's/^probe: versions: //p')
carried_versions=""
[[ -n $nccl230 ]] && carried_versions=$(LD_LIBRARY_PATH=$nccl230:$LD_LIBRARY_PATH "$probe" versions 2>&1 |
                                        sed -n 's/^probe: versions: nccl \([0-9]*\).*/\1/p')
mem=$(awk '/^MemTotal:/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo 2>/dev/null)
os=$(grep -m1 PRETTY_NAME /etc/os-release 2>/dev/null | cut -d= -f2 | tr -d '"')
glibc=$(ldd --version 2>/dev/null | head -n 1 | grep -oE '[0-9]+\.[0-9]+$')
sanitizer=$(compute-sanitizer --version 2>/dev/null | sed -n 's/.*Version //p' | head -n 1)
facts=(
  "date: $(date -u +%FT%TZ)"
  "commit: $commit ($(sed -n 's/^describe=//p' "$Z/BUILT_FROM"); files changed since: $(sed -n 's/^dirty_files=//p' "$Z/BUILT_FROM"))"
  "built: $(sed -n 's/^built=//p' "$Z/BUILT_FROM"), $(sed -n 's/^cuda_arch=//p' "$Z/BUILT_FROM")"
  "machine: $(uname -m), $(nproc) cores, $mem, kernel $(uname -r), $os, glibc $glibc"
  "gpu: ${gpu:-none found by nvidia-smi} (name, driver, memory)"
  "cuda: ${image_versions:-zgpu-probe failed} (NCCL, runtime and driver API versions as loaded)"
  "nccl: the machine's from ${nccl_dir:-nowhere}; carried ${carried_versions:-none} from ${nccl230:-nowhere} (multi-rank phases)"
  "cublas: ${cublas_dir:-not found}; nvcc: $(nvcc --version 2>/dev/null | tail -n 2 | head -n 1); compute-sanitizer: $sanitizer"
  "python3: $(command -v python3) $(python3 -c 'import sys; print(sys.version.split()[0])' 2>/dev/null); xz: $(command -v xz || echo none)"
)
printf '%s\n' "${facts[@]}" | sed 's/^/fact /' | tee -a "$summary"
printf '{%s}\n' "$(printf '%s\n' "${facts[@]}" | python3 -c 'import json, sys
print(", ".join(json.dumps(l.split(": ", 1)[0]) + ": " + json.dumps(l.split(": ", 1)[1]) for l in sys.stdin.read().splitlines()))' 2>/dev/null)" >"$L/facts.json"
note "PASS unpack ${unpack_s}s (bundle and NCCL 2.30 into $Z)"

echo "===== libraries"
missing=0
for f in "$B"/tests/*_test "$B"/bench/zero_bench_* "$B"/examples/*/* "$B"/src/libzero.so* "$probe" \
         "$Z"/deps/ompi/bin/orted "$Z"/deps/ompi/lib/x86_64-linux-gnu/openmpi/lib/openmpi3/*.so; do
  [[ -f $f && ( -x $f || $f == *.so* ) ]] || continue
  file_out=$(ldd "$f" 2>&1)
  if grep -q "not found" <<<"$file_out"; then
    echo "$f:"; grep "not found" <<<"$file_out"; missing=1
  fi
done
if ((missing)); then note "FAIL libraries (see run.log: what is missing)"; else note "PASS libraries (every binary and plugin resolves)"; fi
ldd "$B/src/libzero.so.0" | grep -E "nccl|cudart|mpi|hwy|gomp" | awk '{print "  " $1 " -> " $3}'

cuda_filter='*cuda*:*Cuda*:*CUDA*'
# The suites in the order the phases take them: ZGPU_SUITE_ORDER first (the central ones, so that a phase that runs
# out of time skips the rest), then the others as listed; ZGPU_SUITES, when set, keeps only those (a second run in
# the same visit for what the first skipped).
suites=$L/suites.txt
order=${ZGPU_SUITE_ORDER:-"engine_equivalence_test checkpoint_test engine_loss_scale_test engine_errors_test
  engine_teardown_test engine_accounting_test trainer_collectives_test"}
{
  for name in $order; do grep "^$name " "$Z/cuda_suites.txt"; done
  grep -v -F -w -f <(printf '%s\n' $order) "$Z/cuda_suites.txt"
} | awk -v keep="${ZGPU_SUITES:-}" 'keep == "" || index(" " keep " ", " " $1 " ") > 0' >"$suites"
[[ -n ${ZGPU_SUITES:-} ]] && echo "only the suites $(cut -d' ' -f1 "$suites" | tr '\n' ' ')(ZGPU_SUITES)"
suite_filter() { [[ $1 == *cuda* || $1 == *nccl* ]] && echo '*' || echo "$cuda_filter"; }
has_rank() { [[ ,$2, == *,$1,* ]]; }  # has_rank N RANKS

# --- phases --------------------------------------------------------------------------------------------------
run_probes() {
  begin_phase probes 30
  step probe-basics 40 "$probe" basics
  local d
  d=$(mktemp -d)
  # The machine's NCCL with two ranks on one GPU: refused before 2.30 ("Duplicate GPU"), which OpenNccl now says.
  step probe-nccl2-machine 30 bash -c "\"$probe\" nccl2 0 $d 0 & \"$probe\" nccl2 1 $d 0; r=\$?; wait \$!; exit \$r"
  grep -h "^probe:" "$L"/logs/probe-*.log | sed 's/^/  /' | tee -a "$summary"
}

run_np1() {
  begin_phase np1 140
  local cs=() name cases ranks f
  if command -v compute-sanitizer >/dev/null; then
    cs=(compute-sanitizer --error-exitcode 9 --print-limit 20 --target-processes application-only)
    local engine_case=${ZGPU_SANITIZE_FILTER:-*stage3_adamw_offload_params_persistent_cuda*}
    # The longest first, so that the pool overlaps them with the suites.
    bg sanitize-memcheck-engine-stage3-offload 120 "${cs[@]}" --tool memcheck "$B/tests/engine_equivalence_test" \
      "--gtest_filter=$engine_case"
    bg sanitize-memcheck-lora-model 120 "${cs[@]}" --tool memcheck "$B/tests/lora_cuda_model_test"
  else
    note "SKIP sanitize-* (no compute-sanitizer on this machine)"
  fi
  # ZGPU_LORA_DEVICE=cpu: chroot_check.sh's dry run on a machine without a GPU.
  bg lora-e2e.np1 130 bash "$Z/lora_check.sh" "$B/examples/lora_finetune/lora_finetune" 1 "$L/runs/lora1" \
    "${ZGPU_LORA_DEVICE:-cuda}" -- "${MPI[@]}"
  while read -r name cases ranks; do
    [[ $ranks == - ]] || has_rank 1 "$ranks" || continue
    f=$(suite_filter "$name")
    if [[ $ranks == - ]]; then
      bg "$name.np1" 120 "$B/tests/$name" "--gtest_filter=$f" "--gtest_output=xml:$L/xml/$name.np1.xml"
    else
      bg "$name.np1" 120 "${MPI[@]}" -n 1 "$B/tests/$name" "--gtest_filter=$f-*PeerTest.*" \
        "--gtest_output=xml:$L/xml/$name.np1.xml"
    fi
  done <"$suites"
  [[ ${ZGPU_TORCH:-1} == 1 ]] && queue_torch
  if ((${#cs[@]})); then
    local engine_case=${ZGPU_SANITIZE_FILTER:-*stage3_adamw_offload_params_persistent_cuda*} tool
    for tool in racecheck synccheck; do
      bg "sanitize-$tool-engine-stage3-offload" 90 "${cs[@]}" --tool "$tool" "$B/tests/engine_equivalence_test" \
        "--gtest_filter=$engine_case"
      bg "sanitize-$tool-lora-model" 90 "${cs[@]}" --tool "$tool" "$B/tests/lora_cuda_model_test"
    done
  fi
  collect
  torch_lines
}

# zero::torch against the machine's libtorch (scripts/gpu/torch_consumer.sh, from the hf-torch work), on the CPU
# and on the GPU (the install consumer and the libtorch example with --device cuda): its own
# summary lines follow its verdict in summary.txt; its log is in logs.tgz (torch/).
queue_torch() {
  if [[ ! -f $PWD/scripts/gpu/torch_consumer.sh || ! -f $here/zero-prefix.tar.xz ]]; then
    note "SKIP torch-consumer (no scripts/gpu/torch_consumer.sh or .gpu/zero-prefix.tar.xz)"
    return 0
  fi
  # With the carried NCCL the example's CUDA runs take two ranks on the GPU (its environment: MR); else one.
  local cuda=(env ZERO_TORCH_CUDA_RANKS=1)
  [[ -n $nccl230 ]] && cuda=("${MR[@]}" ZERO_TORCH_CUDA_RANKS=2)
  bg torch-consumer 150 "${cuda[@]}" bash "$PWD/scripts/gpu/torch_consumer.sh" run "$here/zero-prefix.tar.xz" "$L/torch"
}
torch_lines() {
  [[ -f $L/torch/torch_consumer_summary.txt ]] && sed 's/^/  torch: /' "$L/torch/torch_consumer_summary.txt" |
    tee -a "$summary"
  return 0
}
run_torch() {
  begin_phase torch 150
  queue_torch
  collect
  torch_lines
}

# The multi-rank phases need the carried NCCL; the first step is its probe, and a failing probe skips the rest
# (nothing multi-rank can pass when two ranks cannot open a communicator on the GPU).
multirank_ok=unknown
multirank_gate() {
  if [[ -z $nccl230 ]]; then
    note "SKIP $1 (no NCCL >= 2.30 beside the bundle: two ranks cannot share the GPU; prepare.sh puts it there)"
    return 1
  fi
  if [[ $multirank_ok == unknown ]]; then
    if (($(phase_left) < 10)); then note "SKIP $1 (the phase's time is spent)"; return 1; fi
    local d
    d=$(mktemp -d)
    if step probe-nccl2-carried 40 "${MR[@]}" bash -c \
         "\"$probe\" nccl2 0 $d 0 & \"$probe\" nccl2 1 $d 0; r=\$?; wait \$!; exit \$r"; then
      multirank_ok=yes
    else
      multirank_ok=no
    fi
    grep -h "^probe:" "$L/logs/probe-nccl2-carried.log" | sed 's/^/  /' | tee -a "$summary"
  fi
  # ZGPU_FORCE_MULTIRANK=1: chroot_check.sh's dry run walks these phases' command lines without a GPU.
  [[ $multirank_ok == yes || ${ZGPU_FORCE_MULTIRANK:-0} == 1 ]] ||
    { note "SKIP $1 (two ranks could not share the GPU with the carried NCCL)"; return 1; }
}

# suites_at N ALT MODE: every suite with CUDA cases that CI runs at N ranks (or at ALT, when not empty, for a suite
# CI runs at ALT but at neither 2 nor N). MODE nccl: over NcclComm, ranks sharing the GPU through the carried NCCL;
# MODE staged: over the test suites' StagedComm (device buffers through host memory and MPI; tests/testing/
# backend_comm.h), which needs no NCCL that allows sharing, steps named SUITE.npN.staged.
suites_at() {
  local n=$1 alt=${2:-} mode=${3:-nccl} name cases ranks at envs=("${MR[@]}") suffix=""
  [[ $mode == staged ]] && envs=(env ZERO_TEST_STAGED_COMM=1) && suffix=.staged
  while read -r name cases ranks; do
    [[ $ranks == - ]] && continue
    at=""
    if has_rank "$n" "$ranks"; then at=$n; elif [[ -n $alt ]] && has_rank "$alt" "$ranks" && ! has_rank 2 "$ranks"; then at=$alt; fi
    [[ -n $at ]] || continue
    [[ $name == nccl_comm_test ]] && continue  # run first, by the caller
    step "$name.np$at$suffix" 150 "${envs[@]}" "${MPI[@]}" -n "$at" "$B/tests/$name" \
      "--gtest_filter=$(suite_filter "$name")" "--gtest_output=xml:$L/xml/$name.np$at$suffix.xml"
  done <"$suites"
}

run_multirank() {
  begin_phase multirank 110
  if multirank_gate multirank; then
    step nccl_comm_test.np2 60 "${MR[@]}" "${MPI[@]}" -n 2 "$B/tests/nccl_comm_test" \
      "--gtest_output=xml:$L/xml/nccl_comm_test.np2.xml"
    suites_at 2 "" nccl
  else
    note "  (instead: the suites' CUDA cases at 2 ranks over StagedComm, which needs no NCCL that shares a GPU)"
    suites_at 2 "" staged
  fi
}

# Optional (ZGPU_PHASES=staged): the suites' CUDA cases at 2 ranks over StagedComm even where NCCL can share.
run_staged() {
  begin_phase staged 150
  suites_at 2 "" staged
}

run_lora2() {
  begin_phase lora2 75
  multirank_gate lora2 || return 0
  step lora-e2e.np2 75 "${MR[@]}" bash "$Z/lora_check.sh" "$B/examples/lora_finetune/lora_finetune" 2 \
    "$L/runs/lora2" "${ZGPU_LORA_DEVICE:-cuda}" -- "${MPI[@]}"
}

run_kill() {
  begin_phase kill 30
  multirank_gate kill || return 0
  # The last rank dies right after a collective both completed; the survivor's next one must time out (3 s) and
  # abort NCCL. --enable-recovery keeps mpiexec from killing the survivor first.
  step killed-rank.np2 30 "${MR[@]}" ZERO_NCCL_TEST_VICTIM=kill bash "$Z/expect_line.sh" \
    '^\[ killed peer \] rank 0: (Timeout|Aborted) after' 'nccl_comm_test.cc:[0-9]+: Failure' -- \
    "${MPI[@]}" --enable-recovery -n 2 "$B/tests/nccl_comm_test" '--gtest_filter=*StalledPeer*'
}

run_multirank4() {
  local reserve=0
  [[ " $phases " == *" bench "* ]] && reserve=${ZGPU_BENCH_RESERVE:-200}
  begin_phase multirank4 $(($(left) - reserve))
  if multirank_gate multirank4; then
    step nccl_comm_test.np4 60 "${MR[@]}" "${MPI[@]}" -n 4 "$B/tests/nccl_comm_test" \
      "--gtest_output=xml:$L/xml/nccl_comm_test.np4.xml"
    suites_at 4 3 nccl
  else
    suites_at 4 3 staged
  fi
}

# bench/gpu's binaries (zero_bench_gpu, zero_bench_gpu_card24: about 75 s and 20 s with --quick by their estimate)
# write their JSON under the working directory (bench/results/gpu/ by default); every JSON found comes back.
# Issue 16's rows through bench/gpu/run.sh --quick, the same command a GPU machine with a build runs: zero_bench_gpu
# (kernels, norm, copies, offloaded step, overhead, prefetch), zero_bench_gpu_card24, and lora_vs_torch.sh (the
# LoRA example beside PyTorch + PEFT, with the first python3 that imports torch). Its JSON files come back under
# their own names (bench/report.py reads them as they are: commit them under bench/results/gpu/).
torch_python() {
  local py
  for py in ${ZGPU_TORCH_PYTHON:-} python3 /opt/torch/.venv/bin/python3 /usr/bin/python3; do
    if "$py" -c 'import torch' >/dev/null 2>&1; then echo "$py"; return 0; fi
  done
  echo python3
}
run_bench() {
  local cap=${ZGPU_BENCH_SECONDS:-$bench_default}
  begin_phase bench "$cap"
  if [[ ! -x $B/bench/zero_bench_gpu || ! -f $PWD/bench/gpu/run.sh ]]; then
    note "SKIP bench (no zero_bench_gpu in this build, or no bench/gpu/run.sh in the working tree)"
    return 0
  fi
  mkdir -p "$L/bench/gpu"
  step bench-gpu-quick "$cap" env "ZERO_BENCH_COMMIT=$commit" bash "$PWD/bench/gpu/run.sh" --quick --build "$B" \
    --out "$L/bench/gpu" --python "$(torch_python)" --mpiexec "$Z/deps/bin/mpiexec -n 1 --bind-to none"
  grep -hE '^  [a-z_0-9]+ +[0-9]+s +exit' "$L/logs/bench-gpu-quick.log" 2>/dev/null | sed 's/^/  bench:/' |
    tee -a "$summary"
}

for ph in $phases; do
  case $ph in
    probes|np1|multirank|lora2|kill|multirank4|bench|torch|staged) "run_$ph" ;;
    *) note "SKIP unknown phase '$ph'" ;;
  esac
done

# --- results -------------------------------------------------------------------------------------------------
echo "===== done in $((SECONDS - start))s"
nvidia-smi --query-gpu=memory.used,temperature.gpu --format=csv,noheader 2>/dev/null
verdicts=$(grep -cE '^(PASS|FAIL|SKIP|TIMEOUT)' "$summary")
bad=$(grep -cE '^(FAIL|TIMEOUT)' "$summary")
note "total $((SECONDS - start))s: $verdicts steps, $bad failed or timed out"
# What the phases' time did not reach, as the command that runs just that (suites by name, in the phases they need).
late=$(sed -n "s/^SKIP \([^ ]*\) (the phase's time is spent)$/\1/p" "$summary")
late_suites=$(grep -oE '^[a-z_0-9]+_test' <<<"$late" | sort -u | tr '\n' ' ')
if [[ -n $late_suites ]]; then
  late_phases=""
  grep -qE '_test\.np1$' <<<"$late" && late_phases+=" np1"
  grep -qE '_test\.np2(\.staged)?$' <<<"$late" && late_phases+=" multirank"
  grep -qE '_test\.np[34](\.staged)?$' <<<"$late" && late_phases+=" multirank4"
  note "next: what the time did not reach: ZGPU_PHASES='${late_phases# }' ZGPU_SUITES='${late_suites% }' bash .gpu/gpu_run.sh"
fi
[[ " $phases " == *" bench "* ]] ||
  note "next: the benchmarks (issue 16), about 3 minutes: ZGPU_PHASES=bench bash .gpu/gpu_run.sh (timeout_s 420)"
# The benchmarks' JSON as bench/gpu/run.sh wrote them (at most 4: zero_bench_gpu, zero_bench_gpu_card24,
# lora_vs_torch, gpu_run), and the run's facts (machine, driver, NCCL, commit) beside them: 8 files in all.
n=0
for j in "$L"/bench/gpu/*.json; do
  [[ -f $j ]] && ((n < 4)) || continue
  cp "$j" "$O/" && n=$((n + 1))
done
cp "$L/facts.json" "$O/facts.json" 2>/dev/null
cp "$L/facts.json" "$L/logs/" 2>/dev/null
tar -C "$L" -czf "$O/logs.tgz" logs xml runs bench verdicts $(test -d "$L/torch" && echo torch) 2>/dev/null
exec 1>&- 2>&-
wait "$tee_pid" 2>/dev/null
exit 0
