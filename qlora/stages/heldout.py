"""Greedy answers to held-out prompts, scored against their references (exact match, contains, regex)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import datasets
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class ExactMatch:
    correct: int
    total: int
    # (prompt, expected, answer) of the first few examples, to show what the model says
    samples: list[tuple[str, str, str]]

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


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
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True)
            batch = batch.to(model.device)
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


def _prompt_and_reference(example: dict, tokenizer: PreTrainedTokenizerBase) -> tuple[str, str]:
    if "messages" in example:
        *history, last = example["messages"]
        prompt = tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
        return prompt, last["content"]
    return example["prompt"], example["completion"]
