"""Hugging Face transformers integration of avar-kernels.

* ``"avar"``: an attention implementation name (registered on import, :func:`register`), e.g.
  ``Model.from_pretrained(path, attn_implementation={"text_config": "avar", "vision_config": "sdpa"})``.
* :func:`token_classes`: per-token classes (image, system, user, response, video, other) from a chat template.
* :func:`record`: the per-class attention masses of each layer, differentiable, also during ``generate()``;
  with ``key_mass=True`` also the attention each position receives (:func:`image_heatmaps` lays it on the image).
* :func:`intervene` with the presets :func:`vaf`, :func:`pai`, :func:`class_bias`: class-wise score re-weighting.
"""
from __future__ import annotations

from .attention import NUM_CLASSES, avar_attention
from .classes import token_classes
from .heatmap import image_heatmaps
from .intervene import Preset, class_bias, intervene, pai, vaf
from .record import Recorder, find_language_model, record, use_classes
from .rows import AFTER_IMAGE, GENERATED

NAME = "avar"

__all__ = ["register", "NAME", "NUM_CLASSES", "avar_attention", "token_classes", "record", "Recorder",
           "intervene", "Preset", "vaf", "pai", "class_bias", "use_classes", "find_language_model", "image_heatmaps",
           "AFTER_IMAGE", "GENERATED"]


def register(name: str = NAME) -> str:
    """Register the attention function and its (sdpa) mask function under ``name`` (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if AttentionInterface._global_mapping.get(name) is not avar_attention:
        AttentionInterface.register(name, avar_attention)
    if AttentionMaskInterface._global_mapping.get(name) is not sdpa_mask:
        AttentionMaskInterface.register(name, sdpa_mask)
    return name


register()
