"""Attention-guided SFT on the ``transformers`` Trainer: ``L = L_LM + alpha L_enh + beta L_sup``.

The masses come from the fused kernels through :func:`avar_kernels.hf.record` (the text attention of the model
must be ``"avar"``): per layer ``[B, H, S, C]``, never the ``[B, H, S, S]`` weights. ``L_enh`` / ``L_sup`` are
:func:`avar_kernels.metrics.attention_guided_loss` on the query rows of each sample (docs/training.md). Logged
beside ``loss``: ``lm_loss``, ``l_enh``, ``l_sup``, ``vas`` and ``visual_share`` (user-text rows) of the batches.
Gradient accumulation, DDP / FSDP / DeepSpeed, gradient checkpointing, bf16 / fp16, padded and packed batches
work as with the plain Trainer.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch
from transformers import Trainer

from avar_kernels import hf as ah
from avar_kernels import metrics
from avar_kernels.types import IMAGE

from .batches import unpack
from .queries import QUERY_SETS

SERIES = ("lm_loss", "l_enh", "l_sup", "vas", "visual_share")


@dataclass
class AvarArguments:
    """The AVAR keys (the names of the published ``avar_sft.yaml``) and the query set."""

    use_avar_attn_guide: bool = True
    avar_attn_alpha: float = 0.15
    avar_attn_beta: float = 0.15
    avar_attn_epsilon: float = 1e-6
    avar_attn_layer_indices: list | None = None
    avar_query_set: str = "turn"

    def __post_init__(self):
        if self.avar_query_set not in QUERY_SETS:
            raise ValueError(f"avar_query_set must be one of {QUERY_SETS}, got {self.avar_query_set!r}")
        if self.avar_attn_epsilon <= 0:
            raise ValueError(f"avar_attn_epsilon must be > 0, got {self.avar_attn_epsilon}")
        if isinstance(self.avar_attn_layer_indices, str):       # the published config spells them "0,1,2"
            text = self.avar_attn_layer_indices.strip()
            self.avar_attn_layer_indices = [int(x) for x in text.split(",")] if text else None


def causal_lm_loss(logits, labels, num_items_in_batch=None):
    """Next-token cross-entropy summed over the trained tokens (labels != -100), divided by ``num_items_in_batch``
    (the accumulated batch's count) or by this batch's count."""
    shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:].to(logits.device)
    total = torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]),
                                              shift_labels.reshape(-1), ignore_index=-100, reduction="sum")
    count = num_items_in_batch if num_items_in_batch is not None else (shift_labels != -100).sum()
    return total / torch.as_tensor(count, device=total.device).clamp_min(1)


class AvarSFTTrainer(Trainer):
    """A ``Trainer`` whose loss adds the attention-guided terms. Batches come from
    :class:`~avar_kernels.train.batches.SFTCollator` (they carry ``token_classes`` and ``query_mask``; the
    ``TrainingArguments`` need ``remove_unused_columns=False``)."""

    def __init__(self, *args, avar_args: AvarArguments | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.avar_args = avar_args or AvarArguments()
        self._series = {name: [] for name in SERIES}
        # The LM loss is computed here as a sum over the accumulated batch's trained tokens (num_items_in_batch),
        # so that gradient accumulation and several processes give the loss of one big batch. Qwen2-VL models
        # declare accepts_loss_kwargs = False, which would make the Trainer average per micro-batch instead.
        self.model_accepts_loss_kwargs = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        a = self.avar_args
        inputs = dict(inputs)
        classes, query = inputs.pop("token_classes"), inputs.pop("query_mask")
        seq_lengths = inputs.pop("seq_lengths", None)
        labels = inputs.pop("labels")
        inputs["use_cache"] = False                       # also what lets Qwen2-VL models see packed rows
        # the published code skips both terms for a batch without image tokens
        guided = a.use_avar_attn_guide and bool((classes == IMAGE).any())
        rec_ctx = (ah.record(self.accelerator.unwrap_model(model), classes, layers=a.avar_attn_layer_indices)
                   if guided else contextlib.nullcontext())
        with rec_ctx as rec:
            outputs = model(**inputs)
        loss = lm = causal_lm_loss(outputs.logits, labels, num_items_in_batch)
        if num_items_in_batch is not None and self.args.average_tokens_across_devices and self.args.world_size > 1:
            loss = lm = lm * self.args.world_size           # the token count is global; DDP averages gradients
        if guided:
            masses = rec.mass
            if seq_lengths is not None:                  # a packed row: one sample per row again
                masses, classes, query = unpack(masses, classes, query, seq_lengths)
            l_enh, l_sup = metrics.attention_guided_loss(masses, classes, query_mask=query, eps=a.avar_attn_epsilon)
            # per-batch means: with the LM loss normalized over the accumulated batch, training_step does not
            # divide by the accumulation steps, so these are divided here
            extra = a.avar_attn_alpha * l_enh + a.avar_attn_beta * l_sup
            if num_items_in_batch is not None:
                extra = extra / self._accumulation_steps()
            loss = loss + extra
        if model.training:
            self._record_series(lm, num_items_in_batch, guided and (l_enh, l_sup, masses, classes))
        return (loss, outputs) if return_outputs else loss

    def _accumulation_steps(self):
        return getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)

    def _record_series(self, lm, num_items_in_batch, guided):
        lm = lm.detach().float()
        # normalized over the accumulated batch (and multiplied by the world size when tokens are averaged across
        # devices): times the accumulation steps, the mean of these values over micro-batches and ranks is L_LM
        if num_items_in_batch is not None:
            lm = lm * self._accumulation_steps()
        self._series["lm_loss"].append(lm)
        if not guided:
            return
        l_enh, l_sup, masses, classes = guided
        self._series["l_enh"].append(l_enh.detach().float())
        self._series["l_sup"].append(l_sup.detach().float())
        detached = [m.detach() for m in masses]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", metrics.UndefinedMetricWarning)
            self._series["vas"].append(metrics.vas(detached, classes).overall.float())
            self._series["visual_share"].append(metrics.visual_share(detached, classes).overall.float())

    def log(self, logs, *args, **kwargs):
        if "loss" in logs and any(self._series.values()):
            for name, values in self._series.items():
                if not values:
                    continue
                t = torch.stack(values).to(self.args.device)
                t = torch.where(torch.isnan(t), torch.zeros_like(t), t).sum()[None], (~torch.isnan(t)).sum()[None]
                total, count = (self.accelerator.reduce(x, reduction="sum") for x in t)
                if count.item() > 0:
                    logs[name] = round((total / count).item(), 4)
                values.clear()
        return super().log(logs, *args, **kwargs)
