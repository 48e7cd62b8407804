#!/usr/bin/env bash
# The LoRA example end to end in a tiny configuration (ctest lora_example_tiny, 2 ranks, synthetic corpora so
# no package is needed): pretrain, fine-tune under ZeRO stage 3, then check what the run promises.
#   * the last two lines are machine-readable, and the validation loss fell during fine-tuning;
#   * the base file is reused by a second run with the same settings (the cache key);
#   * OUT/adapter/adapter_model.safetensors parses with numpy alone: only lora_A / lora_B tensors, PEFT names, the
#     shapes of r = 4, finite values, and B no longer zero (it was trained); adapter_config.json names the rank;
#   * `sample` reads the base and the adapter back and continues a prompt with each;
#   * an interrupted fine-tune resumed from its zero checkpoint ends where the uninterrupted one did;
#   * --targets q,gate puts adapters on those projections only (config and file agree); a bad list is refused.
#   * --synthetic-documents N sizes the synthetic corpus (a benchmark's larger batches); a bad N is refused.
#   * --recompute 1 reports a measured activation peak below the stored one, each within 10% of the estimate.
#   * `merge` folds the adapter into the base: merged logits equal adapter logits within 1e-5 (relative; the
#     example checks it and fails otherwise, this reads its line), and merged/model.safetensors holds the base's
#     tensors under Hugging Face names, no LoRA tensor, with the targeted projections changed by the fold and the rest
#     equal. (lora_example_hf loads these directories with transformers and PEFT.)
# usage: lora_example_test.sh BINARY MPIEXEC PYTHON WORKDIR [mpiexec flags...]
set -euo pipefail
binary=$1 mpiexec=$2 python=$3 work=$4
shift 4
rm -rf "$work"
mkdir -p "$work"
args=(all --out "$work" --base-corpus synthetic --tune-corpus synthetic --dim 32 --layers 2 --heads 4 --kv-heads 2
      --ffn 86 --seq 32 --batch 4 --micro 2 --pretrain-steps 40 --lora-steps 30 --warmup 5 --r 4 --alpha 8
      --eval-batches 4 --lora-lr 1e-2)
"$mpiexec" -n 2 "$@" "$binary" "${args[@]}" | tee "$work/run1.log"

last=$(tail -n 2 "$work/run1.log")
losses=$(sed -n 1p <<<"$last")
adapter=$(sed -n 2p <<<"$last")
[[ $losses =~ ^val_loss_before=([0-9.]+)\ val_loss_after=([0-9.]+)$ ]] || { echo "FAIL: bad loss line: $losses"; exit 1; }
before=${BASH_REMATCH[1]} after=${BASH_REMATCH[2]}
[[ $adapter =~ ^adapter=(.+)$ ]] || { echo "FAIL: bad adapter line: $adapter"; exit 1; }
path=${BASH_REMATCH[1]}/adapter_model.safetensors
awk -v b="$before" -v a="$after" 'BEGIN { exit !(a < b) }' || { echo "FAIL: validation loss did not fall: $before -> $after"; exit 1; }
grep -q '"r": 4' "$work/adapter/adapter_config.json" || { echo "FAIL: adapter_config.json does not name r = 4"; exit 1; }

"$mpiexec" -n 2 "$@" "$binary" "${args[@]}" > "$work/run2.log"
grep -q "pretrain: reusing" "$work/run2.log" || { echo "FAIL: the second run did not reuse the base"; exit 1; }

# `sample` loads the base and the adapter back (every rank reads its own fragments) and continues a prompt.
sample_args=("${args[@]}")
sample_args[0]=sample
"$mpiexec" -n 2 "$@" "$binary" "${sample_args[@]}" --prompt "abc " --sample-tokens 8 > "$work/sample.log"
grep -q "^base:    abc " "$work/sample.log" || { echo "FAIL: no base sample"; cat "$work/sample.log"; exit 1; }
grep -q "^adapter: abc " "$work/sample.log" || { echo "FAIL: no adapter sample"; cat "$work/sample.log"; exit 1; }

