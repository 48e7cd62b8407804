#!/usr/bin/env bash
# bench/gpu/lora_vs_torch.sh: the main job's tokens/s beside PyTorch on the same GPU (issue 16's row "the LoRA
# example at SmolLM2-135M's shape against PyTorch + PEFT, same shapes, bf16, same batch and sequence length").
#
#   1. bench/gpu/random_llama_gguf.py writes a random-init GGUF at SmolLM2-135M's shape (270 MB, a few seconds);
#   2. the example fine-tunes LoRA on it: lora_finetune lora --base smollm2 --gguf THAT --device cuda
#      --tune-corpus synthetic --stage S --batch B --seq L --micro M (one rank; r = 8 on q,k,v,o, no dropout: the
#      example's SmolLM2 defaults) on a synthetic corpus of 40,000 documents (--synthetic-documents: about 99,000
#      validation tokens, so that the validation sampler's (tokens - L) / L >= B windows hold for every shape below;
#      the GPU machine has no Debian corpus packages). Shapes B x L x M: 4 x 128 x 2, the example's own defaults and
#      what the GPU kit's CUDA run of it uses, and 8 x 512 x 1, a batch of 4096 tokens where the GPU, not launch
#      overhead, sets the pace;
#   3. bench/gpu/torch_lora.py trains the same shape and adapters with the same B, L, M in PyTorch (+ PEFT).
# Tokens/s of each: the median over the steps after the first --warmup (the example's own per-step line; the
# script's timing around each step). Writes OUT/lora_vs_torch.json (both results, ratio = example / PyTorch, goal
# >= 0.8) and the logs next to it.
#
# usage: bench/gpu/lora_vs_torch.sh --example PATH [--out DIR] [--quick] [--python PY] [--mpiexec "CMD ..."]
#                                   [--stages "0 3"] [--shapes "4x128x2 8x512x1"] [--steps N]
#   --example  the lora_finetune binary (a CUDA build)
#   --out      results directory (default bench/results/gpu)
#   --quick    both shapes (4x128x2 and 8x512x1), 10 steps, stage 0; default: those and 16x512x1, 30 steps,
#              stages 0 and 3
#   --python   the Python with torch and transformers (default python3: the GPU image's venv)
#   --mpiexec  launcher for the example, e.g. "$Z/deps/bin/mpiexec -n 1 --bind-to none" (default: none, a
#              singleton MPI process)
#   --device   cuda (default) or cpu, and --tiny (a 2-layer, 64-wide model with 1024 tokens): a smoke test of this
#              script on a machine without a GPU (numbers meaningless)
# Expected wall time on an H200: about 70 s quick (most of it PyTorch's import and the GGUF), 3 minutes full; the
# plumbing, tried here with --device cpu --tiny and torch 2.11 + transformers 5.25 + PEFT 0.21: 14 s.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
example="" out=bench/results/gpu quick=0 python=python3 mpiexec="" stages="" shapes="" steps="" device=cuda shape_args=()
while (($#)); do
  case $1 in
    --example) example=$2; shift ;;
    --out) out=$2; shift ;;
    --quick) quick=1 ;;
    --python) python=$2; shift ;;
    --mpiexec) mpiexec=$2; shift ;;
    --stages) stages=$2; shift ;;
    --shapes) shapes=$2; shift ;;
    --steps) steps=$2; shift ;;
    --device) device=$2; shift ;;
    --tiny) shape_args=(--layers 2 --dim 64 --heads 4 --kv-heads 2 --ffn 128 --vocab 1024) ;;
    *) echo "lora_vs_torch.sh: unknown argument $1 (see the comment at the top)" >&2; exit 2 ;;
  esac
  shift
done
[[ -x $example ]] || { echo "lora_vs_torch.sh: --example PATH (the lora_finetune binary) is required" >&2; exit 2; }
if ((quick)); then
  : "${stages:=0}" "${shapes:=4x128x2 8x512x1}" "${steps:=10}"
else
  : "${stages:=0 3}" "${shapes:=4x128x2 8x512x1 16x512x1}" "${steps:=30}"
fi
warmup=3
mkdir -p "$out"
out=$(cd "$out" && pwd)
logs=$out/lora_vs_torch_logs
mkdir -p "$logs"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
t0=$SECONDS

