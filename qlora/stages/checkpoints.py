"""Checkpoints that survive a crash, and resuming from them.

transformers' Trainer writes checkpoint-N (adapter, optimizer, scheduler, RNG states, trainer state
with the step reached) straight into its final folder, and picks the highest-numbered folder on resume,
complete or not. Here each checkpoint is written under checkpoints/.partial/ first, fsynced, and only
then renamed to checkpoints/checkpoint-N: a folder with that name is always complete, and older
checkpoints are deleted (save_total_limit) only after the new one is in place. A file can still be damaged
later (a full disk, an interrupted copy), so training.resume=auto reads every file a resume reads before it
chooses a checkpoint, and sets a damaged one aside.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
import yaml
from safetensors import safe_open
from transformers import TrainerState
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_pt_utils import safe_globals
from transformers.trainer_utils import rotate_checkpoints
from trl import DPOTrainer, KTOTrainer, SFTTrainer

from qlora.config import TrainConfig, as_plain_dict
from qlora.errors import QLoRAError
from qlora.stages.disk_space import WRITE_ERRORS, checkpoint_bytes, no_space_left, out_of_space
from qlora.stages.sharded_adapter import ShardedAdapterCheckpoints

log = logging.getLogger(__name__)

CONFIG_NAME = "qlora_config.yaml"  # the resolved config, next to transformers' files
# What a checkpoint must hold to be resumed from; the rename makes them all-or-nothing.
REQUIRED_FILES = ("adapter_model.safetensors", TRAINER_STATE_NAME, "optimizer.pt", "scheduler.pt", CONFIG_NAME)
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")

# Config keys that change what a checkpoint means: resuming with a different value would continue a
# different model or walk a different data order. Everything else (max_steps, lr, logging) may change.
RESUME_KEYS = ("model.", "quantization.", "lora.", "data.path", "data.format", "data.max_length", "data.datasets",
               "data.columns", "data.split", "data.chat_template", "data.train_on_prompt",
               "training.method", "training.batch_size", "training.grad_accum", "training.seed")


class AtomicCheckpoints:
    """Mixed in before a TRL trainer: its checkpoints are written atomically and carry the resolved config."""

    def __init__(self, *args: Any, qlora_config: TrainConfig, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.qlora_config = qlora_config
        self._staging: Optional[Path] = None

    def _get_output_dir(self, trial: Any) -> str:
        # While saving, transformers writes (and rotates) inside the staging folder.
        return str(self._staging) if self._staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        checkpoints_dir = Path(super()._get_output_dir(trial))
        name = f"checkpoint-{self.state.global_step}"
        staging = checkpoints_dir / ".partial"
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)  # left over by a crash during an earlier save
        self.accelerator.wait_for_everyone()
        self._staging = staging
        try:
            super()._save_checkpoint(model, trial)
            self.accelerator.wait_for_everyone()  # every process has written its RNG state
            if self.args.should_save:
                (staging / name / CONFIG_NAME).write_text(yaml.safe_dump(as_plain_dict(self.qlora_config), sort_keys=False))
                _fsync_tree(staging / name)
        except WRITE_ERRORS as error:
            shutil.rmtree(staging, ignore_errors=True)
            raise self._save_error(error, checkpoints_dir) from error
        finally:
            self._staging = None
        if not self.args.should_save:
            return
        final = checkpoints_dir / name
        if final.exists():  # the same step saved twice (a signal on a save step): keep the newer
            shutil.rmtree(final)
        os.replace(staging / name, final)
        _fsync_dir(checkpoints_dir)
        shutil.rmtree(staging, ignore_errors=True)
        # by step number, not mtime: a rename does not touch the folder's mtime reliably
        rotate_checkpoints(str(checkpoints_dir), save_total_limit=self.args.save_total_limit, use_mtime=False)

    def _save_error(self, error: Exception, checkpoints_dir: Path) -> QLoRAError:
        step, previous = self.state.global_step, newest_checkpoint(checkpoints_dir) or "(none yet)"
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        if out_of_space(error, checkpoints_dir, checkpoint_bytes(trainable)):
            return QLoRAError(
                f"{no_space_left(checkpoints_dir)} while saving the checkpoint of step {step}. Nothing was lost: the "
                f"previous checkpoint {previous} is intact. Free disk space or lower training.save_total_limit, then "
                f"resume with training.resume=auto. Details: {error}"
            )
        return QLoRAError(
            f"could not save the checkpoint of step {step} in {checkpoints_dir}: {error}. Nothing was lost: the "
            f"previous checkpoint {previous} is intact. Fix the cause (e.g. the folder's permissions), then "
            f"resume with training.resume=auto."
        )


def remove_if_empty(checkpoints_dir: Path) -> None:
    """transformers creates the checkpoints folder with the trainer: a run that saved none leaves no empty folder."""
    with contextlib.suppress(OSError):  # it holds checkpoints, or is gone
        checkpoints_dir.rmdir()


# Each trainer below also gathers the adapter under FSDP (ShardedAdapterCheckpoints; nothing without FSDP)
class AtomicCheckpointTrainer(AtomicCheckpoints, ShardedAdapterCheckpoints, SFTTrainer):
    """SFTTrainer whose checkpoints are written atomically and carry the resolved config."""


class AtomicDPOTrainer(AtomicCheckpoints, ShardedAdapterCheckpoints, DPOTrainer):
    """DPOTrainer whose checkpoints are written atomically and carry the resolved config."""


class AtomicKTOTrainer(AtomicCheckpoints, ShardedAdapterCheckpoints, KTOTrainer):
    """KTOTrainer whose checkpoints are written atomically and carry the resolved config."""


def atomic_trainer_class(method: str) -> type:
    """The TRL trainer of training.method, with atomic checkpoints."""
    if method == "orpo":
        from trl.experimental.orpo import ORPOTrainer  # TRL 1.16 keeps ORPO among its experimental trainers

        return type("AtomicORPOTrainer", (AtomicCheckpoints, ShardedAdapterCheckpoints, ORPOTrainer), {})
    return {"sft": AtomicCheckpointTrainer, "dpo": AtomicDPOTrainer, "kto": AtomicKTOTrainer}[method]


def newest_checkpoint(checkpoints_dir: Path) -> Optional[Path]:
    """The complete checkpoint with the highest step in `checkpoints_dir`, or None."""
    if not checkpoints_dir.is_dir():
        return None
    steps = [(int(m.group(1)), p) for p in checkpoints_dir.iterdir() if (m := _CHECKPOINT.match(p.name))]
    complete = [(step, p) for step, p in steps if not missing_files(p)]
    return max(complete)[1] if complete else None


# accelerate names the optimizer's state optimizer.bin under FSDP
OTHER_NAMES = {"optimizer.pt": "optimizer.bin"}


def missing_files(checkpoint: Path) -> list[str]:
    return [name for name in REQUIRED_FILES
            if not (checkpoint / name).is_file() and not (checkpoint / OTHER_NAMES.get(name, name)).is_file()]


def find_resume_checkpoint(config: TrainConfig) -> Optional[Path]:
    """The checkpoint training.resume asks for (None: start at step 0), after checking it fits the config."""
    resume = config.training.resume
    if resume is None:
        return None
    if resume == "auto":
        checkpoint = newest_good_checkpoint(Path(config.training.output_dir).expanduser() / "checkpoints")
        if checkpoint is None:
            log.warning("training.resume=auto: no complete checkpoint in %s, starting at step 0",
                        config.training.output_dir)
            return None
    else:
        checkpoint = Path(resume).expanduser()
        fault = checkpoint_fault(checkpoint)
        if fault is not None:
            raise QLoRAError(
                f"training.resume={resume} is not a complete, readable qlora checkpoint ({fault}). Give a "
                f"checkpoints/checkpoint-N folder of a qlora run, or use training.resume=auto."
            )
    check_resumable(checkpoint, config)
    return checkpoint


def newest_good_checkpoint(checkpoints_dir: Path) -> Optional[Path]:
    """The newest checkpoint whose files all load, or None when there is no checkpoint at all.

    Newer ones that do not load (a file truncated or deleted after the save, e.g. by a full disk or a copy) are
    set aside as corrupt-checkpoint-N, with a warning naming them. When none loads, all stay where they are and
    the run is refused: starting at step 0 silently would throw their training away.
    """
    if not checkpoints_dir.is_dir():
        return None
    found = sorted(((int(m.group(1)), p) for p in checkpoints_dir.iterdir() if (m := _CHECKPOINT.match(p.name))),
                   reverse=True)
    corrupt = []
    for _, checkpoint in found:
        fault = checkpoint_fault(checkpoint)
        if fault is None:
            for bad, reason in corrupt:
                _set_aside(bad, reason)
            return checkpoint
        corrupt.append((checkpoint, fault))
    if corrupt:
        faults = "; ".join(f"{checkpoint.name}: {fault}" for checkpoint, fault in corrupt)
        raise QLoRAError(
            f"training.resume=auto: no checkpoint in {checkpoints_dir} can be resumed from ({faults}). Restore the "
            f"files, or move these folders away to start again at step 0."
        )
    return None


def checkpoint_fault(checkpoint: Path) -> Optional[str]:
    """What stops transformers from resuming from `checkpoint` (a file missing or unreadable), or None."""
    missing = missing_files(checkpoint)
    if missing:
        return f"missing {', '.join(missing)}"
    for path in sorted(checkpoint.iterdir()):
        try:
            _read(path)
        except Exception as error:  # a truncated or garbled file: each reader raises its own type
            return f"{path.name} is unreadable: {_first_sentence(error)}"
    saved_step = TrainerState.load_from_json(str(checkpoint / TRAINER_STATE_NAME)).global_step
    if saved_step != checkpoint_step(checkpoint):
        return f"{TRAINER_STATE_NAME} is of step {saved_step}"
    return None


def _read(path: Path) -> None:
    """Read a checkpoint's file as the resume will (training_args.bin and the model card are not read)."""
    if path.name == TRAINER_STATE_NAME:
        TrainerState.load_from_json(str(path))
    elif path.suffix == ".json":
        json.loads(path.read_text())
    elif path.suffix == ".yaml":
        yaml.safe_load(path.read_text())
    elif path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt"):  # checks that the header's tensors fill the file
            pass
    elif path.suffix in (".pt", ".pth") or path.name == OTHER_NAMES["optimizer.pt"]:
        # optimizer (optimizer.bin under FSDP), scheduler, RNG and scaler states
        with safe_globals():  # the numpy types of the RNG states, as transformers allows them
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # mmap: the zip index, not the data


