"""``avar-kernels train sft`` / ``avar-kernels train grpo``: attention-guided SFT and visual-reward GRPO
(``avar_kernels.train``). ``--config`` takes a YAML file with ``TrainingArguments`` (``GRPOConfig``) keys, the
AVAR keys of the published ``avar_sft.yaml`` and LLaMA-Factory's model / data keys; flags override it. Without a
model and a dataset it trains the embedded default (a procedural shapes task and a small Qwen2.5-VL, no download).
"""
from __future__ import annotations

import json

from . import args as A


def register(sub):
    p = sub.add_parser("train", help="attention-guided SFT (train sft) or visual-reward GRPO (train grpo)",
                       description=__doc__)
    stages = p.add_subparsers(title="stages", dest="stage", metavar="{sft,grpo}")
    stages.required = True
    for stage, text in (("sft", "attention-guided SFT: L = L_LM + alpha L_enh + beta L_sup"),
                        ("grpo", "GRPO with r = r_acc + 0.3 r_visual + 0.1 r_format")):
        q = stages.add_parser(stage, help=text, description=text)
        q.add_argument("--config", type=A.existing_file, help="YAML config (TrainingArguments / AVAR / data keys)")
        q.add_argument("--model", dest="model_name_or_path", help="checkpoint (local path or hub name); default: "
                       "the embedded model" + (", e.g. the output of 'train sft'" if stage == "grpo" else ""))
        q.add_argument("--dataset", help="JSONL file(s), comma separated: " + (
            "ShareGPT multimodal (messages + images)" if stage == "sft" else "problem / answer / images rows"))
        q.add_argument("--output-dir", dest="output_dir", help="checkpoints and the final model")
        q.add_argument("--max-steps", dest="max_steps", type=A.positive_int)
        q.add_argument("--seed", type=A.nonneg_int)
        q.add_argument("--resume", dest="resume_from_checkpoint", nargs="?", const="last",
                       help="resume from the last checkpoint in the output dir, or from the one given")
        if stage == "sft":
            q.add_argument("--plain", action="store_true", help="plain SFT (use_avar_attn_guide: false)")
        q.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="any config key, value read as YAML (repeatable), e.g. --set learning_rate=1e-4")
        q.set_defaults(run=run, parser=q)


def config_of(args) -> dict:
    """The config of a command line: the YAML file, then the flags, then ``--set``."""
    from avar_kernels.train.config import load_yaml, parse_override

    cfg = load_yaml(args.config) if args.config else {}
    for key in ("model_name_or_path", "dataset", "output_dir", "max_steps", "seed", "resume_from_checkpoint"):
        value = getattr(args, key)
        if value is not None:
            cfg[key] = value
    if getattr(args, "plain", False):
        cfg["use_avar_attn_guide"] = False
    for text in args.overrides:
        key, value = parse_override(text)
        cfg[key] = value
    return cfg


def run(args) -> int:
    from avar_kernels.train import run as R

    cfg = config_of(args)
    report = R.run_sft(cfg) if args.stage == "sft" else R.run_grpo(cfg)
    held = report.get("heldout")
    if held:
        print(f"held-out accuracy {held['accuracy']:.3f} (chance {held['chance']:.3f}, n={held['n']}), "
              f"VAS {held['vas']:.4g}, visual share {held['visual_share']:.4f}")
    if report["skipped"]:
        print(f"{len(report['skipped'])} records skipped (warnings above)")
    print(json.dumps(report["train"]))
    return 0
