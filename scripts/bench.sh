#!/usr/bin/env bash
# scripts/bench.sh: runs every benchmark, writes JSON under bench/results/, renders the charts and regenerates
# docs/BENCHMARKS.md (bench/report.py).
#
#   zero_bench_stages       stages 0-3 × offload × dtype at 2 and 4 ranks: step time, communication / Ψ,
#                           peak bytes per rank / DESIGN.md's formula
#   zero_bench_collectives  reduce-scatter, all-gather, all-reduce through Comm against raw MPI (raw NCCL on GPUs)
#   zero_bench_adamw        the CPU AdamW against its measured memory-bandwidth roofline
#   zero_bench_nvme         the NVMe tier against fio (O_DIRECT, same block size, queue depth and directory), against
#                           the step with the state in host memory, and its host memory as the model grows 1x -> 8x
#   lora_finetune lora      the LoRA example's tokens/s per stage (a few steps of a small pretrained base)
#   zero_bench_zeropp       ZeRO++ against plain stage 3: bytes per link kind on 4 ranks in 2 "nodes" of one machine,
#                           step times on 2 namespace hosts x 2 ranks with limited links (scripts/netns_cluster.sh;
#                           skipped, saying why, where namespaces are forbidden), and the example's pretraining loss
#                           with and without it
#
# usage: scripts/bench.sh [--quick] [--build DIR] [--out DIR] [--docs FILE] [--no-build] [--no-deps] [--only LIST]
#   --quick     a smoke run (small sizes, few iterations, under 3 minutes on 2 cores); ctest's bench_quick runs it
#   --build     build directory (default build/, configured in Release with benchmarks and examples if it is not
#               configured yet; an existing one is reused as it is and only the benchmark targets are built)
#   --out       results directory (default bench/results)
#   --docs      the Markdown report (default docs/BENCHMARKS.md)
#   --no-build  use the binaries in --build as they are; --no-deps  skip scripts/deps.sh
#   --only      run only these of stages,collectives,adamw,nvme,lora,zeropp (comma-separated) and keep the other
#               results already in --out; the report covers everything there
# Every step's wall time is printed; the machine it ran on goes into the report. Timings on a shared machine are
# noisy: the report's ratios are measured within one run (paired per iteration), never across runs.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

all=stages,collectives,adamw,nvme,lora,zeropp
quick=0 build=build out=bench/results docs=docs/BENCHMARKS.md do_build=1 do_deps=1 only=$all
while (($#)); do
  case $1 in
    --quick) quick=1 ;;
    --build) build=$2; shift ;;
    --out) out=$2; shift ;;
    --docs) docs=$2; shift ;;
    --no-build) do_build=0 ;;
    --no-deps) do_deps=0 ;;
    --only) only=$2; shift ;;
    *) echo "bench.sh: unknown argument $1 (see the comment at the top of scripts/bench.sh)" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$out" "$(dirname "$docs")"
out=$(cd "$out" && pwd)
log=$out/logs
mkdir -p "$log"

declare -a phase_names=() phase_secs=()
phase() {  # phase NAME COMMAND...: runs it, records its wall time
  local name=$1 t0=$SECONDS
  shift
  echo "== $name"
  "$@"
  phase_names+=("$name")
  phase_secs+=($((SECONDS - t0)))
}
report_times() {
  local i
  for i in "${!phase_names[@]}"; do printf '  %-22s %4ss\n' "${phase_names[$i]}" "${phase_secs[$i]}"; done
}
trap report_times EXIT

if ((do_deps)); then phase deps scripts/deps.sh; fi

# Build only what runs here. A fresh directory is configured like scripts/example.sh's, with benchmarks on.
targets=(zero_bench_stages zero_bench_collectives zero_bench_adamw zero_bench_nvme zero_bench_zeropp lora_finetune)
build_all() {
  if [[ ! -f $build/CMakeCache.txt ]]; then
    cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DZERO_BUILD_BENCHMARKS=ON -DZERO_BUILD_EXAMPLES=ON \
      -DZERO_BUILD_TESTS=OFF >"$log/configure.log"
  fi
  cmake --build "$build" --parallel "$(nproc)" --target "${targets[@]}"
}
if ((do_build)); then phase build build_all; fi
bin=$build/bench
lora_bin=$build/examples/lora_finetune/lora_finetune
wanted() { [[ ,$only, == *,$1,* ]]; }
for b in stages collectives adamw nvme zeropp; do
  if wanted "$b" && [[ ! -x $bin/zero_bench_$b ]]; then
    echo "bench.sh: $bin/zero_bench_$b is missing (build it, or drop --no-build)" >&2
    exit 1
  fi
