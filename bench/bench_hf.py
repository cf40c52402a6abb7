"""Peak memory and time of forward + backward of a mass-based loss through a 2-layer Qwen2.5-VL language model.

Three variants, each run in a fresh subprocess (so that the peak is its own):

* ``avar``  -- ``attn_implementation="avar"`` + :func:`avar_kernels.hf.record`, loss = LM loss + AVAR's
  attention-guided terms (0.15 L_enh + 0.15 L_sup) on the recorded masses;
* ``eager`` -- the published AVAR code's way: eager attention with ``output_attentions=True``, masses = the
  attention weights summed per class, same loss;
* ``sdpa``  -- plain ``"sdpa"``, LM loss only (no masses): the floor.

Shapes: Qwen2.5-VL-7B's language model (hidden 3584, 28 heads, 4 KV heads, head dim 128), 2 layers, batch 1,
causal, a prompt laid out as system (32 tokens) / image (S/2) / user text / response (S/8). Documented
reductions: the vocabulary is 4096 (not 152064: the [S, V] logits are the same for every variant and would
only dilute the comparison), and on the CPU the MLP intermediate size is 1024 (not 18944) to keep the run short;
``--intermediate`` overrides. CPU: float32, peak = ``ru_maxrss`` of the subprocess (``peak``) and its growth
over the resident size after the model is built (``act``, activations and gradients). GPU: bfloat16,
``torch.cuda.max_memory_allocated`` (``peak``) and its growth over the allocation after the model is built.

    python bench/bench_hf.py --device cpu --seq 1024 2048          # writes bench/results/hf_cpu.md
    python bench/bench_hf.py --device cuda --seq 1024 2048 4096    # writes bench/results/hf_cuda.md
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
VARIANTS = ("avar", "eager", "sdpa")


def build(device, dtype, intermediate, vocab):
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    import avar_kernels.hf  # noqa: F401 - registers "avar"

    text = dict(vocab_size=vocab, hidden_size=3584, intermediate_size=intermediate, num_hidden_layers=2,
                num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
                pad_token_id=0, tie_word_embeddings=False)
    vision = dict(depth=1, hidden_size=32, out_hidden_size=3584, num_heads=2, intermediate_size=64)
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=vocab - 1,
                           video_token_id=vocab - 2, vision_start_token_id=vocab - 3, vision_end_token_id=vocab - 4)
    return cfg


def worker(args):
    import torch

    warnings.simplefilter("ignore")
    import avar_kernels.hf as ah
    from avar_kernels import IMAGE, RESPONSE, SYSTEM, USER
    from avar_kernels.metrics import attention_guided_loss
    from transformers import Qwen2_5_VLForConditionalGeneration

    cuda = args.device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    dev = torch.device(args.device)
    torch.manual_seed(0)
    cfg = build(dev, dtype, args.intermediate, args.vocab)
    impl = {"text_config": args.variant, "vision_config": "sdpa"}
    model = Qwen2_5_VLForConditionalGeneration._from_config(cfg, attn_implementation=impl, dtype=dtype).to(dev)
    model.train()
    s = args.seq
    ids = torch.randint(1, args.vocab - 8, (1, s), device=dev)
    cls = torch.full((1, s), USER, dtype=torch.long, device=dev)
    cls[:, :32] = SYSTEM
    cls[:, 32:32 + s // 2] = IMAGE
    cls[:, s - s // 8:] = RESPONSE
    labels = torch.where(cls == RESPONSE, ids, torch.full_like(ids, -100))
    kw = dict(input_ids=ids, labels=labels, use_cache=False)

    def step():
        if args.variant == "avar":
            with ah.record(model, cls) as rec:
                out = model(**kw)
            l_enh, l_sup = attention_guided_loss(rec.mass, cls)
            loss = out.loss + 0.15 * l_enh + 0.15 * l_sup
        elif args.variant == "eager":
            out = model(**kw, output_attentions=True)
            onehot = torch.nn.functional.one_hot(cls, ah.NUM_CLASSES).to(out.attentions[0].dtype)
            masses = [(a @ onehot[:, None]).float() for a in out.attentions]
            l_enh, l_sup = attention_guided_loss(masses, cls)
            loss = out.loss + 0.15 * l_enh + 0.15 * l_sup
        else:
            out = model(**kw)
            loss = out.loss
        loss.backward()
        model.zero_grad(set_to_none=False)
        return loss.detach()

    def rss_now():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    # gradients allocated up front, so that "act" counts only what the step itself needs
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_now()
    times = []
    for _ in range(args.reps + 1):
        t0 = time.perf_counter()
        loss = step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if cuda:
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t = sorted(times[1:])[len(times[1:]) // 2] if len(times) > 1 else times[0]
    print(json.dumps({"variant": args.variant, "seq": s, "time_s": t, "peak": peak, "act": peak - base,
                      "loss": float(loss)}))


def run_case(args, variant, seq):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--variant", variant, "--seq", str(seq),
           "--device", args.device, "--reps", str(args.reps), "--intermediate", str(args.intermediate),
           "--vocab", str(args.vocab)]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    for line in p.stdout.splitlines()[::-1]:
        if line.startswith("{"):
            return json.loads(line)
    return {"variant": variant, "seq": seq, "error": (p.stderr or p.stdout).strip().splitlines()[-1:]}


def gb(x):
    return f"{x / 2**30:.2f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--seq", type=int, nargs="+", default=None)
    ap.add_argument("--reps", type=int, default=1, help="timed steps after one warm-up step (median)")
    ap.add_argument("--intermediate", type=int, default=None)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.intermediate is None:
        args.intermediate = 18944 if args.device == "cuda" else 1024
    if args.worker:
        args.seq = args.seq[0]
        return worker(args)
    seqs = args.seq or ([1024, 2048, 4096] if args.device == "cuda" else [1024, 2048])
    results = {}
    for s in seqs:
        for v in args.variants:
            r = run_case(args, v, s)
            results[(v, s)] = r
            print(json.dumps(r), flush=True)
    lines = [f"# HF integration: forward + backward of a mass-based loss ({args.device})", "",
             f"Qwen2.5-VL-7B language-model shapes, 2 layers (hidden 3584, 28 heads / 4 KV heads, D 128), "
             f"intermediate {args.intermediate}, vocab {args.vocab}, batch 1, causal, "
             f"{'bfloat16' if args.device == 'cuda' else 'float32'}. `peak`: "
             f"{'torch.cuda.max_memory_allocated' if args.device == 'cuda' else 'ru_maxrss of a fresh process'}; "
             "`act`: growth over the model with its gradients allocated. Ratios are avar / baseline "
             "(memory: lower is better; `eager/avar` is how many times more the published way needs).", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}. "
             f"Command: `python bench/bench_hf.py --device {args.device} --seq {' '.join(map(str, seqs))} "
             f"--reps {args.reps} --intermediate {args.intermediate}` (time: "
             f"{'median of the steps after one warm-up step' if args.reps else 'the single, first step'}).", "",
             "| S | variant | time (s) | peak (GiB) | act (GiB) |", "|---|---|---|---|---|"]
    for s in seqs:
        for v in args.variants:
            r = results[(v, s)]
            if "error" in r:
                lines.append(f"| {s} | {v} | error: {' '.join(r['error'])[:80]} | | |")
            else:
                lines.append(f"| {s} | {v} | {r['time_s']:.2f} | {gb(r['peak'])} | {gb(r['act'])} |")
    lines += ["", "| S | peak avar/sdpa | act avar/sdpa | peak eager/avar | act eager/avar | time avar/sdpa | "
              "time avar/eager |", "|---|---|---|---|---|---|---|"]
    for s in seqs:
        a, e, d = (results.get((v, s), {}) for v in ("avar", "eager", "sdpa"))

        def ratio(x, y, k):
            return f"{x[k] / y[k]:.2f}x" if k in x and k in y and y[k] else "n/a"
        lines.append(f"| {s} | {ratio(a, d, 'peak')} | {ratio(a, d, 'act')} | {ratio(e, a, 'peak')} | "
                     f"{ratio(e, a, 'act')} | {ratio(a, d, 'time_s')} | {ratio(a, e, 'time_s')} |")
    out = args.out or os.path.join(HERE, "results", f"hf_{args.device}.md")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
