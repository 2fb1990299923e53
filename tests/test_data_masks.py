"""Assistant masks without `{% generation %}` markers: rendering turn by turn marks the tokens the markers mark.

Each marked template is compared with itself with the markers taken out (same rendering, no markers)."""

import re
from pathlib import Path

import pytest
import trl
from jinja2 import TemplateError
from transformers import AutoTokenizer

from qlora.config import ASSETS_DIR
from qlora.data.masks import BY_MARKERS, BY_RENDERED_TURNS, describe_chat_masking, tokenize_conversation
from qlora.data.templates import SHIPPED_TEMPLATES
from qlora.errors import QLoRAError

TRL_TEMPLATES = Path(trl.__file__).parent / "chat_templates"
TRAINING_TEMPLATES = sorted(path.name.removesuffix("_training.jinja")
                            for path in TRL_TEMPLATES.glob("*_training.jinja"))
CHATS = {
    "system and two turns": [
        {"role": "system", "content": "Be kind."}, {"role": "user", "content": "How was the film?"},
        {"role": "assistant", "content": "It was great."}, {"role": "user", "content": "And the music?"},
        {"role": "assistant", "content": "Very fun."}],
    "two turns": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."},
        {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "See you.\n"}],
    "ends on the user": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."},
        {"role": "user", "content": "Bye"}],
}
# TRL training templates whose markers also cover text of the generation prompt, which the model is given at
# inference and never writes (qwen2_5: the newline after `assistant`; the Qwen 3.5+ ones: `<think>\n`;
# muse_glimmer: `<|start|>assistant`); TRL's other templates start the marked span after it, as rendering does.
MARKERS_COVER_GENERATION_PROMPT = {"qwen2_5", "qwen3_5_nothink", "qwen3_5_think", "qwen3_6", "qwen3_8", "muse_glimmer"}
# TRL training templates that render an earlier turn differently once more turns follow (the generation prompt
# opens a `<think>` block the rendered turn lacks; an end-of-conversation token; `<|return|>` on the last turn):
# without markers they are refused, naming the turn.
NOT_PREFIX_PRESERVING = {"deepseek_r1_distill", "deepseekv3", "gptoss", "nemotron_3_5_lightning", "nemotron_3_nano",
                         "nemotron_3_super", "nemotron_3_ultra", "phi3", "phi3_5"}


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(ASSETS_DIR / "tiny-llama")


def without_markers(template: str) -> str:
    """The template with `{% generation %}`/`{% endgeneration %}` made plain blocks, whitespace control kept."""
    block = re.compile(r"\{%(-?)\s*(end)?generation\s*(-?)%\}")
    return block.sub(lambda tag: "{%" + tag[1] + (" endif " if tag[2] else " if true ") + tag[3] + "%}", template)


def both_masks(tokenizer, template, messages):
    """(input_ids, mask) from the markers and from rendering turn by turn; the rendering checked to be the same."""
    plain = without_markers(template)
    assert plain != template and tokenizer.apply_chat_template(messages, chat_template=plain, tokenize=False) == \
        tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
    return [tokenize_conversation(messages, tokenizer, t, train_on_prompt=False) for t in (template, plain)]


@pytest.mark.parametrize("chat", sorted(CHATS))
@pytest.mark.parametrize("name", sorted(SHIPPED_TEMPLATES))
def test_shipped_templates_get_the_same_mask_without_markers(tokenizer, name, chat):
    marked, rendered = both_masks(tokenizer, SHIPPED_TEMPLATES[name], CHATS[chat])
    assert rendered == marked and 1 in marked[1]