done

# mpiexec: as root Open MPI needs the allow-run-as-root pair; --oversubscribe lets 4 ranks share 2 cores.
if [[ $(id -u) -eq 0 ]]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi
mpi=(mpiexec --oversubscribe --bind-to none --mca btl self,vader)

# What each mode measures. Full: Ψ = 2^22 and 2^24 at 2 and 4 ranks in three dtypes (f32/f32, bf16/f32, and the
# paper's bf16/bf16), and 2^26 at 2 ranks in bf16/bf16 (2^27 fits in memory but not in a ~10 minute run on 2
# cores); collectives 8 B to 256 MiB at 2 and 4 ranks; every AdamW case; LoRA at stages 0-3 with and without
# optimizer offload. Quick: the smallest of each, to prove that everything runs.
if ((quick)); then
  stage_runs=("2 --sizes=20 --dtypes=f32,bf16 --iterations=2" "4 --sizes=20 --dtypes=bf16 --iterations=2")
  coll_args=(--max_bytes=1048576 --budget_bytes=4194304 --min_iterations=3)
  coll_worlds=(2 4)
  adamw_args=(--benchmark_filter='n:2\^20/threads:1/pages:4K')
  nvme_args=(--sizes=21,22 --iterations=2)
  lora_args=(--dim 32 --layers 2 --heads 4 --kv-heads 2 --ffn 86 --seq 32 --batch 4 --micro 1 --pretrain-steps 2
             --lora-steps 4 --r 4 --eval-batches 1 --sample-tokens 2 --warmup 1)
  lora_cases=("0 0" "3 0")
  lora_corpora=(--base-corpus synthetic --tune-corpus synthetic)
  zeropp_args=(--sizes=20 --iterations=2)
  zeropp_lora_steps=60
else
  stage_runs=("2 --sizes=22,24 --dtypes=f32,bf16,bf16g --iterations=5" "2 --sizes=26 --dtypes=bf16g --iterations=3"
              "4 --sizes=22,24 --dtypes=f32,bf16,bf16g --iterations=5")
  coll_args=()
  coll_worlds=(2 4)
  adamw_args=()
  # 1x, 2x, 4x, 8x: 2^22 to 2^25 parameters, 48 to 384 MiB of optimizer state on the disk.
  nvme_args=(--sizes=22,23,24,25 --iterations=5)
  lora_args=(--pretrain-steps 5 --lora-steps 16 --eval-batches 1 --sample-tokens 2 --warmup 2)
  lora_cases=("0 0" "1 0" "2 0" "3 0" "1 1" "2 1" "3 1")
  lora_corpora=()  # the main job's: fortunes, then the Bible (Debian packages that scripts/deps.sh installs)
  zeropp_args=(--sizes=22 --iterations=3)
  zeropp_lora_steps=200
fi

if [[ $only == "$all" ]]; then
  date -u +%Y-%m-%dT%H:%M:%SZ >"$out/started"
  cat /proc/loadavg >"$out/loadavg_start"
  # The commit measured (the binaries are built from the working tree as it is).
  { git rev-parse --short HEAD | tr -d '\n'
    [[ -z $(git status --porcelain --untracked-files=no) ]] || printf ' + uncommitted changes in the working tree'
    echo; } >"$out/commit" 2>/dev/null || true
fi

run_stages() {
  local spec n args i=0
  rm -f "$out"/stages_w*.gbench.json
  for spec in "${stage_runs[@]}"; do
    read -r n args <<<"$spec"
    i=$((i + 1))
    # shellcheck disable=SC2086  # args is a list of flags
    "${mpi[@]}" -n "$n" "$bin/zero_bench_stages" $args --benchmark_out="$out/stages_w${n}_$i.gbench.json" \
      --benchmark_out_format=json --benchmark_color=false 2>&1 | tee "$log/stages_w${n}_$i.log" |
      grep -E '^(zero_bench|Stages)' | cut -c1-150
  done
}
if wanted stages; then phase stages run_stages; fi

