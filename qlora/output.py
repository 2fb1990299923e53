"""What every command prints: qlora's own lines, and the libraries' progress bars and notices only with --verbose.

The libraries are imported here only when a command runs, so that `--help`, `--cfg job` and a refused key stay
quick.
"""

from __future__ import annotations

import logging
import warnings
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import Trainer

LIBRARIES = ("transformers", "trl", "peft", "accelerate", "datasets", "torch", "bitsandbytes")


def configure_output(verbose: bool) -> None:
    """Quiet the libraries for a command about to run; `verbose` (--verbose) leaves them as they are."""
    if not verbose:
        quiet_libraries()


def quiet_libraries() -> None:
    """Silence what users cannot act on; keep real warnings.

    Off: datasets' per-operation bars and transformers' weight-loading bar (qlora logs what each step did),
    library-internal deprecation notices (they concern qlora's calls, not the user's), and torch's pin_memory
    notice on machines without a GPU. Downloads keep their bars: they can take minutes.
    """
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=rf"({'|'.join(LIBRARIES)})(\.|$)")
    warnings.filterwarnings("ignore", message=".*'pin_memory' argument is set as true but no accelerator is found")


def quiet_other_processes() -> None:
    """Under `accelerate launch`, the libraries in processes other than the main one print errors only, so that N
    processes do not print N copies of every message."""
    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_error()
    datasets.utils.logging.set_verbosity_error()


def quiet_trainer(trainer: Trainer) -> None:
    """Take transformers' progress bar off a Trainer that only evaluates (qlora logs the result), unless the
    libraries' bars are on (--verbose)."""
    from transformers import ProgressCallback
    from transformers.utils.logging import is_progress_bar_enabled

    if not is_progress_bar_enabled():
        trainer.remove_callback(ProgressCallback)


class _UnusedCpuKernelNotice(logging.Filter):
    """bitsandbytes warns, when imported on a CPU with AVX512-BF16 and without the optional `kernels` package,
    that it cannot load a kernel for its packed 4-bit inference layout. qlora never uses that layout
    (stages.model.keep_4bit_layout turns it off), so the notice is noise on every command."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


def drop_unused_cpu_kernel_notice() -> None:
    """Before bitsandbytes is imported (it warns while importing)."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_UnusedCpuKernelNotice())
