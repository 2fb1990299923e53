import json

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