"$python" "$here/random_llama_gguf.py" "$work/smollm2-random.gguf" "${shape_args[@]}" | tee "$logs/gguf.log"
# shellcheck disable=SC2206  # the launcher is a word list
launcher=($mpiexec)
runs=()
for shape in $shapes; do
  b=${shape%%x*} rest=${shape#*x}
  l=${rest%%x*} m=1
  [[ $rest == *x* ]] && m=${rest#*x}
  for s in $stages; do
    log=$logs/example_b${b}_s${l}_m${m}_stage$s.log
    "${launcher[@]}" "$example" lora --base smollm2 --gguf "$work/smollm2-random.gguf" --device "$device" \
      --tune-corpus synthetic --synthetic-documents 40000 --out "$work/lora_$s" --data "$work/data" --stage "$s" \
      --batch "$b" --seq "$l" \
      --micro "$m" --lora-steps "$steps" --warmup 2 --eval-batches 1 --sample-tokens 1 --threads "$(nproc)" \
      >"$log" 2>&1 || { tail -n 20 "$log"; echo "lora_vs_torch.sh: the example failed (log: $log)" >&2; exit 1; }
    grep -E '^lora step' "$log" | tail -n 1
    runs+=("example $b $l $m $s $log")
  done
  tj=$logs/torch_b${b}_s${l}_m${m}.json
  "$python" "$here/torch_lora.py" --batch "$b" --seq "$l" --micro "$m" --steps "$steps" --warmup "$warmup" \
    --device "$device" "${shape_args[@]}" --json "$tj" >"$logs/torch_b${b}_s${l}_m${m}.log" 2>&1 ||
    { tail -n 20 "$logs/torch_b${b}_s${l}_m${m}.log"; echo "lora_vs_torch.sh: torch_lora.py failed" >&2; exit 1; }
  runs+=("torch $b $l $m - $tj")
done

# One JSON: per shape, the example at each stage and PyTorch, with the ratio to PyTorch.
model="SmolLM2-135M shape, random init, LoRA r=8 alpha=16 on q,k,v,o, bf16"
((${#shape_args[@]})) && model="a tiny 2-layer smoke-test model on $device (not a measurement)"
"$python" - "$out/lora_vs_torch.json" "$warmup" "$((SECONDS - t0))" "$quick" "$model" "${runs[@]}" <<'EOF'
import json, re, statistics, sys
path, warmup, wall, quick, model = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1", sys.argv[5]
step_re = re.compile(r"^lora step\s+(\d+)/(\d+).*?([\d.]+) tok/s\s+device ([\d.]+) MiB")
rows, torch = [], {}
for spec in sys.argv[6:]:
    kind, b, l, m, stage, file = spec.split(" ", 5)
    if kind == "torch":
        torch[(int(b), int(l), int(m))] = json.load(open(file))
        continue
    tps, dev = [], 0.0
    for line in open(file, errors="replace"):
        hit = step_re.match(line)
        if hit:
            tps.append(float(hit.group(3)))
            dev = float(hit.group(4))
    timed = tps[warmup:] if len(tps) > warmup else tps
    rows.append({"batch": int(b), "seq": int(l), "micro": int(m), "stage": int(stage),
                 "tokens_per_s": statistics.median(timed) if timed else None, "tokens_per_s_steps": tps,
                 "peak_device_mib": dev, "log": file.rsplit("/", 1)[-1]})
for r in rows:
    t = torch.get((r["batch"], r["seq"], r["micro"]))
    r["torch_tokens_per_s"] = t["tokens_per_s"] if t else None
    r["ratio"] = r["tokens_per_s"] / t["tokens_per_s"] if t and r["tokens_per_s"] else None
out = {"row": "lora_vs_torch", "goal": 0.8, "mode": "quick" if quick else "full", "wall_s": wall,
       "warmup_steps": warmup, "model": model,
       "example": rows, "pytorch": [torch[k] for k in sorted(torch)]}
json.dump(out, open(path, "w"), indent=1)
for r in rows:
    print(f"lora_vs_torch: {r['batch']}x{r['seq']}x{r['micro']} stage {r['stage']}: example {r['tokens_per_s']} tok/s, "
          f"PyTorch {r['torch_tokens_per_s']} tok/s, ratio {r['ratio']}")
EOF
echo "lora_vs_torch.sh: $((SECONDS - t0)) s, results in $out/lora_vs_torch.json"
