#!/usr/bin/env python3
"""Checks a .safetensors file with numpy alone (no `safetensors` package): header layout and tensor values.

Usage: safetensors_numpy_check.py FILE [--expect NAME=DTYPE:SHAPE:SCALE ...] [--meta KEY=VALUE ...]

SHAPE is comma-separated dimensions ('' for a scalar). Each expected tensor holds the closed form
value[i] = ((i % 17) - 8) * 0.125 * SCALE in row-major order (exact in F32, F16 and BF16). The file must hold
exactly the expected tensors and at least the given metadata. Exits non-zero with a message on any mismatch.
"""
import argparse
import json
import struct
import sys

import numpy as np

DTYPES = {"F32": ("<f4", 4), "F16": ("<f2", 2), "BF16": ("<u2", 2)}


def fail(msg):
    print(f"safetensors_numpy_check: FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def load(path):
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8:
        fail(f"{path}: {len(raw)} bytes, shorter than the header length")
    (n,) = struct.unpack("<Q", raw[:8])
    if 8 + n > len(raw):
        fail(f"{path}: header length {n} past end of file ({len(raw)} bytes)")
    header_bytes = raw[8 : 8 + n]
    if (8 + n) % 8 != 0:
        fail(f"{path}: data section starts at {8 + n}, not 8-byte aligned")
    text = header_bytes.decode("utf-8")
    if text.rstrip(" ") != text.rstrip() or not text.rstrip(" ").endswith("}"):
        fail(f"{path}: header padding is not spaces after the JSON object")
    header = json.loads(text)
    data = raw[8 + n :]
    metadata = header.pop("__metadata__", {})
    tensors = {}
    end = 0
    for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        if set(info) != {"dtype", "shape", "data_offsets"}:
            fail(f"{name}: fields {sorted(info)}")
        np_dtype, size = DTYPES[info["dtype"]]
        begin, stop = info["data_offsets"]
        if begin != end:
            fail(f"{name}: begins at {begin}, previous tensor ended at {end}")
        count = int(np.prod(info["shape"], dtype=np.int64))
        if stop - begin != count * size:
            fail(f"{name}: {stop - begin} bytes for shape {info['shape']} {info['dtype']}")
        array = np.frombuffer(data[begin:stop], dtype=np_dtype)
        if info["dtype"] == "BF16":
            array = (array.astype(np.uint32) << 16).view(np.float32)
        tensors[name] = (info["dtype"], tuple(info["shape"]), array.astype(np.float32).reshape(info["shape"]))
        end = stop
    if end != len(data):
        fail(f"tensor data ends at {end}, data section has {len(data)} bytes")
    return tensors, metadata


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("file")
    parser.add_argument("--expect", action="append", default=[])
    parser.add_argument("--meta", action="append", default=[])
    args = parser.parse_args()
    tensors, metadata = load(args.file)

    expected_names = set()
    for spec in args.expect:
        name, rest = spec.split("=", 1)
        dtype, shape_text, scale = rest.split(":")
        shape = tuple(int(d) for d in shape_text.split(",") if d)
        expected_names.add(name)
        if name not in tensors:
            fail(f"missing tensor {name}")
        got_dtype, got_shape, values = tensors[name]
        if (got_dtype, got_shape) != (dtype, shape):
            fail(f"{name}: {got_dtype} {got_shape}, expected {dtype} {shape}")
        i = np.arange(values.size, dtype=np.int64)
        want = (((i % 17) - 8) * 0.125 * float(scale)).astype(np.float32).reshape(shape)
        if not np.array_equal(values, want):
            fail(f"{name}: values {values.ravel()[:8]} ..., expected {want.ravel()[:8]} ...")
    if set(tensors) != expected_names:
        fail(f"tensors {sorted(tensors)}, expected {sorted(expected_names)}")
    for kv in args.meta:
        key, value = kv.split("=", 1)
        if metadata.get(key) != value:
            fail(f"metadata[{key!r}] = {metadata.get(key)!r}, expected {value!r}")
    print(f"safetensors_numpy_check: OK: {len(tensors)} tensors, {len(metadata)} metadata keys in {args.file}")


if __name__ == "__main__":
    main()
