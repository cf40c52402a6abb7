"""GRPO: the visual reward from the policy's fused masses against eager attention weights, and a short run."""
import types
import warnings

import pytest
import torch

pytest.importorskip("trl")

from avar_kernels.train import embedded as E  # noqa: E402
from avar_kernels.train.rewards import VisualReward, rollout_inputs  # noqa: E402
from avar_kernels.types import IMAGE, RESPONSE, SYSTEM  # noqa: E402

warnings.filterwarnings("ignore", message=".*falling back to the slow reference backend.*")


def rollouts():
    proc = E.processor()
    recs = E.records(2, seed=4)
    prompts = [[{"role": "user", "content": [{"type": "image", "image": r.images[0]},
                                             {"type": "text", "text": r.question}]}] for r in recs]
    texts = [f"<think> the image shows it </think> <answer> {recs[0].answer} </answer>",
             "<think> a </think> <answer> nothing </answer>"]
    ids = [proc.tokenizer(t)["input_ids"] + [proc.tokenizer.eos_token_id] for t in texts]
    return proc, prompts, texts, ids, [r.answer for r in recs]


def test_visual_reward_matches_eager_weights_and_is_zero_for_wrong_answers():
    proc, prompts, texts, ids, answers = rollouts()
    model = E.model("avar", seed=0, num_hidden_layers=2)
    eager = E.model("eager", seed=0, num_hidden_layers=2)
    eager.load_state_dict(model.state_dict())
    reward = VisualReward(proc)
    reward.trainer = types.SimpleNamespace(model=model, accelerator=types.SimpleNamespace(unwrap_model=lambda m: m))
    got = reward(prompts, texts, ids, answer=answers)
    assert got[1] == 0.0 and got[0] > 0

    inputs, classes, rows = rollout_inputs(proc, prompts, ids, "cpu")
    assert torch.equal(rows, classes == RESPONSE) and (classes == IMAGE).sum() == 18
    with torch.no_grad():
        att = eager(**inputs, output_attentions=True, use_cache=False).attentions
    onehot = torch.nn.functional.one_hot(classes, 6).float()
    mass = sum((a @ onehot[:, None]).sum(1) for a in att)                   # sum over layers and heads [B, S, C]
    ratio = mass[..., IMAGE] / (mass[..., SYSTEM] + 1e-6)
    want = (ratio[0] * rows[0]).sum() / rows[0].sum()
    assert got[0] == pytest.approx(want.item(), rel=1e-4)
    # the released EasyR1 aggregation is one ratio of sums over the same rows
    reward_sums = VisualReward(proc, aggregate="ratio_of_sums")
    reward_sums.trainer = reward.trainer
    sums = reward_sums(prompts, texts, ids, answer=answers)[0]
    want_sums = (mass[0, :, IMAGE] * rows[0]).sum() / ((mass[0, :, SYSTEM] * rows[0]).sum() + 1e-6)
    assert sums == pytest.approx(want_sums.item(), rel=1e-4)


def test_visual_reward_needs_the_trainer():
    proc, prompts, texts, ids, answers = rollouts()
    with pytest.raises(RuntimeError, match="trainer"):
        VisualReward(proc)(prompts, texts, ids, answer=answers)
