"""Disk space: a run that cannot fit its checkpoints is refused before training, and a save that runs out of
space says so first (torch reports a full disk only as `[enforce fail at inline_container.cc] unexpected pos`)."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

from safetensors import SafetensorError

from qlora.errors import QLoRAError

# What a failed write raises: OSError; torch.save a RuntimeError; safetensors its own error type.
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)
# errno values of a write refused for lack of space: a full disk, a user's quota
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


SMALL_FILES = 16 * 2**20  # configs, tokenizer, trainer and RNG states


def checkpoint_bytes(trainable_parameters: int) -> int:
    """Rough size of one checkpoint: float32 adapter plus two float32 Adam moments, and the small files."""
    return trainable_parameters * 4 * 3 + SMALL_FILES


def adapter_bytes(trainable_parameters: int) -> int:
    """Rough size of the saved adapter: float32 weights, and the small files."""
    return trainable_parameters * 4 + SMALL_FILES


def check_free_space(run_dir: Path, trainable_parameters: int, checkpoints_kept: int) -> None:
    """Refuse to start when the run folder's disk cannot hold the checkpoints and the final adapter."""
    # one checkpoint more than kept exists while a save is in progress, plus the final adapter
    needed = checkpoint_bytes(trainable_parameters) * (checkpoints_kept + 2)
    free = shutil.disk_usage(run_dir).free
    if free < needed:
        raise QLoRAError(
            f"not enough disk space in training.output_dir={run_dir}: about {needed / 2**30:.2f} GiB needed for "
            f"{checkpoints_kept} checkpoint(s) and the adapter, {free / 2**30:.2f} GiB free. Free space, "
            f"choose another training.output_dir, or lower training.save_total_limit."
        )


def out_of_space(error: Exception, folder: Path, needed_bytes: int) -> bool:
    """Whether a write into `folder` that failed with `error` ran out of space: the error says so (ENOSPC, EDQUOT),
    or, as torch's and safetensors' errors do not, the disk has less free space left than the write needs."""
    if isinstance(error, OSError) and error.errno in NO_SPACE:
        return True
    return shutil.disk_usage(folder).free < needed_bytes


def no_space_left(folder: Path) -> str:
    """The start of the message for a save that ran out of space, e.g. 'no space left on /data/run (3.0 MiB free)'."""
    return f"no space left on {folder} ({shutil.disk_usage(folder).free / 2**20:,.1f} MiB free)"
