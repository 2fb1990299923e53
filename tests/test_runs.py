"""What merge, generate and evaluate take from a run folder, and what they never take from it."""

import pytest
import yaml

import qlora.pipeline
import qlora.stages.model
from qlora.compose import compose_config
from qlora.config import DataConfig, EvaluateConfig, GenerateConfig, MergeConfig
from qlora.evaluate import evaluate
from qlora.generate import generate
from qlora.merge import merge
from qlora.pipeline import run_training


class FirstLoad(Exception):
    """Stops a command at its first load of the base model, once its arguments are recorded."""


@pytest.fixture(scope="module")
def their_run(tmp_path_factory):
    """A one-step run whose config.yaml asks for remote code, as a folder someone else wrote could."""
    run = tmp_path_factory.mktemp("their") / "run"
    config = compose_config([f"training.output_dir={run}", "training.max_steps=1", "eval.exact_match_samples=0"])
    run_training(config)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    saved["model"]["trust_remote_code"] = True
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    return run, config.data.heldout_path


COMMANDS = {
    "merge": lambda run, trust, heldout: merge(MergeConfig(run=run, from_dequantized=True, trust_remote_code=trust)),
    "generate": lambda run, trust, heldout: generate(GenerateConfig(run=run, prompt="hi", trust_remote_code=trust)),
    "evaluate": lambda run, trust, heldout: evaluate(EvaluateConfig(run=run, data=DataConfig(path=heldout),
                                                                    trust_remote_code=trust)),
}


@pytest.mark.parametrize("on_command_line", [False, True], ids=["not-on-command-line", "on-command-line"])
@pytest.mark.parametrize("command", COMMANDS)
def test_remote_code_runs_only_when_the_command_line_allows_it(their_run, monkeypatch, caplog, command,
                                                                on_command_line):
    run, heldout = their_run
    loads = []

    def first_load(name_or_path, *args, trust_remote_code=False, **kwargs):
        loads.append((trust_remote_code, "running code shipped with" in caplog.text))
        raise FirstLoad

    monkeypatch.setattr(qlora.stages.model.AutoConfig, "from_pretrained", first_load)
    with pytest.raises(FirstLoad):
        COMMANDS[command](str(run), on_command_line, heldout)
    trusted, warned_before_loading = loads[0]
    assert trusted is on_command_line
    assert warned_before_loading is on_command_line
    # the run's own setting is named and ignored when the command line does not ask for remote code
    assert ("model.trust_remote_code=true; ignored" in caplog.text) is not on_command_line


def test_training_warns_about_remote_code_before_its_tokenizer_loads(tiny_config, monkeypatch, caplog):
    def tokenizer(model):
        assert "trust_remote_code=true: running code shipped with" in caplog.text
        raise FirstLoad

    monkeypatch.setattr(qlora.pipeline, "load_tokenizer", tokenizer)
    with pytest.raises(FirstLoad):
        run_training(tiny_config("model.trust_remote_code=true"))
