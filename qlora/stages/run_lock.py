"""One training process per run folder: an exclusive lock that the OS releases when its holder exits or dies.

Without it a second `python -m qlora.train` on the same training.output_dir (a duplicate requeue while the
first run is alive) moves the live run's files aside and writes its steps in between. flock(2) locks belong
to the open file and go with the process, so a killed run never blocks its own resume.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Optional, TextIO

from qlora.errors import QLoRAError

LOCK_NAME = ".qlora.lock"  # holds the PID of the process that has the folder


class RunDirLock:
    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self._file: Optional[TextIO] = None

    def acquire(self) -> None:
        """Take the folder (creating it), or refuse, naming the process that has it."""
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            lock = (self.run_dir / LOCK_NAME).open("a+")
        except OSError as error:
            raise QLoRAError(
                f"cannot write to training.output_dir={self.run_dir}: {error}. Choose a folder you can write to."
            ) from error
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            lock.close()
            raise QLoRAError(
                f"training.output_dir={self.run_dir} is in use by another qlora process (PID {holder}); two runs in "
                f"one folder would overwrite each other's files. Wait for it to end, or stop it (kill {holder}) "
                f"and resume with training.resume=auto, or choose another training.output_dir."
            ) from None
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        self._file = lock

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the file releases its lock
            self._file = None