run_collectives() {
  local n
  rm -f "$out"/collectives_w*.gbench.json
  for n in "${coll_worlds[@]}"; do
    "${mpi[@]}" -n "$n" "$bin/zero_bench_collectives" "${coll_args[@]}" \
      --benchmark_out="$out/collectives_w$n.gbench.json" --benchmark_out_format=json --benchmark_color=false 2>&1 |
      tee "$log/collectives_w$n.log" | grep -E '^(zero_bench|NcclComm|Collectives)' | cut -c1-160
  done
}
if wanted collectives; then phase collectives run_collectives; fi

run_adamw() {
  "$bin/zero_bench_adamw" "${adamw_args[@]}" --benchmark_out="$out/adamw.gbench.json" --benchmark_out_format=json \
    --benchmark_color=false 2>&1 | tee "$log/adamw.log" | grep -E '^(AdamW|AdamWStepCpu)' | cut -c1-160
}
if wanted adamw; then phase adamw run_adamw; fi

# The NVMe tier, one rank, in a directory of the results' disk (never tmpfs: the tier refuses it), fio beside it in
# the same directory. Its own start time and load go beside its results: with --only it runs apart from the rest.
run_nvme() {
  local work=$out/nvme_work
  rm -rf "$work"
  date -u +%Y-%m-%dT%H:%M:%SZ >"$out/nvme_started"
  { git rev-parse --short HEAD | tr -d '\n'
    [[ -z $(git status --porcelain --untracked-files=no) ]] || printf ' + uncommitted changes in the working tree'
    echo; } >"$out/nvme_commit" 2>/dev/null || true
  cat /proc/loadavg >"$out/nvme_loadavg_start"
  { df -T "$out" | tail -n 1 | awk '{print $2 " (" $1 ")"}'; } >"$out/nvme_fs" 2>/dev/null || true
  # The machine of this part (a partial run may not be on the full run's): CPU, cores, kernel, liburing.
  echo "$(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) cores, kernel $(uname -r), liburing" \
    "$(dpkg-query -W -f='${Version}' liburing-dev 2>/dev/null)" >"$out/nvme_machine"
  "${mpi[@]}" -n 1 "$bin/zero_bench_nvme" "${nvme_args[@]}" --dir="$work" --benchmark_out="$out/nvme.gbench.json" \
    --benchmark_out_format=json --benchmark_color=false 2>&1 | tee "$log/nvme.log" | grep -E '^(zero_bench|Nvme)' |
    cut -c1-160
  cat /proc/loadavg >"$out/nvme_loadavg_end"
  rm -rf "$work"
}
if wanted nvme; then phase nvme run_nvme; fi

# The LoRA example in the main job's model configuration (quick: a tiny one on synthetic corpora): pretrain a base
# once (a few steps: only throughput matters here), then fine-tune it per stage and offload setting on 2 ranks.
# Each run's per-step lines go to its log; report.py takes the median tokens/s over the steps after the first.
run_lora() {
  local work=$out/lora_work stage offload
  rm -rf "$work" "$out"/lora_s*.log
  mkdir -p "$work"
  local common=(--out "$work" --data "$build/lora_bench_data" "${lora_corpora[@]}" "${lora_args[@]}")
  "${mpi[@]}" -n 2 "$lora_bin" pretrain --stage 2 "${common[@]}" >"$log/lora_pretrain.log" 2>&1 ||
    { tail -n 20 "$log/lora_pretrain.log"; return 1; }
  for c in "${lora_cases[@]}"; do
    read -r stage offload <<<"$c"
    "${mpi[@]}" -n 2 "$lora_bin" lora --stage "$stage" --offload "$offload" "${common[@]}" \
      >"$out/lora_s${stage}_o${offload}.log" 2>&1 || { tail -n 20 "$out/lora_s${stage}_o${offload}.log"; return 1; }
    grep -E '^lora step' "$out/lora_s${stage}_o${offload}.log" | tail -n 1
  done
  rm -rf "$work"  # the corpora stay in the build directory for the next run
}
if ! wanted lora; then
  :
elif [[ -x $lora_bin ]]; then
  phase lora run_lora
else
  echo "== lora: skipped ($lora_bin not built: configure with -DZERO_BUILD_EXAMPLES=ON)"
  rm -f "$out"/lora_s*.log
fi

