import pytest
from transformers import AutoTokenizer
from trl.chat_template_utils import llama3_chat_template, llama3_training_chat_template

from qlora.config import ASSETS_DIR
from qlora.data.templates import SHIPPED_TEMPLATES, resolve_chat_template
from qlora.errors import QLoRAError
from qlora.stages.model import set_pad_token


@pytest.fixture
def tokenizer():
    return AutoTokenizer.from_pretrained(ASSETS_DIR / "tiny-llama")


def test_a_shipped_template_is_picked_by_name(tokenizer):
    assert resolve_chat_template(tokenizer, "chatml", train_on_prompt=False) == SHIPPED_TEMPLATES["chatml"]


def test_the_tokenizers_own_template_is_swapped_for_trls_training_variant(tokenizer):
    tokenizer.chat_template = llama3_chat_template  # no generation markers
    assert resolve_chat_template(tokenizer, None, train_on_prompt=False) == llama3_training_chat_template


def test_a_tokenizer_template_with_markers_is_used_as_it_is(tokenizer):
    tokenizer.chat_template = SHIPPED_TEMPLATES["alpaca"]
    assert resolve_chat_template(tokenizer, None, train_on_prompt=False) == SHIPPED_TEMPLATES["alpaca"]


def test_chat_data_without_any_template_names_the_fix(tokenizer):
    with pytest.raises(QLoRAError, match="no chat template. Set data.chat_template to one of chatml"):
        resolve_chat_template(tokenizer, None, train_on_prompt=False)


def test_a_template_without_markers_that_trl_does_not_know_is_used_as_it_is(tokenizer):
    jinja = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # turns found by rendering: test_data_masks.py
    assert resolve_chat_template(tokenizer, jinja, train_on_prompt=False) == jinja
    tokenizer.chat_template = jinja
    assert resolve_chat_template(tokenizer, None, train_on_prompt=False) == jinja


def test_an_unknown_template_name_is_refused(tokenizer):
    with pytest.raises(QLoRAError, match="data.chat_template=vicuna is neither a shipped template"):
        resolve_chat_template(tokenizer, "vicuna", train_on_prompt=False)


def bare_tokenizer(*added):
    """A tokenizer with EOS and the given added tokens, and no pad or unk token."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocabulary = Tokenizer(models.WordLevel({"a": 0, "</s>": 1}))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=vocabulary, eos_token="</s>")
    tokenizer.add_special_tokens({"additional_special_tokens": list(added)})
    return tokenizer


def test_the_unused_pad_token_of_the_vocabulary_is_reused(tokenizer):
    tokenizer.pad_token = None
    set_pad_token(tokenizer)
    assert tokenizer.pad_token == "<|pad|>"


def test_a_reserved_token_is_reused_as_pad():
    tokenizer = bare_tokenizer("<|reserved_special_token_0|>")
    set_pad_token(tokenizer)
    assert tokenizer.pad_token == "<|reserved_special_token_0|>"


def test_a_new_pad_token_is_added_when_none_can_be_reused():
    tokenizer = bare_tokenizer()
    set_pad_token(tokenizer)
    assert tokenizer.pad_token == "<|qlora_pad|>" and tokenizer.pad_token_id == 2
