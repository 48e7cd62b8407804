#!/usr/bin/env python3
"""Reads Engine::Export's safetensors files with numpy alone and compares them with the engine's parameters.

Usage: checkpoint_export_check.py DIR

DIR holds what checkpoint_test's ExportFixture wrote: model.safetensors (every parameter, F32, names "model.*",
metadata format=pt), adapters.safetensors (trainable parameters only, BF16) and ref/<name>.f32 (each parameter's
fp32 values as the engine holds them). model.safetensors must equal the references exactly; adapters.safetensors
must hold every trainable reference rounded to bf16 (nearest, ties to even) and no frozen parameter.
"""
import json
import os
import struct
import sys

import numpy as np

DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": "<u2"}


def fail(msg):
    print(f"checkpoint_export_check: FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def load(path):
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    meta = header.pop("__metadata__", {})
    spans = sorted((v["data_offsets"][0], v["data_offsets"][1], k) for k, v in header.items())
    at = 0
    for b, e, k in spans:  # the safetensors rule: contiguous, no holes, no overlaps
        if b != at:
            fail(f"{path}: tensor {k} starts at {b}, expected {at}")
        at = e
    if at != len(data):
        fail(f"{path}: tensors cover {at} of {len(data)} data bytes")
    tensors = {}
    for k, v in header.items():
        b, e = v["data_offsets"]
        arr = np.frombuffer(data[b:e], dtype=DTYPES[v["dtype"]])
        if arr.size != int(np.prod(v["shape"], dtype=np.int64)):
            fail(f"{path}: {k} has {arr.size} elements for shape {v['shape']}")
        tensors[k] = (v["dtype"], arr)
    return tensors, meta


def to_bf16_bits(x):
    u = x.astype("<f4").view("<u4").astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype("<u2")


def main():
    d = sys.argv[1]
    refs = {}
    for name in os.listdir(os.path.join(d, "ref")):
        refs[name[: -len(".f32")]] = np.fromfile(os.path.join(d, "ref", name), dtype="<f4")
    model, meta = load(os.path.join(d, "model.safetensors"))
    if meta.get("format") != "pt":
        fail(f"model.safetensors metadata {meta} lacks format=pt")
    if set(model) != set(refs):
        fail(f"model.safetensors has {sorted(model)}, expected {sorted(refs)}")
    for k, (dt, arr) in model.items():
        if dt != "F32" or not np.array_equal(arr, refs[k]):
            fail(f"model.safetensors {k} ({dt}) differs from the engine's values")
    adapters, _ = load(os.path.join(d, "adapters.safetensors"))
    if "model.frozen.f" in adapters or len(adapters) != len(refs) - 1:
        fail(f"adapters.safetensors holds {sorted(adapters)}: expected every trainable parameter and no frozen one")
    for k, (dt, arr) in adapters.items():
        if dt != "BF16" or not np.array_equal(arr, to_bf16_bits(refs[k])):
            fail(f"adapters.safetensors {k} is not the engine's value rounded to bf16")
    print(f"checkpoint_export_check: OK: {len(model)} tensors in model.safetensors, {len(adapters)} in adapters")


if __name__ == "__main__":
    main()
