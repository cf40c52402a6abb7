#!/usr/bin/env python
"""One SFT step (forward, backward, AdamW step) of the embedded default model, three ways:

* ``avar``  -- ``avar-kernels train sft``: ``"avar"`` attention, ``AvarSFTTrainer.compute_loss`` (LM loss +
  0.15 L_enh + 0.15 L_sup on the masses recorded through the fused kernels);
* ``eager`` -- the published AVAR code's way: eager attention with ``output_attentions=True``, the same loss on the
  attention weights summed per class;
* ``sdpa``  -- plain SFT with ``"sdpa"``: LM loss only.

The sample is the embedded task's chat layout grown to S tokens: the system turn, an image of about S/2 image
tokens (a larger procedural scene), the question, and a response cut at S (``cutoff_len``). Memory: each
(variant, S) in a fresh subprocess, the step's peak beyond the model, its gradients and the optimizer state
(avar_kernels.benchmark.peak_memory). Time: one more subprocess per S holds one model and switches its attention
implementation between the variants, timed interleaved (avar_kernels.benchmark.compare).

    python bench/bench_sft_step.py --seq 512 1024 2048          # writes bench/results/sft_step_cpu.*
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from avar_kernels import benchmark as bm  # noqa: E402

VARIANTS = ("avar", "eager", "sdpa")


def batch_of_length(seq):
    """An SFT batch (SFTCollator) of one embedded-task sample with exactly ``seq`` tokens, about half of them image."""
    import numpy as np
    from transformers import Qwen2VLImageProcessorPil

    from avar_kernels.train import embedded as E
    from avar_kernels.train.batches import SFTCollator, encode_conversation
    from avar_kernels.train.processing import QwenVLProcessor
    from avar_kernels.train.run import embedded_conversation

    side = max(1, round(math.sqrt(seq / 2)))                         # image tokens per side (one per 12 px cell)
    cell = E.CELL
    pixels = (side * cell) ** 2
    processor = QwenVLProcessor(Qwen2VLImageProcessorPil(patch_size=E.PATCH, merge_size=E.MERGE,
                                                         temporal_patch_size=2,
                                                         size={"shortest_edge": pixels, "longest_edge": pixels}),
                                E.tokenizer())
    rec = E.records(1, seed=0)[0]
    rec.images = [np.tile(rec.images[0], (math.ceil(side / E.GRID), math.ceil(side / E.GRID), 1))[
        :side * cell, :side * cell]]
    conv = embedded_conversation(rec)
    answer = conv.messages[1]["content"]
    conv.messages[1]["content"] = " ".join([answer] * (seq // 40 + 1))       # long enough to cut at seq
    sample = encode_conversation(conv, processor, cutoff_len=seq)
    assert len(sample["input_ids"]) == seq, len(sample["input_ids"])
    return SFTCollator(processor.tokenizer.pad_token_id)([sample]), processor


def setup(args, first_variant):
    import torch
    from transformers import TrainingArguments

    from avar_kernels import IMAGE, SYSTEM
    from avar_kernels.metrics import attention_guided_loss
    from avar_kernels.train import embedded as E
    from avar_kernels.train.sft import AvarSFTTrainer, causal_lm_loss

    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    batch, processor = batch_of_length(args.seq[0])
    model = E.model(first_variant, seed=0)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    for p in model.parameters():                                     # gradients and optimizer state up front
        p.grad = torch.zeros_like(p)
    opt.step()
    trainer = AvarSFTTrainer(model=model, processing_class=processor,
                             args=TrainingArguments(output_dir=tempfile.mkdtemp(), report_to="none", use_cpu=True,
                                                    remove_unused_columns=False))
    current = [first_variant]
    cls, query = batch["token_classes"], batch["query_mask"]
    inputs = {k: v for k, v in batch.items() if k not in ("token_classes", "query_mask", "labels")}

    def step(variant):
        if variant != current[0]:
            model.set_attn_implementation({"text_config": variant, "vision_config": "sdpa"})
            current[0] = variant
        if variant == "avar":
            loss = trainer.compute_loss(model, dict(batch))
        elif variant == "eager":
            out = model(**inputs, output_attentions=True, use_cache=False)
            onehot = torch.nn.functional.one_hot(cls, 6).to(out.attentions[0].dtype)
            masses = [(a @ onehot[:, None]).float() for a in out.attentions]
            l_enh, l_sup = attention_guided_loss(masses, cls, query_mask=query)
            loss = causal_lm_loss(out.logits, batch["labels"]) + 0.15 * l_enh + 0.15 * l_sup
        else:
            out = model(**inputs, use_cache=False)
            loss = causal_lm_loss(out.logits, batch["labels"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
        assert bool((cls == IMAGE).any()) and bool((cls == SYSTEM).any())
        return float(loss)

    return step


def memory_worker(args):
    step = setup(args, args.variant)
    base = bm.memory_in_use("cpu")
    mem = bm.peak_memory(lambda: step(args.variant), "cpu")
    return {"act": mem.bytes, "peak": base + mem.bytes, "method": mem.method}


def time_worker(args):
    step = setup(args, args.variants[0])
    res = bm.compare({v: (lambda v=v: step(v)) for v in args.variants}, baseline="sdpa", device="cpu",
                     reps=args.reps, warmup=args.warmup)
    out = {v: {"time_s": t.median, "x_sdpa": t.ratio, "error": t.error} for v, t in res.items()}
    if "avar" in res and "eager" in res:
        out["avar"]["x_eager"] = res["avar"].ratio_to(res["eager"])
    return out


def run_worker(args, kind, seq, variant=None):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--seq", str(seq), "--reps", str(args.reps),
           "--warmup", str(args.warmup), "--threads", str(args.threads), "--variants", *args.variants]
    cmd += ["--variant", variant] if variant else []
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.timeout} s"}
    for line in p.stdout.splitlines()[::-1]:
        if line.startswith("{"):
            return json.loads(line)
    return {"error": " ".join((p.stderr or p.stdout).strip().splitlines()[-1:])[:200]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions of every variant (interleaved)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2, help="torch threads per process")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per subprocess")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "sft_step_cpu"))
    ap.add_argument("--worker", choices=["memory", "time"], help=argparse.SUPPRESS)
    ap.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(memory_worker(args) if args.worker == "memory" else time_worker(args)))
        return
    from avar_kernels.train import embedded as E

    text, vision = E.MODEL, E.VISION
    notes = [f"The embedded default model (Qwen2.5-VL, hidden {text['hidden_size']}, {text['num_hidden_layers']} layers, "
             f"{text['num_attention_heads']} heads / {text['num_key_value_heads']} KV heads, vision depth "
             f"{vision['depth']}), "
             "float32, batch 1, one sample of S tokens (about S/2 image tokens). A step = forward, backward, AdamW. "
             "`act`: the step's peak memory beyond the model, gradients and optimizer state (fresh process). "
             f"Time: median of {args.reps} interleaved repetitions after {args.warmup} warm-up step(s), "
             f"{args.threads} torch thread(s); `x sdpa` = median same-repetition ratio to plain sdpa SFT, "
             "`x eager` = avar's ratio to the published eager way."]
    columns = ["S", "variant", "time s", "x sdpa", "x eager", "peak MiB", "act MiB", "act / sdpa", "act eager/avar"]
    report = bm.Report("One SFT step: attention-guided (avar) vs the published eager way vs plain sdpa", columns,
                       device="cpu", notes=notes, path=args.out,
                       digits={"x sdpa": 2, "x eager": 2, "peak MiB": 0, "act MiB": 1, "act / sdpa": 2,
                               "act eager/avar": 2, "time s": 3})
    for s in args.seq:
        mem = {v: run_worker(args, "memory", s, v) for v in args.variants}
        times = run_worker(args, "time", s)
        for v in args.variants:
            m, t = mem[v], times.get(v, {})
            row = {"S": s, "variant": v, "time s": t.get("time_s"), "x sdpa": t.get("x_sdpa"),
                   "x eager": t.get("x_eager"), "peak MiB": m["peak"] / 2**20 if "peak" in m else None,
                   "act MiB": m["act"] / 2**20 if "act" in m else None, "memory method": m.get("method"),
                   "error": m.get("error") or t.get("error") or times.get("error")}
            if "act" in m and "act" in mem.get("sdpa", {}):
                row["act / sdpa"] = m["act"] / mem["sdpa"]["act"]
            if v == "avar" and "act" in m and "act" in mem.get("eager", {}):
                row["act eager/avar"] = mem["eager"]["act"] / m["act"]
            report.add(row)
            print(json.dumps(row), flush=True)
    print(report.markdown())


if __name__ == "__main__":
    main()
