import json
from pathlib import Path

import pytest

from qlora.errors import QLoRAError
from qlora.stages.artifacts import prepare_run_dir


def test_run_folder_gets_config_and_environment(tiny_config):
    config = tiny_config("lora.r=4")
    run_dir = prepare_run_dir(config)
    assert "r: 4" in (run_dir / "config.yaml").read_text()
    environment = json.loads((run_dir / "environment.json").read_text())
    assert environment["packages"]["torch"] and environment["packages"]["peft"]
    assert "git_revision" in environment


def test_refuses_to_write_over_an_earlier_run(tiny_config):
    config = tiny_config()
    run_dir = prepare_run_dir(config)
    (run_dir / "adapter").mkdir()
    (run_dir / "adapter" / "adapter_model.safetensors").write_bytes(b"earlier weights")
    with pytest.raises(QLoRAError, match="already holds files from an earlier run"):
        prepare_run_dir(config)
    assert (run_dir / "adapter" / "adapter_model.safetensors").read_bytes() == b"earlier weights"


def test_overwrite_is_explicit(tiny_config):
    prepare_run_dir(tiny_config())
    assert prepare_run_dir(tiny_config("training.overwrite_output_dir=true")).is_dir()


def test_an_adapter_without_lora_weights_is_refused_and_the_earlier_one_kept(tiny_config, tmp_path):
    """A state dict gathered without the adapter (as FSDP's did on 2 GPUs) must not become an empty adapter/."""
    import torch

    from qlora.stages.adapters import attach_lora
    from qlora.stages.artifacts import save_adapter
    from qlora.stages.model import load_quantized_model, load_tokenizer

    config = tiny_config()
    tokenizer = load_tokenizer(config.model)
    model = attach_lora(load_quantized_model(config.model, config.quantization, torch.device("cpu")), config.lora)
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"earlier weights")
    with pytest.raises(QLoRAError, match="holds no LoRA weights"):
        save_adapter(model, tokenizer, tmp_path, state_dict={"model.norm.weight": torch.ones(4)})
    assert (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes() == b"earlier weights"
    assert "lora_A" in str(save_adapter(model, tokenizer, tmp_path).joinpath("adapter_model.safetensors").read_bytes()[:4000])


def test_a_run_that_failed_before_its_first_step_runs_again_with_the_same_command(tiny_config, tmp_path):
    from qlora.pipeline import run_training

    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": 5}\n')
    config = tiny_config(f"data.path={data}", "training.max_steps=1", "eval.exact_match_samples=0")
    with pytest.raises(QLoRAError, match="data.jsonl, line 2: field 'prompt' must be text"):
        run_training(config)
    assert (Path(config.training.output_dir) / "config.yaml").is_file()  # what it wrote before failing
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "d"}\n')  # fixed
    summary = run_training(config)
    assert (Path(summary.adapter_dir) / "adapter_model.safetensors").is_file()
    assert not [p for p in Path(summary.run_dir).iterdir() if p.name.startswith("before-resume")]


@pytest.mark.parametrize("left", ["checkpoints/checkpoint-2/trainer_state.json", "notes.txt",
                                  "before-resume-2/config.yaml"])
def test_a_folder_with_a_checkpoint_or_other_files_is_still_refused(tiny_config, left):
    config = tiny_config()
    run_dir = prepare_run_dir(config)
    (run_dir / left).parent.mkdir(parents=True, exist_ok=True)
    (run_dir / left).write_text("{}")
    with pytest.raises(QLoRAError, match="already holds files from an earlier run"):
        prepare_run_dir(config)


def test_a_folder_whose_last_attempt_logged_a_step_is_still_refused(tiny_config):
    config = tiny_config()
    run_dir = prepare_run_dir(config)
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 6.7}\n')  # killed with training.save_steps=0
    with pytest.raises(QLoRAError, match="already holds files from an earlier run"):
        prepare_run_dir(config)
