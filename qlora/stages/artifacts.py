"""The run folder: created before anything is loaded, never over an earlier run's outputs."""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Optional

import torch
import yaml
from peft import PeftModel
from safetensors import safe_open
from transformers import PreTrainedTokenizerBase, Trainer

from qlora.config import TrainConfig, as_plain_dict
from qlora.errors import QLoRAError

PACKAGES = ("qlora", "torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets", "hydra-core")


# What a run writes at the top of its folder; a resumed run moves the earlier ones aside, never over them.
RUN_OUTPUTS = ("config.yaml", "environment.json", "metrics.jsonl", "summary.json", "adapter", "startup_summary.json",
               "report.md", "report.png")


def prepare_run_dir(config: TrainConfig, resume_step: Optional[int] = None) -> Path:
    """Create the run folder and write the resolved config and environment into it.

    `resume_step` (training.resume set; 0 when no checkpoint was found) allows a folder with files:
    the earlier attempt's outputs move to before-resume-<step>/ and its metrics up to that step are kept.
    """
    run_dir = Path(config.training.output_dir).expanduser()
    occupied = run_dir.exists() and any(run_dir.iterdir())
    if occupied and resume_step is None and not config.training.overwrite_output_dir:
        raise QLoRAError(
            f"training.output_dir={run_dir} already holds files from an earlier run; refusing to write over "
            f"them. Continue it with training.resume=auto, choose another training.output_dir, or set "
            f"training.overwrite_output_dir=true."
        )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if occupied and resume_step is not None:
            _move_earlier_outputs(run_dir, resume_step)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(as_plain_dict(config), sort_keys=False))
        (run_dir / "environment.json").write_text(json.dumps(describe_environment(), indent=2) + "\n")
    except OSError as error:
        raise QLoRAError(
            f"cannot write to training.output_dir={run_dir}: {error}. Choose a folder you can write to."
        ) from error
    return run_dir


def _move_earlier_outputs(run_dir: Path, resume_step: int) -> None:
    earlier = run_dir / f"before-resume-{resume_step}"
    suffix = 1
    while earlier.exists():  # resumed from the same step more than once
        suffix += 1
        earlier = run_dir / f"before-resume-{resume_step}.{suffix}"
    present = [name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    if not present:
        return
    earlier.mkdir()
    for name in present:
        (run_dir / name).rename(earlier / name)
    if (earlier / "metrics.jsonl").exists():
        kept = [line for line in (earlier / "metrics.jsonl").read_text().splitlines()
                if line and json.loads(line)["step"] <= resume_step]
        (run_dir / "metrics.jsonl").write_text("".join(line + "\n" for line in kept))


def describe_environment() -> dict:
    """What it takes to reproduce the run: the command, package versions and git revision."""
    return {
        "command": [Path(sys.executable).name, "-m", "qlora.train", *sys.argv[1:]],
        "python": platform.python_version(),
        "packages": {name: _version(name) for name in PACKAGES},
        "git_revision": _git_revision(),
    }


def save_trained_adapter(trainer: Trainer, tokenizer: PreTrainedTokenizerBase, run_dir: Path) -> Path:
    """Save the trained adapter from every process: the main process writes it.

    Under FSDP each process holds a shard of the weights, so all of them take part in gathering the full
    state dict (accelerate's get_state_dict, onto the main process's CPU); peft keeps only the adapter's
    tensors, which then load in a single process.
    """
    state_dict = trainer.accelerator.get_state_dict(trainer.model) if trainer.is_fsdp_enabled else None
    if trainer.accelerator.is_main_process:
        save_adapter(trainer.accelerator.unwrap_model(trainer.model), tokenizer, run_dir, state_dict)
    trainer.accelerator.wait_for_everyone()
    return run_dir / "adapter"


def save_adapter(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    run_dir: Path,
    state_dict: Optional[dict[str, torch.Tensor]] = None,
) -> Path:
    """Save the adapter (peft format) and tokenizer to run_dir/adapter, atomically.

    Written to a temporary folder first and renamed, so a crash mid-save never leaves a folder named
    `adapter` that is incomplete. `state_dict`: the model's gathered weights, where they are sharded.
    """
    final, partial = run_dir / "adapter", run_dir / "adapter.partial"
    shutil.rmtree(partial, ignore_errors=True)
    # only the trained adapter: not the frozen reference copy DPO and KTO keep of a continued one (model.adapter)
    model.save_pretrained(partial, state_dict=state_dict, selected_adapters=[model.active_adapter])
    if not adapter_tensor_names(partial):
        # e.g. a state dict gathered without the adapter's weights: an empty adapter would load silently as
        # the untrained base model, so refuse it and keep whatever adapter/ already holds
        raise QLoRAError(
            f"the adapter written to {partial} holds no LoRA weights (the state dict passed to peft had none), "
            f"so it was not saved as {final}. This is a bug in how the weights were gathered; the checkpoints "
            f"in {run_dir / 'checkpoints'} are kept."
        )
    tokenizer.save_pretrained(partial)
    if final.exists():  # only with training.overwrite_output_dir=true (a resume moved it aside)
        shutil.rmtree(final)
    partial.rename(final)
    return final


def adapter_tensor_names(folder: Path) -> list[str]:
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        return []
    with safe_open(str(weights), framework="pt") as f:
        return list(f.keys())


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _git_revision() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None
