"""``avar-kernels eval``: accuracy, Visual Attention Score and visual share of one or more vision-language models
over a dataset, with and without interventions, against the eager way of measuring them; writes a report folder
(``avar_kernels.eval``). Resumable (rerun the same command), data-parallel under ``accelerate launch``.
"""
from __future__ import annotations

import argparse
import os

from . import args as A

DEFAULT_INTERVENTIONS = ("vaf:0.15", "pai:0.2")


def add_eval_arguments(p, *, models=True):
    """The options shared by ``eval`` and ``run`` (``run`` picks its own models)."""
    if models:
        p.add_argument("--model", action="append", default=None, metavar="[NAME=]PATH",
                       help="a checkpoint directory or hub name, or 'embedded' (the embedded tiny Qwen2.5-VL, "
                            "random init); repeat for several models (default: embedded)")
    p.add_argument("--data", type=A.existing_file, default=None, metavar="FILE.jsonl",
                   help="questions in a trainer layout: ShareGPT messages+images, or problem/answer/images rows "
                        "(default: the embedded generator)")
    p.add_argument("--image-dir", default=None, metavar="DIR",
                   help="folder the image paths are relative to (default: the JSONL file's folder)")
    p.add_argument("--limit", type=A.positive_int, default=None, metavar="N", help="evaluate the first N samples")
    p.add_argument("--samples", type=A.positive_int, default=48, metavar="N",
                   help="questions drawn from the embedded generator when no --data (default 48)")
    p.add_argument("--data-seed", type=A.integer, default=1, help="seed of the embedded questions (default 1)")
    p.add_argument("--interventions", nargs="*", default=list(DEFAULT_INTERVENTIONS), metavar="SPEC",
                   help="conditions besides 'none': KIND:STRENGTH[,STRENGTH...][@FIRST-[LAST]], KIND vaf or pai; "
                        "e.g. vaf:0.1,0.2,0.4 vaf:0.15@1-2 pai:0.2,0.5@2- (default: %(default)s; none: no "
                        "intervention only)")
    p.add_argument("--max-new-tokens", type=A.positive_int, default=128, metavar="N",
                   help="greedy tokens per answer (default 128)")
    p.add_argument("--batch-size", type=A.positive_int, default=8, metavar="N", help="questions per generate()")
    p.add_argument("--device", type=A.device, default=None, help="default: cuda if available (per process), else cpu")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="auto: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--seed", type=A.integer, default=0, help="torch seed; initialises the embedded model (default 0)")
    p.add_argument("--bench-samples", type=A.nonneg_int, default=4, metavar="N",
                   help="questions of the eager-vs-avar comparison per model; 0 skips it (default 4)")
    p.add_argument("--bench-new-tokens", type=A.positive_int, default=16, metavar="N",
                   help="tokens generated in that comparison (default 16)")
    p.add_argument("--bench-reps", type=A.positive_int, default=3, metavar="N",
                   help="interleaved repetitions of that comparison (default 3)")
    p.add_argument("--no-heatmap", action="store_true", help="skip the image heatmap of each model")
    p.add_argument("--overwrite", action="store_true",
                   help="discard the cells already in the report folder instead of resuming")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def eval_config(args, out, models):
    from avar_kernels import eval as ev

    return ev.EvalConfig(
        out=out, models=models, data=args.data, image_dir=args.image_dir, limit=args.limit,
        embedded_samples=args.samples, data_seed=args.data_seed, conditions=ev.parse_conditions(args.interventions),
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, device=args.device,
        dtype=None if args.dtype == "auto" else args.dtype, seed=args.seed, bench_samples=args.bench_samples,
        bench_new_tokens=args.bench_new_tokens, bench_reps=args.bench_reps, heatmap=not args.no_heatmap,
        overwrite=args.overwrite, progress=not args.no_progress)


def register(sub):
    p = sub.add_parser(
        "eval", help="accuracy x VAS x interventions of VLMs over a dataset, with a report folder",
        description="Evaluate vision-language models: accuracy (greedy generation through the fused 'avar' "
                    "attention), VAS and visual share per layer / head / overall on the prompt, the same under vaf "
                    "and pai interventions, and time and peak memory against eager output_attentions=True. Writes "
                    "OUT/results.json, OUT/summary.md and plots. Rerunning the same command resumes; under "
                    "'accelerate launch' the samples are split over the processes.",
        epilog="examples: avar-kernels eval   (embedded default, offline, CPU)\n"
               "  avar-kernels eval --model base=Qwen/Qwen2.5-VL-7B-Instruct --model avar=ckpt/avar-sft "
               "--data geo3k_test.jsonl --interventions vaf:0.1,0.15,0.3 vaf:0.15@9-14 pai:0.2,0.5 --out report\n"
               "  accelerate launch --multi_gpu --num_processes 8 -m avar_kernels eval --model ... --data ... "
               "--out report\n"
               "  (CPU processes over gloo: the same with --device cpu; 'torchrun --nproc_per_node N -m avar_kernels "
               "eval ...' works too)",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_eval_arguments(p)
    p.add_argument("--out", default="eval-report", metavar="DIR", help="the report folder (default eval-report)")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite the report from the cells in --out without computing anything")
    p.set_defaults(run=run, parser=p)
    return p


def print_results(res, out):
    from avar_kernels.eval.report import console_table

    print(console_table(res))
    status = "complete" if res["complete"] else f"INCOMPLETE ({res['cells_done']} of {res['cells_total']} cells)"
    print(f"\nreport ({status}): {os.path.join(out, 'summary.md')}, {os.path.join(out, 'results.json')}, "
          f"{len(res['plots'])} plots in {out}")


def run(args):
    from avar_kernels import eval as ev

    if args.report_only:
        res = ev.write_report(args.out)
        print_results(res, args.out)
        return 0
    models = [ev.ModelSpec.parse(m) for m in (args.model or ["embedded"])]
    res = ev.run_evaluation(eval_config(args, args.out, models))
    if res is not None:                                   # the main process of a multi-process run
        print_results(res, args.out)
    return 0
