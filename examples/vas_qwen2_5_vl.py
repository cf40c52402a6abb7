"""Measure the Visual Attention Score (VAS) of Qwen2.5-VL-7B-Instruct on one image + question, then answer with
and without the VAF intervention (image keys x(1 + 0.15) in the scores of the rows after the image).

This is ``avar-kernels vas --model Qwen/Qwen2.5-VL-7B-Instruct`` (the code is in ``avar_kernels/cli/vas.py``:
``load_checkpoint``, ``measure``, ``answers``); any other option of ``avar-kernels vas`` is passed on.
Needs a GPU with ~20 GB, the checkpoint (downloaded or in the HF cache) and the Qwen2.5-VL processor
(torchvision or Pillow). The masses come from the fused kernel: no [S, S] attention matrix is ever stored,
unlike eager attention with output_attentions=True.

    python examples/vas_qwen2_5_vl.py --image cat.jpg --question "What is in the picture?"
"""
import sys

from avar_kernels.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["vas", "--model", "Qwen/Qwen2.5-VL-7B-Instruct", "--max-new-tokens", "48",
                           *sys.argv[1:]]))
