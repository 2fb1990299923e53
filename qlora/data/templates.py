"""Chat templates: the tokenizer's own, one the package ships, or a Jinja string from the config.

Loss on assistant turns only needs to know which tokens the assistant says. The shipped templates mark
them with `{% generation %}` (transformers' `return_assistant_tokens_mask`), the end-of-turn token
inside the marked span, so the model learns to stop. When the tokenizer's own template lacks markers,
TRL's training variant of it is used where TRL has one; any other template is used as it is, its
assistant turns found by rendering the conversation turn by turn (qlora/data/masks.py).
"""

from __future__ import annotations

import logging

from transformers import PreTrainedTokenizerBase
from trl.chat_template_utils import get_training_chat_template, has_generation_markers, llama3_training_chat_template

from qlora.errors import QLoRAError

log = logging.getLogger(__name__)

# Templates without a place for a role say so instead of silently leaving the message out.
_SET_ROLE_ERROR = "{%- set ROLE_ERROR = 'this chat template has no place for a message with role ' %}"

CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{%- else %}{{- message['content'] + '<|im_end|>' }}{%- endif %}"
    "{%- if not loop.last %}{{- '\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '\\n<|im_start|>assistant\\n' }}{%- endif %}"
)

# Llama-2-chat: the system prompt sits inside the first [INST] block, between <<SYS>> tags.
LLAMA_2 = _SET_ROLE_ERROR + (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system = messages[0]['content'] %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system = '' %}{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}"
    "{{- '[INST] ' }}{%- if system and loop.first %}{{- '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' }}{%- endif %}"
    "{{- message['content'] + ' [/INST]' }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{%- generation %}{{- ' ' + message['content'] + eos_token }}{%- endgeneration %}"
    "{%- else %}{{- raise_exception(ROLE_ERROR + message['role']) }}"
    "{%- endif %}"
    "{%- endfor %}"
)

# Mistral-instruct: no system role, so a system prompt is put before the first user message.
MISTRAL = _SET_ROLE_ERROR + (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system = messages[0]['content'] + '\\n\\n' %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system = '' %}{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}"
    "{{- '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{%- generation %}{{- ' ' + message['content'] + eos_token }}{%- endgeneration %}"
    "{%- else %}{{- raise_exception(ROLE_ERROR + message['role']) }}"
    "{%- endif %}"
    "{%- endfor %}"
)

ALPACA = _SET_ROLE_ERROR + (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{- message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'user' %}{{- '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- '### Response:\\n' }}{%- generation %}{{- message['content'] + eos_token }}{%- endgeneration %}"
    "{%- if not loop.last %}{{- '\\n\\n' }}{%- endif %}"
    "{%- else %}{{- raise_exception(ROLE_ERROR + message['role']) }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '### Response:\\n' }}{%- endif %}"
)

SHIPPED_TEMPLATES = {
    "chatml": CHATML,
    "llama-3": llama3_training_chat_template,  # TRL's, with generation markers
    "llama-2": LLAMA_2,
    "mistral": MISTRAL,
    "alpaca": ALPACA,
}


def resolve_chat_template(tokenizer: PreTrainedTokenizerBase, chat_template: str | None, train_on_prompt: bool) -> str:
    """The template chat data is rendered with: data.chat_template, or the tokenizer's (TRL's training variant
    of it, with markers, where TRL knows it)."""
    if chat_template is not None:
        return _named_or_jinja(chat_template)
    if not tokenizer.chat_template:
        raise QLoRAError(
            f"the dataset is chat data but the tokenizer has no chat template. Set data.chat_template to one "
            f"of {', '.join(SHIPPED_TEMPLATES)} (the one the model was trained with, for an instruct model) or "
            f"to a Jinja string."
        )
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template["default"]
    if train_on_prompt or has_generation_markers(template):
        return template
    training_template = _trl_training_variant(tokenizer)
    if training_template:
        log.info("using TRL's training variant of the tokenizer's chat template (it marks assistant turns)")
        return training_template
    return template


def _trl_training_variant(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """TRL's copy of the tokenizer's template with `{% generation %}` markers, if TRL knows it byte for byte."""
    try:
        return get_training_chat_template(tokenizer)
    except ValueError:  # a template TRL does not know
        return None


def _named_or_jinja(chat_template: str) -> str:
    if chat_template in SHIPPED_TEMPLATES:
        return SHIPPED_TEMPLATES[chat_template]
    if "{%" in chat_template or "{{" in chat_template:
        return chat_template
    raise QLoRAError(
        f"data.chat_template={chat_template} is neither a shipped template ({', '.join(SHIPPED_TEMPLATES)}) "
        f"nor a Jinja string."
    )
