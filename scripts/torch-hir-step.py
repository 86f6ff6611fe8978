#!/usr/bin/env python3
"""One HIR training step in PyTorch eager, the baseline of the trainer bench.

The bench (`cargo bench -p hir-trainer --bench trainer`) writes the step it times to a
JSON file and runs this script on it, on the same CPU with the same number of threads,
so the two times can be printed side by side. The step is the same computation:

* the same model (a GGUF file, dequantized to f32 by transformers, or a Hugging Face
  folder) in training mode, f32;
* the same token ids: positive and negative sequences of each pair, right-padded per
  micro-batch, positions counted over real tokens;
* the language-model head applied only at the labelled positions, as the trainer does;
* the HIR loss of shared/HIR.md §1.6, each term a per-example token mean averaged over
  the examples: label-smoothed cross-entropy and entropy on the positive sequences, the
  two-way contrastive term on both;
* gradients accumulated over the micro-batches, the global norm clipped, AdamW.

Input (argv[1], JSON): model, pad, micro_batch, steps (timed, after one warm-up), threads,
lr, max_grad_norm, epsilon, contrastive_coef, entropy_coef, pairs: [{pos: {prompt,
completion}, neg: {...}}]. Output: one JSON line with the median step seconds, the peak
resident memory the steps added (MiB, Linux), and the first step's loss.

Needs torch, transformers, and gguf for a GGUF model; exits 3 when they are missing, so
the bench can skip the comparison.
"""

import json
import os
import statistics
import sys
import time

try:
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM
except ImportError as e:  # the bench prints the reason and goes on
    print(json.dumps({"skipped": f"{e}"}))
    sys.exit(3)


def load(path):
    if path.endswith(".gguf"):
        folder, name = os.path.split(os.path.abspath(path))
        return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def batch(examples, pad):
    """Right-padded ids, mask, positions, and for every row the (position, label) pairs:
    position t predicts token t + 1."""
    seqs = [e["prompt"] + e["completion"] for e in examples]
    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), t), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    spans = []
    for e in examples:
        start = len(e["prompt"]) - 1
        spans.append((start, e["completion"]))
    return ids, mask, positions, spans


def label_logprobs(model, ids, mask, positions, spans):
    """Log-probabilities `[B, L, V]` at each row's labelled positions (L the longest
    completion), the labels `[B, L]` and a 0/1 mask `[B, L]`."""
    hidden = model.model(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
    longest = max(len(c) for _, c in spans)
    index = torch.zeros((len(spans), longest), dtype=torch.long)
    labels = torch.zeros((len(spans), longest), dtype=torch.long)
    keep = torch.zeros((len(spans), longest))
    for i, (start, completion) in enumerate(spans):
        n = len(completion)
        index[i, :n] = torch.arange(start, start + n)
        labels[i, :n] = torch.tensor(completion)
        keep[i, :n] = 1
    picked = hidden.gather(1, index[:, :, None].expand(-1, -1, hidden.shape[-1]))
    return torch.log_softmax(model.lm_head(picked).float(), dim=-1), labels, keep


def hir_loss(model, pos, neg, pad, cfg):
    eps = cfg["label_smoothing"]
    lp, y, keep = label_logprobs(model, *batch(pos, pad))
    lpn, yn, keepn = label_logprobs(model, *batch(neg, pad))
    row = lambda x, k: (x * k).sum(-1) / k.sum(-1)
    nll = -lp.gather(2, y[:, :, None])[:, :, 0]
    smooth = -lp.mean(-1)
    ls = (1 - eps) * row(nll, keep) + eps * row(smooth, keep)
    nlln = -lpn.gather(2, yn[:, :, None])[:, :, 0]
    d = row(nll, keep) - row(nlln, keepn)  # log s⁻ − log s⁺
    r_pos = 1 / (d.exp() + 1)
    r_neg = 1 / ((-d).exp() + 1)
    con = -(1 - eps) * torch.log(r_pos + 1e-8) - eps * torch.log(r_neg + 1e-8)
    h = row(-(lp.exp() * lp).sum(-1), keep)
    return ls.mean() + cfg["contrastive_coef"] * con.mean() - cfg["entropy_coef"] * h.mean()


def main():
    spec = json.load(open(sys.argv[1]))
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    model = load(spec["model"]).train()
    opt = torch.optim.AdamW(model.parameters(), lr=spec["lr"], weight_decay=0.0)
    pairs = spec["pairs"]
    micro = spec["micro_batch"]
    chunks = [pairs[i : i + micro] for i in range(0, len(pairs), micro)]

    def step():
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for chunk in chunks:
            loss = hir_loss(model, [p["pos"] for p in chunk], [p["neg"] for p in chunk], spec["pad"], spec)
            (loss / len(chunks)).backward()
            total += loss.item() / len(chunks)
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec["max_grad_norm"])
        opt.step()
        return total

    # The peak resident size from here on (Linux: a write of 5 to clear_refs resets it).
    before = rss("VmRSS")
    try:
        open("/proc/self/clear_refs", "w").write("5")
    except OSError:
        before = None
    times, first = [], None
    for i in range(spec["steps"] + 1):
        t = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t)
        first = loss if first is None else first
    peak = rss("VmHWM")
    print(json.dumps({
        "step_s": statistics.median(times[1:]),
        "peak_mib": None if before is None or peak is None else (peak - before) / 1024,
        "first_loss": first,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }))


def rss(field):
    """A `/proc/self/status` size in KiB, or None."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


if __name__ == "__main__":
    main()
