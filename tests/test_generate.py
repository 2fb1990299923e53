"""`qlora.generate`: one prompt, a batch file and a chat, on the tiny trained run."""

import json
import shutil

import pytest
from transformers import AutoTokenizer

from conftest import library_noise, run_cli
from qlora.config import GenerateConfig
from qlora.errors import QLoRAError
from qlora.generate import generate

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_one_prompt_is_streamed_to_the_terminal(trained_run, tmp_path):
    _, run_dir = trained_run
    result = run_cli(f"run={run_dir}", "prompt=Is this review positive or negative?", "max_new_tokens=4",
                     cwd=tmp_path, command="qlora.generate")
    assert result.returncode == 0, result.stderr[-2000:]
    expected = generate(GenerateConfig(run=str(run_dir), prompt="Is this review positive or negative?",
                                       max_new_tokens=4, stream=False))[0]
    assert expected.strip() and result.stdout.rstrip().endswith(expected.strip())
    assert not library_noise(result) and not result.stderr  # the answer alone


def test_batch_file_answers_every_row_like_training_did(trained_run, tmp_path):
    config, run_dir = trained_run
    rows = [json.loads(line) for line in open(config.data.heldout_path)][:8]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    answers = generate(GenerateConfig(run=str(run_dir), input_file=str(tmp_path / "prompts.jsonl"), max_new_tokens=4))
    written = [json.loads(line) for line in (tmp_path / "prompts.generated.jsonl").read_text().splitlines()]
    assert [row["generated"] for row in written] == answers and len(answers) == 8
    assert [row["instruction"] for row in written] == [row["instruction"] for row in rows]
    # the alpaca template is applied as in training, so the trained adapter answers the held-out rows
    assert sum(a.strip() == row["output"] for a, row in zip(answers, rows)) >= 6, answers


def test_sampling_is_seeded(trained_run):
    _, run_dir = trained_run
    sample = dict(run=str(run_dir), prompt="the film was", template="raw", temperature=1.0, max_new_tokens=8, stream=False)
    assert generate(GenerateConfig(**sample)) == generate(GenerateConfig(**sample))


def test_chat_keeps_the_history(trained_run, tmp_path):
    _, run_dir = trained_run
    adapter = tmp_path / "adapter"
    shutil.copytree(run_dir / "adapter", adapter)
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(adapter)
    result = run_cli(f"adapter={adapter}", "chat=true", "max_new_tokens=3", cwd=tmp_path, command="qlora.generate",
                     input="hello\nhow are you\n/exit\n")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("assistant: ") == 2


@pytest.mark.parametrize("kwargs, message", [
    (dict(), "exactly one of"),
    (dict(prompt="a", chat=True), "exactly one of"),
    (dict(prompt="a", template="xml"), "template=xml"),
    (dict(chat=True), "no chat template"),
    (dict(input_file="missing.jsonl"), "does not exist"),
])
def test_bad_generate_options(trained_run, kwargs, message):
    _, run_dir = trained_run
    with pytest.raises(QLoRAError, match=message):
        generate(GenerateConfig(run=str(run_dir), **kwargs))


def test_an_adapter_without_lora_weights_is_refused(trained_run, tmp_path):
    """peft only warns about missing adapter keys and answers as the base model; qlora refuses instead."""
    from qlora.runs import load_adapted_model

    _, run_dir = trained_run
    empty = tmp_path / "adapter"
    shutil.copytree(run_dir / "adapter", empty)
    (empty / "adapter_model.safetensors").unlink()
    with pytest.raises(QLoRAError, match="holds no LoRA weights"):
        load_adapted_model(None, str(empty), None, trust_remote_code=False)
