"""The data stage of the preference methods (DPO, ORPO, KTO): pairs, or KTO's labelled completions, in TRL's shapes.

TRL's preference trainers take prompt/chosen/rejected rows (KTO: prompt/completion/label) and tokenize them in their
own dataset preparation. qlora tokenizes them here too, with the same rules (DPOTrainer's and KTOTrainer's: EOS
after a text answer; a conversation's prompt rendered with the generation prompt; each answer starting where the
tokenized prompt and prompt + answer diverge), so that the counts, data.truncation=drop, the preview and the held-out
check see the tokens the trainer sees; tests/test_preference.py checks that the two tokenizations agree.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import datasets
import numpy as np
from accelerate import PartialState
from transformers import PreTrainedTokenizerBase
from trl.data_utils import common_prefix_length, unpair_preference_dataset

from qlora.config import DataConfig, DatasetSource
from qlora.data.load import data_sources, load_formatted
from qlora.data.templates import resolve_chat_template
from qlora.data.tokenization import IGNORE, DataStats

log = logging.getLogger(__name__)

ANSWERS = ("chosen", "rejected", "completion")  # the answer fields of a pair, or of KTO's unpaired row


@dataclass
class PreferenceData:
    """What the preference trainer gets: rows in TRL's shape (it tokenizes them), and what preprocessing did."""

    train: datasets.Dataset
    validation: datasets.Dataset | None
    stats: DataStats
    validation_stats: DataStats | None


def prepare_preference_data(data: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int,
                            method: str) -> PreferenceData:
    """The training (and validation) pairs of `data` for training.method=`method`, checked and counted.

    KTO trains on single completions labelled desirable or not: pairs are unpaired here (as KTOTrainer would),
    and shuffled, because KTOTrainer reads them in order (its KL estimate pairs each completion with its
    neighbour's prompt).
    """
    with PartialState().main_process_first():
        parts = [_checked_rows(source, data, tokenizer, method, "training") for source in data_sources(data)]
        train = datasets.concatenate_datasets([rows for rows, _, _ in parts])
        stats = _sum_stats([(part_stats, lengths) for _, part_stats, lengths in parts])
        if len(parts) > 1 or method == "kto":
            train = train.shuffle(seed=seed)
        validation = validation_stats = None
        if data.val_path is not None:
            validation, validation_stats, _ = _checked_rows(DatasetSource(path=data.val_path, columns=data.columns),
                                                            data, tokenizer, method, "validation")
        elif data.val_size:
            size = data.val_size if data.val_size < 1 else int(data.val_size)
            split = train.train_test_split(test_size=size, seed=seed)
            train, validation = split["train"], split["test"]
    if len(parts) > 1:  # each source's line is above
        log.info("training data, all %d datasets: %s", len(parts), stats.describe())
    if data.val_size:  # a validation file's line is above
        log.info("validation data: %d examples split off", len(validation))
    return PreferenceData(train, validation, stats, validation_stats)


def tokenize_preference(example: dict, tokenizer: PreTrainedTokenizerBase) -> dict[str, list[int]]:
    """prompt_ids, and chosen_ids/rejected_ids (or completion_ids) of a pair, as TRL's preference trainers make them."""
    prompt = example["prompt"]
    conversational = isinstance(prompt, list)
    prompt_ids = _token_ids(tokenizer, prompt, add_generation_prompt=conversational)
    whole = {}
    for name in (name for name in ANSWERS if name in example):
        answer = example[name]
        if not conversational and not answer.endswith(tokenizer.eos_token or ""):
            answer += tokenizer.eos_token or ""
        whole[name] = _token_ids(tokenizer, prompt + answer)
    # tokens can merge across the boundary: the answers start where the prompt alone and prompt + answer diverge
    prompt_length = min(common_prefix_length(prompt_ids, ids) for ids in whole.values())
    answers = {f"{name}_ids": ids[prompt_length:] for name, ids in whole.items()}
    return {"prompt_ids": prompt_ids[:prompt_length], **answers}


def preference_sequences(example: dict, tokenizer: PreTrainedTokenizerBase) -> dict[str, tuple[list[int], list[int]]]:
    """Each answer's whole sequence as (input_ids, labels): the prompt masked, the answer trained."""
    ids = tokenize_preference(example, tokenizer)
    prompt = ids.pop("prompt_ids")
    return {name.removesuffix("_ids"): (prompt + answer, [IGNORE] * len(prompt) + answer)
            for name, answer in ids.items()}


