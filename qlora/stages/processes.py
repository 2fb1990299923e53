"""Several processes under `accelerate launch`: one process state, one run folder, one verdict per step.

Each process composes its own config and runs the same stages; accelerate's DDP or FSDP wrapping (through
the Trainer) does the parallel work. What is left here is making the processes agree where they could
otherwise differ: the run folder, errors the main process finds while writing it, and stop decisions
taken from something only one process saw (a signal, a NaN in its gradient shard).
"""

from __future__ import annotations

from typing import Callable, TypeVar

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, parse_flag_from_env

from qlora.config import TrainConfig
from qlora.errors import QLoRAError

T = TypeVar("T")


def process_state() -> PartialState:
    """accelerate's state of this process, joined to the others over gloo where there is no GPU.

    accelerate picks a GPU backend for processes started by `accelerate launch --multi_gpu` (torchrun) and
    only joins CPU processes when asked for the CPU (`accelerate launch --cpu` alone starts one process);
    asking here, before anything else creates the state, makes a CPU-only machine run N gloo processes.
    """
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())


def uses_fsdp() -> bool:
    """Launched by `accelerate launch` with an FSDP config (it tells the processes through the environment)."""
    return parse_flag_from_env("ACCELERATE_USE_FSDP")


def share_run_dir(config: TrainConfig, state: PartialState) -> None:
    """Give every process the main process's training.output_dir.

    The default output_dir holds `${now:...}`, resolved by each process's own Hydra at its own moment, so
    two processes can name folders a second apart; the main process's name is the run's.
    """
    if state.num_processes > 1:
        chosen = broadcast_object_list([config.training.output_dir], from_process=0)
        config.training.output_dir = chosen[0]


def on_main_process(state: PartialState, action: Callable[[], T]) -> T:
    """Run `action` on the main process only; its result, or the QLoRAError it raises, reaches every process.

    Otherwise the other processes would wait forever at the next collective for a main process that
    has already stopped (e.g. refusing to write into an occupied run folder).
    """
    result, message = None, None
    if state.is_main_process:
        try:
            result = action()
        except QLoRAError as error:
            message = str(error)
    if state.num_processes > 1:
        result, message = broadcast_object_list([result, message], from_process=0)
    if message is not None:
        raise QLoRAError(message)
    return result


def max_over_processes(value: torch.Tensor) -> torch.Tensor:
    """The elementwise largest of `value` over all processes, in place on its device: nothing waits for it."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return value


def largest_on_any_process(number: int, device: torch.device) -> int:
    """The largest of `number` over all processes (0 stays 0 everywhere)."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return number
    value = torch.tensor([float(number)], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return int(value.item())


def describe_global_batch(config: TrainConfig, processes: int) -> str:
    """The global batch, e.g. '64 = batch_size 4 x grad_accum 4 x 4 processes'."""
    t = config.training
    if t.batch_size == "auto":
        return f"auto (batch_size auto x grad_accum {t.grad_accum} x {processes} process(es))"
    return f"{t.batch_size * t.grad_accum * processes} = batch_size {t.batch_size} x grad_accum {t.grad_accum} " \
           f"x {processes} process(es)"