@pytest.mark.parametrize("chat", sorted(CHATS))
@pytest.mark.parametrize("name", TRAINING_TEMPLATES)
def test_trl_training_templates_get_the_same_mask_without_markers(tokenizer, name, chat):
    template = (TRL_TEMPLATES / f"{name}_training.jinja").read_text()
    messages = CHATS[chat]
    try:
        marked = tokenize_conversation(messages, tokenizer, template, train_on_prompt=False)
    except TemplateError:  # e.g. no system role (gemma), or image-only content blocks (llava_next)
        with pytest.raises(TemplateError):
            tokenize_conversation(messages, tokenizer, without_markers(template), train_on_prompt=False)
        return
    if name in NOT_PREFIX_PRESERVING:
        with pytest.raises(QLoRAError, match=r"cannot find the assistant's tokens at turn \d+: .*train_on_prompt"):
            both_masks(tokenizer, template, messages)
        return
    marked, rendered = both_masks(tokenizer, template, messages)
    assert rendered[0] == marked[0]
    if name in MARKERS_COVER_GENERATION_PROMPT:
        differing = {i for i, (m, r) in enumerate(zip(marked[1], rendered[1])) if m != r}
        assert differing and all(marked[1][i] and not rendered[1][i] for i in differing)
        assert differing <= generation_prompt_tokens(tokenizer, template, messages)
    else:
        assert rendered == marked


def generation_prompt_tokens(tokenizer, template, messages):
    """Indices of the tokens that lie in the generation prompt before each assistant turn."""
    text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    prompts = []
    for turn in (i for i, message in enumerate(messages) if message["role"] == "assistant"):
        before = tokenizer.apply_chat_template(messages[:turn], chat_template=template, tokenize=False)
        prompt = tokenizer.apply_chat_template(messages[:turn], chat_template=template, tokenize=False,
                                               add_generation_prompt=True)
        prompts.append((len(before), len(prompt)))
    return {i for i, (start, end) in enumerate(offsets) if any(start < e and end > s for s, e in prompts)}


# ChatML as many models ship it: every message ends with <|im_end|> and a newline, and no markers.
CHATML_UNMARKED = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_the_trained_text_is_what_the_assistant_writes_and_its_end_of_turn(tokenizer):
    input_ids, mask = tokenize_conversation(CHATS["system and two turns"], tokenizer, CHATML_UNMARKED, False)
    trained = [token for token, keep in zip(input_ids, mask) if keep]
    # the newline after <|im_end|> is the template's too: the model learns to write it before the next turn
    assert tokenizer.decode(trained) == "It was great.<|im_end|>\nVery fun.<|im_end|>\n"
    assert describe_chat_masking(CHATML_UNMARKED, False) == BY_RENDERED_TURNS
    assert describe_chat_masking(SHIPPED_TEMPLATES["chatml"], False) == BY_MARKERS


def test_a_template_that_renders_earlier_turns_differently_names_the_turn(tokenizer):
    # the last assistant turn ends with <|end|>, earlier ones with <|next|>: the rendering up to turn 1 ends
    # differently from the same turn in the whole conversation
    template = CHATML_UNMARKED.replace("'<|im_end|>\\n'", "('<|end|>' if loop.last else '<|next|>')")
    with pytest.raises(QLoRAError, match=r"^the chat template has no \{% generation %\} markers, and rendering turn "
                                         r"by turn cannot find the assistant's tokens at turn 1: .*{% endgeneration %}"
                                         r".*data.chat_template=chatml.*data.train_on_prompt=true"):
        tokenize_conversation(CHATS["two turns"], tokenizer, template, train_on_prompt=False)
    input_ids, mask = tokenize_conversation(CHATS["two turns"], tokenizer, template, train_on_prompt=True)
    assert mask == [1] * len(input_ids)


def test_a_conversation_that_starts_with_the_assistant_names_turn_0(tokenizer):
    messages = [{"role": "assistant", "content": "Welcome."}, {"role": "user", "content": "Hi"}]
    with pytest.raises(QLoRAError, match="at turn 0: the conversation starts with it"):
        tokenize_conversation(messages, tokenizer, CHATML_UNMARKED, train_on_prompt=False)
