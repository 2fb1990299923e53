"""The data stage: several datasets, validation splits, caching, and what the trainer gets."""

import json
import re
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from qlora.config import ASSETS_DIR
from qlora.data import IGNORE, prepare_sft_data
from qlora.errors import QLoRAError

EXAMPLES = ASSETS_DIR / "examples"
SEVERAL = (f"data.datasets=[{{path: {EXAMPLES / 'alpaca.jsonl'}}},"
           f"{{path: {EXAMPLES / 'sharegpt.jsonl'}, format: sharegpt}}]")


@pytest.fixture
def tokenizer():
    return AutoTokenizer.from_pretrained(ASSETS_DIR / "tiny-llama")


def decoded_trained(tokenizer, example):
    return tokenizer.decode([t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE])


def test_several_datasets_are_concatenated_and_shuffled_with_the_seed(tiny_config, tokenizer):
    config = tiny_config(SEVERAL, "data.chat_template=chatml", "data.max_length=512")
    data = prepare_sft_data(config.data, tokenizer, seed=1)
    assert data.stats.examples == data.stats.rows == 7 and len(data.train) == 7
    answers = sorted(decoded_trained(tokenizer, example) for example in data.train)
    assert "positive<|end_of_text|>" in answers and "Very fun.<|im_end|><|end_of_text|>" in answers
    again = prepare_sft_data(config.data, tokenizer, seed=1)
    assert again.train["input_ids"] == data.train["input_ids"]
    other_seed = prepare_sft_data(config.data, tokenizer, seed=2)
    assert other_seed.train["input_ids"] != data.train["input_ids"]


@pytest.mark.parametrize("val_size, expected", [(0.25, 128), (10, 10)])
def test_val_size_is_a_share_or_a_count(tiny_config, tokenizer, val_size, expected):
    data = prepare_sft_data(tiny_config(f"data.val_size={val_size}").data, tokenizer, seed=42)
    assert len(data.validation) == expected and len(data.train) == 512 - expected


def test_a_separate_validation_file(tiny_config, tokenizer):
    config = tiny_config(f"data.val_path={ASSETS_DIR / 'sentiment' / 'heldout.jsonl'}")
    data = prepare_sft_data(config.data, tokenizer, seed=42)
    assert len(data.train) == 512 and len(data.validation) == 32 and data.validation_stats.examples == 32


def test_a_second_run_reads_the_tokenized_data_from_the_cache(tiny_config, tokenizer, tmp_path):
    rows = [json.loads(line) for line in (ASSETS_DIR / "sentiment" / "train.jsonl").read_text().splitlines()][:20]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = tiny_config(f"data.path={path}")
    first = prepare_sft_data(config.data, tokenizer, seed=42)

    written = {f["filename"]: Path(f["filename"]).stat().st_mtime_ns for f in first.train.cache_files}
    assert written  # tokenized into the datasets cache, next to the rows
    second = prepare_sft_data(config.data, AutoTokenizer.from_pretrained(ASSETS_DIR / "tiny-llama"), seed=42)
    assert {f["filename"]: Path(f["filename"]).stat().st_mtime_ns for f in second.train.cache_files} == written
    assert second.train["input_ids"] == first.train["input_ids"]


def test_num_proc_gives_the_same_examples(tiny_config, tokenizer):
    one = prepare_sft_data(tiny_config().data, tokenizer, seed=42)
    two = prepare_sft_data(tiny_config("data.num_proc=2").data, tokenizer, seed=42)
    assert two.train["input_ids"] == one.train["input_ids"] and two.train["labels"] == one.train["labels"]


TOOL_CHAT = {"messages": [{"role": "user", "content": "Add 2 and 3."}, {"role": "tool", "content": "5"},
                          {"role": "assistant", "content": "5"}]}
PLAIN_CHAT = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                           {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye."}]}
# no markers, and a last assistant turn that ends unlike earlier ones: PLAIN_CHAT's turn 1 cannot be found by rendering
LAST_TURN_DIFFERENT = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}"
                       "{{ '<end>' if loop.last and m['role'] == 'assistant' else '<next>' }}{% endfor %}")


@pytest.mark.parametrize("chat_template, row, expected", [
    ("llama-2", TOOL_CHAT, "the chat template cannot render this conversation: this chat template has no place "
                           "for a message with role tool"),
    (LAST_TURN_DIFFERENT, PLAIN_CHAT, "the chat template has no {% generation %} markers, and rendering turn by "
                                      "turn cannot find the assistant's tokens at turn 1"),
])
def test_a_conversation_that_cannot_be_tokenized_names_file_and_line(tiny_config, tokenizer, tmp_path, chat_template,
                                                                     row, expected):
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (good, {"messages": []}, good, row)))
    config = tiny_config(f"data.path={path}", "data.on_error=skip")  # the empty conversation on line 2 is skipped
    config.data.chat_template = chat_template
    with pytest.raises(QLoRAError, match=f"^{re.escape(f'{path}, line 4: {expected}')}"):
        prepare_sft_data(config.data, tokenizer, seed=42)