merge_args=("${args[@]}")
merge_args[0]=merge
"$mpiexec" -n 2 "$@" "$binary" "${merge_args[@]}" > "$work/merge.log"
merge_line=$(grep '^merged_relative_error=' "$work/merge.log") || { echo "FAIL: no merge result"; cat "$work/merge.log"; exit 1; }
rel=${merge_line#merged_relative_error=}
awk -v r="$rel" 'BEGIN { exit !(r <= 1e-5) }' || { echo "FAIL: merged logits differ by $rel (relative)"; exit 1; }
grep -q "^merged=$work/merged$" "$work/merge.log" || { echo "FAIL: no merged= line"; exit 1; }

"$python" - "$work/base/model.safetensors" "$work/merged/model.safetensors" <<'PY'
import json, struct, sys
import numpy as np
def load(path):
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__", {})
    out = {}
    for name, t in header.items():
        b, e = t["data_offsets"]
        out[name] = np.frombuffer(raw[8 + n + b:8 + n + e], dtype="<f4").reshape(t["shape"])
    return out, meta
base, _ = load(sys.argv[1])
merged, meta = load(sys.argv[2])
assert sorted(base) == sorted(merged), (sorted(set(base) ^ set(merged)))
assert json.loads(meta["config"])["model_type"] == "llama", meta
for name, w in merged.items():
    assert "lora" not in name, name
    assert np.isfinite(w).all(), name
    folded = any(p in name for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
    if folded:
        assert np.abs(w - base[name]).max() > 0, name + " was not changed by the fold"
    else:
        assert np.array_equal(w, base[name]), name + " changed although it has no adapter"
print(f"merged ok: {len(merged)} tensors")
PY

"$python" - "$path" <<'PY'
import json, struct, sys
import numpy as np
path = sys.argv[1]
raw = open(path, "rb").read()
n = struct.unpack("<Q", raw[:8])[0]
header = json.loads(raw[8:8 + n])
header.pop("__metadata__", None)
assert header, "no tensors"
for name, t in header.items():
    assert name.startswith("base_model.model.model.layers.") and (".lora_A.weight" in name or ".lora_B.weight" in name), name
    assert t["dtype"] == "F32", (name, t["dtype"])
    b, e = t["data_offsets"]
    a = np.frombuffer(raw[8 + n + b:8 + n + e], dtype="<f4").reshape(t["shape"])
    assert np.isfinite(a).all(), name
    if ".lora_A." in name:
        assert a.shape[0] == 4, (name, a.shape)
    else:
        assert a.shape[1] == 4, (name, a.shape)
        assert np.abs(a).max() > 0, name + " is still zero: the adapter was not trained"
print(f"adapter ok: {len(header)} tensors")
PY
# Resume: the same fine-tune interrupted after 20 of 30 steps (checkpoints every 10) and resumed with --resume 1
# ends with the uninterrupted run's validation loss (the checkpoint holds the adapters, the optimizer state, the
# step and the data position; same world size and stage, so the runs are bitwise equal).
lora_args=("${args[@]}")
lora_args[0]=lora
"$mpiexec" -n 2 "$@" "$binary" "${lora_args[@]}" --save-every 10 --stop-after 20 > "$work/interrupted.log"
grep -q "stopping after step 20" "$work/interrupted.log" || { echo "FAIL: the run did not stop"; cat "$work/interrupted.log"; exit 1; }
[[ $(cat "$work/ckpt/latest") == step-000020 ]] || { echo "FAIL: ckpt/latest is not step-000020"; exit 1; }
[[ ! -d $work/ckpt/step-000000 && -d $work/ckpt/step-000010 ]] || { echo "FAIL: unexpected checkpoints: $(ls "$work/ckpt")"; exit 1; }
"$mpiexec" -n 2 "$@" "$binary" "${lora_args[@]}" --save-every 10 --resume 1 > "$work/resumed.log"
grep -q "resumed from $work/ckpt at step 20" "$work/resumed.log" || { echo "FAIL: no resume"; cat "$work/resumed.log"; exit 1; }
resumed=$(tail -n 2 "$work/resumed.log" | sed -n 's/^val_loss_before=[0-9.]* val_loss_after=\([0-9.]*\)$/\1/p')
[[ $resumed == "$after" ]] || { echo "FAIL: resumed run ends at validation loss '$resumed', uninterrupted at $after"; exit 1; }

# --targets: adapters on q and gate only; adapter_config.json and the adapter file say so. A bad list is refused.
"$mpiexec" -n 2 "$@" "$binary" "${lora_args[@]}" --lora-steps 3 --targets q,gate > "$work/targets.log"
"$python" -c 'import json, sys; sys.exit(json.load(open(sys.argv[1]))["target_modules"] != ["q_proj", "gate_proj"])' \
  "$work/adapter/adapter_config.json" ||
  { echo "FAIL: adapter_config.json does not list q_proj, gate_proj"; cat "$work/adapter/adapter_config.json"; exit 1; }
"$python" - "$path" <<'PY'
import json, struct, sys
raw = open(sys.argv[1], "rb").read()
header = json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]])
header.pop("__metadata__", None)
kinds = {name.split(".")[-3] for name in header}
assert kinds == {"q_proj", "gate_proj"}, kinds
PY
if "$mpiexec" -n 2 "$@" "$binary" "${lora_args[@]}" --targets q,nope > "$work/bad_targets.log" 2>&1; then
  echo "FAIL: --targets q,nope was accepted"; exit 1
