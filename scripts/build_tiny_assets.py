"""Regenerate the tiny assets the package ships: a sentiment dataset, its preference pairs and a tiny Llama model.

The tiny recipe trains on the CPU in about a minute; the tiny_dpo recipe learns the same task from the pairs.
Everything here is deterministic (fixed seeds, sorted vocabularies), so running it again rewrites the same files:

    python scripts/build_tiny_assets.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from qlora.data.formats import to_trl_example

ASSETS = Path(__file__).resolve().parent.parent / "qlora" / "assets"
INSTRUCTION = "Is this review positive or negative?"
SUBJECTS = ["the film", "the movie", "this show", "the book", "the album", "the story", "the game",
            "the play", "the acting", "the music", "the ending", "the plot", "the cast", "the script"]
POSITIVE = ["great", "wonderful", "superb", "brilliant", "delightful", "moving", "excellent", "charming",
            "fun", "beautiful", "clever", "gripping", "lovely", "fantastic", "enjoyable", "touching"]
NEGATIVE = ["awful", "boring", "dull", "terrible", "clumsy", "tedious", "bland", "painful", "weak",
            "messy", "lifeless", "annoying", "poor", "dreadful", "forgettable", "confusing"]
FILLERS = ["", "really ", "quite ", "truly ", "rather ", "so "]


def make_review(rng: random.Random, label: str) -> str:
    words = POSITIVE if label == "positive" else NEGATIVE
    first, second = rng.sample(words, 2)
    subject = rng.choice(SUBJECTS)
    return f"{subject} was {rng.choice(FILLERS)}{first} and {second}"


def build_dataset(n_train: int = 512, n_heldout: int = 32) -> tuple[list[dict], list[dict]]:
    rng = random.Random(0)
    rows, seen = [], set()
    while len(rows) < n_train + n_heldout:
        label = rng.choice(["positive", "negative"])
        review = make_review(rng, label)
        if review not in seen:  # held-out reviews never appear in training
            seen.add(review)
            rows.append({"instruction": INSTRUCTION, "input": review, "output": label})
    return rows[:n_train], rows[n_train:]


def preference_pair(row: dict) -> dict:
    """A sentiment row as a preference pair: the same alpaca prompt, the right label chosen, the wrong one rejected."""
    wrong = "negative" if row["output"] == "positive" else "positive"
    return {"prompt": alpaca_example(row)["prompt"], "chosen": row["output"], "rejected": wrong}


def build_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=["<|pad|>", "<|begin_of_text|>", "<|end_of_text|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        pad_token="<|pad|>",
        model_max_length=512,
    )


def build_model(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    # After the final RMSNorm the hidden state has norm sqrt(128); with the usual 0.02 init the head's
    # logits could never exceed about 2.5, so the frozen head could not express a confident answer.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model.to(torch.bfloat16)


def alpaca_example(row: dict) -> dict:
    return to_trl_example(row, "alpaca")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def main() -> None:
    train, heldout = build_dataset()
    write_jsonl(ASSETS / "sentiment" / "train.jsonl", train)
    write_jsonl(ASSETS / "sentiment" / "heldout.jsonl", heldout)
    write_jsonl(ASSETS / "sentiment_pairs" / "train.jsonl", [preference_pair(row) for row in train])
    write_jsonl(ASSETS / "sentiment_pairs" / "heldout.jsonl", [preference_pair(row) for row in heldout])
    # Trained on the formatted examples, so the alpaca template takes few tokens and the runs are quick.
    texts = [example["prompt"] + example["completion"] for example in map(alpaca_example, train)]
    tokenizer = build_tokenizer(texts)
    model = build_model(tokenizer)
    model_dir = ASSETS / "tiny-llama"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    print(f"wrote {len(train)} train and {len(heldout)} held-out rows and as many pairs, and {model_dir}")


if __name__ == "__main__":
    main()
