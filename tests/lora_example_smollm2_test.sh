#!/usr/bin/env bash
# `lora_finetune --base smollm2` end to end on the real SmolLM2-135M-Instruct GGUF (ctest lora_example_smollm2,
# registered only when scripts/fetch_smollm2.sh has put the file in runs/models/ before cmake ran): 2 ranks,
# stage 3, two short LoRA steps on the Bible (or synthetic text when bible-kjv is missing), then `merge`.
#   * the last two lines of `lora` are machine-readable and the losses are finite and plausible for a pretrained
#     model (below 6 nats per token; a broken load scores near ln(49152) = 10.8);
#   * the adapter has PEFT names and SmolLM2's shapes: q_proj lora_B [576, r], k_proj lora_B [192, r] (3 kv heads
#     of 64), lora_A [r, 576]; adapter_config.json names the base model;
#   * `merge` folds it: merged logits equal adapter logits within 1e-5 relative (the example checks, this reads it);
#   * Hugging Face loads what it wrote (tests/hf_load_check.py): OUT/base (the dequantized base, with tokenizer.json
#     built from the GGUF's vocabulary and merges), PeftModel on OUT/adapter and OUT/merged give the example's logits
#     within 1e-5 of the largest, and the tokenizer gives the example's ids for the prompt.
# usage: lora_example_smollm2_test.sh BINARY MPIEXEC PYTHON WORKDIR GGUF [mpiexec flags...]
set -euo pipefail
binary=$1 mpiexec=$2 python=$3 work=$4 gguf=$5
shift 5
rm -rf "$work"
mkdir -p "$work"
corpus=bible
command -v bible >/dev/null 2>&1 || corpus=synthetic
args=(--base smollm2 --gguf "$gguf" --out "$work" --tune-corpus "$corpus" --lora-steps 2 --eval-batches 1
      --sample-tokens 2 --r 4)
"$mpiexec" -n 2 "$@" "$binary" lora "${args[@]}" | tee "$work/lora.log"
grep -q "only a short run is practical" "$work/lora.log" || { echo "FAIL: no note on CPU speed"; exit 1; }
last=$(tail -n 2 "$work/lora.log")
[[ $(sed -n 1p <<<"$last") =~ ^val_loss_before=([0-9.]+)\ val_loss_after=([0-9.]+)$ ]] ||
  { echo "FAIL: bad loss line"; exit 1; }
before=${BASH_REMATCH[1]} after=${BASH_REMATCH[2]}
awk -v b="$before" -v a="$after" 'BEGIN { exit !(b < 6 && a < 6) }' ||
  { echo "FAIL: losses $before -> $after are not those of a pretrained model"; exit 1; }
grep -q '"base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"' "$work/adapter/adapter_config.json" ||
  { echo "FAIL: adapter_config.json does not name the base"; exit 1; }

"$python" - "$work/adapter/adapter_model.safetensors" <<'PY'
import json, struct, sys
raw = open(sys.argv[1], "rb").read()
n = struct.unpack("<Q", raw[:8])[0]
header = json.loads(raw[8:8 + n])
header.pop("__metadata__", None)
assert len(header) == 30 * 4 * 2, len(header)
p = "base_model.model.model.layers.7.self_attn."
assert header[p + "q_proj.lora_B.weight"]["shape"] == [576, 4], header[p + "q_proj.lora_B.weight"]
assert header[p + "k_proj.lora_B.weight"]["shape"] == [192, 4], header[p + "k_proj.lora_B.weight"]
assert header[p + "k_proj.lora_A.weight"]["shape"] == [4, 576], header[p + "k_proj.lora_A.weight"]
print("adapter ok")
PY

"$mpiexec" -n 2 "$@" "$binary" merge "${args[@]}" --logits-out "$work/logits.safetensors" | tee "$work/merge.log"
rel=$(sed -n 's/^merged_relative_error=//p' "$work/merge.log")
[[ -n $rel ]] || { echo "FAIL: no merge result"; exit 1; }
awk -v r="$rel" 'BEGIN { exit !(r <= 1e-5) }' || { echo "FAIL: merged logits differ by $rel (relative)"; exit 1; }
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
"$python" "$here/hf_load_check.py" "$work" "$work/logits.safetensors"
rm -f "$work/merged/model.safetensors" "$work/base/model.safetensors" "$work/logits.safetensors"  # 538 + 538 + 38 MB
echo "PASS: validation loss $before -> $after, merged relative error $rel"
