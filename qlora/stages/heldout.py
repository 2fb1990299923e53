"""Greedy answers to held-out prompts, scored against their references (exact match, contains, regex), and for the
preference methods how often the model prefers the chosen answer of a held-out pair."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import datasets
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback

from qlora.config import METHOD_FORMATS, DatasetSource
from qlora.data.formats import TRL_SHAPES, matching_formats
from qlora.data.load import load_formatted, read_rows
from qlora.data.preference import preference_sequences
from qlora.data.tokenization import IGNORE
from qlora.stages.host_embeddings import on_device

log = logging.getLogger("qlora")


@dataclass
class ExactMatch:
    correct: int
    total: int
    # (prompt, expected, answer) of the first few examples, to show what the model says
    samples: list[tuple[str, str, str]]

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


def heldout_examples(path: Optional[str], samples: int, training_formats: list[str]) -> Optional[datasets.Dataset]:
    """The first `samples` held-out rows, read in their own format; None (saying why) when they cannot test the
    model: no file, no samples, or rows of another shape than the training data's (a recipe's held-out file
    belongs to the recipe's data, which data.path may have replaced) or without reference answers."""
    if path is None or samples == 0:
        return None
    heldout = load_formatted(DatasetSource(path=path))
    shape = TRL_SHAPES[heldout.format]
    if shape == "text":
        log.info("held-out check skipped: data.heldout_path=%s holds text rows, which have no reference answers", path)
        return None
    if shape not in {TRL_SHAPES[name] for name in training_formats}:
        trained = " and ".join(sorted({f"{TRL_SHAPES[name]} rows ({name})" for name in training_formats}))
        log.info("held-out check skipped: data.heldout_path=%s holds %s rows (%s) while the training data has %s, "
                 "so its prompts would not test what the model learns (a recipe's held-out file goes with the "
                 "recipe's data); set data.heldout_path to held-out rows like your data's to check them",
                 path, shape, heldout.format, trained)
        return None
    return heldout.dataset.select(range(min(samples, len(heldout.dataset))))


def heldout_pairs(path: Optional[str], samples: int) -> Optional[datasets.Dataset]:
    """The first `samples` held-out pairs of a preference method, read in their own format (as heldout_examples
    reads SFT rows); None (saying why) when the file holds no pairs: a recipe's held-out file goes with the
    recipe's data, which data.path may have replaced, and unpaired completions have no second answer to compare."""
    if path is None or samples == 0:
        return None
    read = read_rows(path)
    columns = read.dataset.column_names
    if not set(matching_formats(columns)) & set(METHOD_FORMATS["dpo"]):
        log.info("held-out check skipped: data.heldout_path=%s holds no pairs (its columns: %s), and the preference "
                 "check compares the two answers of a pair (a recipe's held-out file goes with the recipe's data); "
                 "set data.heldout_path to held-out prompt/chosen/rejected pairs to check them",
                 path, ", ".join(columns))
        return None
    heldout = load_formatted(DatasetSource(path=path), method="dpo", read=read).dataset
    return heldout.select(range(min(samples, len(heldout))))


def exact_match(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: datasets.Dataset,
    max_new_tokens: int,
    batch_size: int = 8,
) -> ExactMatch:
    """Answer each prompt/completion or messages example greedily; count answers equal to the reference."""
    prompts, references, answers = generate_answers(model, tokenizer, examples, max_new_tokens, batch_size)
    correct = sum(score_answers(answers, references)["exact_match"])
    samples = list(zip(prompts, references, answers))[:3]
    return ExactMatch(correct=correct, total=len(answers), samples=samples)


@torch.no_grad()
def generate_answers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: datasets.Dataset,
    max_new_tokens: int,
    batch_size: int = 8,
) -> tuple[list[str], list[str], list[str]]:
    """Prompts, reference answers and greedy answers for prompt/completion or messages examples."""
    prompts, references = map(list, zip(*(_prompt_and_reference(example, tokenizer) for example in examples)))
    was_training = model.training
    model.eval()
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"  # generation continues on the right
    answers: list[str] = []
    try:
        # generation takes the model's device from its input embeddings, which may be in host memory while training
        with on_device(model):
            for start in range(0, len(prompts), batch_size):
                batch = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True)
                batch = batch.to(model.device)
                with torch.compiler.set_stance("force_eager"):  # compiled layers would compile again for every length
                    output = model.generate(
                        **batch,
                        max_new_tokens=max_new_tokens,
                        do_sample=False,
                        pad_token_id=tokenizer.pad_token_id,
                        eos_token_id=tokenizer.eos_token_id,
                    )
                new_tokens = output[:, batch["input_ids"].shape[1] :]
                answers += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return prompts, references, answers


