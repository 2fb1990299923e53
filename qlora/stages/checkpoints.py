"""Checkpoints that survive a crash, and resuming from them.

transformers' Trainer writes checkpoint-N (adapter, optimizer, scheduler, RNG states, trainer state
with the step reached) straight into its final folder, and picks the highest-numbered folder on resume,
complete or not. Here each checkpoint is written under checkpoints/.partial/ first, fsynced, and only
then renamed to checkpoints/checkpoint-N: a folder with that name is always complete, and older
checkpoints are deleted (save_total_limit) only after the new one is in place.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import yaml
from transformers.trainer_utils import rotate_checkpoints
from trl import DPOTrainer, KTOTrainer, SFTTrainer

from qlora.config import TrainConfig, as_plain_dict
from qlora.errors import QLoRAError

log = logging.getLogger(__name__)

CONFIG_NAME = "qlora_config.yaml"  # the resolved config, next to transformers' files
# What a checkpoint must hold to be resumed from; the rename makes them all-or-nothing.
REQUIRED_FILES = ("adapter_model.safetensors", "trainer_state.json", "optimizer.pt", "scheduler.pt", CONFIG_NAME)
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
        except (OSError, RuntimeError) as error:  # torch.save reports a full disk as RuntimeError
            shutil.rmtree(staging, ignore_errors=True)
            previous = newest_checkpoint(checkpoints_dir)
            raise QLoRAError(
                f"could not save the checkpoint of step {self.state.global_step} in {checkpoints_dir}: {error}. "
                f"Nothing was lost: the previous checkpoint {previous or '(none yet)'} is intact. Free disk space "
                f"or fix the folder's permissions, then resume with training.resume=auto."
            ) from error
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


class AtomicCheckpointTrainer(AtomicCheckpoints, SFTTrainer):
    """SFTTrainer whose checkpoints are written atomically and carry the resolved config."""


class AtomicDPOTrainer(AtomicCheckpoints, DPOTrainer):
    """DPOTrainer whose checkpoints are written atomically and carry the resolved config."""


class AtomicKTOTrainer(AtomicCheckpoints, KTOTrainer):
    """KTOTrainer whose checkpoints are written atomically and carry the resolved config."""


def atomic_trainer_class(method: str) -> type:
    """The TRL trainer of training.method, with atomic checkpoints."""
    if method == "orpo":
        from trl.experimental.orpo import ORPOTrainer  # TRL 1.16 keeps ORPO among its experimental trainers

        return type("AtomicORPOTrainer", (AtomicCheckpoints, ORPOTrainer), {})
    return {"sft": AtomicCheckpointTrainer, "dpo": AtomicDPOTrainer, "kto": AtomicKTOTrainer}[method]


def newest_checkpoint(checkpoints_dir: Path) -> Optional[Path]:
    """The complete checkpoint with the highest step in `checkpoints_dir`, or None."""
    if not checkpoints_dir.is_dir():
        return None
    steps = [(int(m.group(1)), p) for p in checkpoints_dir.iterdir() if (m := _CHECKPOINT.match(p.name))]
    complete = [(step, p) for step, p in steps if not missing_files(p)]
    return max(complete)[1] if complete else None


def missing_files(checkpoint: Path) -> list[str]:
    return [name for name in REQUIRED_FILES if not (checkpoint / name).is_file()]


def find_resume_checkpoint(config: TrainConfig) -> Optional[Path]:
    """The checkpoint training.resume asks for (None: start at step 0), after checking it fits the config."""
    resume = config.training.resume
    if resume is None:
        return None
    if resume == "auto":
        checkpoint = newest_checkpoint(Path(config.training.output_dir).expanduser() / "checkpoints")
        if checkpoint is None:
            log.warning("training.resume=auto: no complete checkpoint in %s, starting at step 0",
                        config.training.output_dir)
            return None
    else:
        checkpoint = Path(resume).expanduser()
        missing = missing_files(checkpoint)
        if missing:
            raise QLoRAError(
                f"training.resume={resume} is not a complete qlora checkpoint (missing {', '.join(missing)}). "
                f"Give a checkpoints/checkpoint-N folder of a qlora run, or use training.resume=auto."
            )
    check_resumable(checkpoint, config)
    return checkpoint


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
