"""`python -m qlora.evaluate run=outputs/<run> [data.path=eval.jsonl]`: how good is the adapter?

Eval loss and perplexity over the dataset, tokenized and masked exactly as in training (TRL's
SFTTrainer computes both), and, for rows with a reference answer, greedy answers scored by exact
match, containment and an optional `regex`. Everything goes to eval.json in the run folder.
Without data.path, the run's own validation set (data.val_path, or its data.val_size split) or
held-out file (data.heldout_path) is evaluated.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import datasets
from transformers import PreTrainedTokenizerBase
from trl import SFTConfig, SFTTrainer

from qlora.cli import run_hydra_command
from qlora.config import ColumnNames, DataConfig, DatasetSource, EvaluateConfig, typed_config
from qlora.data import prepare_sft_data
from qlora.data.load import load_formatted
from qlora.errors import QLoRAError
from qlora.output import quiet_trainer
from qlora.runs import checked_adapter_dir, load_adapted_model, load_run_config
from qlora.stages.heldout import generate_answers, score_answers

log = logging.getLogger("qlora")


@dataclass
class EvaluationData:
    """What to evaluate on: data settings tokenized as training does, and where the rows come from, in words."""

    data: DataConfig
    described: str
    validation_split: bool = False  # the run's data.val_size split, tokenized again with its seed: loss only
    seed: int = 0


def evaluate(config: EvaluateConfig) -> dict[str, Any]:
    adapter_dir = checked_adapter_dir(config.run, config.adapter)  # fail early on a bad run=
    source = evaluation_data(config)
    model, tokenizer, _ = load_adapted_model(config.run, config.adapter, config.base,
                                             trust_remote_code=config.trust_remote_code)
    dataset, rows = _examples_and_rows(source, tokenizer, config.max_samples)

    with tempfile.TemporaryDirectory() as scratch:
        # no autocast: the 4-bit layers already compute in the dtype the base was quantized with
        args = SFTConfig(output_dir=scratch, per_device_eval_batch_size=config.batch_size,
                         max_length=source.data.max_length, bf16=False, fp16=False, report_to="none")
        # TRL insists on a train_dataset even to evaluate; the same rows are tokenized once (datasets' cache)
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, eval_dataset=dataset,
                             processing_class=tokenizer)
        quiet_trainer(trainer)
        loss = trainer.evaluate()["eval_loss"]
    results: dict[str, Any] = {"data": source.described, "examples": len(dataset), "eval_loss": loss,
                               "perplexity": math.exp(loss)}

    answerable = rows is not None and ("completion" in rows.column_names or "messages" in rows.column_names)
    if config.generation and answerable:
        prompts, references, answers = generate_answers(model, tokenizer, rows, config.max_new_tokens,
                                                        config.batch_size)
        scores = score_answers(answers, references, config.regex)
        results.update({name: sum(hits) / len(hits) for name, hits in scores.items()})
        results["samples"] = [{"prompt": p, "reference": r, "answer": a}
                              for p, r, a in list(zip(prompts, references, answers))[:5]]
    elif config.generation and rows is None:
        log.info("%s: answers are not scored (the split keeps no prompts); set data.path=FILE to score them",
                 source.described)
    elif config.generation:
        log.info("%s has no reference answers (text rows): reporting loss and perplexity only", source.described)

    target = Path(config.output_file or Path(config.run or adapter_dir.parent) / "eval.json").expanduser()
    target.write_text(json.dumps(results, indent=2) + "\n")
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in results.items() if isinstance(v, float))
    log.info("evaluated %d examples of %s: %s; written to %s", len(dataset), source.described, metrics, target)
    return results


def _examples_and_rows(
    source: EvaluationData, tokenizer: PreTrainedTokenizerBase, max_samples: int | None
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """The tokenized examples, and the rows they came from (none for the run's split: it keeps no prompts)."""
    # tokenized and masked by the same code as training (the adapter's tokenizer keeps its chat template)
    prepared = prepare_sft_data(source.data, tokenizer, seed=source.seed, purpose="evaluation")
    if source.validation_split:
        examples, rows = prepared.validation, None
    else:
        data = source.data
        examples = prepared.train
        rows = load_formatted(DatasetSource(data.path, data.format, data.split, data.columns)).dataset
    if max_samples is not None:
        examples = examples.select(range(min(max_samples, len(examples))))
        rows = rows.select(range(min(max_samples, len(rows)))) if rows is not None else None
    return examples, rows


def evaluation_data(config: EvaluateConfig) -> EvaluationData:
    """data.path; without it, the run's validation file or split, or else its held-out file."""
    if config.data.path is not None:
        return EvaluationData(config.data, config.data.path)
    run = load_run_config(config.run) if config.run else None
    if run is None:
        raise QLoRAError("nothing to evaluate on: set data.path=eval.jsonl (any format training accepts), or pass "
                         "run= of a run with a validation set or held-out file.")
    if run.training.method != "sft":  # its validation and held-out files hold pairs: no loss of one answer
        raise QLoRAError(f"nothing to evaluate on: run={config.run} was trained with training.method="
                         f"{run.training.method}, and its validation and held-out pairs are scored by the run itself "
                         f"(reward margin and accuracy in metrics.jsonl, preference accuracy in summary.json); set "
                         f"data.path=eval.jsonl (prompts with answers, any format SFT training accepts).")
    # the run's own tokenization settings (max_length, chat template, train_on_prompt), one file in its own format
    own_file = replace(run.data, format="auto", datasets=[], val_path=None, val_size=0.0)
    if run.data.val_path is not None:
        return EvaluationData(replace(own_file, path=run.data.val_path),
                              f"{run.data.val_path} (the run's data.val_path)")
    if run.data.val_size:
        return EvaluationData(run.data, f"the run's validation split (data.val_size={run.data.val_size:g})",
                              validation_split=True, seed=run.training.seed)
    if run.data.heldout_path is not None:
        held_out = replace(own_file, path=run.data.heldout_path, columns=ColumnNames())  # as training reads it
        return EvaluationData(held_out, f"{run.data.heldout_path} (the run's data.heldout_path)")
    raise QLoRAError(f"nothing to evaluate on: run={config.run} has no validation set (data.val_path, data.val_size) "
                     f"or held-out file (data.heldout_path); set data.path=eval.jsonl (any format training accepts).")


def main() -> None:
    run_hydra_command("evaluate", lambda cfg: evaluate(typed_config(cfg)))


if __name__ == "__main__":
    main()
