"""``avar-kernels op`` (the default subcommand): the fused op on a generated VLM-shaped prompt.

It prints where each class of query rows puts its attention (the per-class masses), checks the result against
the float64 reference, and times the op against torch SDPA (which computes no masses) in the same run.
"""
from __future__ import annotations

import torch

import avar_kernels as ak
from avar_kernels import benchmark as bm
from avar_kernels.types import CLASS_NAMES

from . import args as A


def vlm_prompt_classes(system: int, image: int, user: int, response: int) -> torch.Tensor:
    """Class ids of a chat prompt laid out as [system | image | user text | response]."""
    parts = [(ak.SYSTEM, system), (ak.IMAGE, image), (ak.USER, user), (ak.RESPONSE, response)]
    return torch.cat([torch.full((n,), c, dtype=torch.long) for c, n in parts])


def register(sub):
    p = sub.add_parser("op", help="the fused op on a generated VLM-shaped prompt (the default)",
                       description="Run the fused op on a generated [system | image | user | response] prompt: "
                                   "per-class masses, error against the float64 reference, time against SDPA.")
    p.add_argument("--system", type=A.nonneg_int, default=64, help="system-prompt tokens (default 64)")
    p.add_argument("--image", type=A.nonneg_int, default=1024, help="image tokens (default 1024)")
    p.add_argument("--user", type=A.nonneg_int, default=128, help="user-text tokens (default 128)")
    p.add_argument("--response", type=A.nonneg_int, default=256, help="response tokens (default 256)")
    p.add_argument("--heads", type=A.positive_int, default=16, help="query heads (default 16)")
    p.add_argument("--kv-heads", type=A.positive_int, default=4, help="key/value heads, divides --heads (default 4)")
    p.add_argument("--head-dim", type=A.positive_int, default=128, help="head dimension (default 128)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--device", type=A.device, default=A.default_device(), help="default: cuda if available, else cpu")
    p.add_argument("--backend", default="auto", choices=["auto", "cpu", "triton", "reference"])
    p.add_argument("--vaf", type=A.finite_float, default=0.0,
                   help="boost image keys by MUL=+x for user/response rows (default 0: off)")
    p.add_argument("--repeats", type=A.positive_int, default=3,
                   help="interleaved timing repetitions; the ratio is their median (default 3)")
    p.add_argument("--seed", type=A.integer, default=0)
    p.set_defaults(run=run, parser=p)
    return p


def run(args):
    if args.heads % args.kv_heads:
        args.parser.error(f"argument --kv-heads: must divide --heads ({args.heads}), got {args.kv_heads}")
    if args.system + args.image + args.user + args.response == 0:
        args.parser.error("arguments --system/--image/--user/--response: the prompt is empty")
    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    classes = vlm_prompt_classes(args.system, args.image, args.user, args.response).to(args.device)[None]
    s = classes.shape[1]
    q = torch.randn(1, s, args.heads, args.head_dim, device=args.device, dtype=dtype)
    k = torch.randn(1, s, args.kv_heads, args.head_dim, device=args.device, dtype=dtype)
    v = torch.randn(1, s, args.kv_heads, args.head_dim, device=args.device, dtype=dtype)
    # Give the image keys a shared direction so that the masses are not just proportional to token counts.
    k[:, classes[0] == ak.IMAGE] += 0.5 * q.mean((1, 2))[:, None, None]
    reweight = None
    if args.vaf:
        mul = torch.zeros(5, 5)
        mul[[ak.USER, ak.RESPONSE], ak.IMAGE] = args.vaf
        reweight = ak.Reweight(mul=mul)

    def run(backend):
        return ak.attention(q, k, v, classes, num_classes=5, causal=True, reweight=reweight, return_lse=True,
                            backend=backend)

    res = run(args.backend)
    print(f"avar-kernels {ak.__version__}: S={s} (system {args.system}, image {args.image}, user {args.user}, "
          f"response {args.response}), heads {args.heads}/{args.kv_heads}, D={args.head_dim}, {args.dtype}, "
          f"{args.device}, backend={args.backend}" + (f", VAF mul={args.vaf}" if args.vaf else ""))
    print("\nMean attention mass per query class (rows) on each key class (columns):")
    names = [CLASS_NAMES[c] for c in range(5)]
    print(f"{'':>10}" + "".join(f"{n:>10}" for n in names))
    for c in (ak.SYSTEM, ak.IMAGE, ak.USER, ak.RESPONSE):
        if not bool((classes[0] == c).any()):
            continue
        rows = res.mass[0][:, classes[0] == c].float().mean((0, 1))
        print(f"{CLASS_NAMES[c]:>10}" + "".join(f"{x:10.4f}" for x in rows.tolist()))

    # Check against the float64 reference on the last rows (the reference materializes P).
    tail = min(s, 256)
    ref = ak.attention(q[:, -tail:].double(), k.double(), v.double(), classes, num_classes=5,
                       query_class=classes[:, -tail:], causal=True, reweight=reweight, return_lse=True,
                       backend="reference")
    sub = ak.attention(q[:, -tail:], k, v, classes, num_classes=5, query_class=classes[:, -tail:], causal=True,
                       reweight=reweight, return_lse=True, backend=args.backend)
    print(f"\nmax |error| vs float64 reference on the last {tail} rows: "
          f"out {(sub.out.double() - ref.out).abs().max():.2e}, mass {(sub.mass.double() - ref.mass).abs().max():.2e}, "
          f"lse {(sub.lse.double() - ref.lse).abs().max():.2e}")

    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    timing = bm.compare({
        "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True),
        "avar": lambda: run(args.backend),
    }, baseline="sdpa", device=args.device, reps=args.repeats, warmup=1)
    t_sdpa, t_avar = timing["sdpa"], timing["avar"]
    print(f"forward time (median of {args.repeats} interleaved repetitions): SDPA (no masses) "
          f"{t_sdpa.median * 1e3:.1f} ms, avar (out + masses) {t_avar.median * 1e3:.1f} ms, ratio {t_avar.ratio:.2f}x")
    return 0
