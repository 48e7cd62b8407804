#!/usr/bin/env python3
"""Loads the LoRA example's Hugging Face directories with transformers and PEFT, as a user would, and compares
their logits with the example's own.

Usage: hf_load_check.py OUT LOGITS [--auto-peft]

OUT is the example's --out: OUT/base (config.json, model.safetensors, tokenizer files), OUT/adapter
(adapter_config.json, adapter_model.safetensors) and OUT/merged (like base). LOGITS is what `merge --logits-out`
wrote: the validation batch's token ids and zero's logits of the base, the adapted and the merged model, and a
prompt with its token ids. Checks, each failing with what differs:
  * config.json parses as a LlamaConfig with every field the example's model depends on;
  * AutoModelForCausalLM.from_pretrained(OUT/base) gives LlamaForCausalLM whose logits on the batch equal zero's
    base logits, PeftModel.from_pretrained(that, OUT/adapter) the adapted ones, AutoModelForCausalLM on OUT/merged
    the merged ones, each within 1e-5 of the largest |logit| (below);
  * the adapter matters: it moves the logits by more than 100 times that tolerance, so the comparison above would
    see an adapter that was not applied, transposed or unscaled;
  * with --auto-peft, AutoPeftModelForCausalLM.from_pretrained(OUT/adapter) finds the base through
    adapter_config.json's base_model_name_or_path (a local path for the small base) and gives the adapted logits;
  * AutoTokenizer.from_pretrained on OUT/base and OUT/merged encodes the prompt to the example's ids and decodes
    them back to the prompt.
Nothing is downloaded: HF_HUB_OFFLINE=1 and local paths only.

Tolerance: both sides compute in fp32 and differ only in rounding: summation order in the matrix products (OpenBLAS
against torch's kernels), rsqrt against 1/sqrt, RoPE's cos/sin computed by different code, softmax's reduction
order. Each is a few units of 2^-24 (6e-8) relative to the magnitudes summed, compounded over the layers; measured
about 1e-6 relative on the tiny test model. A real mistake (a transposed or permuted weight, a wrong eps, RoPE
layout, tie or adapter scale) moves logits by a large fraction of their size.
"""
import json
import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TOLERANCE = 1e-5


def fail(msg):
    print(f"hf_load_check: FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


try:
    import torch
    import transformers
    import peft
    from safetensors.torch import load_file, safe_open
except ImportError as e:
    fail(f"{e}: install the Python packages with scripts/deps.sh (Debian's python3-torch, pinned transformers/peft)")


def fp32():
    """from_pretrained's keyword for fp32 weights: `dtype` since transformers 4.56, which deprecates `torch_dtype`
    (it warns in 5.x and is to go in 6); the pinned 4.40 knows only `torch_dtype`."""
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": torch.float32}


def relative_error(got, want):
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


def compare(label, got, want):
    if got.shape != want.shape:
        fail(f"{label}: logits of shape {tuple(got.shape)}, zero's {tuple(want.shape)}")
    rel = relative_error(got, want)
    print(f"hf_load_check: {label}: max |transformers - zero| / max |zero| = {rel:.3g} (limit {TOLERANCE:g})")
    if not rel <= TOLERANCE:
        fail(f"{label}: logits differ from zero's by {rel:.3g} relative")
    return rel


def logits_of(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens).logits.float()


def check_config(path):
    with open(os.path.join(path, "config.json")) as f:
        raw = json.load(f)
    for key in ("architectures", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "rope_theta", "rms_norm_eps", "tie_word_embeddings", "vocab_size",
                "max_position_embeddings", "torch_dtype"):
        if key not in raw:
            fail(f"{path}/config.json lacks {key}")
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    if not isinstance(config, transformers.LlamaConfig):
        fail(f"{path}/config.json reads as {type(config).__name__}, not LlamaConfig")
    return config


def check_tokenizer(path, prompt, prompt_ids):
    tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    if ids != prompt_ids:
        fail(f"{path}: the tokenizer encodes {prompt!r} to {ids}, the example to {prompt_ids}")
    text = tok.decode(ids)
    if text != prompt:
        fail(f"{path}: the tokenizer decodes {ids} to {text!r}, not {prompt!r}")
    print(f"hf_load_check: {path}: tokenizer ok ({len(ids)} ids for {prompt!r})")


def main():
    if len(sys.argv) < 3:
        fail("usage: hf_load_check.py OUT LOGITS [--auto-peft]")
    out, logits_path = sys.argv[1], sys.argv[2]
    auto_peft = "--auto-peft" in sys.argv[3:]
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    base_dir, adapter_dir, merged_dir = (os.path.join(out, d) for d in ("base", "adapter", "merged"))

    zero = load_file(logits_path)
    with safe_open(logits_path, framework="pt") as f:
        meta = f.metadata()
    tokens = zero["tokens"].to(torch.long)
    if not torch.equal(tokens.to(torch.float32), zero["tokens"]):
        fail("token ids in the logits file are not integers")
    prompt = meta["prompt"]
    prompt_ids = [int(x) for x in meta["prompt_ids"].split(",")] if meta["prompt_ids"] else []

    config = check_config(base_dir)
    check_config(merged_dir)
    if config.vocab_size != zero["base"].shape[-1]:
        fail(f"config.json says vocab_size {config.vocab_size}, zero's logits have {zero['base'].shape[-1]}")

    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, local_files_only=True,
                                                             **fp32())
    if not isinstance(base, transformers.LlamaForCausalLM):
        fail(f"{base_dir} loads as {type(base).__name__}")
    base.eval()
    compare("base", logits_of(base, tokens), zero["base"])

    adapted = peft.PeftModel.from_pretrained(base, adapter_dir, is_trainable=False)
    adapted.eval()
    compare("adapter (PeftModel.from_pretrained)", logits_of(adapted, tokens), zero["adapter"])
    effect = relative_error(zero["adapter"], zero["base"])
    print(f"hf_load_check: the adapter moves zero's logits by {effect:.3g} relative")
    if not effect > 100 * TOLERANCE:
        fail(f"the adapter moves logits by only {effect:.3g}: the comparison could not tell it was applied")

    if auto_peft:
        with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
            named = json.load(f)["base_model_name_or_path"]
        if os.path.realpath(named) != os.path.realpath(base_dir):
            fail(f"adapter_config.json names {named!r} as the base, not {base_dir}")
        auto = peft.AutoPeftModelForCausalLM.from_pretrained(adapter_dir, **fp32())
        auto.eval()
        compare("adapter (AutoPeftModelForCausalLM)", logits_of(auto, tokens), zero["adapter"])

    merged = transformers.AutoModelForCausalLM.from_pretrained(merged_dir, local_files_only=True,
                                                               **fp32())
    merged.eval()
    compare("merged", logits_of(merged, tokens), zero["merged"])

    check_tokenizer(base_dir, prompt, prompt_ids)
    check_tokenizer(merged_dir, prompt, prompt_ids)
    print(f"hf_load_check: OK (transformers {transformers.__version__}, peft {peft.__version__}, "
          f"torch {torch.__version__})")


if __name__ == "__main__":
    main()
