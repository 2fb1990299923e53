import json
import re

import datasets
import pytest

from conftest import run_cli
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


def test_malformed_row_names_file_and_1_based_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [
        {"instruction": "a", "input": "", "output": "b"},
        {"instruction": "c", "input": "", "output": ""},
    ])
    with pytest.raises(QLoRAError, match=r"bad\.jsonl, line 2: field 'output' is empty"):
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
    ({"conversations": []}, "sharegpt", "line 2: field 'conversations' is an empty conversation"),
    ({"conversations": [{"from": "alien", "value": "hi"}]}, "sharegpt", "line 2: turn 0 has unknown speaker"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages", "line 2: turn 0 has unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages", "line 2: turn 0 content must be text, got int"),
    ({"messages": "hello"}, "messages", "line 2: field 'messages' must be a list of turns, got str"),
    ({"instruction": "a"}, "alpaca", "line 2: missing field 'output'"),
    ({"instruction": "a", "output": 5}, "alpaca", "line 2: field 'output' must be text, got int"),
    ({"prompt": "a", "completion": " "}, "prompt_completion", "line 2: field 'completion' is empty"),
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


# --- files that cannot be read: one-line errors naming the file and the 1-based line (or row) ---

def fifth_line_not_json(tmp_path):
    lines = ['{"text": "one"}', '{"text": "two"}', "", '{"text": "three"}', '{"text": four}', '{"text": "five"}']
    path = tmp_path / "bad.jsonl"  # the blank third line counts: line numbers are the editor's
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_line_that_is_not_json_names_file_and_line(tmp_path):
    path = fifth_line_not_json(tmp_path)
    with pytest.raises(QLoRAError, match=rf"^{re.escape(str(path))}, line 5: not valid JSON \(Expecting value at "
                                         rf"column 10\)\. Fix the line, or set data.on_error=skip"):
        load_formatted(DatasetSource(path=str(path)))


def test_lines_that_are_not_json_are_skipped_and_counted_on_request(tmp_path, caplog):
    path = fifth_line_not_json(tmp_path)
    with path.open("a") as file:
        file.write('["a list"]\n{"text": ""}\n')  # line 7 is not an object; line 8 is a malformed row
    rows = load_formatted(DatasetSource(path=str(path)), on_error="skip")
    assert rows.dataset["text"] == ["one", "two", "three", "five"] and rows.skipped == 3
    assert f"skipped 2 unreadable line(s) (data.on_error=skip), e.g. {path}, line 5: not valid JSON" in caplog.text
    assert f"skipped 1 malformed row(s) (data.on_error=skip), e.g. {path}, line 8: field 'text' is empty" in caplog.text


@pytest.mark.parametrize("name, content, message", [
    ("empty.jsonl", "", "the file is empty; give a file with rows."),
    ("blank.jsonl", "\n  \n", "no rows, only blank lines."),
    ("empty.csv", "", "the file is empty; give a file with rows."),
    ("header.csv", "instruction,output\n", "no rows to read."),
])
def test_a_file_without_rows_is_named(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(QLoRAError, match=f"^{re.escape(str(tmp_path / name))}: {re.escape(message)}$"):
        load_formatted(DatasetSource(path=str(tmp_path / name)))


def test_an_array_with_a_syntax_error_names_its_line(tmp_path):
    (tmp_path / "rows.json").write_text('[{"text": "a"},\n {"text": oops}]\n')
    with pytest.raises(QLoRAError, match=r"rows\.json, line 2: not valid JSON \(Expecting value at column 11\)"):
        load_formatted(DatasetSource(path=str(tmp_path / "rows.json")))


def test_csv_and_parquet_rows_are_counted_from_1(tmp_path):
    (tmp_path / "rows.csv").write_text("instruction,output\na,b\nc,\n")
    with pytest.raises(QLoRAError, match=r"rows\.csv, row 2: missing field 'output'"):
        load_formatted(DatasetSource(path=str(tmp_path / "rows.csv")))
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": ""}]
    datasets.Dataset.from_list(rows).to_parquet(tmp_path / "rows.parquet")
    with pytest.raises(QLoRAError, match=r"rows\.parquet, row 2: field 'completion' is empty"):
        load_formatted(DatasetSource(path=str(tmp_path / "rows.parquet")))


def test_unreadable_csv_and_parquet_files_are_named(tmp_path):
    (tmp_path / "rows.csv").write_text("prompt,completion\na,b\nc,d,e\n")
    with pytest.raises(QLoRAError, match=r"rows\.csv: could not be read \(.*Expected 2 fields in line 3, saw 3\)"):
        load_formatted(DatasetSource(path=str(tmp_path / "rows.csv")))
    (tmp_path / "rows.parquet").write_text("not parquet")
    with pytest.raises(QLoRAError, match=r"rows\.parquet: could not be read \(Parquet magic bytes not found"):
        load_formatted(DatasetSource(path=str(tmp_path / "rows.parquet")))


def test_a_row_of_a_folder_names_its_file_and_line(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [GOOD["alpaca"], GOOD["alpaca"]])
    (tmp_path / "b.jsonl").write_text("\n" + json.dumps(GOOD["alpaca"]) + "\n" + json.dumps({"instruction": "a"}))
    (tmp_path / "c.jsonl").write_text("")
    with pytest.raises(QLoRAError, match=r"c\.jsonl: the file is empty; .*data.on_error=skip to leave the folder's"):
        load_formatted(DatasetSource(path=str(tmp_path)))
    with pytest.raises(QLoRAError, match=r"b\.jsonl, line 3: missing field 'output'"):
        load_formatted(DatasetSource(path=str(tmp_path / "b.jsonl")))
    rows = load_formatted(DatasetSource(path=str(tmp_path)), on_error="skip")  # c.jsonl left out, line 3 skipped
    assert len(rows.dataset) == 3 and rows.skipped == 1 and rows.locate(2) == f"{tmp_path / 'b.jsonl'}, line 2"


@pytest.mark.parametrize("case, expected", [
    ("fifth line not json", "bad.jsonl, line 5: not valid JSON (Expecting value at column 10). Fix the line, or set "
                            "data.on_error=skip to skip and count such lines."),
    ("empty file", "empty.jsonl: the file is empty; give a file with rows."),
])
def test_train_stops_on_unreadable_data_with_one_line_naming_file_and_line(tmp_path, case, expected):
    path = fifth_line_not_json(tmp_path) if case == "fifth line not json" else tmp_path / "empty.jsonl"
    path.touch()
    result = run_cli(f"data.path={path.name}", "training.output_dir=run", cwd=tmp_path)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert errors == [f"qlora: error: {expected}"], result.stderr
    assert "Traceback" not in result.stderr
