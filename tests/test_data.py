import json

import pytest

from qlora.data import ALPACA_PROMPT, detect_format, load_sft_dataset, to_trl_example
from qlora.errors import QLoRAError


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_alpaca_with_input_becomes_prompt_and_completion():
    example = to_trl_example({"instruction": "Translate.", "input": "bonjour", "output": "hello"}, "alpaca")
    assert example["completion"] == "hello"
    assert example["prompt"].endswith("### Instruction:\nTranslate.\n\n### Input:\nbonjour\n\n### Response:\n")
    assert "paired with an input" in example["prompt"]


def test_alpaca_without_input_has_no_input_block():
    example = to_trl_example({"instruction": "Say hi.", "input": "", "output": "hi"}, "alpaca")
    assert "### Input" not in example["prompt"] and "paired with an input" not in example["prompt"]
    assert example["prompt"] == ALPACA_PROMPT.format(with_input="", instruction="Say hi.", input_block="")


@pytest.mark.parametrize(
    "columns, expected",
    [
        (["instruction", "input", "output"], "alpaca"),
        (["prompt", "completion"], "prompt_completion"),
        (["messages"], "messages"),
        (["text", "id"], "text"),
    ],
)
def test_detect_format(columns, expected):
    assert detect_format(columns) == expected


def test_unknown_columns_are_refused_with_the_fix():
    with pytest.raises(QLoRAError, match=r"question.*data\.format"):
        detect_format(["question", "answer"])


def test_loads_each_format(tmp_path):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert load_sft_dataset(write_jsonl(tmp_path / "m.jsonl", [{"messages": messages}]))[0] == {"messages": messages}
    assert load_sft_dataset(write_jsonl(tmp_path / "t.jsonl", [{"text": "abc"}]))[0] == {"text": "abc"}
    row = load_sft_dataset(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "completion": "b"}]))[0]
    assert row == {"prompt": "a", "completion": "b"}


def test_malformed_row_names_file_and_index(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [
        {"instruction": "a", "input": "", "output": "b"},
        {"instruction": "c", "input": "", "output": ""},
    ])
    with pytest.raises(QLoRAError, match=r"bad\.jsonl, row 1: .*output"):
        load_sft_dataset(path, "alpaca")


def test_unsupported_file_type(tmp_path):
    (tmp_path / "data.txt").write_text("hello")
    with pytest.raises(QLoRAError, match="unsupported file type"):
        load_sft_dataset(str(tmp_path / "data.txt"))
