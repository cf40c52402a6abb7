"""``avar-kernels synth``: visual-anchored cold-start samples (``<think>`` description, reasoning, a look back at
the image, reflection ``</think><answer>...</answer>``) from records with an image, a question and an answer, written
as LLaMA-Factory ShareGPT multimodal JSONL. Input rows: ``image``/``images``, ``question`` (or ``problem``),
``answer``, optional ``reasoning`` and ``description``. Without ``--input`` it writes the embedded procedural task.
Bad records are reported with their line numbers and skipped; an interrupted run resumes where it stopped.
"""
from __future__ import annotations

from . import args as A


def register(sub):
    p = sub.add_parser("synth", help="visual-anchored cold-start samples (ShareGPT multimodal JSONL)",
                       description=__doc__)
    p.add_argument("--input", type=A.existing_file, help="JSONL records (default: the embedded procedural task)")
    p.add_argument("--output", required=True, help="output JSONL (images of the embedded task go next to it)")
    p.add_argument("--image-dir", help="folder the input's image paths are relative to (default: the input's)")
    p.add_argument("--rewriter", default="template", help="'template' (deterministic, the default) or the path "
                   "of a local transformers vision-language model (Qwen family) that writes description and reasoning")
    p.add_argument("--device", type=A.device, default=A.default_device(), help="device of the rewriter model")
    p.add_argument("--max-new-tokens", type=A.positive_int, default=256, help="per generation of the model rewriter")
    p.add_argument("--num", type=A.positive_int, default=1000, help="records of the embedded task (without --input)")
    p.add_argument("--seed", type=A.nonneg_int, default=0, help="seed of the embedded task")
    p.add_argument("--restart", action="store_true", help="overwrite the output instead of resuming it")
    p.set_defaults(run=run, parser=p)


def run(args) -> int:
    from avar_kernels.train import data, embedded, synth

    if args.input:
        records = data.read_synth_records(args.input, image_dir=args.image_dir)
        bad, source = list(records.bad), args.input
    else:
        records, bad, source = embedded.records(args.num, seed=args.seed), [], "<embedded>"
    rewriter = (synth.TemplateRewriter() if args.rewriter == "template" else
                synth.ModelRewriter(args.rewriter, device=args.device, max_new_tokens=args.max_new_tokens))
    rep = synth.synthesize(records, args.output, rewriter=rewriter, source=source, resume=not args.restart,
                           progress=True)
    for b in bad + rep.bad:
        print(f"skipped {b}")
    kept = f", {rep.resumed} kept from an earlier run" if rep.resumed else ""
    print(f"wrote {rep.written} samples to {args.output}{kept}; {len(bad) + len(rep.bad)} records skipped")
    return 0