def score_answers(answers: list[str], references: list[str], regex: Optional[str] = None) -> dict[str, list[bool]]:
    """Per answer: exact match and containment of the reference (both ignoring surrounding whitespace), and
    with `regex`, whether its first match in the answer (group 1 if it has groups) equals the reference."""
    scores = {
        "exact_match": [a.strip() == r.strip() for a, r in zip(answers, references)],
        "contains": [r.strip() in a for a, r in zip(answers, references)],
    }
    if regex is not None:
        pattern = re.compile(regex)
        found = [pattern.search(a) for a in answers]
        scores["regex"] = [
            m is not None and (m.group(1) if pattern.groups else m.group(0)).strip() == r.strip()
            for m, r in zip(found, references)
        ]
    return scores


class HeldoutEvaluation(TrainerCallback):
    """Every `every` steps, answer the held-out prompts and append the scores to metrics.jsonl
    (eval.during_training=true), so answer quality can be followed as training goes."""

    def __init__(self, examples: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, max_new_tokens: int,
                 every: int, metrics_path: Path):
        self.examples, self.tokenizer, self.max_new_tokens = examples, tokenizer, max_new_tokens
        self.every, self.metrics_path = every, metrics_path

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every or not state.is_world_process_zero:
            return
        _, references, answers = generate_answers(model, self.tokenizer, self.examples, self.max_new_tokens)
        scores = {f"heldout_{name}": sum(hits) / len(hits) for name, hits in score_answers(answers, references).items()}
        with self.metrics_path.open("a") as f:
            f.write(json.dumps({"step": state.global_step, **scores}) + "\n")


@dataclass
class PreferenceAccuracy:
    preferred: int  # pairs whose chosen answer the model gives the higher log-probability
    total: int
    mean_margin: float  # log p(chosen) - log p(rejected), averaged over the pairs

    @property
    def accuracy(self) -> float:
        return self.preferred / self.total if self.total else 0.0


def preference_accuracy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pairs: datasets.Dataset,
                        batch_size: int = 8) -> PreferenceAccuracy:
    """The model's own preference on held-out pairs: how often log p(chosen | prompt) > log p(rejected | prompt),
    each summed over the answer's tokens as the preference trainers tokenize them. Unlike the trainers' reward
    accuracy, it needs no reference, so it means the same before training as after."""
    sequences = [preference_sequences(pair, tokenizer) for pair in pairs]
    chosen = answer_log_probs(model, [s["chosen"] for s in sequences], tokenizer.pad_token_id, batch_size)
    rejected = answer_log_probs(model, [s["rejected"] for s in sequences], tokenizer.pad_token_id, batch_size)
    margins = chosen - rejected
    return PreferenceAccuracy(int((margins > 0).sum()), len(margins), float(margins.mean()))


@torch.no_grad()
def answer_log_probs(model: PreTrainedModel, sequences: list[tuple[list[int], list[int]]], pad_token_id: int,
                     batch_size: int = 8) -> torch.Tensor:
    """log p(answer | prompt) of each (input_ids, labels) sequence: the sum over its labelled tokens."""
    was_training = model.training
    model.eval()
    sums = []
    try:
        with on_device(model):  # the model's device is its input embeddings' (see generate_answers)
            for start in range(0, len(sequences), batch_size):
                batch = sequences[start : start + batch_size]
                width = max(len(ids) for ids, _ in batch)
                input_ids = torch.tensor([ids + [pad_token_id] * (width - len(ids)) for ids, _ in batch])
                labels = torch.tensor([labels + [IGNORE] * (width - len(labels)) for _, labels in batch])
                attention_mask = (torch.arange(width) < torch.tensor([[len(ids)] for ids, _ in batch])).long()
                with torch.compiler.set_stance("force_eager"):  # compiled layers would compile again for every length
                    logits = model(input_ids=input_ids.to(model.device),
                                   attention_mask=attention_mask.to(model.device)).logits
                targets, kept = labels[:, 1:].to(model.device), labels[:, 1:].to(model.device) != IGNORE
                for row in range(len(batch)):  # one row's float32 log-softmax at a time: a 7B's vocabulary is large
                    log_probs = logits[row, :-1].float().log_softmax(-1)
                    picked = log_probs.gather(-1, targets[row].clamp(min=0).unsqueeze(-1)).squeeze(-1)
                    sums.append(picked[kept[row]].sum().cpu())
    finally:
        model.train(was_training)
    return torch.stack(sums)


def _prompt_and_reference(example: dict, tokenizer: PreTrainedTokenizerBase) -> tuple[str, str]:
    if "messages" in example:
        *history, last = example["messages"]
        prompt = tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
        return prompt, last["content"]
    return example["prompt"], example["completion"]
