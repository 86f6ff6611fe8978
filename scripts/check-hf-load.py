#!/usr/bin/env python3
"""Checks that checkpoint folders written by hindsight load in Hugging Face transformers.

For each folder: transformers loads it with no missing, unexpected or mis-shaped weight
(T5's `encoder.embed_tokens` / `decoder.embed_tokens` are tied to `shared`, as transformers
declares), every tensor it holds equals the one in `model.safetensors`, and the tokenizer
loads with the same vocabulary size.

    python3 -m venv /tmp/ref && /tmp/ref/bin/pip install torch==2.15.0 transformers==5.23.0
    cargo test -p hir-model --test t5_tiny --test llama_tiny    # writes target/tmp/*
    /tmp/ref/bin/python scripts/check-hf-load.py "$CARGO_TARGET_DIR"/tmp/t5_loaded ...

Exits non-zero on the first folder that does not load.
"""

import json
import os
import sys

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, PreTrainedTokenizerFast

TIED = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "model.embed_tokens.weight", "lm_head.weight")


def check(folder):
    cfg = json.load(open(os.path.join(folder, "config.json")))
    cls = AutoModelForSeq2SeqLM if cfg["model_type"] == "t5" else AutoModelForCausalLM
    model, info = cls.from_pretrained(folder, output_loading_info=True)
    missing = [k for k in info["missing_keys"] if k not in TIED]
    problems = missing + list(info["unexpected_keys"]) + [str(m) for m in info["mismatched_keys"]]
    if problems:
        raise SystemExit(f"{folder}: transformers reports {problems}")
    state = model.state_dict()
    saved = load_file(os.path.join(folder, "model.safetensors"))
    for name, tensor in saved.items():
        if name not in state:
            raise SystemExit(f"{folder}: {name} is not a weight of {cls.__name__}")
        if not torch.equal(state[name].to(tensor.dtype), tensor):
            raise SystemExit(f"{folder}: {name} differs after loading")
    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(folder, "tokenizer.json"))
    if len(tok) > cfg["vocab_size"]:
        raise SystemExit(f"{folder}: tokenizer has {len(tok)} tokens, vocabulary {cfg['vocab_size']}")
    print(f"{folder}: {cfg['model_type']} loads as {type(model).__name__}, {len(saved)} tensors equal")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    for f in sys.argv[1:]:
        check(f)