def describe_answer(name: str, example: dict) -> str:
    """chosen / rejected, or for KTO's labelled completions desirable / undesirable."""
    if name != "completion":
        return name
    return "desirable" if example["label"] else "undesirable"


def _checked_rows(source: DatasetSource, data: DataConfig, tokenizer: PreTrainedTokenizerBase, method: str,
                  purpose: str) -> tuple[datasets.Dataset, DataStats, np.ndarray]:
    """The source's rows in TRL's shape, those too long for data.max_length dropped or counted as truncated, the
    counts (logged as `purpose`'s: training, validation), and each kept row's length in tokens (its longest
    sequence)."""
    rows = load_formatted(source, data.on_error, data.num_proc, method)
    dataset = rows.dataset
    if isinstance(dataset[0]["prompt"], list):
        # a pair is masked by where its prompt ends, so the template needs no {% generation %} markers
        tokenizer.chat_template = resolve_chat_template(tokenizer, data.chat_template, train_on_prompt=True)
    if method == "kto" and "chosen" in dataset.column_names:
        dataset = unpair_preference_dataset(dataset, num_proc=data.num_proc)
    counted = dataset.map(_count_example, fn_kwargs={"tokenizer": tokenizer, "data": data}, num_proc=data.num_proc,
                          desc="tokenizing pairs")
    status = np.array(counted["qlora_status"])
    kept = counted.filter(lambda s: s in ("", "truncated"), input_columns="qlora_status", num_proc=data.num_proc)
    lengths = np.array(kept["qlora_length"], dtype=int)
    stats = DataStats(
        rows=len(rows.dataset) + rows.skipped,
        examples=len(kept),
        skipped_malformed=rows.skipped,
        truncated=int((status == "truncated").sum()),
        dropped_too_long=int((status == "too_long").sum()),
        dropped_no_trainable=int((status == "no_trainable").sum()),
        tokens=int(sum(kept["qlora_tokens"])),
        trained_tokens=int(sum(kept["qlora_trained"])),
        length_percentiles=_percentiles(lengths),
    )
    log.info("%s data: %s (%s): %s", purpose, source.path, rows.format, stats.describe())
    return kept.remove_columns(["qlora_status", "qlora_tokens", "qlora_trained", "qlora_length"]), stats, lengths


def _count_example(example: dict, tokenizer: PreTrainedTokenizerBase, data: DataConfig) -> dict:
    """What training sees of one pair: its tokens and answer tokens (each sequence cut at data.max_length by the
    trainer's collator), its longest sequence, and its status: '', truncated, too_long or no_trainable (the prompt
    alone fills data.max_length: the trainers drop such pairs)."""
    ids = tokenize_preference(example, tokenizer)
    prompt, answers = len(ids["prompt_ids"]), [len(ids[f"{name}_ids"]) for name in ANSWERS if name in example]
    limit = data.max_length
    status = ""
    if prompt >= limit:
        status = "no_trainable"
    elif prompt + max(answers) > limit:
        status = "truncated" if data.truncation == "truncate" else "too_long"
    sequences = [min(prompt + answer, limit) for answer in answers]
    return {"qlora_status": status, "qlora_tokens": sum(sequences),
            "qlora_trained": sum(sequences) - prompt * len(answers), "qlora_length": max(sequences)}


def _token_ids(tokenizer: PreTrainedTokenizerBase, text_or_messages: str | list, add_generation_prompt: bool = False
               ) -> list[int]:
    if isinstance(text_or_messages, list):
        return list(tokenizer.apply_chat_template(text_or_messages, tokenize=True, return_dict=True,
                                                  add_generation_prompt=add_generation_prompt)["input_ids"])
    return list(tokenizer(text=text_or_messages)["input_ids"])


def _sum_stats(parts: list[tuple[DataStats, np.ndarray]]) -> DataStats:
    if len(parts) == 1:
        return parts[0][0]
    counted = [stats for stats, _ in parts]
    names = ("rows", "examples", "skipped_malformed", "truncated", "dropped_too_long", "dropped_no_trainable", "tokens",
             "trained_tokens")
    totals = {name: sum(getattr(stats, name) for stats in counted) for name in names}
    return DataStats(**totals, length_percentiles=_percentiles(np.concatenate([lengths for _, lengths in parts])))


def _percentiles(lengths: np.ndarray) -> dict[str, int]:
    lengths = lengths if len(lengths) else np.zeros(1, dtype=int)
    return {f"p{q}": int(np.percentile(lengths, q)) for q in (50, 90, 99)} | {"max": int(lengths.max())}
