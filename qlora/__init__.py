"""QLoRA fine-tuning from Hydra recipes: 4-bit base model, LoRA adapters, TRL's SFTTrainer."""

from qlora.errors import QLoRAError

__all__ = ["QLoRAError"]
__version__ = "0.1.0"
