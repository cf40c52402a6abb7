"""Passing token classes into the ``"avar"`` attention of a model, and recording the per-class masses.

One controller per model installs one forward pre-hook (``with_kwargs=True``) on the *language model* (the
text decoder: ``model.model.language_model`` for the VLMs). On every forward the hook injects two kwargs, which
transformers carries down to each attention call:

* ``avar_classes``: int64 ``[B, S_total]``, the classes of every position seen so far (the cache included).
  During ``generate()`` the classes given for the prompt are extended with :data:`avar_kernels.RESPONSE` for the
  new tokens (``S_total = cache length + new tokens``); beams / ``num_return_sequences`` repeat them per row.
* ``avar_context``: a small per-forward object through which the attention function asks for the re-weighting
  of its layer and hands back its masses.
* ``avar_query_classes``: int64 ``[B, S_total]``, only while an intervention is active: the query class of every
  row for the op's tables (:class:`avar_kernels.hf.rows.RowPlan`).

Kwargs, unlike a ContextVar, are captured by gradient checkpointing, so the recomputation in backward sees the
same classes; a mass that was already stored for this forward and layer is not stored twice.
"""
from __future__ import annotations

import contextlib
import weakref

import torch

import avar_kernels
from avar_kernels import _checks

from .attention import NUM_CLASSES
from .rows import RowPlan

_CONTROLLERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def find_language_model(model):
    """The text decoder of a VLM (``model.model.language_model``) or of a causal LM (``model.model``)."""
    for path in (("model", "language_model"), ("language_model",), ("model",), ()):
        m = model
        for p in path:
            m = getattr(m, p, None)
            if m is None:
                break
        if isinstance(m, torch.nn.Module) and hasattr(m, "layers") and hasattr(m, "config"):
            return m
    raise ValueError(f"avar: cannot find the language model inside {type(model).__name__} "
                     "(expected model.model.language_model or model.model with .layers)")


def controller(model) -> "_Controller":
    ctl = _CONTROLLERS.get(model)
    if ctl is None:
        ctl = _CONTROLLERS[model] = _Controller(model)
    return ctl


class _Forward:
    """What one forward of the language model hands to its attention calls (``avar_context`` kwarg).

    It snapshots the active recorders and interventions, so that the recomputation of a layer under gradient
    checkpointing (which runs in backward, possibly after the contexts closed) takes the same path."""

    __slots__ = ("ctl", "step", "recorders", "plan", "classes_checked")

    def __init__(self, ctl, step, classes_checked, plan):
        self.ctl, self.step = ctl, step
        self.classes_checked = classes_checked  # the hook checked the id range once for all layers
        self.recorders = tuple(ctl.recorders)
        self.plan = plan  # RowPlan of the active interventions, or None

    @property
    def num_classes(self):
        return NUM_CLASSES if self.plan is None else self.plan.num_classes

    def reweight(self, layer_idx, num_heads, device):
        return None if self.plan is None else self.plan.reweight(layer_idx, num_heads, device)

    def wants_mass(self, layer_idx):
        return any(r.wants(layer_idx) for r in self.recorders)

    def wants_key_mass(self, layer_idx):
        return any(r.key_mass_wanted and r.wants(layer_idx) for r in self.recorders)

    def store(self, layer_idx, mass, key_mass=None):
        """Hands a layer's masses ``[B, H, Sq, C]`` (and key masses ``[B, H, Sk, C']`` by query id) to the recorders."""
        if key_mass is not None and self.plan is not None:
            key_mass = self.plan.key_mass_by_class(key_mass)
        for r in self.recorders:
            if r.wants(layer_idx):
                r._store(self.step, layer_idx, mass, key_mass if r.key_mass_wanted else None)


