#!/usr/bin/env bash
# The LoRA example's outputs loaded by Hugging Face as they are (ctest lora_example_hf): the tiny configuration on
# synthetic corpora at 2 ranks, stage 3 (pretrain, fine-tune, merge with --logits-out), then tests/hf_load_check.py
# loads OUT/base, OUT/adapter and OUT/merged with transformers and PEFT and compares their logits with the example's
# (it says what it checks). Also checks the directories hold the files transformers and PEFT look for.
# usage: lora_hf_test.sh BINARY MPIEXEC PYTHON WORKDIR [mpiexec flags...]
set -euo pipefail
binary=$1 mpiexec=$2 python=$3 work=$4
shift 4
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
rm -rf "$work"
mkdir -p "$work"
# shellcheck disable=SC2054  # "q,v,o,up" is one argument
args=(--out "$work" --base-corpus synthetic --tune-corpus synthetic --dim 32 --layers 2 --heads 4 --kv-heads 2
      --ffn 86 --seq 32 --batch 2 --micro 1 --pretrain-steps 20 --lora-steps 10 --warmup 2 --r 4 --alpha 8
      --eval-batches 1 --lora-lr 3e-2 --sample-tokens 4 --targets q,v,o,up --prompt "Hello, 12 worlds!")
"$mpiexec" -n 2 "$@" "$binary" all "${args[@]}" > "$work/all.log" || { cat "$work/all.log"; exit 1; }
"$mpiexec" -n 2 "$@" "$binary" merge "${args[@]}" --logits-out "$work/logits.safetensors" > "$work/merge.log" ||
  { cat "$work/merge.log"; exit 1; }
grep -q "^adapter=$work/adapter$" "$work/all.log" || { echo "FAIL: no adapter= line"; cat "$work/all.log"; exit 1; }
grep -q "^merged=$work/merged$" "$work/merge.log" || { echo "FAIL: no merged= line"; cat "$work/merge.log"; exit 1; }
for f in base/model.safetensors base/config.json base/tokenizer.json base/tokenizer_config.json \
         adapter/adapter_model.safetensors adapter/adapter_config.json \
         merged/model.safetensors merged/config.json merged/tokenizer.json merged/tokenizer_config.json; do
  [[ -s $work/$f ]] || { echo "FAIL: $work/$f is missing or empty"; ls -R "$work"; exit 1; }
done
"$python" "$here/hf_load_check.py" "$work" "$work/logits.safetensors" --auto-peft
