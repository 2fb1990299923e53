"""QLoRA fine-tuning from Hydra recipes: 4-bit base model, LoRA adapters, TRL's SFTTrainer."""

from qlora.errors import QLoRAError
from qlora.output import drop_unused_cpu_kernel_notice

# here, before any command imports bitsandbytes: it warns while being imported
drop_unused_cpu_kernel_notice()

__all__ = ["QLoRAError"]
__version__ = "0.1.0"