class _Controller:
    def __init__(self, model):
        self.lm = find_language_model(model)
        self.classes_stack: list = []
        self.recorders: list = []
        self.interventions: list = []
        self.handle = None
        self.users = 0
        self.step = 0
        self.current_classes = None
        self._plans: dict = {}

    # ---- lifetime
    def enter(self):
        if self.users == 0:
            self.handle = self.lm.register_forward_pre_hook(self._hook, with_kwargs=True)
        self.users += 1

    def exit(self):
        self.users -= 1
        if self.users == 0 and self.handle is not None:
            self.handle.remove()
            self.handle = None

    def changed(self):
        self._plans.clear()

    def plan(self):
        """The RowPlan of the active interventions (cached until they change), or None. While key masses are
        recorded, its query ids keep token classes apart (key masses are summed by token class)."""
        if not self.interventions:
            return None
        by_class = any(r.key_mass_wanted for r in self.recorders)
        key = (tuple(id(iv) for iv in self.interventions), by_class)
        if key not in self._plans:
            cfg = self.lm.config
            self._plans[key] = RowPlan(tuple(self.interventions), cfg.num_hidden_layers, cfg.num_attention_heads,
                                       by_class=by_class)
        return self._plans[key]

    # ---- the hook
    def _hook(self, module, args, kwargs):
        classes = next((c for c in reversed(self.classes_stack) if c is not None), None)
        x = kwargs.get("inputs_embeds")
        if x is None:
            x = kwargs.get("input_ids", args[0] if args else None)
        if x is None:
            return None
        batch, sq = x.shape[0], x.shape[1]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = 0
        if cache is not None and hasattr(cache, "get_seq_length"):
            past = int(cache.get_seq_length())
        self.step += 1
        if past == 0:
            for r in self.recorders:
                r._new_sequence()
        if classes is not None:
            cls = classes.to(device=x.device, dtype=torch.long)
            if cls.dim() != 2:
                raise ValueError(f"avar: token classes must be [B, S], got shape {tuple(cls.shape)}")
            if cls.shape[0] != batch:
                if batch % cls.shape[0]:
                    raise ValueError(f"avar: token classes have batch {cls.shape[0]}, the input has {batch}")
                cls = cls.repeat_interleave(batch // cls.shape[0], dim=0)
            total = past + sq
            if cls.shape[1] < total:       # generation: the new tokens are the response
                cls = torch.cat([cls, cls.new_full((batch, total - cls.shape[1]), avar_kernels.RESPONSE)], 1)
            elif cls.shape[1] > total:
                raise ValueError(f"avar: token classes cover {cls.shape[1]} positions but the model sees only "
                                 f"{total} (cache {past} + input {sq})")
            _checks.check_class_range("token classes", cls, NUM_CLASSES)
            self.current_classes = cls
            kwargs["avar_classes"] = cls
        plan = self.plan()
        if plan is not None and classes is not None:
            kwargs["avar_query_classes"] = plan.query_classes(cls)
        kwargs["avar_context"] = _Forward(self, self.step, classes_checked=classes is not None, plan=plan)
        return args, kwargs


def _layer_filter(layers):
    if layers is None:
        return None
    if isinstance(layers, int):
        return {layers}
    return layers


class Recorder:
    """Result of :func:`record`: ``mass`` is a list over the recorded layers (``layers``, ascending) of float32
    ``[B, H, S, C]`` tensors (C = 6 classes), or of what ``reduce`` made of them. Differentiable when grad is on.

    A forward that starts a new sequence (empty cache) replaces what was recorded; the decode steps of
    ``generate()`` append their new query rows (dim -2), so after ``generate()`` the rows cover the prompt and
    every generated token but the last (whose forward never runs). ``chunks[layer]`` keeps the per-forward pieces.
    ``classes`` is the ``[B, S]`` class tensor of the last forward (extended during generation).

    With ``key_mass=True``, ``key_mass`` is a list over the same layers of float32 ``[B, H, S, C]`` tensors: the
    attention each position receives from the rows of each token class, summed over the forwards of a generation
    (each step's rows add to the cache positions they see).
    """

    def __init__(self, ctl, layers, reduce, key_mass=False):
        self._ctl = ctl
        self._layers = _layer_filter(layers)
        self._reduce = _make_reduce(reduce)
        self.key_mass_wanted = bool(key_mass)
        self.chunks: dict = {}
        self.key_chunks: dict = {}
        self._seen: set = set()

    def wants(self, layer_idx):
        return layer_idx is not None and (self._layers is None or layer_idx in self._layers)

    def _new_sequence(self):
        self.chunks = {}
        self.key_chunks = {}
        self._seen = set()

    def _store(self, step, layer_idx, mass, key_mass=None):
        if (step, layer_idx) in self._seen:      # recomputation under gradient checkpointing
            return
        self._seen.add((step, layer_idx))
        self.chunks.setdefault(layer_idx, []).append(self._reduce(mass))
        if key_mass is not None:
            self.key_chunks.setdefault(layer_idx, []).append(key_mass)

    @property
    def layers(self):
        return sorted(self.chunks)

    @property
    def mass(self):
        out = []
        for layer in self.layers:
            c = self.chunks[layer]
            out.append(c[0] if len(c) == 1 else torch.cat(c, dim=-2))
        return out

    @property
    def key_mass(self):
        if not self.key_mass_wanted:
            raise ValueError("record: key masses were not recorded; use record(..., key_mass=True)")
        out = []
        for layer in self.layers:
            pieces = self.key_chunks.get(layer, [])
            total = max(p.shape[-2] for p in pieces)
            acc = sum(torch.nn.functional.pad(p, (0, 0, 0, total - p.shape[-2])) for p in pieces)
            out.append(acc)
        return out

    @property
    def classes(self):
        return self._ctl.current_classes


def _make_reduce(reduce):
    if reduce is None:
        return lambda m: m
    if callable(reduce):
        return reduce
    if reduce == "mean_heads":
        return lambda m: m.mean(dim=1)
    if reduce == "sum_heads":
        return lambda m: m.sum(dim=1)
    raise ValueError(f"record: reduce must be None, 'mean_heads', 'sum_heads' or a callable; got {reduce!r}")


@contextlib.contextmanager
def record(model, token_classes, *, layers=None, reduce=None, key_mass=False):
    """Record the per-class attention masses of the language model's layers.

    Args:
        model: a transformers model whose text attention is ``"avar"``.
        token_classes: int ``[B, S]`` classes of the input positions (see :func:`token_classes`).
        layers: layer indices to record (an int, a set, a range); default all.
        reduce: None (keep ``[B, H, S, C]``), ``"mean_heads"`` / ``"sum_heads"`` (``[B, S, C]``) or a callable
            applied to each ``[B, H, Sq, C]`` piece as it is produced (memory O(layers) when it reduces over S;
            it should keep the query axis at dim -2 for the decode steps of ``generate()`` to be concatenated).
        key_mass: also record key masses (``Recorder.key_mass``): per position, the attention it receives from
            each token class of query rows; :func:`avar_kernels.hf.image_heatmaps` lays an image's on its grid.

    Yields a :class:`Recorder`. Usable around ``model(...)``, ``model.generate(...)`` and a backward pass.
    """
    ctl = controller(model)
    rec = Recorder(ctl, layers, reduce, key_mass=key_mass)
    ctl.classes_stack.append(token_classes)
    ctl.recorders.append(rec)
    ctl.enter()
    try:
        yield rec
    finally:
        ctl.exit()
        ctl.recorders.remove(rec)
        _remove(ctl.classes_stack, token_classes)


def _remove(lst, obj):
    for i, x in enumerate(lst):
        if x is obj:
            del lst[i]
            return


@contextlib.contextmanager
def use_classes(model, token_classes):
    """Make ``token_classes`` the classes of the model's forwards (for :func:`intervene` alone)."""
    ctl = controller(model)
    ctl.classes_stack.append(token_classes)
    ctl.enter()
    try:
        yield
    finally:
        ctl.exit()
        _remove(ctl.classes_stack, token_classes)

