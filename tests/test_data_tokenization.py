"""Real tokenized examples of every format and shipped template, their labels decoded: exactly the
assistant/completion text (and EOS) is trained on."""

import datasets
import pytest
from transformers import AutoTokenizer

from qlora.config import ASSETS_DIR
from qlora.data.formats import to_trl_example
from qlora.data.templates import SHIPPED_TEMPLATES
from qlora.data.tokenization import IGNORE, TokenizeOptions, tokenize_dataset, tokenize_example
from qlora.errors import QLoRAError

EOS = "<|end_of_text|>"
CHAT = [
    {"role": "system", "content": "Be kind."},
    {"role": "user", "content": "How was the film?"},
    {"role": "assistant", "content": "It was great."},
    {"role": "user", "content": "And the music?"},
    {"role": "assistant", "content": "Very fun."},
]
# The trained spans of CHAT under each shipped template: each assistant turn with its end-of-turn token.
TRAINED_SPANS = {
    "chatml": ["It was great.<|im_end|>", f"Very fun.<|im_end|>{EOS}"],
    "llama-3": ["It was great.<|eot_id|>", f"Very fun.<|eot_id|>{EOS}"],
    "llama-2": [f" It was great.{EOS}", f" Very fun.{EOS}"],
    "mistral": [f" It was great.{EOS}", f" Very fun.{EOS}"],
    "alpaca": [f"It was great.{EOS}", f"Very fun.{EOS}"],
}


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(ASSETS_DIR / "tiny-llama")


def options(chat_template=None, **changes):
    values = dict(max_length=512, truncation="truncate", train_on_prompt=False, chat_template=chat_template)
    return TokenizeOptions(**(values | changes))


def trained_spans(tokenizer, example):
    """The decoded runs of consecutive trained tokens."""
    spans, run = [], []
    for token, label in zip(example["input_ids"], example["labels"]):
        if label != IGNORE:
            assert label == token
            run.append(token)
        elif run:
            spans, run = spans + [run], []
    return [tokenizer.decode(span) for span in spans + ([run] if run else [])]


@pytest.mark.parametrize("template", sorted(SHIPPED_TEMPLATES))
def test_chat_loss_is_on_assistant_turns_only(tokenizer, template):
    example = tokenize_example({"messages": CHAT}, tokenizer, options(SHIPPED_TEMPLATES[template]))
    assert trained_spans(tokenizer, example) == TRAINED_SPANS[template]
    assert example["input_ids"][-1] == tokenizer.eos_token_id
    assert "How was the film?" in tokenizer.decode(example["input_ids"])


def test_sharegpt_rows_are_masked_like_messages(tokenizer):
    row = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello there."}]}
    example = tokenize_example(to_trl_example(row, "sharegpt"), tokenizer, options(SHIPPED_TEMPLATES["chatml"]))
    assert trained_spans(tokenizer, example) == [f"Hello there.<|im_end|>{EOS}"]


def test_chat_ending_on_a_user_turn_does_not_train_its_eos(tokenizer):
    example = tokenize_example({"messages": CHAT[:4]}, tokenizer, options(SHIPPED_TEMPLATES["chatml"]))
    assert trained_spans(tokenizer, example) == ["It was great.<|im_end|>"]
    assert example["input_ids"][-1] == tokenizer.eos_token_id


def test_alpaca_loss_is_on_the_output_and_eos(tokenizer):
    row = {"instruction": "Is this review positive or negative?", "input": "the film was great", "output": "positive"}
    example = tokenize_example(to_trl_example(row, "alpaca"), tokenizer, options())
    assert trained_spans(tokenizer, example) == [f"positive{EOS}"]
    assert tokenizer.decode(example["input_ids"]).startswith("Below is an instruction")


def test_prompt_completion_loss_is_on_the_completion_and_eos(tokenizer):
    example = tokenize_example({"prompt": "Review: dull\nSentiment:", "completion": " negative"}, tokenizer, options())
    assert trained_spans(tokenizer, example) == [f" negative{EOS}"]


def test_text_is_trained_on_every_token_and_ends_with_eos(tokenizer):
    example = tokenize_example({"text": "the film was great"}, tokenizer, options())
    assert trained_spans(tokenizer, example) == [f"the film was great{EOS}"]


@pytest.mark.parametrize("row", [{"messages": CHAT}, {"prompt": "Review: dull\nSentiment:", "completion": " negative"}])
def test_train_on_prompt_trains_every_token(tokenizer, row):
    example = tokenize_example(row, tokenizer, options(SHIPPED_TEMPLATES["chatml"], train_on_prompt=True))
    assert example["labels"] == example["input_ids"]


def test_long_examples_are_truncated_or_dropped_and_counted(tokenizer):
    rows = datasets.Dataset.from_list([
        {"prompt": "short:", "completion": " yes"},
        {"prompt": "a long prompt " * 3, "completion": " with a long answer" * 5},  # completion cut, still trained
        {"prompt": "a prompt that fills the whole window " * 5, "completion": " lost"},  # nothing trained left
    ])
    kept, stats = tokenize_dataset(rows, tokenizer, options(max_length=24))
    assert (stats.examples, stats.truncated, stats.dropped_no_trainable, stats.dropped_too_long) == (2, 1, 1, 0)
    assert max(len(ids) for ids in kept["input_ids"]) == 24
    assert stats.tokens == sum(len(ids) for ids in kept["input_ids"])
    assert stats.trained_tokens == sum(label != IGNORE for labels in kept["labels"] for label in labels)
    assert stats.length_percentiles["max"] == 24

    kept, stats = tokenize_dataset(rows, tokenizer, options(max_length=24, truncation="drop"), skipped=3)
    assert (stats.examples, stats.truncated, stats.dropped_too_long) == (1, 0, 2)
    assert (stats.rows, stats.skipped_malformed) == (6, 3)
    assert kept[0]["labels"][-1] == tokenizer.eos_token_id


@pytest.mark.parametrize("template", ["llama-2", "mistral", "alpaca"])
def test_a_role_the_template_cannot_render_is_an_error_not_a_silent_gap(tokenizer, template):
    chat = [{"role": "user", "content": "Add 2 and 3."}, {"role": "tool", "content": "5"},
            {"role": "assistant", "content": "5"}]
    with pytest.raises(QLoRAError, match="no place for a message with role tool.*chatml"):
        tokenize_example({"messages": chat}, tokenizer, options(SHIPPED_TEMPLATES[template]))
