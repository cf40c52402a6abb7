"""``avar-kernels vas``: the Visual Attention Score (``metrics.vas``) and visual share of a vision-language model on one
  image + question, per layer and overall, from the fused ``"avar"`` attention (``avar_kernels.hf.record``), then
  the answers without and with the VAF intervention. Without ``--model`` it runs offline on a tiny random-weight
  Qwen2.5-VL (``avar_kernels.hf.testing``) and checks the recorded masses against eager attention weights.
"""
from __future__ import annotations

import math
import re

import torch

import avar_kernels as ak
from avar_kernels.types import CLASS_NAMES

from . import args as A

SYSTEM_PROMPT = "You are a helpful assistant."
DEFAULT_QUESTION = "Describe the image in one sentence."


# ------------------------------------------------------------------------------------------------ vas

def synthetic_image(size: int = 448) -> torch.Tensor:
    """A synthetic uint8 ``[3, size, size]`` image: white with a red and a blue square."""
    img = torch.full((3, size, size), 255, dtype=torch.uint8)
    a, b, c, d = (round(size * f) for f in (64 / 448, 256 / 448, 224 / 448, 400 / 448))
    img[:, a:b, a:b] = torch.tensor([200, 30, 30], dtype=torch.uint8)[:, None, None]
    img[:, c:d, c:d] = torch.tensor([30, 30, 200], dtype=torch.uint8)[:, None, None]
    return img


def load_image(path):
    """A PIL RGB image from ``path`` (needs Pillow)."""
    try:
        from PIL import Image
    except ImportError:
        raise ValueError("reading an image file needs Pillow (pip install pillow)") from None
    return Image.open(path).convert("RGB")


def _pil(image):
    """A PIL RGB image from a PIL image or a uint8 ``[3, H, W]`` tensor."""
    from PIL import Image

    if isinstance(image, torch.Tensor):
        return Image.fromarray(image.permute(1, 2, 0).contiguous().numpy())
    return image


def chat_messages(question, system=SYSTEM_PROMPT):
    return [{"role": "system", "content": [{"type": "text", "text": system}]},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def _qwen_image_processor(vision_config, grid):
    """transformers' torchvision-free Qwen2-VL image processor, sized so that an image becomes ``grid`` patches."""
    from transformers import Qwen2VLImageProcessorPil

    t, h, w = grid
    pixels = h * w * vision_config.patch_size ** 2
    return Qwen2VLImageProcessorPil(patch_size=vision_config.patch_size, merge_size=vision_config.spatial_merge_size,
                                    temporal_patch_size=vision_config.temporal_patch_size,
                                    size={"shortest_edge": pixels, "longest_edge": pixels})


class VasRun:
    """A model with its inputs: ``model``, ``inputs`` (kwargs of ``model(...)``), ``classes [1, S]``,
    ``decode(ids) -> str`` and, for the embedded tiny model, ``eager`` (the same weights with eager attention)."""

    def __init__(self, model, inputs, classes, decode, eager=None, name=""):
        self.model, self.inputs, self.classes, self.decode, self.eager, self.name = (model, inputs, classes, decode,
                                                                                     eager, name)


def tiny_qwen2_5_vl(image, question, *, device="cpu", dtype=torch.float32, seed=0) -> VasRun:
    """The embedded default: a tiny random-weight Qwen2.5-VL, the local ChatML tokenizer and ``image`` resized to
    4 image tokens. Also builds the same weights with eager attention, for the end-to-end check."""
    import avar_kernels.hf as ah
    from avar_kernels.hf import testing as T

    model, make_inputs = T.qwen2_5_vl(attn="avar", seed=seed)
    eager, _ = T.qwen2_5_vl(attn="eager", vision_attn="eager", seed=seed)
    eager.load_state_dict(model.state_dict())
    tok = T.chatml_tokenizer()

    def words(s):                      # the local tokenizer is word-level: split off punctuation
        return re.sub(r"([.?!,:;])", r" \1 ", s).split()

    nl = "\n"
    tokens = ["<|im_start|>", "system", nl, *words(SYSTEM_PROMPT), "<|im_end|>", nl,
              "<|im_start|>", "user", nl, "<|vision_start|>", "<|image_pad|>", "<|vision_end|>", *words(question),
              "<|im_end|>", nl, "<|im_start|>", "assistant", nl]
    ids = tok.convert_tokens_to_ids(tokens)                              # words outside the tiny vocabulary: [UNK]
    inputs = make_inputs([ids])                                          # one <|image_pad|> -> 4 image tokens
    grid = tuple(int(x) for x in inputs["image_grid_thw"][0])
    pixels = _qwen_image_processor(model.config.vision_config, grid)(images=[_pil(image)], return_tensors="pt")
    if tuple(int(x) for x in pixels["image_grid_thw"][0]) != grid:
        raise RuntimeError(f"image processor made a {pixels['image_grid_thw'][0].tolist()} grid, expected {grid}")
    inputs["pixel_values"] = pixels["pixel_values"]
    classes = ah.token_classes(inputs["input_ids"], tok, image_token_id=model.config.image_token_id)
    model.to(device=device, dtype=dtype)
    eager.to(device=device, dtype=dtype)
    inputs = {k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device))
              for k, v in inputs.items()}

    def decode(out_ids):
        return repr(tok.decode(out_ids, skip_special_tokens=True)) + f" (ids {out_ids})"

    return VasRun(model, inputs, classes.to(device), decode, eager=eager,
                  name="tiny random-weight Qwen2.5-VL (embedded default)")