def _first_sentence(error: Exception) -> str:
    text = str(error).split(". ")[0].splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}".rstrip(": ")


def _set_aside(checkpoint: Path, fault: str) -> None:
    aside = checkpoint.with_name(f"corrupt-{checkpoint.name}")
    suffix = 1
    while aside.exists():  # set aside at the same step before
        suffix += 1
        aside = checkpoint.with_name(f"corrupt-{checkpoint.name}.{suffix}")
    checkpoint.rename(aside)
    log.warning("%s cannot be resumed from (%s): set aside as %s; resuming from an earlier checkpoint",
                checkpoint, fault, aside.name)


def finished_at(checkpoint: Path, config: TrainConfig) -> Optional[int]:
    """The run's last step when `checkpoint` is at (or past) it, so that resuming has nothing to train; None when
    steps are left, or when only the trainer can count them (training.epochs changed)."""
    reached = TrainerState.load_from_json(str(checkpoint / TRAINER_STATE_NAME))
    if config.training.max_steps > 0:
        last = config.training.max_steps
    else:
        trained = yaml.safe_load((checkpoint / CONFIG_NAME).read_text())["training"]
        if trained["max_steps"] > 0 or trained["epochs"] != config.training.epochs:
            return None
        last = reached.max_steps  # the trainer's count for these epochs, batch and data, as in the checkpoint
    return last if reached.global_step >= last else None


