"""Turn the datasets users have into tokenized examples with the right loss mask, and show them."""

from qlora.data.formats import ALPACA_PROMPT, alpaca_prompt, detect_format, to_trl_example
from qlora.data.load import load_sft_dataset
from qlora.data.prepare import SFTData, prepare_sft_data, prepare_training_data
from qlora.data.tokenization import IGNORE, DataStats

__all__ = [
    "ALPACA_PROMPT", "IGNORE", "DataStats", "SFTData", "alpaca_prompt", "detect_format", "load_sft_dataset",
    "prepare_sft_data", "prepare_training_data", "to_trl_example",
]
