#!/usr/bin/env python3
"""bench/gpu/torch_lora.py: the LoRA example's job in PyTorch, for tokens/s side by side with zero's example.

A LLaMA model at SmolLM2-135M's shape (30 layers, hidden 576, 9 query and 3 key/value heads, feed-forward 1536,
vocabulary 49152, tied embeddings; random initialisation: speed does not depend on the values) from Hugging Face
transformers, LoRA adapters on q, k, v and o (r = 8, alpha = 16, no dropout: the example's SmolLM2 defaults) from
PEFT when it imports, else an equivalent hand-written LoRA, the base frozen in bf16, the adapters in fp32 under
bf16 autocast (bf16 products with fp32 accumulation and an fp32 master, as the example's CUDA model and zero's
bf16 parameters), fused AdamW (weight decay 0.01), gradient clipping at 1.0 as the example does, random token ids.
Each step: `micro` micro-batches of batch x seq tokens, backward, clip, step, zero_grad, then a device
synchronisation; tokens/s is batch x seq x micro over the median step time after the warm-up steps.

Prints one JSON object (and writes it to --json): versions, GPU, shapes, the per-step times, tokens_per_s, peak
memory. Needs torch and transformers (the GPU machine's image has both, and PEFT); --device cpu runs anywhere.

usage: torch_lora.py [--batch 8] [--seq 512] [--micro 1] [--steps 20] [--warmup 3] [--json PATH]
                     [--lora auto|peft|manual] [--attn sdpa|eager] [--compile 0|1] [--device cuda|cpu]
                     [--layers 30 --dim 576 --heads 9 --kv-heads 3 --ffn 1536 --vocab 49152]
"""
import argparse
import json
import math
import platform
import statistics
import sys
import time


def parse():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--micro", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3, help="first steps left out of the median")
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--targets", default="q,k,v,o")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lora", choices=["auto", "peft", "manual"], default="auto")
    ap.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa")
    ap.add_argument("--compile", type=int, default=0)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--dim", type=int, default=576)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--ffn", type=int, default=1536)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", default="")
    return ap.parse_args()


def manual_lora(torch, model, targets, r, alpha, dropout):
    """Wraps every targeted nn.Linear in `model` (q_proj, ...) with y = W x + (alpha / r) B A dropout(x): A
    Kaiming-uniform, B zero (PEFT's initialisation), both fp32."""
    nn = torch.nn

    class LoraLinear(nn.Module):
        def __init__(self, base):
            super().__init__()
            self.base = base
            self.scale = alpha / r
            dev = base.weight.device
            self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=dev, dtype=torch.float32))
            self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=dev, dtype=torch.float32))
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

        def forward(self, x):
            return self.base(x) + (self.drop(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scale

    names = {f"{t}_proj" for t in targets}
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if child_name in names and isinstance(child, nn.Linear):
                setattr(module, child_name, LoraLinear(child))
    return model


def main():
    a = parse()
    try:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as e:  # the GPU image has both; say what is missing elsewhere
        sys.exit(f"torch_lora.py: {e} (needs torch and transformers)")
    torch.manual_seed(a.seed)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("torch_lora.py: --device cuda but torch sees no GPU")
    config = LlamaConfig(vocab_size=a.vocab, hidden_size=a.dim, intermediate_size=a.ffn, num_hidden_layers=a.layers,
                         num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, tie_word_embeddings=True,
                         rope_theta=100000.0, rms_norm_eps=1e-5, max_position_embeddings=max(2048, a.seq),
                         attention_dropout=0.0)
    config._attn_implementation = a.attn
    model = LlamaForCausalLM(config).to(device=device, dtype=torch.bfloat16)
    for p in model.parameters():
        p.requires_grad_(False)
    targets = [t.strip() for t in a.targets.split(",") if t.strip()]
    lora_impl, peft_version = "manual", None
    if a.lora in ("auto", "peft"):
        try:
            import peft
            from peft import LoraConfig, get_peft_model

            cfg = LoraConfig(r=a.r, lora_alpha=a.alpha, lora_dropout=a.dropout, bias="none", task_type="CAUSAL_LM",
                             target_modules=[f"{t}_proj" for t in targets])
            model = get_peft_model(model, cfg)
            for n, p in model.named_parameters():  # adapters in fp32 (PEFT's default; made explicit)
                if p.requires_grad:
                    p.data = p.data.float()
            lora_impl, peft_version = "peft", peft.__version__
        except ImportError:
            if a.lora == "peft":
                sys.exit("torch_lora.py: --lora peft but peft does not import")
    if lora_impl == "manual":
        model = manual_lora(torch, model, targets, a.r, a.alpha, a.dropout)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    n_total = sum(p.numel() for p in model.parameters())
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(trainable, lr=a.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, fused=fused)
    fwd = torch.compile(model) if a.compile else model
    gen = torch.Generator(device="cpu").manual_seed(a.seed)
    batches = [torch.randint(0, a.vocab, (a.batch, a.seq), generator=gen).to(device) for _ in range(4)]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for step in range(a.steps):
        sync()
        t0 = time.perf_counter()
        total = 0.0
        for m in range(a.micro):
            ids = batches[(step * a.micro + m) % len(batches)]
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
                out = fwd(input_ids=ids, labels=ids)
            (out.loss / a.micro).backward()
            total += out.loss.detach()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t0)
        losses.append(float(total) / a.micro)
    timed = times[a.warmup:] if len(times) > a.warmup else times
    step_s = statistics.median(timed)
    tokens = a.batch * a.seq * a.micro
    result = {
        "impl": "pytorch",
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "peft": peft_version,
        "lora_impl": lora_impl,
        "attn": a.attn,
        "compile": bool(a.compile),
        "python": platform.python_version(),
        "device": a.device,
        "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else "none",
        "shape": {"layers": a.layers, "dim": a.dim, "heads": a.heads, "kv_heads": a.kv_heads, "ffn": a.ffn,
                  "vocab": a.vocab, "tied": True},
        "lora": {"r": a.r, "alpha": a.alpha, "dropout": a.dropout, "targets": targets},
        "batch": a.batch, "seq": a.seq, "micro": a.micro, "steps": a.steps, "warmup": a.warmup,
        "dtype": "bf16 base, fp32 adapters, bf16 autocast",
        "trainable_params": n_trainable,
        "total_params": n_total,
        "step_s": times,
        "step_s_median": step_s,
        "tokens_per_step": tokens,
        "tokens_per_s": tokens / step_s,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
    }
    text = json.dumps(result, indent=1)
    print(text)
    if a.json:
        with open(a.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
