#!/usr/bin/env bash
# bench/gpu/run.sh: every GPU benchmark of issue 16 in one command, on a machine with a GPU (nothing here needs a
# compiler: it runs binaries built elsewhere, e.g. the GPU kit's bundle). Writes OUT/*.json, which
# bench/report.py renders into the GPU section of docs/BENCHMARKS.md (commit them under bench/results/gpu/).
#
#   zero_bench_gpu          optimizer kernels, gradient norm, offload copies, offloaded step, engine overhead at
#                           stages 0-3, stage-3 prefetch            -> OUT/zero_bench_gpu.json (three processes:
#                           kernel rows, offloaded step, engine rows; their JSON in OUT/zero_bench_gpu_parts/)
#   zero_bench_gpu_card24   the "24 GB card": Stage::kAuto under a 24 GiB capacity -> OUT/zero_bench_gpu_card24.json
#   lora_vs_torch.sh        the LoRA example at SmolLM2's shape against PyTorch     -> OUT/lora_vs_torch.json
#
# usage: bench/gpu/run.sh [--quick] [--build DIR] [--out DIR] [--python PY] [--mpiexec "CMD ..."] [--only LIST]
#   --quick    every row small (the one-command GPU run: under 3 minutes on an H200 by estimate; the run's own
#              wall time is printed and recorded in OUT/gpu_run.json)
#   --build    the build directory holding bench/zero_bench_gpu* and examples/lora_finetune (default build)
#   --out      default bench/results/gpu
#   --python   Python with torch + transformers (+ peft) for torch_lora.py (default python3)
#   --mpiexec  launcher for the MPI programs, e.g. "$Z/deps/bin/mpiexec -n 1 --bind-to none" (default: none,
#              each runs as a singleton MPI process)
#   --only     a comma-separated subset of bench,card24,lora
# Expected wall time on an H200 (estimates until a run measures them): quick about 75 s (15 kernel rows, 30
# offloaded step at 1.1B, 30 engine rows) + 20 s + 70 s, close to the GPU run's 200 s; full about 5 + 2 + 3 minutes.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
quick=0 build=build out=bench/results/gpu python=python3 mpiexec="" only=bench,card24,lora
while (($#)); do
  case $1 in
    --quick) quick=1 ;;
    --build) build=$2; shift ;;
    --out) out=$2; shift ;;
    --python) python=$2; shift ;;
    --mpiexec) mpiexec=$2; shift ;;
    --only) only=$2; shift ;;
    *) echo "run.sh: unknown argument $1 (see the comment at the top of bench/gpu/run.sh)" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$out"
out=$(cd "$out" && pwd)
q=()
((quick)) && q=(--quick)
# shellcheck disable=SC2206  # the launcher is a word list
launcher=($mpiexec)
wanted() { [[ ,$only, == *,$1,* ]]; }
declare -a names=() secs=() codes=()
phase() {  # phase NAME COMMAND...: runs it, records its wall time and exit status (a failing phase does not stop the rest)
  local name=$1 t0=$SECONDS rc=0
  shift
  echo "== $name"
  "$@" || rc=$?
  names+=("$name") secs+=($((SECONDS - t0))) codes+=("$rc")
}
start=$SECONDS
if wanted bench; then
  # One process per group of rows, merged into OUT/zero_bench_gpu.json: Google Benchmark closes its JSON only at
  # the end, so a crash or an out-of-memory kill (the offloaded step pins ~18 GB of host memory) would otherwise
  # leave a truncated file and lose every row of the run. Costs a CUDA context and an MPI start per group.
  parts=$out/zero_bench_gpu_parts
  mkdir -p "$parts"
  rm -f "$parts"/*.json
  groups=(kernels '^(Optimizer|Norm|OffloadCopy)/' offload '^OffloadStep/' engine '^(EngineOverhead|Prefetch)/')
  part_files=()
  for ((g = 0; g < ${#groups[@]}; g += 2)); do
    part_files+=("$parts/${groups[g]}.json")
    phase "zero_bench_gpu_${groups[g]}" "${launcher[@]}" "$build/bench/zero_bench_gpu" "${q[@]}" \
      --benchmark_filter="${groups[g + 1]}" --benchmark_out="$parts/${groups[g]}.json" --benchmark_out_format=json \
      --benchmark_color=false
  done
  # The context of the first part that completed (clocks_after and host_memory_after from the last), every row.
  # (set -e must not end the run here: card24 and lora still follow.)
  if "$python" - "$out/zero_bench_gpu.json" "${part_files[@]}" <<'EOF'
import json, os, sys
docs = []
for path in sys.argv[2:]:
    if not os.path.exists(path):
        continue
    try:
        with open(path) as f:
            docs.append(json.load(f))
    except ValueError as e:
        print(f"run.sh: {path} is not complete JSON ({e}): that group's rows are lost", file=sys.stderr)
if docs:
    ctx = dict(docs[0].get("context", {}))
    for key in ("clocks_after", "host_memory_after"):
        if key in docs[-1].get("context", {}):
            ctx[key] = docs[-1]["context"][key]
    ctx["processes"] = str(len(docs))
    merged = {"context": ctx, "benchmarks": [b for d in docs for b in d.get("benchmarks", [])]}
    with open(sys.argv[1], "w") as f:
        json.dump(merged, f, indent=2)
    print(f"run.sh: {len(merged['benchmarks'])} rows from {len(docs)} processes in {sys.argv[1]}")
EOF
  then :; else echo "run.sh: merging $parts/*.json failed (the parts are still there)" >&2; fi
fi
if wanted card24; then
  phase zero_bench_gpu_card24 "${launcher[@]}" "$build/bench/zero_bench_gpu_card24" "${q[@]}" --out="$out" \
    --benchmark_color=false
fi
if wanted lora; then
  phase lora_vs_torch "$here/lora_vs_torch.sh" --example "$build/examples/lora_finetune/lora_finetune" --out "$out" \
    --python "$python" --mpiexec "$mpiexec" "${q[@]}"
fi
total=$((SECONDS - start))
{
  printf '{"row": "gpu_run", "mode": "%s", "wall_s": %d, "phases": [' "$( ((quick)) && echo quick || echo full)" "$total"
  for i in "${!names[@]}"; do
    ((i)) && printf ', '
    printf '{"name": "%s", "wall_s": %d, "exit": %d}' "${names[$i]}" "${secs[$i]}" "${codes[$i]}"
  done
  printf ']}\n'
} >"$out/gpu_run.json"
for i in "${!names[@]}"; do printf '  %-24s %4ss  exit %s\n' "${names[$i]}" "${secs[$i]}" "${codes[$i]}"; done
echo "run.sh: ${total}s in all, results in $out"
for c in "${codes[@]}"; do ((c == 0)) || exit 1; done
