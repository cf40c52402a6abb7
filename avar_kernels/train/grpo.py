"""GRPO with visual-anchored reward shaping on TRL's ``GRPOTrainer``.

``r_total = r_acc + 0.3 r_visual + 0.1 r_format`` (weights in :class:`RewardArguments`): three TRL reward
functions combined by TRL's ``reward_weights``, so each term is logged as its own series
(``rewards/accuracy_reward/mean``, ``rewards/visual_reward/mean``, ``rewards/format_reward/mean``) beside ``reward``.
``r_visual`` is the policy's own visual-attention reward on the generated tokens (:class:`~.rewards.VisualReward`,
masses from the fused kernels), 0 for wrong answers.
"""
from __future__ import annotations

from dataclasses import dataclass

from avar_kernels.metrics import VISUAL_REWARD_AGGREGATIONS

from .rewards import VisualReward, accuracy_reward, format_reward


@dataclass
class RewardArguments:
    accuracy_reward_weight: float = 1.0
    visual_reward_weight: float = 0.3
    format_reward_weight: float = 0.1
    visual_reward_aggregate: str = "per_token"
    visual_reward_layers: list | None = None
    visual_reward_epsilon: float = 1e-6

    def __post_init__(self):
        if self.visual_reward_aggregate not in VISUAL_REWARD_AGGREGATIONS:
            raise ValueError(f"visual_reward_aggregate must be one of {VISUAL_REWARD_AGGREGATIONS}, "
                             f"got {self.visual_reward_aggregate!r}")


def build_trainer(model, processor, rows, args, reward_args: RewardArguments | None = None):
    """A ``GRPOTrainer`` over ``rows`` (``{"prompt": conversational messages with image parts, "answer": str}``)
    with the AVAR rewards. ``args`` is a TRL ``GRPOConfig``; its ``reward_weights``, when not set, become
    ``[accuracy, visual, format]`` from ``reward_args``."""
    from datasets import Dataset
    from PIL import Image
    from trl import GRPOTrainer

    r = reward_args or RewardArguments()
    visual = VisualReward(processor, layers=r.visual_reward_layers, aggregate=r.visual_reward_aggregate,
                          eps=r.visual_reward_epsilon)
    if args.reward_weights is None:
        args.reward_weights = [r.accuracy_reward_weight, r.visual_reward_weight, r.format_reward_weight]
    elif len(args.reward_weights) != 3:
        raise ValueError(f"reward_weights: 3 weights (accuracy, visual, format) expected, got {args.reward_weights}")
    table = []
    for row in rows:
        images, prompt = [], []
        for message in row["prompt"]:
            parts = []
            for part in message["content"]:
                if part["type"] == "image":       # images travel in the "images" column, placeholders stay
                    images.append(Image.fromarray(part["image"]))
                    parts.append({"type": "image"})
                else:
                    parts.append(part)
            prompt.append({"role": message["role"], "content": parts})
        table.append({"prompt": prompt, "images": images, "answer": row["answer"]})
    trainer = GRPOTrainer(model=model, reward_funcs=[accuracy_reward, visual, format_reward], args=args,
                          train_dataset=Dataset.from_list(table), processing_class=processor)
    visual.trainer = trainer
    return trainer
