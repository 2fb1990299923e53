"""The held-out check: greedy answers to unseen prompts, scored by exact match."""

from __future__ import annotations

from dataclasses import dataclass

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


@torch.no_grad()
def exact_match(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: datasets.Dataset,
    max_new_tokens: int,
    batch_size: int = 8,
) -> ExactMatch:
    """Answer each prompt/completion or messages example greedily; count answers equal to the reference."""
    prompts, references = zip(*(_prompt_and_reference(example, tokenizer) for example in examples))
    was_training = model.training
    model.eval()
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"  # generation continues on the right
    answers: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(list(prompts[start : start + batch_size]), return_tensors="pt", padding=True)
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
    correct = sum(a.strip() == r.strip() for a, r in zip(answers, references))
    samples = list(zip(prompts, references, answers))[:3]
    return ExactMatch(correct=correct, total=len(answers), samples=samples)


def _prompt_and_reference(example: dict, tokenizer: PreTrainedTokenizerBase) -> tuple[str, str]:
    if "messages" in example:
        *history, last = example["messages"]
        prompt = tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
        return prompt, last["content"]
    return example["prompt"], example["completion"]
