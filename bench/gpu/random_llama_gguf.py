#!/usr/bin/env python3
"""bench/gpu/random_llama_gguf.py: writes a randomly initialised LLaMA-style GGUF that the LoRA example loads with
`--base smollm2 --gguf PATH`, so that the example runs at SmolLM2-135M's shape without the real weights (which
would not fit the GPU run's 64 MiB transfer and need a download). Speed does not depend on the values.

The file has what examples/lora_finetune/gguf_llama.cc and tokenizer.cc read: general.architecture = llama, the
llama.* sizes, the RMSNorm epsilon and RoPE base, a byte-level BPE vocabulary ('gpt2') of --vocab tokens (the 256
byte symbols, then filler tokens, no merges: text becomes one token per byte, every id below 256, while the
embedding and the logits have the full vocabulary), and the tensors under llama.cpp's names in BF16 (norm
weights 1, everything else N(0, 0.02) drawn once per 1 Mi values and repeated: fast without numpy). The head is
tied to the embedding (no output.weight), as in SmolLM2.

usage: random_llama_gguf.py OUT.gguf [--layers 30 --dim 576 --heads 9 --kv-heads 3 --ffn 1536 --vocab 49152]
Defaults are SmolLM2-135M's shape. No dependencies beyond the standard library.
"""
import argparse
import random
import struct
import sys

GGUF_UINT32, GGUF_FLOAT32, GGUF_STRING, GGUF_ARRAY = 4, 6, 8, 9
GGML_F32, GGML_BF16 = 0, 30
ALIGN = 32


def byte_symbols():
    """GPT-2's byte-to-unicode map: printable bytes stand for themselves, the rest are shifted past 255."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


class Writer:
    def __init__(self):
        self.kv = bytearray()
        self.kv_count = 0
        self.tensors = []  # (name, shape row-major, ggml type, bytes)

    @staticmethod
    def _str(s):
        b = s.encode("utf-8")
        return struct.pack("<Q", len(b)) + b

    def string(self, key, value):
        self.kv += self._str(key) + struct.pack("<I", GGUF_STRING) + self._str(value)
        self.kv_count += 1

    def u32(self, key, value):
        self.kv += self._str(key) + struct.pack("<II", GGUF_UINT32, value)
        self.kv_count += 1

    def f32(self, key, value):
        self.kv += self._str(key) + struct.pack("<If", GGUF_FLOAT32, value)
        self.kv_count += 1

    def strings(self, key, values):
        self.kv += self._str(key) + struct.pack("<IIQ", GGUF_ARRAY, GGUF_STRING, len(values))
        self.kv += b"".join(self._str(v) for v in values)
        self.kv_count += 1

    def tensor(self, name, shape, ggml_type, data):
        self.tensors.append((name, shape, ggml_type, data))

    def write(self, path):
        with open(path, "wb") as f:
            f.write(b"GGUF" + struct.pack("<IQQ", 3, len(self.tensors), self.kv_count))
            f.write(self.kv)
            offset = 0
            offsets = []
            for name, shape, ggml_type, data in self.tensors:
                offsets.append(offset)
                offset = (offset + len(data) + ALIGN - 1) // ALIGN * ALIGN
            for (name, shape, ggml_type, data), off in zip(self.tensors, offsets):
                f.write(self._str(name) + struct.pack("<I", len(shape)))
                for d in reversed(shape):  # GGUF lists the innermost dimension first
                    f.write(struct.pack("<Q", d))
                f.write(struct.pack("<IQ", ggml_type, off))
            pos = f.tell()
            f.write(b"\0" * ((ALIGN - pos % ALIGN) % ALIGN))
            start = f.tell()
            for (name, shape, ggml_type, data), off in zip(self.tensors, offsets):
                f.write(b"\0" * (start + off - f.tell()))
                f.write(data)


def bf16_block(count, seed):
    """`count` BF16 values of N(0, 0.02) (truncated float32 bits), as bytes."""
    rng = random.Random(seed)
    out = bytearray(2 * count)
    for i in range(count):
        bits = struct.unpack("<I", struct.pack("<f", rng.gauss(0.0, 0.02)))[0]
        struct.pack_into("<H", out, 2 * i, bits >> 16)
    return bytes(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--dim", type=int, default=576)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--ffn", type=int, default=1536)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    if a.vocab < 256 or a.dim % a.heads or a.heads % a.kv_heads:
        sys.exit("random_llama_gguf.py: need vocab >= 256, heads dividing dim, kv-heads dividing heads")
    head_dim = a.dim // a.heads
    kv = head_dim * a.kv_heads
    block = bf16_block(1 << 20, a.seed)

    def random_bf16(n):
        reps = (2 * n + len(block) - 1) // len(block)
        return (block * reps)[: 2 * n]

    w = Writer()
    w.string("general.architecture", "llama")
    w.string("general.name", "random-init LLaMA (zero GPU benchmark)")
    w.u32("llama.block_count", a.layers)
    w.u32("llama.embedding_length", a.dim)
    w.u32("llama.feed_forward_length", a.ffn)
    w.u32("llama.attention.head_count", a.heads)
    w.u32("llama.attention.head_count_kv", a.kv_heads)
    w.u32("llama.context_length", 8192)
    w.u32("llama.vocab_size", a.vocab)
    w.f32("llama.rope.freq_base", 100000.0)
    w.f32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.string("tokenizer.ggml.model", "gpt2")
    tokens = byte_symbols() + [f"<|bench_{i}|>" for i in range(a.vocab - 256)]
    w.strings("tokenizer.ggml.tokens", tokens)
    w.strings("tokenizer.ggml.merges", [])
    ones = struct.pack("<f", 1.0)
    w.tensor("token_embd.weight", [a.vocab, a.dim], GGML_BF16, random_bf16(a.vocab * a.dim))
    for i in range(a.layers):
        p = f"blk.{i}."
        w.tensor(p + "attn_norm.weight", [a.dim], GGML_F32, ones * a.dim)
        w.tensor(p + "attn_q.weight", [a.dim, a.dim], GGML_BF16, random_bf16(a.dim * a.dim))
        w.tensor(p + "attn_k.weight", [kv, a.dim], GGML_BF16, random_bf16(kv * a.dim))
        w.tensor(p + "attn_v.weight", [kv, a.dim], GGML_BF16, random_bf16(kv * a.dim))
        w.tensor(p + "attn_output.weight", [a.dim, a.dim], GGML_BF16, random_bf16(a.dim * a.dim))
        w.tensor(p + "ffn_norm.weight", [a.dim], GGML_F32, ones * a.dim)
        w.tensor(p + "ffn_gate.weight", [a.ffn, a.dim], GGML_BF16, random_bf16(a.ffn * a.dim))
        w.tensor(p + "ffn_up.weight", [a.ffn, a.dim], GGML_BF16, random_bf16(a.ffn * a.dim))
        w.tensor(p + "ffn_down.weight", [a.dim, a.ffn], GGML_BF16, random_bf16(a.dim * a.ffn))
    w.tensor("output_norm.weight", [a.dim], GGML_F32, ones * a.dim)
    w.write(a.out)
    print(f"random_llama_gguf: wrote {a.out} ({a.layers} layers, dim {a.dim}, {a.heads}/{a.kv_heads} heads, "
          f"ffn {a.ffn}, vocab {a.vocab})")


if __name__ == "__main__":
    main()
