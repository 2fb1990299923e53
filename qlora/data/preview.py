"""Show what the model sees: the first examples (or both sides of the first pairs) with trained and masked tokens
told apart, and statistics.

Run it before spending GPU hours: `python -m qlora.data preview +recipe=NAME [key=value ...]`.
"""

from __future__ import annotations

from typing import Iterator

import datasets
from transformers import PreTrainedTokenizerBase

from qlora.config import TrainConfig
from qlora.data.preference import PreferenceData, describe_answer, preference_sequences
from qlora.data.prepare import SFTData, prepare_training_data
from qlora.data.tokenization import IGNORE, DataStats

# In a terminal, trained tokens are green and masked ones grey; piped, trained text is wrapped in markers.
TRAINED_COLOUR, MASKED_COLOUR, RESET = "\033[32m", "\033[90m", "\033[0m"
TRAINED_OPEN, TRAINED_CLOSE = "[[", "]]"


def preview(config: TrainConfig, examples: int = 3, colour: bool = False) -> str:
    """The report printed by `python -m qlora.data preview`: the first `examples` examples and the statistics."""
    from qlora.stages.model import load_tokenizer  # the model's tokenizer, exactly as training loads it

    tokenizer = load_tokenizer(config.model)
    data = prepare_training_data(config.data, tokenizer, config.training.seed, config.training.method)
    return "\n".join(_report(data, tokenizer, examples, colour))


def render_example(input_ids: list[int], labels: list[int], tokenizer: PreTrainedTokenizerBase, colour: bool) -> str:
    """The decoded example, its trained runs of tokens coloured (terminal) or wrapped in [[ ]] (piped)."""
    parts = []
    for trained, tokens in _runs(input_ids, labels):
        text = tokenizer.decode(tokens)
        if colour:
            parts.append(f"{TRAINED_COLOUR if trained else MASKED_COLOUR}{text}{RESET}")
        else:
            parts.append(f"{TRAINED_OPEN}{text}{TRAINED_CLOSE}" if trained else text)
    return "".join(parts)


def _report(data: SFTData | PreferenceData, tokenizer: PreTrainedTokenizerBase, examples: int,
            colour: bool) -> Iterator[str]:
    legend = f"trained tokens inside {TRAINED_OPEN} {TRAINED_CLOSE}"
    if colour:
        legend = "trained tokens in green, masked in grey"
    if isinstance(data, SFTData) and data.chat_masking:
        yield f"chat rows: {data.chat_masking}"
    kind = "pairs" if "chosen" in data.train.column_names else "examples"
    yield f"first {min(examples, len(data.train))} training {kind} ({legend}):"
    for index, example in enumerate(_first(data.train, examples)):
        for side, input_ids, labels in _sequences(example, tokenizer):
            yield f"\n--- example {index}{side} ({len(input_ids)} tokens) ---"
            yield render_example(input_ids, labels, tokenizer, colour)
    yield "\ntraining data (before a data.val_size split):"
    yield from _stats_lines(data.stats)
    if data.validation is not None:
        yield f"validation data: {len(data.validation)} examples ({len(data.train)} left for training)"
        if data.validation_stats is not None:
            yield from _stats_lines(data.validation_stats)


def _sequences(example: dict, tokenizer: PreTrainedTokenizerBase) -> list[tuple[str, list[int], list[int]]]:
    """What the trainer sees of an example: its tokens, or the chosen and the rejected sequence of a pair (one
    labelled completion for KTO), as (side, input_ids, labels)."""
    if "input_ids" in example:
        return [("", example["input_ids"], example["labels"])]
    return [(f", {describe_answer(name, example)}", input_ids, labels)
            for name, (input_ids, labels) in preference_sequences(example, tokenizer).items()]


def _stats_lines(stats: DataStats) -> Iterator[str]:
    p = stats.length_percentiles
    yield f"  examples            {stats.examples} (of {stats.rows} rows)"
    yield f"  tokens              {stats.tokens}, trained {stats.trained_tokens} ({100 * stats.trained_share:.1f}%)"
    yield f"  length (tokens)     p50 {p['p50']}, p90 {p['p90']}, p99 {p['p99']}, max {p['max']}"
    yield f"  truncated           {stats.truncated}"
    yield (f"  dropped             {stats.dropped_too_long} too long, "
           f"{stats.dropped_no_trainable} with no trained tokens")
    yield f"  skipped malformed   {stats.skipped_malformed}"


def _first(dataset: datasets.Dataset, count: int) -> datasets.Dataset:
    return dataset.select(range(min(count, len(dataset))))


def _runs(input_ids: list[int], labels: list[int]) -> Iterator[tuple[bool, list[int]]]:
    """Consecutive tokens grouped by whether they are trained."""
    run: list[int] = []
    trained = None
    for token, label in zip(input_ids, labels):
        if (label != IGNORE) != trained and run:
            yield bool(trained), run
            run = []
        trained = label != IGNORE
        run.append(token)
    if run:
        yield bool(trained), run