# ZeRO++ (hpZ, qwZ, qgZ) against plain stage 3, bf16. (1) 4 ranks in 2 "nodes" of 2 on this machine: bytes per link
# kind per step against the formula. (2) The same on 2 hosts of 2 ranks made of network namespaces whose links are
# limited to 100 Mbit/s each way, so that step times show the savings; each host's link counters are kept to compare
# with what its ranks counted. (3) The example's pretraining (the tiny model of tests/lora_zeropp_test.sh) without
# ZeRO++, with hpZ + qwZ + qgZ 8 bits, and with 4 bits: the loss curve and the validation loss.
run_zeropp() {
  rm -f "$out"/zeropp_*.gbench.json "$out"/zeropp_*.txt "$out"/zeropp_lora_*.log
  "${mpi[@]}" -n 4 "$bin/zero_bench_zeropp" "${zeropp_args[@]}" --ranks_per_node=2 \
    --benchmark_out="$out/zeropp_w4.gbench.json" --benchmark_out_format=json --benchmark_color=false 2>&1 |
    tee "$log/zeropp_w4.log" | grep -E '^(zero_bench|ZeroPP)' | cut -c1-150
  local why
  if why=$(scripts/netns_cluster.sh check-rate); then
    scripts/netns_cluster.sh run --hosts 2 --ranks-per-host 2 --rate 100mbit --stats "$out/zeropp_cluster_links.txt" \
      -- "$bin/zero_bench_zeropp" "${zeropp_args[@]}" --ranks_per_node=0 \
      --benchmark_out="$out/zeropp_cluster.gbench.json" --benchmark_out_format=json --benchmark_color=false 2>&1 |
      tee "$log/zeropp_cluster.log" | grep -E '^(zero_bench|ZeroPP)' | cut -c1-150
    grep '^zero_bench_zeropp: node' "$log/zeropp_cluster.log" >"$out/zeropp_cluster_counted.txt"
  else
    echo "$why" | tee "$out/zeropp_cluster_skipped.txt"
  fi
  if [[ -x $lora_bin ]]; then
    local name flags
    for name in plain zeropp8 zeropp4; do
      case $name in
        plain) flags=() ;;
        zeropp8) flags=(--hpz 1 --qwz 1 --qgz-bits 8) ;;
        zeropp4) flags=(--hpz 1 --qwz 1 --qgz-bits 4) ;;
      esac
      "${mpi[@]}" -n 4 "$lora_bin" pretrain --out "$out/zeropp_lora_work" --base-corpus synthetic \
        --tune-corpus synthetic --dim 32 --layers 2 --heads 4 --kv-heads 2 --ffn 86 --seq 32 --batch 2 --micro 1 \
        --pretrain-steps "$zeropp_lora_steps" --warmup 10 --eval-batches 8 --stage 3 --ranks-per-node 2 \
        "${flags[@]}" >"$out/zeropp_lora_$name.log" 2>&1 || { tail -n 20 "$out/zeropp_lora_$name.log"; return 1; }
      grep '^pretrain: validation loss' "$out/zeropp_lora_$name.log" | sed "s/^/$name: /"
    done
    rm -rf "$out/zeropp_lora_work"
  fi
}
if wanted zeropp; then phase zeropp run_zeropp; fi

if [[ $only == "$all" ]]; then
  cat /proc/loadavg >"$out/loadavg_end"
  report_times >"$out/phase_times.txt"
else
  report_times >>"$out/phase_times.txt"  # a partial run adds its phases to the full run's
fi

# Debian's python3-matplotlib serves /usr/bin/python3, which may not be the python3 first on PATH (pyenv, venv).
python=""
for py in /usr/bin/python3 python3; do
  if "$py" -c "import matplotlib" >/dev/null 2>&1; then python=$py; break; fi
done
if [[ -z $python ]]; then
  echo "bench.sh: no python3 with matplotlib (apt-get install -y python3-matplotlib, or run scripts/deps.sh)" >&2
  exit 1
fi
mode=full command=scripts/bench.sh
if ((quick)); then mode=quick command+=" --quick"; fi
# --strict: a counted quantity that misses its closed form (elements per step, bytes, #wrong) fails the run.
phase report "$python" bench/report.py --results "$out" --docs "$docs" --build "$build" --mode "$mode" \
  --command "$command" --strict
echo "bench.sh: results in $out, report in $docs"
