"""Evaluation of vision-language models: accuracy, Visual Attention Score and visual share, under interventions,
against the eager way of measuring them; a report folder with results.json, a markdown summary and plots.

    from avar_kernels import eval as ev

    cfg = ev.EvalConfig(models=[ev.ModelSpec.parse("embedded")], out="eval-report",
                        conditions=ev.parse_conditions(["vaf:0.15,0.3", "pai:0.2"]))
    results = ev.run_evaluation(cfg)          # resumable; data-parallel under `accelerate launch`
    results["complete"], results["models"]["embedded"]["conditions"]["none"]["accuracy"]
"""
from .evaluate import (
    Condition,
    Dataset,
    EvalConfig,
    ModelSpec,
    Sample,
    load_dataset,
    parse_conditions,
    run_evaluation,
    score_answer,
)
from .report import pearson, write_report

__all__ = ["EvalConfig", "ModelSpec", "Condition", "Sample", "Dataset", "run_evaluation", "load_dataset",
           "parse_conditions", "score_answer", "write_report", "pearson"]
