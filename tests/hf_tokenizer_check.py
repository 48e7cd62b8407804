#!/usr/bin/env python3
"""Loads the tokenizer directories hf_files_test wrote (HfTokenizerFixture.Write) with transformers and checks that
Hugging Face tokenizes each text to the ids BpeTokenizer gave, and decodes them back.

Usage: hf_tokenizer_check.py DIR

DIR/bpe: a vocabulary with control and user-defined tokens, byte symbols out of byte order and 300 merges learned
from a small corpus; DIR/bytes: the small base's byte-level tokenizer (ids are the bytes). Each holds
tokenizer.json, tokenizer_config.json and expected.json ([{"text", "ids"}]).
"""
import json
import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def fail(msg):
    print(f"hf_tokenizer_check: FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


try:
    import transformers
except ImportError as e:
    fail(f"{e}: install the Python packages with scripts/deps.sh")


def main():
    root = sys.argv[1]
    for name in ("bpe", "bytes"):
        path = os.path.join(root, name)
        tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        if not tok.is_fast:
            fail(f"{path}: loaded a slow tokenizer ({type(tok).__name__})")
        with open(os.path.join(path, "expected.json")) as f:
            cases = json.load(f)
        for case in cases:
            text, want = case["text"], case["ids"]
            got = tok(text, add_special_tokens=False)["input_ids"]
            if got != want:
                fail(f"{name}: {text!r}: Hugging Face gives {got}, BpeTokenizer {want}")
            back = tok.decode(got)
            if back != text:
                fail(f"{name}: {text!r}: decodes back to {back!r}")
        print(f"hf_tokenizer_check: {name}: {len(cases)} texts, same ids ({len(tok)} tokens)")
    print("hf_tokenizer_check: OK")


if __name__ == "__main__":
    main()
