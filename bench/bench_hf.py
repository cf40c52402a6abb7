#!/usr/bin/env python
"""Peak memory and time of forward + backward of a mass-based loss through a 2-layer Qwen2.5-VL language model.

Three variants:

* ``avar``  -- ``attn_implementation="avar"`` + :func:`avar_kernels.hf.record`, loss = LM loss + AVAR's
  attention-guided terms (0.15 L_enh + 0.15 L_sup) on the recorded masses;
* ``eager`` -- the published AVAR code's way: eager attention with ``output_attentions=True``, masses = the
  attention weights summed per class, same loss;
* ``sdpa``  -- plain ``"sdpa"``, LM loss only (no masses): the floor.

Shapes: Qwen2.5-VL-7B's language model (hidden 3584, 28 heads, 4 KV heads, head dim 128), 2 layers, batch 1,
causal, a prompt laid out as system (32 tokens) / image (S/2) / user text / response (S/8). Documented
reductions: the vocabulary is 4096 (not 152064: the [S, V] logits are the same for every variant and would
only dilute the comparison), and on the CPU the MLP intermediate size is 1024 (not 18944) to keep the run short;
``--intermediate`` overrides. CPU float32, GPU bfloat16.

Memory: each (variant, S) in a fresh subprocess, the first step's peak beyond the model with its gradients
allocated (``act``; avar_kernels.benchmark.peak_memory: the CUDA allocator's peak, or the resident-set
high-water mark on the CPU) and that plus the memory held before it (``peak``). Time: one more subprocess per S
holds one model and switches its attention implementation (``set_attn_implementation``) between the variants,
timed interleaved (avar_kernels.benchmark.compare: --warmup steps each, then --reps repetitions; medians and
same-repetition ratios). Writes <out>.md/.json/.csv after every S.

    python bench/bench_hf.py --device cpu --seq 1024 2048          # writes bench/results/hf_cpu.*
    python bench/bench_hf.py --device cuda --seq 1024 2048 4096    # writes bench/results/hf_cuda.*
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from avar_kernels import benchmark as bm  # noqa: E402

VARIANTS = ("avar", "eager", "sdpa")


def build(intermediate, vocab):
    from transformers import Qwen2_5_VLConfig

    text = dict(vocab_size=vocab, hidden_size=3584, intermediate_size=intermediate, num_hidden_layers=2,
                num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
                pad_token_id=0, tie_word_embeddings=False)
    vision = dict(depth=1, hidden_size=32, out_hidden_size=3584, num_heads=2, intermediate_size=64)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=vocab - 1,
                            video_token_id=vocab - 2, vision_start_token_id=vocab - 3, vision_end_token_id=vocab - 4)


def setup(args, first_variant):
    """The model (gradients allocated up front, so that a step's growth is only what the step needs) and a
    step(variant) that runs forward + backward of the variant's loss."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    import avar_kernels.hf as ah
    from avar_kernels import IMAGE, RESPONSE, SYSTEM, USER
    from avar_kernels.metrics import attention_guided_loss

    warnings.simplefilter("ignore")
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    torch.manual_seed(0)
    impl = {"text_config": first_variant, "vision_config": "sdpa"}
    model = Qwen2_5_VLForConditionalGeneration._from_config(build(args.intermediate, args.vocab),
                                                             attn_implementation=impl, dtype=dtype).to(dev)
    model.train()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    s = args.seq[0]
    ids = torch.randint(1, args.vocab - 8, (1, s), device=dev)
    cls = torch.full((1, s), USER, dtype=torch.long, device=dev)
    cls[:, :32] = SYSTEM
    cls[:, 32:32 + s // 2] = IMAGE
    cls[:, s - s // 8:] = RESPONSE
    labels = torch.where(cls == RESPONSE, ids, torch.full_like(ids, -100))
    kw = dict(input_ids=ids, labels=labels, use_cache=False)
    current = [first_variant]

    def step(variant):
        if variant != current[0]:
            model.set_attn_implementation({"text_config": variant, "vision_config": "sdpa"})
            current[0] = variant
        if variant == "avar":
            with ah.record(model, cls) as rec:
                out = model(**kw)
            l_enh, l_sup = attention_guided_loss(rec.mass, cls)
            loss = out.loss + 0.15 * l_enh + 0.15 * l_sup
        elif variant == "eager":
            out = model(**kw, output_attentions=True)
            onehot = torch.nn.functional.one_hot(cls, ah.NUM_CLASSES).to(out.attentions[0].dtype)
            masses = [(a @ onehot[:, None]).float() for a in out.attentions]
            l_enh, l_sup = attention_guided_loss(masses, cls)
            loss = out.loss + 0.15 * l_enh + 0.15 * l_sup
        else:
            loss = model(**kw).loss
        loss.backward()
        model.zero_grad(set_to_none=False)
        return float(loss)

    return step, dev


def memory_worker(args):
    step, dev = setup(args, args.variant)
    base = bm.memory_in_use(dev)
    mem = bm.peak_memory(lambda: step(args.variant), dev)
    return {"act": mem.bytes, "peak": base + mem.bytes, "method": mem.method}


def time_worker(args):
    step, dev = setup(args, args.variants[0])
    res = bm.compare({v: (lambda v=v: step(v)) for v in args.variants}, baseline="sdpa" if "sdpa" in args.variants
                     else None, device=dev, reps=args.reps, warmup=args.warmup)
    out = {v: {"time_s": t.median, "x_sdpa": t.ratio, "error": t.error} for v, t in res.items()}
    if "avar" in res and "eager" in res:
        out["avar"]["x_eager"] = res["avar"].ratio_to(res["eager"])
    return out


def run_worker(args, kind, seq, variant=None):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--seq", str(seq), "--device", args.device,
           "--reps", str(args.reps), "--warmup", str(args.warmup), "--intermediate", str(args.intermediate),
           "--vocab", str(args.vocab), "--variants", *args.variants] + (["--variant", variant] if variant else [])
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
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--seq", type=int, nargs="+", default=None)
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions of every variant (interleaved)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps of every variant before timing")
    ap.add_argument("--intermediate", type=int, default=None)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per subprocess")
    ap.add_argument("--out", default=None, help="path stem (default bench/results/hf_<device>)")
    ap.add_argument("--worker", choices=["memory", "time"], help=argparse.SUPPRESS)
    ap.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.intermediate is None:
        args.intermediate = 18944 if args.device == "cuda" else 1024
    if args.worker:
        print(json.dumps(memory_worker(args) if args.worker == "memory" else time_worker(args)))
        return
    seqs = args.seq or ([1024, 2048, 4096] if args.device == "cuda" else [1024, 2048])
    notes = [f"Qwen2.5-VL-7B language-model shapes, 2 layers (hidden 3584, 28 heads / 4 KV heads, D 128), "
             f"intermediate {args.intermediate}, vocab {args.vocab}, batch 1, causal, "
             f"{'bfloat16' if args.device == 'cuda' else 'float32'}. `peak`: memory held at the first step's peak "
             "(fresh process); `act`: its growth over the model with its gradients allocated "
             "(avar_kernels.benchmark.peak_memory). Time: median of "
             f"{args.reps} interleaved repetitions after {args.warmup} warm-up step(s); `x sdpa` = median "
             "same-repetition ratio to sdpa. `act eager/avar` is how many times more the published way needs."]
    columns = ["S", "variant", "time s", "x sdpa", "peak GiB", "act GiB", "act / sdpa", "act eager/avar"]
    out = args.out or os.path.join(HERE, "results", f"hf_{args.device}")
    report = bm.Report("HF integration: forward + backward of a mass-based loss", columns, device=args.device,
                       notes=notes, path=out, digits={"x sdpa": 2, "peak GiB": 2, "act GiB": 2, "act / sdpa": 2,
                                                      "act eager/avar": 2, "time s": 2})
    for s in seqs:
        mem = {v: run_worker(args, "memory", s, v) for v in args.variants}
        times = run_worker(args, "time", s)
        for v in args.variants:
            m, t = mem[v], times.get(v, {})
            row = {"S": s, "variant": v, "time s": t.get("time_s"), "x sdpa": t.get("x_sdpa"),
                   "peak GiB": m["peak"] / 2**30 if "peak" in m else None,
                   "act GiB": m["act"] / 2**30 if "act" in m else None, "memory method": m.get("method"),
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
