#!/usr/bin/env bash
# The LoRA example with its optimizer state on the NVMe tier (ctest lora_nvme): 2 ranks, stage 2 with the optimizer
# offloaded, a tiny model on the synthetic corpus, pretraining then LoRA, once with the state in host memory and
# once with --nvme DIR (a directory in the build tree: a local disk, which O_DIRECT needs).
#   * The tier changes no value: every progress line (loss, learning rate, gradient norm) and both validation
#     losses equal the host-memory run's (the engine streams the same bytes through the same AdamW).
#   * The run says where the state went, each rank's tier directory exists while it runs and is gone afterwards.
#   * --nvme without --offload 1 is refused before anything runs, saying what to add.
# usage: lora_nvme_test.sh BINARY MPIEXEC WORKDIR [mpiexec flags...]
set -euo pipefail
binary=$1 mpiexec=$2 work=$3
shift 3
rm -rf "$work"
mkdir -p "$work/nvme"
args=(all --base-corpus synthetic --tune-corpus synthetic --dim 32 --layers 2 --heads 4 --kv-heads 2 --ffn 86
      --seq 32 --batch 2 --micro 2 --pretrain-steps 30 --lora-steps 10 --warmup 3 --eval-batches 2
      --sample-tokens 4 --stage 2 --offload 1)
run() {  # run NAME FLAGS...: the example with those flags, its output in $work/NAME.log
  local name=$1
  shift
  "$mpiexec" -n 2 "${mpi_flags[@]}" "$binary" "${args[@]}" --out "$work/$name" "$@" >"$work/$name.log" 2>&1 ||
    { tail -n 20 "$work/$name.log"; echo "FAIL: $name did not run"; exit 1; }
}
mpi_flags=("$@")
run host
run tier --nvme "$work/nvme"

grep -q "^offload: the optimizer state on the NVMe tier under $work/nvme" "$work/tier.log" ||
  { echo "FAIL: the run does not say the state is on the tier"; exit 1; }
leftover=$(find "$work/nvme" -mindepth 1 -maxdepth 1 | head -3)
[[ -z $leftover ]] || { echo "FAIL: the tier's directories outlived the run: $leftover"; exit 1; }
for phase in pretrain lora; do
  a=$(grep -cE "^$phase step" "$work/host.log" || true)
  ((a > 0)) || { echo "FAIL: no $phase progress lines in the host-memory run"; exit 1; }
done
diff <(grep -E '^(pretrain|lora) step' "$work/host.log" | awk '{print $1, $3, $5, $7, $9}') \
     <(grep -E '^(pretrain|lora) step' "$work/tier.log" | awk '{print $1, $3, $5, $7, $9}') ||
  { echo "FAIL: the tier changed the training curve"; exit 1; }
diff <(grep -E 'validation loss' "$work/host.log") <(grep -E 'validation loss' "$work/tier.log") ||
  { echo "FAIL: the tier changed a validation loss"; exit 1; }

if "$mpiexec" -n 1 "${mpi_flags[@]}" "$binary" pretrain --out "$work/refused" --nvme "$work/nvme" \
    >"$work/refused.log" 2>&1; then
  echo "FAIL: --nvme without --offload 1 ran"; exit 1
fi
grep -q "add --offload 1" "$work/refused.log" || { cat "$work/refused.log"; echo "FAIL: the refusal does not say what to add"; exit 1; }
echo "lora_nvme: OK ($(grep -cE '^(pretrain|lora) step' "$work/tier.log") progress lines and $(grep -c 'validation loss' "$work/tier.log") validation losses equal)"
