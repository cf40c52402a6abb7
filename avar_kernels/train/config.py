"""Training configs: one flat mapping (a YAML file plus command-line overrides) split into its parts.

A config takes the ``transformers.TrainingArguments`` keys (TRL's ``GRPOConfig`` keys for GRPO), the AVAR keys of
the published ``avar_sft.yaml`` (``use_avar_attn_guide``, ``avar_attn_alpha``, ``avar_attn_beta``,
``avar_attn_epsilon``, ``avar_attn_layer_indices``) and the data / model keys of LLaMA-Factory
(``model_name_or_path``, ``dataset``, ``dataset_dir``, ``media_dir``, ``cutoff_len``, ``image_max_pixels``,
``image_min_pixels``, ``max_samples``, ``val_size``, ``packing``, ``freeze_vision_tower``, ...), so a config
written for that code runs here. LLaMA-Factory keys that do not apply are listed in :data:`IGNORED` and reported;
an unknown key is an error that names it.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass

import torch

from .sft import AvarArguments


@dataclass
class DataArguments:
    """Model and data keys (LLaMA-Factory names). Without ``model_name_or_path`` the embedded model is trained;
    without ``dataset`` the embedded procedural task is the data."""

    model_name_or_path: str | None = None
    dataset: str | None = None
    dataset_dir: str | None = None
    media_dir: str | None = None
    eval_dataset: str | None = None
    cutoff_len: int | None = None
    image_max_pixels: int | None = None
    image_min_pixels: int | None = None
    max_samples: int | None = None
    val_size: float = 0.0
    packing: bool = False
    template: str | None = None
    freeze_vision_tower: bool | None = None
    freeze_multi_modal_projector: bool = False
    freeze_language_model: bool = False
    finetuning_type: str = "full"
    stage: str | None = None
    embedded_train_size: int = 20000
    embedded_eval_size: int = 200
    max_new_tokens: int = 128

    def __post_init__(self):
        if self.finetuning_type != "full":
            raise ValueError(f"finetuning_type: only 'full' is supported, got {self.finetuning_type!r}")
        if self.template is not None and not str(self.template).startswith("qwen"):
            raise ValueError(f"template: the trainer renders the Qwen ChatML template; got {self.template!r}")
        if not 0.0 <= float(self.val_size) < 1.0:
            raise ValueError(f"val_size must be in [0, 1), got {self.val_size}")


# LLaMA-Factory keys with no meaning here (the data pipeline is built in, attention is always "avar")
IGNORED = ("do_train", "do_eval", "overwrite_cache", "preprocessing_num_workers", "plot_loss", "flash_attn",
           "trust_remote_code", "mask_history", "train_on_prompt", "neat_packing", "enable_thinking",
           "video_max_pixels", "video_min_pixels", "tokenized_path", "streaming", "buffer_size", "mix_strategy",
           "interleave_probs", "print_param_status", "use_fast_tokenizer", "new_special_tokens", "rope_scaling",
           "enable_liger_kernel", "use_unsloth", "upcast_layernorm")

DEFAULT_OUTPUT = {"sft": "avar-sft-output", "grpo": "avar-grpo-output"}


def load_yaml(path) -> dict:
    import yaml

    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such config file: {path}")
    with open(path, encoding="utf-8") as f:
        try:
            cfg = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    if cfg is None:
        return {}
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: a config must be a mapping of keys to values, got {type(cfg).__name__}")
    return cfg


def _fields(cls):
    return {f.name for f in dataclasses.fields(cls)}


def split_config(cfg: dict, kind: str = "sft"):
    """``(training_args, avar_args, data_args)`` from one flat mapping. ``kind`` is ``"sft"`` (``TrainingArguments``)
    or ``"grpo"`` (TRL ``GRPOConfig``); for GRPO ``avar_args`` holds the reward keys (:class:`RewardArguments`)."""
    if kind == "sft":
        from transformers import TrainingArguments as Args

        avar_cls = AvarArguments
    elif kind == "grpo":
        from trl import GRPOConfig as Args

        from .grpo import RewardArguments as avar_cls
    else:
        raise ValueError(f"kind must be 'sft' or 'grpo', got {kind!r}")
    cfg = dict(cfg)
    names = _fields(Args)
    if "warmup_ratio" in cfg and "warmup_ratio" not in names:    # transformers 5: a fraction in warmup_steps
        ratio = float(cfg.pop("warmup_ratio"))
        if not 0 <= ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {ratio}")
        cfg.setdefault("warmup_steps", ratio)
    ignored = sorted(k for k in cfg if k in IGNORED)
    for k in ignored:
        cfg.pop(k)
    if ignored:
        warnings.warn(f"config keys with no effect here, ignored: {', '.join(ignored)}", UserWarning, stacklevel=2)
    parts = {"train": names, "avar": _fields(avar_cls), "data": _fields(DataArguments)}
    unknown = sorted(k for k in cfg if not any(k in names for names in parts.values()))
    if unknown:
        raise ValueError(f"unknown config keys: {', '.join(unknown)} (expected {Args.__name__}, "
                         f"{avar_cls.__name__} or data keys)")
    pick = {name: {k: v for k, v in cfg.items() if k in names} for name, names in parts.items()}
    if pick["data"].get("stage") not in (None, kind):
        raise ValueError(f"stage: this is 'train {kind}', the config says stage={pick['data']['stage']!r}")
    train = {"output_dir": DEFAULT_OUTPUT[kind], "report_to": "none", **pick["train"],
             "remove_unused_columns": False}
    if not torch.cuda.is_available():
        train = cpu_defaults(train, int(os.environ.get("WORLD_SIZE", "1")))
    return Args(**train), avar_cls(**pick["avar"]), DataArguments(**pick["data"])


def cpu_defaults(train: dict, world_size: int) -> dict:
    """Training keys a machine without GPUs needs unless the config sets them: no bf16 (GRPOConfig's default),
    ``use_cpu`` (without it accelerate treats CPU processes under torchrun as independent runs, no DDP), and the
    gloo backend for several processes."""
    out = {"bf16": False, "use_cpu": True, **({"ddp_backend": "gloo"} if world_size > 1 else {})}
    return {**out, **train}


def parse_override(text: str):
    """``key=value`` with the value read as YAML (``lr=1e-4``, ``bf16=true``, ``layers=[0, 1]``)."""
    import yaml

    if "=" not in text:
        raise ValueError(f"--set expects key=value, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value) if value.strip() else None
