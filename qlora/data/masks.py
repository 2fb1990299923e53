"""Which tokens of a rendered conversation are the assistant's, for loss on assistant turns only.

With `{% generation %}` markers in the chat template, transformers returns them
(`return_assistant_tokens_mask`). Without markers, the conversation is rendered turn by turn with the
template as it is: an assistant turn starts where the rendering of the turns before it, with the
generation prompt, ends, and it ends where the rendering up to and including it ends. So the trained
text is what the model writes after the prompt it is served with, and the end-of-turn text the template
puts after it (`<|im_end|>`, `<|eot_id|>`, `</s>`, a newline where the template writes one), which
teaches it to stop. This is exact when each of those renderings is a prefix of the whole conversation's;
a template that renders earlier turns differently once more follow gets an error naming the turn
instead of a guessed mask.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase
from trl.chat_template_utils import has_generation_markers

from qlora.data.templates import SHIPPED_TEMPLATES
from qlora.errors import QLoRAError

_SHIPPED = "|".join(SHIPPED_TEMPLATES)

BY_MARKERS = "loss on the assistant's tokens, found by the chat template's {% generation %} markers"
BY_RENDERED_TURNS = ("loss on the assistant's tokens, found by rendering the conversation turn by turn (the chat "
                     "template has no {% generation %} markers)")
ON_EVERY_TOKEN = "loss on every token (data.train_on_prompt=true)"


def describe_chat_masking(chat_template: str, train_on_prompt: bool) -> str:
    """Which tokens of conversations rendered with `chat_template` are trained, and how they are found, in words."""
    if train_on_prompt:
        return ON_EVERY_TOKEN
    return BY_MARKERS if has_generation_markers(chat_template) else BY_RENDERED_TURNS


def tokenize_conversation(
    messages: list[dict], tokenizer: PreTrainedTokenizerBase, chat_template: str, train_on_prompt: bool
) -> tuple[list[int], list[int]]:
    """The conversation's input_ids and its assistant mask (1 on the assistant's tokens, all 1 with train_on_prompt)."""
    if train_on_prompt:
        input_ids = list(tokenizer.apply_chat_template(messages, chat_template=chat_template, return_dict=False))
        return input_ids, [1] * len(input_ids)
    if has_generation_markers(chat_template):
        output = tokenizer.apply_chat_template(
            messages, chat_template=chat_template, return_dict=True, return_assistant_tokens_mask=True
        )
        return list(output["input_ids"]), list(output["assistant_masks"])
    if not tokenizer.is_fast:
        raise QLoRAError(
            "finding the assistant's tokens without {% generation %} markers needs a fast tokenizer (character "
            f"offsets); this one is slow. Use a template with markers (data.chat_template={_SHIPPED}) or set "
            f"data.train_on_prompt=true."
        )
    text = _render(messages, tokenizer, chat_template)
    spans = assistant_spans(messages, tokenizer, chat_template, text)
    # tokenized exactly as apply_chat_template tokenizes its rendering, so that both methods share input_ids
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(encoded["input_ids"]), tokens_in_spans(encoded["offset_mapping"], spans)


def assistant_spans(
    messages: list[dict], tokenizer: PreTrainedTokenizerBase, chat_template: str, text: str
) -> list[tuple[int, int]]:
    """The character span of each assistant turn in `text`, the whole conversation's rendering."""
    spans = []
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if turn == 0:
            raise _not_prefix_error(turn, "the conversation starts with it, so no turns before it can be rendered")
        prompt = _render(messages[:turn], tokenizer, chat_template, generation_prompt=True)
        through = _render(messages[: turn + 1], tokenizer, chat_template)
        if not through.startswith(prompt):
            raise _not_prefix_error(
                turn, "the turns before it, with the generation prompt, do not render as the start of its rendering"
            )
        if not text.startswith(through):
            raise _not_prefix_error(
                turn, "the conversation up to it does not render as the start of the whole conversation's rendering"
            )
        spans.append((len(prompt), len(through)))
    return spans


def tokens_in_spans(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """1 for each token overlapping a span, else 0: the rule transformers applies to `{% generation %}`
    spans, so that both methods mark the same tokens for the same characters."""
    mask, span = [0] * len(offsets), 0
    for index, (start, end) in enumerate(offsets):
        while span < len(spans) and start >= spans[span][1]:
            span += 1
        if span == len(spans):
            break
        if end > spans[span][0]:
            mask[index] = 1
    return mask


def _render(
    messages: list[dict], tokenizer: PreTrainedTokenizerBase, chat_template: str, generation_prompt: bool = False
) -> str:
    return tokenizer.apply_chat_template(
        messages, chat_template=chat_template, tokenize=False, add_generation_prompt=generation_prompt
    )


def _not_prefix_error(turn: int, reason: str) -> QLoRAError:
    return QLoRAError(
        f"the chat template has no {{% generation %}} markers, and rendering turn by turn cannot find the assistant's "
        f"tokens at turn {turn}: {reason}. Add {{% generation %}} ... {{% endgeneration %}} around the assistant's "
        f"text (and end-of-turn) in the template, use a shipped one (data.chat_template={_SHIPPED}), or set "
        f"data.train_on_prompt=true to train on every token."
    )
