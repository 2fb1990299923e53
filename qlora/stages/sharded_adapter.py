"""The adapter of a model sharded by FSDP: gathered alone onto the main process to be saved, loaded before
sharding to resume.

FSDP (version 1, configs/accelerate/fsdp_qlora.yaml) flattens the weights of each module it wraps into one tensor
split over the processes, and peft's auto-wrap policy (set by transformers) wraps every LoRA weight apart from the
4-bit layers. So the adapter is gathered one LoRA module after the other, and the 4-bit base never is.

peft cannot pick the adapter out of a sharded model's weights itself: peft 0.21 keeps the tensors of a state dict
whose names lie under its LoRA layers' names in the model, and removes FSDP's `_fsdp_wrapped_module.` only at the
start of those names, while FSDP also inserts it once per wrapped decoder layer
(`base_model.model.model.layers.0._fsdp_wrapped_module.self_attn.q_proj.lora_A`). No tensor matched, and the
2 x H200 run (scripts/benchmarks/results/2026-11-22-h200x2-multi-gpu.md) wrote an adapter without tensors. peft
writes the gathered tensors here through a view of the model without FSDP's wrappers instead.
"""

from __future__ import annotations

import copy
import os
from typing import Any, Optional

import torch
from accelerate.utils import save_fsdp_optimizer
from peft import PeftModel, set_peft_model_state_dict
from peft.utils import load_peft_weights
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from transformers import Trainer
from transformers.trainer import SCHEDULER_NAME

FSDP_PREFIX = "_fsdp_wrapped_module."  # what FSDP (version 1) inserts in the names of the modules it wraps


def adapter_for_saving(trainer: Trainer) -> tuple[PeftModel, Optional[dict[str, torch.Tensor]]]:
    """The model whose save_pretrained writes the trained adapter, and the state dict to pass it: under FSDP the
    gathered adapter (every process must call this then: all take part in gathering), otherwise None."""
    if not trainer.is_fsdp_enabled:
        return trainer.accelerator.unwrap_model(trainer.model), None
    return without_fsdp_wrappers(trainer.model), gather_adapter(trainer.model, trainer.accelerator.is_main_process)


def gather_adapter(model: nn.Module, main_process: bool) -> dict[str, torch.Tensor]:
    """The trainable weights of the FSDP-wrapped `model`, whole, on the main process's CPU (an empty dict on the
    others), under their names without FSDP (base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight)."""
    adapter = {}
    for name, unit in adapter_units(model):
        # rank0_only: the other processes free their gathered copy at once; the main process copies it out
        # before the context frees it
        with FSDP.summon_full_params(unit, recurse=False, writeback=False, rank0_only=True):
            if main_process:
                for param_name, param in unit.named_parameters():
                    adapter[f"{name}.{param_name}".replace(FSDP_PREFIX, "")] = param.detach().to("cpu", copy=True)
    return adapter


def adapter_units(model: nn.Module) -> list[tuple[str, FSDP]]:
    """The FSDP units that hold trainable weights only, with their names: the LoRA modules that peft's auto-wrap
    policy wraps apart (without use_orig_params FSDP needs one requires_grad per flattened tensor)."""
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, FSDP) and all(param.requires_grad for param in module.parameters())]


def without_fsdp_wrappers(module: nn.Module) -> nn.Module:
    """A view of `module` whose tree leaves out FSDP's wrappers: the same modules under the names they had before
    FSDP wrapped them, where peft looks for its LoRA layers. `module` itself is not changed."""
    if isinstance(module, FSDP):
        return without_fsdp_wrappers(module.module)
    view = copy.copy(module)
    view._modules = {name: None if child is None else without_fsdp_wrappers(child)
                     for name, child in module._modules.items()}
    return view


class ShardedAdapterCheckpoints(Trainer):
    """The Trainer's model checkpoints under FSDP: the gathered adapter in peft's format (as without FSDP) and
    accelerate's full optimizer state; resuming loads the adapter into the model before accelerate shards it."""

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        if not self.is_fsdp_enabled:
            return super().save_model(output_dir, _internal_call)
        model, adapter = adapter_for_saving(self)
        if self.args.should_save:
            model.save_pretrained(output_dir or self.args.output_dir, state_dict=adapter)
            self.processing_class.save_pretrained(output_dir or self.args.output_dir)
        return None

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self.is_fsdp_enabled:
            return super()._save_optimizer_and_scheduler(output_dir)
        # transformers would also save the model once more, through accelerate's save_fsdp_model: that gathers the
        # whole model, 4-bit base included, and peft keeps none of it (the names above); save_model wrote the adapter
        plugin = self.accelerator.state.fsdp_plugin
        save_fsdp_optimizer(plugin, self.accelerator, self.optimizer, self.model, output_dir)
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))
        return None

    def train(self, resume_from_checkpoint: Optional[str] = None, *args: Any, **kwargs: Any) -> Any:
        if self.is_fsdp_enabled and resume_from_checkpoint is not None:
            # the model is not wrapped yet: peft loads the checkpoint's adapter as it would without FSDP, in every
            # process (each holds the whole model until accelerate shards it)
            set_peft_model_state_dict(self.model, load_peft_weights(resume_from_checkpoint, device="cpu"))
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Optional[nn.Module] = None) -> None:
        if not self.is_fsdp_enabled:  # under FSDP train() loaded the adapter before sharding
            super()._load_from_checkpoint(resume_from_checkpoint, model)