def check_resumable(checkpoint: Path, config: TrainConfig) -> None:
    """Refuse to resume when a key that defines the model or the data order differs from the checkpoint's."""
    saved = _flatten(yaml.safe_load((checkpoint / CONFIG_NAME).read_text()))
    now = _flatten(as_plain_dict(config))
    differing = [key for key in sorted(saved.keys() | now.keys())
                 if key.startswith(RESUME_KEYS) and saved.get(key) != now.get(key)]
    if differing:
        changes = "; ".join(f"{key}: {saved.get(key)!r} in the checkpoint, {now.get(key)!r} now" for key in differing)
        raise QLoRAError(
            f"cannot resume from {checkpoint}: the config differs in {', '.join(differing)} ({changes}). "
            f"Resuming would continue a different model or data order. Run with the checkpoint's values "
            f"(they are in {checkpoint / CONFIG_NAME}), or start a new run in another training.output_dir."
        )


def checkpoint_step(checkpoint: Path) -> int:
    match = _CHECKPOINT.match(checkpoint.name)
    return int(match.group(1)) if match else 0


def _flatten(node: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in node.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*"), reverse=True):  # files before the folders holding them
        if path.is_file():
            with path.open("rb") as f:
                os.fsync(f.fileno())
        else:
            _fsync_dir(path)
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
