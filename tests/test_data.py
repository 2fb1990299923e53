import json
import re

import pytest

from qlora.config import ASSETS_DIR, ColumnNames, DatasetSource
from qlora.data import ALPACA_PROMPT, detect_format, load_sft_dataset, to_trl_example
from qlora.data.load import load_formatted, load_rows
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
    with pytest.raises(QLoRAError, match=r"question.*data\.columns.*data\.format"):
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


EXAMPLES = ASSETS_DIR / "examples"


@pytest.mark.parametrize(
    "name, format, first",
    [
        ("alpaca.jsonl", "alpaca", {"completion": "positive"}),
        ("sharegpt.jsonl", "sharegpt", {"messages": [
            {"role": "system", "content": "You are a film critic."},
            {"role": "user", "content": "How was the film?"},
            {"role": "assistant", "content": "It was great and moving."}]}),
        ("messages.jsonl", "messages", {"messages": [
            {"role": "system", "content": "You are a film critic."},
            {"role": "user", "content": "How was the film?"},
            {"role": "assistant", "content": "It was great and moving."}]}),
        ("prompt_completion.jsonl", "prompt_completion", {"completion": " positive"}),
        ("prompt_completion.parquet", "prompt_completion", {"completion": " positive"}),
        ("text.jsonl", "text", {"text": "the film was great and moving, and the music was fun."}),
    ],
)
def test_shipped_examples_are_detected_and_converted(name, format, first):
    rows = load_formatted(DatasetSource(path=str(EXAMPLES / name)))
    assert rows.format == format and rows.skipped == 0
    assert first.items() <= rows.dataset[0].items()


def test_alpaca_system_replaces_the_preamble():
    example = to_trl_example({"system": "Be brief.", "instruction": "Say hi.", "output": "hi"}, "alpaca")
    assert example["prompt"] == "Be brief.\n\n### Instruction:\nSay hi.\n\n### Response:\n"


def test_columns_are_remapped_from_the_config():
    source = DatasetSource(path=str(EXAMPLES / "alpaca_renamed.csv"),
                           columns=ColumnNames(instruction="question", input="context", output="answer"))
    rows = load_formatted(source)
    assert rows.format == "alpaca"
    assert rows.dataset[0]["completion"] == "positive"
    assert "### Input:\nthe show was superb" in rows.dataset[0]["prompt"]


def test_remapping_a_column_the_file_lacks_is_refused():
    with pytest.raises(QLoRAError, match=r"'nope'.*its columns are"):
        load_formatted(DatasetSource(path=str(EXAMPLES / "alpaca.jsonl"), columns=ColumnNames(instruction="nope")))


def test_a_folder_of_files_is_one_dataset(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "one"}])
    (tmp_path / "sub").mkdir()
    write_jsonl(tmp_path / "sub" / "b.jsonl", [{"text": "two"}, {"text": "three"}])
    assert sorted(load_sft_dataset(str(tmp_path))["text"]) == ["one", "three", "two"]


def test_hub_dataset_offline_fails_with_a_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(QLoRAError, match=r"could not load dataset nobody/nothing \(split validation\).*local path"):
        load_rows("nobody/nothing", split="validation")


MALFORMED = [
    ({"conversations": []}, "sharegpt", "row 1: field 'conversations' is an empty conversation"),
    ({"conversations": [{"from": "alien", "value": "hi"}]}, "sharegpt", "row 1: turn 0 has unknown speaker"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages", "row 1: turn 0 has unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages", "row 1: turn 0 content must be text, got int"),
    ({"messages": "hello"}, "messages", "row 1: field 'messages' must be a list of turns, got str"),
    ({"instruction": "a"}, "alpaca", "row 1: missing field 'output'"),
    ({"instruction": "a", "output": 5}, "alpaca", "row 1: field 'output' must be text, got int"),
    ({"prompt": "a", "completion": " "}, "prompt_completion", "row 1: field 'completion' is empty"),
]
GOOD = {
    "sharegpt": {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
    "messages": {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
    "alpaca": {"instruction": "a", "output": "b"},
    "prompt_completion": {"prompt": "a", "completion": "b"},
}


@pytest.mark.parametrize("bad, format, reason", MALFORMED)
def test_malformed_rows_fail_with_file_row_and_reason(tmp_path, bad, format, reason):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD[format], bad, GOOD[format]])
    with pytest.raises(QLoRAError, match="bad.jsonl, " + re.escape(reason)):
        load_formatted(DatasetSource(path=path, format=format))


@pytest.mark.parametrize("bad, format, reason", MALFORMED[:3])
def test_malformed_rows_are_skipped_and_counted_on_request(tmp_path, bad, format, reason):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD[format], bad, GOOD[format]])
    rows = load_formatted(DatasetSource(path=path, format=format), on_error="skip")
    assert rows.skipped == 1 and len(rows.dataset) == 2
