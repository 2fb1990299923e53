"""Preference data: the formats users bring, turned into TRL's pairs, checked row by row, counted and previewed."""

import json

import pytest
from transformers import AutoTokenizer

from qlora.config import ASSETS_DIR, DatasetSource
from qlora.data import detect_format, to_trl_example
from qlora.data.load import load_formatted
from qlora.data.preference import prepare_preference_data, tokenize_preference
from qlora.data.preview import preview
from qlora.errors import QLoRAError

EXAMPLES = ASSETS_DIR / "examples"
USER = {"role": "user", "content": "How was the film?"}


def answer(text):
    return {"role": "assistant", "content": text}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(ASSETS_DIR / "tiny-llama")


def test_text_and_chat_pairs_pass_through_as_trl_pairs():
    text = {"prompt": "How was it?", "chosen": "Great.", "rejected": "Awful."}
    assert to_trl_example(text, "preference") == text
    chat = {"prompt": [USER], "chosen": [answer("Great.")], "rejected": [answer("Awful.")]}
    assert to_trl_example(chat, "preference") == chat


def test_ultrafeedback_style_pairs_split_at_their_shared_turns():
    row = {"chosen": [USER, answer("Great.")], "rejected": [USER, answer("Awful.")], "score_chosen": 9.0}
    assert to_trl_example(row, "implicit_preference") == {
        "prompt": [USER], "chosen": [answer("Great.")], "rejected": [answer("Awful.")]}


def test_kto_rows_keep_their_label():
    row = {"prompt": "How was it?", "completion": "Awful.", "label": False}
    assert to_trl_example(row, "unpaired_preference") == row


@pytest.mark.parametrize("columns, method, expected", [
    (["prompt", "chosen", "rejected"], "dpo", "preference"),
    (["chosen", "rejected", "score_chosen"], "orpo", "implicit_preference"),
    (["prompt", "completion", "label"], "kto", "unpaired_preference"),
    (["prompt", "chosen", "rejected"], "kto", "preference"),  # KTO unpairs pairs
    (["prompt", "completion", "label"], "sft", "prompt_completion"),
])
def test_detect_format_among_the_methods_formats(columns, method, expected):
    assert detect_format(columns, method) == expected


@pytest.mark.parametrize("columns, method, fix", [
    (["prompt", "chosen", "rejected"], "sft", "training.method=dpo|orpo|kto"),
    (["instruction", "output"], "dpo", "training.method=sft"),
    (["prompt", "completion", "label"], "dpo", "training.method=kto"),
])
def test_data_of_another_method_is_refused_with_the_fix(columns, method, fix):
    with pytest.raises(QLoRAError, match=f"training.method={method} cannot train on.*{fix}"):
        detect_format(columns, method)


@pytest.mark.parametrize("format, row, reason", [
    ("preference", {"prompt": "p", "chosen": "a"}, "missing field 'rejected'"),
    ("preference", {"prompt": "p", "chosen": "a", "rejected": ""}, "field 'rejected' is empty"),
    ("preference", {"prompt": "p", "chosen": [answer("a")], "rejected": [answer("b")]},
     "fields prompt, chosen, rejected must be all text or all lists of messages, got prompt text, chosen messages"),
    ("preference", {"prompt": [USER], "chosen": [USER], "rejected": [answer("b")]},
     "field 'chosen' must end with an assistant turn"),
    ("preference", {"prompt": [USER], "chosen": [{"role": "bot", "content": "a"}], "rejected": [answer("b")]},
     "field 'chosen': turn 0 has unknown role 'bot'"),
    ("implicit_preference", {"chosen": [USER, answer("a")], "rejected": [answer("b")]},
     "chosen and rejected share no first turn"),
    ("unpaired_preference", {"prompt": "p", "completion": "a", "label": "yes"}, "field 'label' must be true"),
])
def test_malformed_rows_name_the_file_line_and_reason(tmp_path, format, row, reason):
    good = {"preference": {"prompt": "p", "chosen": "a", "rejected": "b"},
            "implicit_preference": {"chosen": [USER, answer("a")], "rejected": [USER, answer("b")]},
            "unpaired_preference": {"prompt": "p", "completion": "a", "label": True}}[format]
    path = write_jsonl(tmp_path / "pairs.jsonl", [good, row])
    with pytest.raises(QLoRAError) as error:
        load_formatted(DatasetSource(path=path, format=format), method="kto")
    assert f"{path}, line 2: {reason}" in str(error.value) and "data.on_error=skip" in str(error.value)


