"""The attention-guided SFT trainer: its loss against the published formula on eager weights, gradient
accumulation, packed batches, gradient checkpointing and the logged series."""
import warnings

import pytest
import torch

pytest.importorskip("transformers")

from test_train_fidelity import published_guidance_loss  # noqa: E402
from transformers import TrainingArguments  # noqa: E402

from avar_kernels import IMAGE, SYSTEM  # noqa: E402
from avar_kernels.train import embedded as E  # noqa: E402
from avar_kernels.train.batches import SFTCollator, SFTDataset  # noqa: E402
from avar_kernels.train.run import embedded_conversation  # noqa: E402
from avar_kernels.train.sft import AvarArguments, AvarSFTTrainer  # noqa: E402

warnings.filterwarnings("ignore", message=".*falling back to the slow reference backend.*")
PROC = E.processor()


def samples(n, seed=0):
    ds = SFTDataset([embedded_conversation(r) for r in E.records(n, seed=seed)], PROC)
    return [ds[i] for i in range(n)]


def trainer(tmp_path, model=None, *, packing=False, avar=None, **kw):
    model = model or E.model("avar", seed=0)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", remove_unused_columns=False,
                             learning_rate=1e-3, lr_scheduler_type="constant", disable_tqdm=True, seed=0,
                             logging_steps=1, save_strategy="no", **kw)
    data = SFTDataset([embedded_conversation(r) for r in E.records(8, seed=1)], PROC)
    collate = SFTCollator(PROC.tokenizer.pad_token_id, packing=packing,
                          rope_index=model.model.get_rope_index if packing else None)
    return AvarSFTTrainer(model=model, args=args, avar_args=avar or AvarArguments(), processing_class=PROC,
                          train_dataset=data, data_collator=collate)


def test_compute_loss_equals_published_formula_on_eager_weights(tmp_path):
    model = E.model("avar", seed=0, num_hidden_layers=2)
    eager = E.model("eager", seed=0, num_hidden_layers=2)
    eager.load_state_dict(model.state_dict())
    t = trainer(tmp_path, model)
    batch = SFTCollator(PROC.tokenizer.pad_token_id)(samples(3))
    model.train()
    loss = t.compute_loss(model, dict(batch))
    cls, q = batch["token_classes"], batch["query_mask"]
    inputs = {k: v for k, v in batch.items() if k not in ("token_classes", "query_mask")}
    out = eager(**inputs, output_attentions=True, use_cache=False)
    enh, sup = published_guidance_loss(out.attentions, cls == IMAGE, cls == SYSTEM, q, 1e-6)
    torch.testing.assert_close(loss, out.loss + 0.15 * enh + 0.15 * sup, rtol=1e-5, atol=1e-6)
    loss.backward()
    (out.loss + 0.15 * enh + 0.15 * sup).backward()
    grads = dict(eager.named_parameters())
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n].grad, rtol=1e-4, atol=2e-6, msg=n)


def _one_step(tmp_path, **kw):
    # SGD: the step is the gradient itself (Adam's first step would magnify rounding in tiny components)
    t = trainer(tmp_path, E.model("avar", seed=0, num_hidden_layers=2), max_steps=1, optim="sgd", **kw)
    t.train()
    return t


def test_gradient_accumulation_equals_the_big_batch(tmp_path):
    big = _one_step(tmp_path / "a", per_device_train_batch_size=4, gradient_accumulation_steps=1)
    acc = _one_step(tmp_path / "b", per_device_train_batch_size=2, gradient_accumulation_steps=2)
    for (n, p), q in zip(big.model.named_parameters(), acc.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=n)
    a, b = big.state.log_history[0], acc.state.log_history[0]
    for key in ("loss", "lm_loss", "l_enh", "l_sup", "vas", "visual_share"):
        assert a[key] == pytest.approx(b[key], rel=2e-3, abs=1e-4), key
    assert a["loss"] == pytest.approx(a["lm_loss"] + 0.15 * a["l_enh"] + 0.15 * a["l_sup"], abs=2e-3)


def test_packed_batch_gives_the_padded_loss(tmp_path):
    model = E.model("avar", seed=0, num_hidden_layers=2)
    s = samples(3, seed=2)
    padded = SFTCollator(PROC.tokenizer.pad_token_id)(s)
    packed = SFTCollator(PROC.tokenizer.pad_token_id, packing=True, rope_index=model.model.get_rope_index)(s)
    assert packed["input_ids"].shape == (1, sum(len(x["input_ids"]) for x in s)) and "attention_mask" not in packed
    t = trainer(tmp_path, model)
    model.train()
    n = int((padded["labels"][:, 1:] != -100).sum())          # the LM loss as a sum over the same tokens
    a = t.compute_loss(model, dict(padded), num_items_in_batch=n)
    b = t.compute_loss(model, dict(packed), num_items_in_batch=n)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_same_step(tmp_path):
    plain = _one_step(tmp_path / "a", per_device_train_batch_size=2)
    ckpt = _one_step(tmp_path / "b", per_device_train_batch_size=2, gradient_checkpointing=True)
    assert ckpt.model.is_gradient_checkpointing and not plain.model.is_gradient_checkpointing
    for (n, p), q in zip(plain.model.named_parameters(), ckpt.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=n)
    assert plain.state.log_history[0]["l_enh"] == ckpt.state.log_history[0]["l_enh"]


def test_plain_run_logs_only_the_lm_loss_and_bf16_runs(tmp_path):
    t = trainer(tmp_path, E.model("avar", seed=0, num_hidden_layers=2), avar=AvarArguments(use_avar_attn_guide=False),
                max_steps=1, per_device_train_batch_size=2)
    t.train()
    log = t.state.log_history[0]
    assert "lm_loss" in log and "l_enh" not in log and log["loss"] == pytest.approx(log["lm_loss"], abs=1e-3)
    # bf16 weights and autocast, as a checkpoint loaded in bf16 trains
    t = trainer(tmp_path / "bf16", E.model("avar", seed=0, num_hidden_layers=2).to(torch.bfloat16), max_steps=1,
                per_device_train_batch_size=2, bf16=True, use_cpu=True)
    t.train()
    log = t.state.log_history[0]
    assert all(torch.isfinite(torch.tensor(log[k])) for k in ("loss", "l_enh", "l_sup", "vas"))
