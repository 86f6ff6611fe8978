#!/usr/bin/env python3
"""Checks that LoRA adapter folders written by hindsight load in Hugging Face PEFT.

    python3 scripts/check-peft-load.py BASE ADAPTER [EXPECTED]

BASE is the base model: a Hugging Face folder or a .gguf file (transformers dequantizes
it; needs the `gguf` package). ADAPTER is a folder hindsight wrote (`adapter_config.json`,
`adapter_model.safetensors`). The check:

- `PeftModel.from_pretrained(base, ADAPTER)` loads it with no missing or unexpected
  adapter weight, and its config has the file's rank, alpha and targets;
- every `lora_A` / `lora_B` tensor PEFT holds equals the file's;
- with EXPECTED (a safetensors file with `input_ids` and the `logits` hindsight computed
  for them with the adapter applied), PEFT's logits for those ids match within 1e-4
  relative to their scale, and differ from the base model's (the adapter is not a no-op).

    pip install torch transformers peft safetensors gguf
    cargo test -p hir-model --test lora        # writes target/tmp/lora_saved/{adapter,expected.safetensors}
    python3 scripts/check-peft-load.py crates/hir-model/tests/fixtures/llama \\
        "$CARGO_TARGET_DIR"/tmp/lora_saved/adapter "$CARGO_TARGET_DIR"/tmp/lora_saved/expected.safetensors

Exits non-zero on the first problem.
"""

import json
import os
import sys

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


def load_base(path):
    if path.endswith(".gguf"):
        folder, name = os.path.split(os.path.abspath(path))
        return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def check(base_path, adapter, expected=None):
    cfg = json.load(open(os.path.join(adapter, "adapter_config.json")))
    base = load_base(base_path).eval()
    base_logits = None
    if expected:
        want = load_file(expected)
        ids = want["input_ids"].to(torch.long)
        with torch.no_grad():
            base_logits = base(input_ids=ids).logits.clone()
    model = PeftModel.from_pretrained(base, adapter).eval()
    pc = model.peft_config["default"]
    if (pc.r, float(pc.lora_alpha), sorted(pc.target_modules)) != (
        cfg["r"], float(cfg["lora_alpha"]), sorted(cfg["target_modules"])
    ):
        raise SystemExit(f"{adapter}: PEFT read r={pc.r} alpha={pc.lora_alpha} targets={pc.target_modules}")
    saved = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    state = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    # PEFT names loaded tensors `...lora_A.default.weight`; the file has `...lora_A.weight`.
    loaded = {k.replace(".default.weight", ".weight"): v for k, v in state.items()}
    missing = sorted(set(loaded) - set(saved))
    unexpected = sorted(set(saved) - set(loaded))
    if missing or unexpected:
        raise SystemExit(f"{adapter}: PEFT expects {missing[:4]} missing, {unexpected[:4]} unexpected")
    for name, tensor in saved.items():
        if not torch.equal(loaded[name].to(tensor.dtype), tensor):
            raise SystemExit(f"{adapter}: {name} differs after loading")
    line = f"{adapter}: PEFT loads {len(saved)} adapter tensors (r={pc.r}, alpha={pc.lora_alpha}, {sorted(pc.target_modules)})"
    if expected:
        with torch.no_grad():
            got = model(input_ids=ids).logits
        scale = want["logits"].abs().max().item()
        err = (got - want["logits"]).abs().max().item()
        moved = (want["logits"] - base_logits).abs().max().item()
        if err > 1e-4 * max(scale, 1.0):
            raise SystemExit(f"{adapter}: PEFT's logits differ from hindsight's by {err:.3g} (scale {scale:.3g})")
        if moved <= 10 * err:
            raise SystemExit(f"{adapter}: the adapter moves the logits by {moved:.3g} only; the check proves nothing")
        line += f"; logits equal hindsight's within {err:.2g} (the adapter moves them by {moved:.2g})"
    print(line)


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        raise SystemExit(__doc__)
    check(*sys.argv[1:])