@pytest.mark.parametrize("chat", [False, True])
def test_skipped_malformed_pairs_are_counted(tmp_path, chat):
    def side(text):
        return [answer(text)] if chat else text

    rows = [{"prompt": [USER] if chat else "p", "chosen": side("a"), "rejected": side("b")},
            {"prompt": [USER] if chat else "p", "chosen": side("a")}]
    rows[1]["rejected"] = [] if chat else ""
    formatted = load_formatted(DatasetSource(path=write_jsonl(tmp_path / "pairs.jsonl", rows)), on_error="skip",
                               method="dpo")
    assert formatted.skipped == 1 and formatted.dataset.to_list() == rows[:1]


def test_every_shipped_preference_example_loads():
    for name, method in (("preference.jsonl", "dpo"), ("preference_messages.jsonl", "dpo"),
                         ("implicit_preference.jsonl", "orpo"), ("unpaired_preference.jsonl", "kto")):
        rows = load_formatted(DatasetSource(path=str(EXAMPLES / name)), method=method)
        assert len(rows.dataset) >= 3 and rows.format == name.removesuffix(".jsonl").replace("_messages", "")


def test_pairs_are_tokenized_as_trl_does_eos_after_a_text_answer(tokenizer):
    pair = {"prompt": "the film was", "chosen": " great", "rejected": " dull"}
    ids = tokenize_preference(pair, tokenizer)
    assert ids["prompt_ids"] == tokenizer("the film was")["input_ids"]
    assert ids["chosen_ids"][-1] == ids["rejected_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids["prompt_ids"] + ids["chosen_ids"]) == "the film was great<|end_of_text|>"


def test_pairs_too_long_are_cut_or_dropped_and_counted(tiny_config, tokenizer):
    # the shipped pairs are 57 to 61 tokens long: the longer ones are cut by the trainer's collator, or dropped here
    cut = prepare_preference_data(tiny_config("+recipe=tiny_dpo", "data.max_length=60").data, tokenizer, 42, "dpo")
    assert cut.stats.examples == len(cut.train) == 512 and 0 < cut.stats.truncated < 512
    assert cut.stats.length_percentiles["max"] == 60
    dropping = tiny_config("+recipe=tiny_dpo", "data.max_length=60", "data.truncation=drop")
    dropped = prepare_preference_data(dropping.data, tokenizer, 42, "dpo")
    assert dropped.stats.dropped_too_long == cut.stats.truncated
    assert dropped.stats.examples == len(dropped.train) == 512 - cut.stats.truncated
    short = prepare_preference_data(tiny_config("+recipe=tiny_dpo", "data.max_length=30").data, tokenizer, 42, "dpo")
    assert short.stats.dropped_no_trainable == 512  # the prompt alone fills data.max_length: no answer token is left


def test_kto_gets_each_pair_as_two_labelled_completions_shuffled(tiny_config, tokenizer):
    config = tiny_config("+recipe=tiny_dpo", "training.method=kto")
    data = prepare_preference_data(config.data, tokenizer, 42, "kto")
    assert data.train.column_names == ["prompt", "completion", "label"] and len(data.train) == 1024
    assert sum(data.train["label"]) == 512
    assert 0 < sum(data.train["label"][:20]) < 20  # not 512 desirable rows first: KTOTrainer reads its rows in order


def test_preview_shows_both_sides_of_each_pair_with_the_answer_marked(tiny_config):
    report = preview(tiny_config("+recipe=tiny_dpo"), examples=2)
    assert "first 2 training pairs (trained tokens inside [[ ]])" in report
    for index in (0, 1):
        assert f"--- example {index}, chosen (61 tokens) ---" in report
        assert f"--- example {index}, rejected (61 tokens) ---" in report
    first = report.split("--- example 0, chosen")[1].split("--- example 1")[0]
    assert first.count("### Response:\n[[negative<|end_of_text|>]]") == 1  # chosen
    assert first.count("### Response:\n[[positive<|end_of_text|>]]") == 1  # rejected
    assert "examples            512 (of 512 rows)" in report and "validation data: 32 examples" in report


def test_preview_of_chat_pairs_renders_the_template(tiny_config):
    config = tiny_config("+recipe=tiny_dpo", f"data.path={EXAMPLES / 'implicit_preference.jsonl'}",
                         "data.val_path=null", "data.chat_template=chatml")
    report = preview(config, examples=1)
    assert "--- example 0, chosen" in report and "--- example 0, rejected" in report
    # the answer after the generation prompt is trained, its end-of-turn too; the conversation before is not
    assert "<|im_start|>assistant\n[[" in report and "<|im_end|>" in report.split("[[")[1]
