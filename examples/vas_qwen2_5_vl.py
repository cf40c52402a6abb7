"""Measure the Visual Attention Score (VAS) of Qwen2.5-VL-7B-Instruct on one image + question, then answer with
and without the VAF intervention (image keys x(1 + 0.15) in the scores of the user/response rows).

Needs a GPU with ~20 GB, the checkpoint (downloaded or in the HF cache) and the Qwen2.5-VL processor
(torchvision or the PIL image processor). The masses come from the fused kernel: no [S, S] attention matrix
is ever stored, unlike eager attention with output_attentions=True.

    python examples/vas_qwen2_5_vl.py --image cat.jpg --question "What is in the picture?"
"""
import argparse

import torch
from PIL import Image
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

import avar_kernels.hf as ah
from avar_kernels import metrics

SYSTEM_PROMPT = "You are a helpful assistant."


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="Qwen/Qwen2.5-VL-7B-Instruct")
    ap.add_argument("--image", default=None, help="an image file (default: a synthetic test pattern)")
    ap.add_argument("--question", default="Describe the image in one sentence.")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    args = ap.parse_args()

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        args.model, dtype=torch.bfloat16, device_map="cuda",
        attn_implementation={"text_config": "avar", "vision_config": "sdpa"})
    processor = AutoProcessor.from_pretrained(args.model)
    if args.image:
        image = Image.open(args.image).convert("RGB")
    else:
        image = Image.new("RGB", (448, 448), "white")
        image.paste((200, 30, 30), (64, 64, 256, 256))
        image.paste((30, 30, 200), (224, 224, 400, 400))
    messages = [{"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": args.question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[text], images=[image], return_tensors="pt").to(model.device)
    classes = ah.token_classes(inputs["input_ids"], processor, image_token_id=model.config.image_token_id,
                               video_token_id=model.config.video_token_id)

    # 1. VAS over all layers and heads, user-turn query rows (paper Eq. 1)
    with torch.no_grad(), ah.record(model, classes) as rec:
        model(**inputs)
    score = metrics.vas(rec.mass, classes)
    share = metrics.visual_share(rec.mass, classes)
    print(f"VAS = {score.overall.item():.2f} ({metrics.vas_band(score.overall.item())}), "
          f"visual share = {share.overall.item():.3f}")
    print("VAS per layer:", " ".join(f"{v:.1f}" for v in score.per_layer.tolist()))

    # 2. Answers without and with VAF (ClearSight / AVAR: image keys MUL=+0.15)
    gen = dict(max_new_tokens=args.max_new_tokens, do_sample=False)
    n = inputs["input_ids"].shape[1]
    with torch.no_grad():
        plain = model.generate(**inputs, **gen)
        with ah.intervene(model, ah.vaf(alpha_img=0.15, alpha_sys=0.0), token_classes=classes):
            boosted = model.generate(**inputs, **gen)
    print("plain:", processor.batch_decode(plain[:, n:], skip_special_tokens=True)[0])
    print("VAF:  ", processor.batch_decode(boosted[:, n:], skip_special_tokens=True)[0])


if __name__ == "__main__":
    main()
