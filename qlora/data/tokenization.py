"""Tokenize TRL-shaped examples into input_ids and labels (-100 where no loss), truncate or drop, and count.

The rules are TRL's (SFTTrainer's dataset preparation): EOS appended to completions and text, the
completion starting where the tokenized prompt and prompt+completion diverge, assistant tokens from the
template's `{% generation %}` markers (without markers, from rendering the conversation turn by turn:
qlora/data/masks.py). We run them here, before the trainer, so that the counts (truncated, dropped) are
known and the preview shows exactly the tokens and labels the trainer gets; SFTTrainer sees `input_ids`
and `labels` and only collates (and packs) them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import datasets
import numpy as np
from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase
from trl.data_utils import common_prefix_length

from qlora.data.masks import tokenize_conversation
from qlora.errors import QLoRAError

IGNORE = -100  # the label of a token without loss (PyTorch's cross-entropy ignore_index)


@dataclass
class TokenizeOptions:
    max_length: int
    truncation: str  # truncate | drop
    train_on_prompt: bool
    chat_template: str | None  # for messages rows (resolve_chat_template's)
    num_proc: int | None = None


@dataclass
class DataStats:
    """What preprocessing did to a dataset; logged, written to the run folder and shown by the preview."""

    rows: int  # rows read, malformed ones included
    examples: int  # examples kept for training
    skipped_malformed: int
    truncated: int
    dropped_too_long: int
    dropped_no_trainable: int
    tokens: int
    trained_tokens: int
    length_percentiles: dict[str, int]

    @property
    def trained_share(self) -> float:
        return self.trained_tokens / self.tokens if self.tokens else 0.0

    def describe(self) -> str:
        p = self.length_percentiles
        return (
            f"{self.examples} examples from {self.rows} rows; {self.tokens} tokens, {self.trained_tokens} trained "
            f"({100 * self.trained_share:.1f}%); length p50 {p.get('p50')} p90 {p.get('p90')} p99 {p.get('p99')} "
            f"max {p.get('max')}; truncated {self.truncated}, dropped {self.dropped_too_long} too long and "
            f"{self.dropped_no_trainable} with no trained tokens, skipped {self.skipped_malformed} malformed"
        )


def tokenize_dataset(
    dataset: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, options: TokenizeOptions, skipped: int = 0,
    locate: Callable[[int], str] | None = None,
) -> tuple[datasets.Dataset, DataStats]:
    """input_ids/labels for every example, long ones truncated or dropped, untrainable ones dropped, counted.
    An example that cannot be tokenized is an error prefixed with locate(its index): its file and line.

    datasets fingerprints the function with its arguments (tokenizer and options included), so a second
    run over the same rows and tokenizer reads the result from its cache instead of tokenizing again.
    """
    try:
        tokenized = dataset.map(
            tokenize_example,
            fn_kwargs={"tokenizer": tokenizer, "options": options},
            remove_columns=dataset.column_names,
            num_proc=options.num_proc,
            desc="tokenizing",
        )
    except QLoRAError as error:
        index = _first_untokenizable(dataset, tokenizer, options) if locate else None
        if index is None:
            raise
        raise QLoRAError(f"{locate(index)}: {error}") from error
    status = np.array(tokenized["qlora_status"])
    kept = tokenized.filter(lambda s: s in ("", "truncated"), input_columns="qlora_status", num_proc=options.num_proc)
    kept = kept.remove_columns("qlora_status")
    lengths = np.array([len(ids) for ids in kept["input_ids"]], dtype=int)
    trained = sum(sum(label != IGNORE for label in labels) for labels in kept["labels"])
    stats = DataStats(
        rows=len(dataset) + skipped,
        examples=len(kept),
        skipped_malformed=skipped,
        truncated=int((status == "truncated").sum()),
        dropped_too_long=int((status == "too_long").sum()),
        dropped_no_trainable=int((status == "no_trainable").sum()),
        tokens=int(lengths.sum()) if len(kept) else 0,
        trained_tokens=int(trained),
        length_percentiles=length_percentiles(kept),
    )
    return kept, stats


def _first_untokenizable(
    dataset: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, options: TokenizeOptions
) -> int | None:
    """The index of the first example tokenize_example refuses (found again here: map does not say which)."""
    for index, example in enumerate(dataset):
        try:
            tokenize_example(example, tokenizer, options)
        except QLoRAError:
            return index
    return None


def length_percentiles(dataset: datasets.Dataset) -> dict[str, int]:
    """Median, 90th and 99th percentile and longest example length, in tokens."""
    lengths = np.array([len(ids) for ids in dataset["input_ids"]] or [0], dtype=int)
    return {f"p{q}": int(np.percentile(lengths, q)) for q in (50, 90, 99)} | {"max": int(lengths.max())}


def tokenize_example(example: dict, tokenizer: PreTrainedTokenizerBase, options: TokenizeOptions) -> dict:
    """One example's input_ids and labels, plus its status: '', truncated, too_long or no_trainable."""
    if example.get("messages"):
        input_ids, labels = _tokenize_messages(example["messages"], tokenizer, options)
    elif example.get("prompt") is not None:
        input_ids, labels = _tokenize_prompt_completion(example["prompt"], example["completion"], tokenizer)
    else:
        input_ids = _tokenize_text(example["text"] + _missing_eos(example["text"], tokenizer), tokenizer)
        labels = list(input_ids)
    if options.train_on_prompt:
        labels = list(input_ids)
    status = ""
    if len(input_ids) > options.max_length:
        status = "truncated" if options.truncation == "truncate" else "too_long"
        input_ids, labels = input_ids[: options.max_length], labels[: options.max_length]
    if status != "too_long" and all(label == IGNORE for label in labels):
        status = "no_trainable"
    return {"input_ids": input_ids, "labels": labels, "qlora_status": status}


def _tokenize_prompt_completion(prompt: str, completion: str, tokenizer: PreTrainedTokenizerBase) -> tuple[list, list]:
    completion = completion + _missing_eos(completion, tokenizer)
    prompt_ids = _tokenize_text(prompt, tokenizer)
    input_ids = _tokenize_text(prompt + completion, tokenizer)
    # tokens can merge across the boundary: the completion starts where the two tokenizations diverge (as in TRL)
    start = common_prefix_length(prompt_ids, input_ids)
    return input_ids, [IGNORE] * start + input_ids[start:]


def _tokenize_messages(
    messages: list[dict], tokenizer: PreTrainedTokenizerBase, options: TokenizeOptions
) -> tuple[list, list]:
    try:
        input_ids, mask = tokenize_conversation(messages, tokenizer, options.chat_template, options.train_on_prompt)
    except TemplateError as error:
        raise QLoRAError(
            f"the chat template cannot render this conversation: {error}. Pick another data.chat_template (chatml "
            f"and llama-3 take any role), or fix the row."
        ) from error
    labels = [token if keep else IGNORE for token, keep in zip(input_ids, mask)]
    if tokenizer.eos_token_id is not None and input_ids[-1] != tokenizer.eos_token_id:
        # Every example ends with EOS; it is trained when the conversation ends on the assistant's turn,
        # so that the model learns to stop after answering.
        input_ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id if messages[-1]["role"] == "assistant" else IGNORE)
    return input_ids, labels


def _tokenize_text(text: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    return list(tokenizer(text=text)["input_ids"])


def _missing_eos(text: str, tokenizer: PreTrainedTokenizerBase) -> str:
    eos = tokenizer.eos_token or ""
    return "" if text.endswith(eos) else eos
