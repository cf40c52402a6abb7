"""One run of attention-guided SFT on the embedded default, for tests/test_train_dist.py: under torchrun (gloo,
several processes) or alone. Writes each rank's final weights and rank 0's loss log to --out."""
import argparse
import json
import os
import warnings

import torch
from transformers import TrainingArguments

from avar_kernels.train import embedded as E
from avar_kernels.train.batches import SFTCollator, SFTDataset
from avar_kernels.train.run import embedded_conversation
from avar_kernels.train.sft import AvarSFTTrainer

warnings.filterwarnings("ignore")
p = argparse.ArgumentParser()
p.add_argument("--out", required=True)
p.add_argument("--per-device", type=int, required=True)
p.add_argument("--steps", type=int, default=2)
a = p.parse_args()
torch.set_num_threads(1)
proc = E.processor()
args = TrainingArguments(output_dir=a.out, report_to="none", remove_unused_columns=False, optim="sgd",
                         learning_rate=0.5, lr_scheduler_type="constant", max_steps=a.steps, logging_steps=1,
                         per_device_train_batch_size=a.per_device, train_sampling_strategy="sequential",
                         save_strategy="no", disable_tqdm=True, seed=0, use_cpu=True,
                         ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", 1)) > 1 else None)
trainer = AvarSFTTrainer(model=E.model("avar", seed=0, num_hidden_layers=2), args=args, processing_class=proc,
                         train_dataset=SFTDataset([embedded_conversation(r) for r in E.records(16, seed=5)], proc),
                         data_collator=SFTCollator(proc.tokenizer.pad_token_id))
trainer.train()
rank = int(os.environ.get("RANK", 0))
torch.save(trainer.accelerator.unwrap_model(trainer.model).state_dict(), os.path.join(a.out, f"rank{rank}.pt"))
if rank == 0:
    with open(os.path.join(a.out, "log.json"), "w") as f:
        json.dump([e for e in trainer.state.log_history if "loss" in e], f)
