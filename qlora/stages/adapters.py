"""Attach LoRA adapters built from the lora config group."""

from __future__ import annotations

import peft
from transformers import PreTrainedModel

from qlora.config import LoraConfig


def attach_lora(model: PreTrainedModel, lora: LoraConfig) -> peft.PeftModel:
    peft_config = peft.LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        use_rslora=lora.use_rslora,
        use_dora=lora.use_dora,
        modules_to_save=lora.modules_to_save,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return peft.get_peft_model(model, peft_config)
