"""Turn the datasets users have into the shapes TRL understands: prompt/completion, messages, text."""

from qlora.data.formats import ALPACA_PROMPT, alpaca_prompt, detect_format, to_trl_example
from qlora.data.load import load_sft_dataset

__all__ = ["ALPACA_PROMPT", "alpaca_prompt", "detect_format", "load_sft_dataset", "to_trl_example"]