def load_checkpoint(name, image, question, *, device="cuda", dtype=torch.bfloat16) -> VasRun:
    """A real checkpoint (a hub name or a local path) with ``"avar"`` text attention and ``sdpa`` vision
    attention, its AutoProcessor, and the chat-template inputs for ``image`` + ``question``."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import avar_kernels.hf as ah

    model = AutoModelForImageTextToText.from_pretrained(
        name, dtype=dtype, device_map=device, attn_implementation={"text_config": "avar", "vision_config": "sdpa"})
    model.eval()
    processor = AutoProcessor.from_pretrained(name)
    text = processor.apply_chat_template(chat_messages(question), add_generation_prompt=True)
    inputs = processor(text=[text], images=[image], return_tensors="pt").to(model.device)
    cfg = model.config
    image_id = getattr(cfg, "image_token_id", getattr(cfg, "image_token_index", None))
    classes = ah.token_classes(inputs["input_ids"], processor, image_token_id=image_id,
                               video_token_id=getattr(cfg, "video_token_id", None))

    def decode(out_ids):
        return processor.batch_decode([out_ids], skip_special_tokens=True)[0]

    return VasRun(model, dict(inputs), classes, decode, name=name)


def measure(run: VasRun, vaf_alpha=None):
    """Per-layer ``[B, H, S, C]`` masses of one forward, from the fused kernel (under VAF if ``vaf_alpha``)."""
    import contextlib

    import avar_kernels.hf as ah

    iv = (ah.intervene(run.model, ah.vaf(alpha_img=vaf_alpha), token_classes=run.classes) if vaf_alpha
          else contextlib.nullcontext())
    with torch.no_grad(), iv, ah.record(run.model, run.classes) as rec:
        run.model(**run.inputs)
    return rec.mass


def eager_check(run: VasRun, masses) -> float:
    """Max |recorded mass - eager attention weights summed by key class| over layers, heads and rows."""

    with torch.no_grad():
        out = run.eager(**run.inputs, output_attentions=True)
    onehot = torch.nn.functional.one_hot(run.classes, ak.NUM_CLASSES).float()[:, None]       # [B, 1, S, C]
    if len(out.attentions) != len(masses):
        raise RuntimeError(f"eager check: {len(out.attentions)} eager layers, {len(masses)} recorded")
    return max(float((m.float() - a.float() @ onehot).abs().max()) for m, a in zip(masses, out.attentions))


def answers(run: VasRun, alpha_img, max_new_tokens):
    """Greedy answers without and with VAF (image keys MUL=+alpha_img on the user/response rows)."""
    import avar_kernels.hf as ah

    gen = dict(max_new_tokens=max_new_tokens, do_sample=False)
    n = run.inputs["input_ids"].shape[1]
    with torch.no_grad():
        plain = run.model.generate(**run.inputs, **gen)
        with ah.intervene(run.model, ah.vaf(alpha_img=alpha_img), token_classes=run.classes):
            boosted = run.model.generate(**run.inputs, **gen)
    return run.decode(plain[0, n:].tolist()), run.decode(boosted[0, n:].tolist())


def register(sub):
    p = sub.add_parser(
        "vas", help="Visual Attention Score of a VLM on one image + question, answers with/without VAF",
        description="Measure the Visual Attention Score (image mass / system mass of the user-turn rows) and the "
                    "visual share, per layer and overall, with the fused 'avar' attention, then answer without and "
                    "with the VAF intervention. Without --model: a tiny random-weight Qwen2.5-VL, offline, checked "
                    "against eager attention (the numbers only demonstrate the pipeline).",
        epilog="example: avar-kernels vas --model Qwen/Qwen2.5-VL-7B-Instruct --image cat.jpg")
    p.add_argument("--model", default=None, metavar="PATH_OR_NAME",
                   help="a VLM checkpoint (hub name or local path), loaded with AutoModelForImageTextToText and "
                        "AutoProcessor, e.g. Qwen/Qwen2.5-VL-7B-Instruct (default: the embedded tiny random model)")
    p.add_argument("--image", type=A.existing_file, default=None, metavar="FILE",
                   help="an image file (default: a synthetic test pattern)")
    p.add_argument("--question", default=DEFAULT_QUESTION, help=f"default: {DEFAULT_QUESTION!r}")
    p.add_argument("--device", type=A.device, default=None,
                   help="default: cuda if available, else cpu (the embedded model: cpu)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="auto: bfloat16 for a checkpoint on cuda, float32 otherwise")
    p.add_argument("--vaf", type=A.finite_float, default=0.15, metavar="ALPHA",
                   help="VAF strength: image keys MUL=+ALPHA for user/response rows (default 0.15)")
    p.add_argument("--max-new-tokens", type=A.nonneg_int, default=32, metavar="N",
                   help="tokens to generate per answer; 0 skips generation (default 32)")
    p.add_argument("--layers", action="store_true", help="also print the per-head VAS of every layer")
    p.set_defaults(run=run, parser=p)
    return p


def _change(before, after):
    return f"{(after / before - 1) * 100:+.2f}%" if before and math.isfinite(before) else f"was {before:.4f}"


def run(args):
    from avar_kernels import metrics

    p = args.parser
    device = args.device or ("cpu" if args.model is None else A.default_device())
    if args.dtype == "auto":
        dtype = torch.bfloat16 if args.model is not None and device.startswith("cuda") else torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    if args.image is not None:
        try:
            image = load_image(args.image)
        except Exception as e:  # noqa: BLE001 - Pillow missing, not an image, ...
            p.error(f"argument --image: cannot read {args.image!r}: {e}")
        image_name = args.image
    else:
        image = synthetic_image()
        image_name = "synthetic test pattern (448x448, red and blue squares)"

    if args.model is None:
        run = tiny_qwen2_5_vl(image, args.question, device=device, dtype=dtype)
    else:
        try:
            run = load_checkpoint(args.model, image, args.question, device=device, dtype=dtype)
        except (OSError, ValueError, KeyError) as e:
            p.error(f"argument --model: cannot load {args.model!r}: {e}")

    classes = run.classes[0]
    counts = ", ".join(f"{CLASS_NAMES[c]} {int((classes == c).sum())}" for c in (ak.SYSTEM, ak.IMAGE, ak.USER)
                       if bool((classes == c).any()))
    print(f"avar-kernels {ak.__version__} vas: {run.name}, {device}, {str(dtype).removeprefix('torch.')}")
    if run.eager is not None:
        print("NOTE: random weights -- the numbers only demonstrate the pipeline, they say nothing about a real "
              "model (use --model PATH_OR_NAME for a checkpoint)")
    print(f"image: {image_name}\nquestion: {args.question!r}\nprompt: {classes.numel()} tokens ({counts})")

    masses = measure(run)
    score = metrics.vas(masses, run.classes)
    share = metrics.visual_share(masses, run.classes)
    print(f"\nVAS = {score.overall.item():.3f} ({metrics.vas_band(score.overall.item())}; narrow < 10, wide 10-15, "
          f"panoramic > 15), visual share = {share.overall.item():.4f}   (user-turn rows, {len(masses)} layers x "
          f"{masses[0].shape[1]} heads, fused avar attention)")
    print(f"{'layer':>7}{'VAS':>10}{'visual share':>14}")
    for i, (v, s) in enumerate(zip(score.per_layer.tolist(), share.per_layer.tolist())):
        print(f"{i:>7}{v:>10.3f}{s:>14.4f}")
    if args.layers:
        print("VAS per head (rows: layers):")
        for i, row in enumerate(score.per_head.tolist()):
            print(f"{i:>7} " + " ".join(f"{x:7.3f}" for x in row))

    if run.eager is not None:
        err = eager_check(run, masses)
        print(f"\neager check: max |avar mass - eager attention weights summed by class| = {err:.2e} "
              f"(all {len(masses)} layers, heads and rows; output_attentions=True, same weights)")

    if args.vaf:
        boosted = measure(run, args.vaf)
        v0, s0 = score.overall.item(), share.overall.item()
        v1 = metrics.vas(boosted, run.classes).overall.item()
        s1 = metrics.visual_share(boosted, run.classes).overall.item()
        print(f"\nwith VAF alpha={args.vaf:g} (scores on image keys x(1+{args.vaf:g}) for user/response rows): "
              f"VAS = {v1:.4f} ({_change(v0, v1)}), visual share = {s1:.4f} ({_change(s0, s1)})")

    if args.max_new_tokens > 0:
        plain, boosted = answers(run, args.vaf, args.max_new_tokens)
        print(f"\nanswer (greedy, {args.max_new_tokens} new tokens max):")
        print(f"  plain:            {plain}")
        print(f"  VAF alpha={args.vaf:<6g}: {boosted}")
    return 0