fi
grep -q "subset of q,k,v,o,gate,up,down" "$work/bad_targets.log" || { echo "FAIL: no clear error"; cat "$work/bad_targets.log"; exit 1; }

# --synthetic-documents: the synthetic corpus grows (800 documents: 760 for training, every 20th for validation),
# in a data directory of its own; a count below 40 is refused naming the range.
"$mpiexec" -n 1 "$@" "$binary" prepare --out "$work" --data "$work/docs_data" --base-corpus synthetic \
  --tune-corpus synthetic --synthetic-documents 800 > "$work/docs.log"
grep -qE '^corpus synthetic +train [0-9]+ tokens \(760 docs\)' "$work/docs.log" ||
  { echo "FAIL: --synthetic-documents 800 did not give 760 training documents"; cat "$work/docs.log"; exit 1; }
if "$mpiexec" -n 1 "$@" "$binary" prepare --out "$work" --synthetic-documents 10 > "$work/docs_bad.log" 2>&1; then
  echo "FAIL: --synthetic-documents 10 was accepted"; exit 1
fi
grep -q "synthetic-documents must be 40..10000000" "$work/docs_bad.log" ||
  { echo "FAIL: no clear error for --synthetic-documents 10"; cat "$work/docs_bad.log"; exit 1; }

# --recompute 1: the run reports its measured activation peak and zero::EstimateActivations' within 10%, below the
# peak of the same micro-batch without recomputation (run1's fine-tune).
"$mpiexec" -n 2 "$@" "$binary" "${lora_args[@]}" --lora-steps 2 --recompute 1 > "$work/recompute.log"
peaks() { sed -n 's/^peak_activation_bytes=\([0-9]*\) estimated_activation_bytes=\([0-9]*\)$/\1 \2/p' "$1" | tail -n 1; }
read -r stored stored_est <<<"$(peaks "$work/run1.log")"
read -r recomputed recomputed_est <<<"$(peaks "$work/recompute.log")"
[[ -n $stored && -n $recomputed ]] || { echo "FAIL: no peak_activation_bytes line"; exit 1; }
awk -v m="$stored" -v e="$stored_est" -v rm="$recomputed" -v re="$recomputed_est" 'BEGIN {
  d1 = (e - m) / m; d2 = (re - rm) / rm; exit !(d1 <= 0.1 && d1 >= -0.1 && d2 <= 0.1 && d2 >= -0.1 && rm < m) }' ||
  { echo "FAIL: activations stored $stored (estimate $stored_est), recomputed $recomputed (estimate $recomputed_est)"; exit 1; }

echo "PASS: validation loss $before -> $after (resumed run: $resumed), adapter $path, activations $stored -> $recomputed bytes with --recompute"
