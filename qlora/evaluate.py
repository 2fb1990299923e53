"""`python -m qlora.evaluate run=outputs/<run> data.path=eval.jsonl`: how good is the adapter?

Eval loss and perplexity over the dataset, tokenized and masked exactly as in training (TRL's
SFTTrainer computes both), and, for rows with a reference answer, greedy answers scored by exact
match, containment and an optional `regex`. Everything goes to eval.json in the run folder.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from pathlib import Path
from typing import Any

from trl import SFTConfig, SFTTrainer

from qlora.cli import run_hydra_command
from qlora.config import DatasetSource, EvaluateConfig, typed_config
from qlora.data import prepare_sft_data
from qlora.data.load import load_formatted
from qlora.errors import QLoRAError
from qlora.output import quiet_trainer
from qlora.runs import find_adapter, load_adapted_model
from qlora.stages.heldout import generate_answers, score_answers

log = logging.getLogger("qlora")


def evaluate(config: EvaluateConfig) -> dict[str, Any]:
    adapter_dir, _ = find_adapter(config.run, config.adapter, config.base)  # fail early on a bad run=
    if config.data.path is None:
        raise QLoRAError("nothing to evaluate on: set data.path=eval.jsonl (any format training accepts).")
    model, tokenizer, run = load_adapted_model(config.run, config.adapter, config.base)
    # tokenized and masked by the same code as training (the adapter's tokenizer keeps its chat template)
    dataset = prepare_sft_data(config.data, tokenizer, seed=0, purpose="evaluation").train
    rows = load_formatted(DatasetSource(config.data.path, config.data.format, config.data.split,
                                        config.data.columns)).dataset
    if config.max_samples is not None:
        dataset = dataset.select(range(min(config.max_samples, len(dataset))))
        rows = rows.select(range(min(config.max_samples, len(rows))))

    with tempfile.TemporaryDirectory() as scratch:
        # no autocast: the 4-bit layers already compute in the dtype the base was quantized with
        args = SFTConfig(output_dir=scratch, per_device_eval_batch_size=config.batch_size,
                         max_length=config.data.max_length, bf16=False, fp16=False, report_to="none")
        # TRL insists on a train_dataset even to evaluate; the same rows are tokenized once (datasets' cache)
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, eval_dataset=dataset,
                             processing_class=tokenizer)
        quiet_trainer(trainer)
        loss = trainer.evaluate()["eval_loss"]
    results: dict[str, Any] = {"data": config.data.path, "examples": len(dataset), "eval_loss": loss,
                               "perplexity": math.exp(loss)}

    answerable = "completion" in rows.column_names or "messages" in rows.column_names
    if config.generation and answerable:
        prompts, references, answers = generate_answers(model, tokenizer, rows, config.max_new_tokens,
                                                        config.batch_size)
        scores = score_answers(answers, references, config.regex)
        results.update({name: sum(hits) / len(hits) for name, hits in scores.items()})
        results["samples"] = [{"prompt": p, "reference": r, "answer": a}
                              for p, r, a in list(zip(prompts, references, answers))[:5]]
    elif config.generation:
        log.info("%s has no reference answers (text rows): reporting loss and perplexity only", config.data.path)

    target = Path(config.output_file or Path(config.run or adapter_dir.parent) / "eval.json").expanduser()
    target.write_text(json.dumps(results, indent=2) + "\n")
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in results.items() if isinstance(v, float))
    log.info("evaluated %d examples of %s: %s; written to %s", len(dataset), config.data.path, metrics, target)
    return results


def main() -> None:
    run_hydra_command("evaluate", lambda cfg: evaluate(typed_config(cfg)))


if __name__ == "__main__":
    main()
