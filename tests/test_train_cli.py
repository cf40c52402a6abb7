"""``avar-kernels synth`` and ``avar-kernels train sft|grpo``: short runs of the embedded default, resume, configs,
and one-line errors."""
import json
import warnings

import pytest

pytest.importorskip("trl")
pytest.importorskip("PIL")

from avar_kernels.cli import main  # noqa: E402
from avar_kernels.train.config import split_config  # noqa: E402

warnings.filterwarnings("ignore", message=".*falling back to the slow reference backend.*")
SMALL = ["--set", "embedded_train_size=16", "--set", "embedded_eval_size=4", "--set", "max_new_tokens=8",
         "--set", "per_device_train_batch_size=4", "--set", "disable_tqdm=true", "--set", "logging_steps=1"]


def test_synth_writes_resumes_and_reports_bad_lines(tmp_path, capsys):
    out = tmp_path / "cold.jsonl"
    assert main(["synth", "--output", str(out), "--num", "3"]) == 0
    assert "wrote 3 samples" in capsys.readouterr().out
    assert main(["synth", "--output", str(out), "--num", "5"]) == 0
    assert "wrote 2 samples" in capsys.readouterr().out and len(out.read_text().splitlines()) == 5
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    good = {"image": rows[0]["images"][0], "question": "What is shown ?", "answer": "red"}
    inp = tmp_path / "records.jsonl"
    inp.write_text("\n".join([json.dumps(good), "{oops", json.dumps({**good, "answer": ""}),
                              json.dumps({**good, "image": "nope.png"})]) + "\n")
    assert main(["synth", "--input", str(inp), "--output", str(tmp_path / "o.jsonl")]) == 0
    text = capsys.readouterr().out
    assert f"skipped {inp}:2: broken JSON" in text and f"{inp}:3: empty answer" in text
    assert f"{inp}:4: image not found" in text and "wrote 1 samples" in text and "3 records skipped" in text


def test_train_sft_embedded_runs_and_resumes(tmp_path, capsys):
    common = ["train", "sft", "--output-dir", str(tmp_path), *SMALL, "--set", "save_steps=1"]
    assert main(common + ["--max-steps", "1"]) == 0
    text = capsys.readouterr().out
    assert "held-out accuracy" in text and "chance" in text and "'l_enh'" in text and "'vas'" in text
    assert (tmp_path / "checkpoint-1").is_dir() and (tmp_path / "model.safetensors").is_file()
    assert main(common + ["--max-steps", "2", "--resume"]) == 0
    state = json.loads((tmp_path / "checkpoint-2" / "trainer_state.json").read_text())
    assert [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2]
    report = json.loads((tmp_path / "report.json").read_text())
    assert 0 <= report["heldout"]["accuracy"] <= 1 and report["heldout"]["n"] == 4


def test_train_grpo_embedded_short_run_logs_each_reward(tmp_path):
    assert main(["train", "grpo", "--output-dir", str(tmp_path), "--max-steps", "1", "--set",
                 "embedded_train_size=8", "--set", "max_completion_length=8", "--set", "disable_tqdm=true"]) == 0
    log = json.loads((tmp_path / "report.json").read_text())["log"][0]
    for name in ("accuracy_reward", "visual_reward", "format_reward"):
        assert f"rewards/{name}/mean" in log
    assert "reward" in log


@pytest.mark.parametrize("argv, message", [
    (["--model", "{tmp}/missing"], "model_name_or_path: cannot load a checkpoint"),
    (["--set", "no_such_key=1"], "unknown config keys: no_such_key"),
    (["--resume"], "resume_from_checkpoint: no checkpoint in"),
    (["--dataset", "{tmp}/bad.jsonl"], "no usable record"),
    (["--model", "{tmp}/llava"], "model type 'llava'"),
    (["--set", "finetuning_type=lora"], "only 'full' is supported"),
])
def test_train_errors_are_one_line(tmp_path, capsys, argv, message):
    (tmp_path / "bad.jsonl").write_text('{"messages": []}\n{broken\n')
    (tmp_path / "llava").mkdir()
    (tmp_path / "llava" / "config.json").write_text(json.dumps({"model_type": "llava"}))
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(["train", "sft", "--output-dir", str(tmp_path / "out"), *argv]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("avar-kernels train: error: ") and message in err and "\n" not in err


def test_config_takes_the_published_avar_keys(tmp_path):
    cfg = {"model_name_or_path": None, "stage": "sft", "do_train": True, "finetuning_type": "full",
           "use_avar_attn_guide": True, "avar_attn_alpha": 0.2, "avar_attn_beta": 0.1, "avar_attn_epsilon": 1e-5,
           "avar_attn_layer_indices": "0,2", "cutoff_len": 4096, "image_max_pixels": 262144,
           "learning_rate": 1e-5, "gradient_accumulation_steps": 8, "output_dir": str(tmp_path)}
    with pytest.warns(UserWarning, match="ignored: do_train"):
        train, avar, data = split_config(cfg, "sft")
    assert (avar.avar_attn_alpha, avar.avar_attn_beta, avar.avar_attn_layer_indices) == (0.2, 0.1, [0, 2])
    assert (train.learning_rate, train.gradient_accumulation_steps, train.remove_unused_columns) == (1e-5, 8, False)
    assert (data.cutoff_len, data.image_max_pixels) == (4096, 262144)
    with pytest.raises(ValueError, match="stage"):
        split_config({**cfg, "stage": "dpo"}, "sft")


def test_example_configs_load():
    import os

    import yaml

    root = os.path.join(os.path.dirname(__file__), "..", "examples", "train")
    from avar_kernels.train.config import load_yaml

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        train, avar, data = split_config({**load_yaml(os.path.join(root, "avar_sft.yaml")), "bf16": False}, "sft")
        assert data.model_name_or_path == "Qwen/Qwen2.5-VL-7B-Instruct" and avar.avar_query_set == "turn"
        assert train.warmup_steps == 0.1 and train.gradient_checkpointing
        train, rewards, data = split_config({**load_yaml(os.path.join(root, "avar_grpo.yaml")), "bf16": False}, "grpo")
        assert (rewards.visual_reward_weight, train.num_generations) == (0.3, 8)
        train, avar, data = split_config(load_yaml(os.path.join(root, "embedded_sft.yaml")), "sft")
        assert data.model_name_or_path is None and train.max_steps == 1500
    kinds = {}
    for name in ("ddp", "fsdp", "deepspeed_zero3"):
        with open(os.path.join(root, "accelerate", name + ".yaml")) as f:
            kinds[name] = yaml.safe_load(f)["distributed_type"]
    assert kinds == {"ddp": "MULTI_GPU", "fsdp": "FSDP", "deepspeed_zero3": "DEEPSPEED"}
    with open(os.path.join(root, "ds_zero3.json")) as f:
        assert json.load(f)["zero_optimization"]["stage"] == 3


def test_cpu_processes_under_torchrun_get_gloo_ddp():
    from avar_kernels.train.config import cpu_defaults

    assert cpu_defaults({}, 2) == {"bf16": False, "use_cpu": True, "ddp_backend": "gloo"}
    assert cpu_defaults({"ddp_backend": "mpi", "bf16": True}, 2)["ddp_backend"] == "mpi"
    assert "ddp_backend" not in cpu_defaults({}, 1)
