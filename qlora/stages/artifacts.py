"""The run folder: created before anything is loaded, never over an earlier run's outputs."""

from __future__ import annotations

import json
import logging
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
from transformers.trainer import TRAINER_STATE_NAME

from qlora.config import TrainConfig, as_plain_dict
from qlora.errors import QLoRAError
from qlora.stages.checkpoints import CONFIG_NAME
from qlora.stages.disk_space import WRITE_ERRORS, adapter_bytes, no_space_left, out_of_space
from qlora.stages.run_lock import LOCK_NAME
from qlora.stages.sharded_adapter import adapter_for_saving

log = logging.getLogger("qlora")

PACKAGES = ("qlora", "torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets", "hydra-core")


# What a run writes at the top of its folder; a resumed run moves the earlier ones aside, never over them.
RUN_OUTPUTS = ("config.yaml", "environment.json", "metrics.jsonl", "summary.json", "adapter", "startup_summary.json",
               "report.md", "report.png")
# What an attempt writes before its first step. A folder that holds nothing else, no checkpoint and no trained step
# is what an attempt that failed early left (bad data, a signal, a full disk): the same command may use it again.
START_UP_OUTPUTS = ("config.yaml", "environment.json", "train.log", "data_stats.json", "startup_summary.json",
                    "metrics.jsonl", "checkpoints", "tensorboard", "wandb", "mlruns", LOCK_NAME)


def prepare_run_dir(config: TrainConfig, resume_step: Optional[int] = None) -> Path:
    """Create the run folder and write the resolved config and environment into it.

    `resume_step` (training.resume set; 0 when no checkpoint was found) allows a folder with files: the outputs
    of an earlier attempt that trained past that step move to before-resume-<step>/ and its metrics up to that
    step are kept; those of an attempt that stopped before its first step are replaced.
    """
    run_dir = Path(config.training.output_dir).expanduser()
    occupied = run_dir.exists() and any(path.name != LOCK_NAME for path in run_dir.iterdir())
    if occupied and resume_step is None and not config.training.overwrite_output_dir:
        if not failed_before_first_step(run_dir):
            raise QLoRAError(
                f"training.output_dir={run_dir} already holds files from an earlier run; refusing to write over "
                f"them. Continue it with training.resume=auto, choose another training.output_dir, or set "
                f"training.overwrite_output_dir=true."
            )
        log.info("%s holds only what an attempt that stopped before its first step wrote: using it again", run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and trained_since(run_dir, resume_step):
            _move_earlier_outputs(run_dir, resume_step)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(as_plain_dict(config), sort_keys=False))
        (run_dir / "environment.json").write_text(json.dumps(describe_environment(), indent=2) + "\n")
    except OSError as error:
        raise QLoRAError(
            f"cannot write to training.output_dir={run_dir}: {error}. Choose a folder you can write to."
        ) from error
    return run_dir


def failed_before_first_step(run_dir: Path) -> bool:
    """Whether run_dir holds only what an attempt writes before its first step: no checkpoint, no adapter, no
    trained step, and no file of another kind (a folder of the user's own files is never taken for one)."""
    checkpoints = run_dir / "checkpoints"
    return ({path.name for path in run_dir.iterdir()} <= set(START_UP_OUTPUTS)
            and not (checkpoints.is_dir() and any(checkpoints.iterdir())) and not trained_since(run_dir, 0))


def trained_since(run_dir: Path, step: int) -> bool:
    """Whether the attempt whose outputs are at the top of run_dir trained past `step`: it saved an adapter or a
    summary, measured its first step's memory, or logged a later step. An attempt that stopped before its first
    step left nothing that the next attempt's outputs would not replace."""
    if (run_dir / "adapter").exists() or (run_dir / "summary.json").exists():
        return True
    startup, metrics = run_dir / "startup_summary.json", run_dir / "metrics.jsonl"
    try:
        first_step_memory = json.loads(startup.read_text()).get("memory_after_first_step_gib") \
            if startup.is_file() else None
        logged = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if line.strip()] \
            if metrics.is_file() else []
    except (ValueError, KeyError):
        return True  # a file half written: keep it, as if it held training
    return first_step_memory is not None or any(logged_step > step for logged_step in logged)


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

    Under FSDP each process holds a shard of the adapter, so all of them take part in gathering it onto the
    main process (qlora/stages/sharded_adapter.py); it then loads in a single process.
    """
    model, state_dict = adapter_for_saving(trainer)
    if trainer.accelerator.is_main_process:
        save_adapter(model, tokenizer, run_dir, state_dict)
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
    try:
        # only the trained adapter: not the frozen reference copy DPO and KTO keep of a continued one (model.adapter)
        model.save_pretrained(partial, state_dict=state_dict, selected_adapters=[model.active_adapter])
        tokenizer.save_pretrained(partial)
    except WRITE_ERRORS as error:
        shutil.rmtree(partial, ignore_errors=True)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        raise _adapter_save_error(error, run_dir, adapter_bytes(trainable)) from error
    if not adapter_tensor_names(partial):
        # e.g. a state dict gathered without the adapter's weights: an empty adapter would load silently as
        # the untrained base model, so refuse it and keep whatever adapter/ already holds
        raise QLoRAError(
            f"the adapter written to {partial} holds no LoRA weights (the state dict passed to peft had none), "
            f"so it was not saved as {final}. This is a bug in how the weights were gathered; the checkpoints "
            f"in {run_dir / 'checkpoints'} are kept."
        )
    if final.exists():  # only with training.overwrite_output_dir=true (a resume moved it aside)
        shutil.rmtree(final)
    partial.rename(final)
    return final


def save_adapter_from_checkpoint(checkpoint: Path, run_dir: Path) -> Path:
    """Save run_dir/adapter, atomically, from the adapter and tokenizer files of the run's last checkpoint: the
    end of a run that a signal or a crash cut short after its last step."""
    final, partial = run_dir / "adapter", run_dir / "adapter.partial"
    shutil.rmtree(partial, ignore_errors=True)
    files = [path for path in checkpoint.iterdir() if path.is_file() and not _trainer_state_file(path.name)]
    try:
        partial.mkdir()
        for path in files:
            shutil.copy2(path, partial / path.name)
    except OSError as error:
        shutil.rmtree(partial, ignore_errors=True)
        raise _adapter_save_error(error, run_dir, sum(path.stat().st_size for path in files)) from error
    if final.exists():  # an adapter/ without weights, which loads as the untrained base model
        shutil.rmtree(final)
    partial.rename(final)
    return final


def _trainer_state_file(name: str) -> bool:
    """A checkpoint's file that only the Trainer reads (optimizer, scheduler, RNG, step, arguments, qlora's config)."""
    return name.endswith((".pt", ".pth", ".bin")) or name in (TRAINER_STATE_NAME, CONFIG_NAME)


def _adapter_save_error(error: Exception, run_dir: Path, needed_bytes: int) -> QLoRAError:
    if out_of_space(error, run_dir, needed_bytes):
        problem = f"{no_space_left(run_dir)} while saving the adapter"
    else:
        problem = f"could not save the adapter to {run_dir / 'adapter'}"
    return QLoRAError(
        f"{problem}; the checkpoints in {run_dir / 'checkpoints'} are kept. Free disk space or fix the folder's "
        f"permissions, then run the same command with training.resume=auto (from a checkpoint of the last step, "
        f"it only saves the adapter). Details: {error}"
    )


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
