"""AVAR training: attention-guided SFT and visual-reward GRPO on the fused attention masses (docs/training.md)."""
from .queries import QUERY_SETS, query_mask

__all__ = ["query_mask", "QUERY_SETS"]
