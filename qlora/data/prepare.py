"""The data stage: every source loaded, formatted, tokenized and counted; concatenated; a validation split."""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields

import datasets
from accelerate import PartialState
from transformers import PreTrainedTokenizerBase

from qlora.config import DataConfig, DatasetSource
from qlora.data.load import FormattedRows, data_sources, load_formatted
from qlora.data.masks import describe_chat_masking
from qlora.data.preference import PreferenceData, prepare_preference_data
from qlora.data.templates import resolve_chat_template
from qlora.data.tokenization import DataStats, TokenizeOptions, length_percentiles, tokenize_dataset

log = logging.getLogger(__name__)


@dataclass
class SFTData:
    """What the trainer gets: tokenized train (and validation) examples, and what preprocessing did."""

    train: datasets.Dataset
    validation: datasets.Dataset | None
    stats: DataStats
    validation_stats: DataStats | None
    formats: list[str]  # each training source's row format (alpaca, sharegpt, ...)
    chat_masking: str | None = None  # for chat rows: which tokens are trained and how they were found, in words


@dataclass
class _TokenizedSource:
    dataset: datasets.Dataset
    stats: DataStats
    format: str
    chat_masking: str | None


def prepare_training_data(data: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int,
                          method: str = "sft") -> SFTData | PreferenceData:
    """The data stage of training.method: tokenized examples for SFT, checked pairs for the preference trainers."""
    if method == "sft":
        return prepare_sft_data(data, tokenizer, seed)
    return prepare_preference_data(data, tokenizer, seed, method)


def prepare_sft_data(data: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int,
                     purpose: str = "training") -> SFTData:
    """Tokenized training and validation examples for `data`, preprocessed by the main process first.

    Under `accelerate launch` the other processes wait, then read the main process's result from the
    datasets cache instead of tokenizing again. `purpose` names the data in the log (training, evaluation).
    """
    with PartialState().main_process_first():
        parts = [_tokenize_source(source, data, tokenizer, purpose) for source in data_sources(data)]
        train = datasets.concatenate_datasets([part.dataset for part in parts])
        stats = _sum_stats([part.stats for part in parts], train)
        if len(parts) > 1:
            train = train.shuffle(seed=seed)
        validation = validation_stats = None
        if data.val_path is not None:
            val_source = DatasetSource(path=data.val_path, columns=data.columns)
            tokenized_validation = _tokenize_source(val_source, data, tokenizer, "validation")
            validation, validation_stats = tokenized_validation.dataset, tokenized_validation.stats
        elif data.val_size:
            size = data.val_size if data.val_size < 1 else int(data.val_size)
            split = train.train_test_split(test_size=size, seed=seed)
            train, validation = split["train"], split["test"]
    if len(parts) > 1:  # each source's line is above
        log.info("%s data, all %d datasets: %s", purpose, len(parts), stats.describe())
    if data.val_size:  # a validation file's line is above
        log.info("validation data: %d examples split off", len(validation))
    chat_masking = next((part.chat_masking for part in parts if part.chat_masking), None)
    if chat_masking:
        log.info("chat rows: %s", chat_masking)
    return SFTData(train, validation, stats, validation_stats, [part.format for part in parts], chat_masking)


def _tokenize_source(
    source: DatasetSource, data: DataConfig, tokenizer: PreTrainedTokenizerBase, purpose: str
) -> _TokenizedSource:
    rows: FormattedRows = load_formatted(source, data.on_error, data.num_proc)
    chat_template = chat_masking = None
    if "messages" in rows.dataset.column_names:
        chat_template = resolve_chat_template(tokenizer, data.chat_template, data.train_on_prompt)
        chat_masking = describe_chat_masking(chat_template, data.train_on_prompt)
        # saved with the adapter's tokenizer, so that inference renders conversations as training did
        tokenizer.chat_template = chat_template
    options = TokenizeOptions(
        max_length=data.max_length,
        truncation=data.truncation,
        train_on_prompt=data.train_on_prompt,
        chat_template=chat_template,
        num_proc=data.num_proc,
    )
    tokenized, stats = tokenize_dataset(rows.dataset, tokenizer, options, rows.skipped, rows.locate)
    log.info("%s data: %s (%s): %s", purpose, source.path, rows.format, stats.describe())
    return _TokenizedSource(tokenized, stats, rows.format, chat_masking)


def _sum_stats(parts: list[DataStats], train: datasets.Dataset) -> DataStats:
    if len(parts) == 1:
        return parts[0]
    names = [f.name for f in fields(DataStats) if f.name != "length_percentiles"]
    counts = {name: sum(getattr(part, name) for part in parts) for name in names}
    return DataStats(**counts, length_percentiles=length_percentiles(train))
