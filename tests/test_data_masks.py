"""Assistant masks without `{% generation %}` markers: rendering turn by turn marks the tokens the markers mark.

Each marked template is compared with itself with the markers taken out (same rendering, no markers)."""

import json
import re
from pathlib import Path

import pytest
import torch
import trl
from jinja2 import TemplateError
from transformers import AutoTokenizer

from conftest import run_cli
from qlora.config import ASSETS_DIR, DatasetSource
from qlora.data import IGNORE, prepare_sft_data
from qlora.data.load import load_formatted
from qlora.data.masks import BY_MARKERS, BY_RENDERED_TURNS, describe_chat_masking, tokenize_conversation
from qlora.data.preview import preview
from qlora.data.templates import SHIPPED_TEMPLATES
from qlora.data.tokenization import TokenizeOptions, tokenize_example
from qlora.errors import QLoRAError
from qlora.stages.model import load_tokenizer

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


# --- end to end: a model whose own chat template has no markers, trained through CLI overrides alone ---

# ChatML as Qwen-style models ship it (a default system prompt, every message closed by <|im_end|> and a newline),
# written here: not byte-equal to any template TRL knows, so no training variant with markers exists for it.
MODEL_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# The same template with the assistant's text and end-of-turn marked.
MARKED_MODEL_TEMPLATE = MODEL_TEMPLATE.replace(
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}",
    "{{- '<|im_start|>' + message['role'] + '\\n' }}{%- if message['role'] == 'assistant' %}{%- generation %}"
    "{{- message['content'] + '<|im_end|>\\n' }}{%- endgeneration %}{%- else %}"
    "{{- message['content'] + '<|im_end|>\\n' }}{%- endif %}",
)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny Qwen2 model whose tokenizer carries MODEL_TEMPLATE and <|im_start|>, <|im_end|> as single tokens.

    Its weights are the shipped tiny Llama's (which knows the sentiment task) with zero q/k/v biases: the same
    function in Qwen2's architecture, so that a few steps show learning."""
    from transformers import LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    folder = tmp_path_factory.mktemp("tiny-qwen2")
    llama = LlamaForCausalLM.from_pretrained(ASSETS_DIR / "tiny-llama")
    same = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "max_position_embeddings", "rms_norm_eps", "rope_parameters", "vocab_size", "bos_token_id", "eos_token_id",
            "pad_token_id")
    qwen2 = Qwen2ForCausalLM(Qwen2Config(**{name: getattr(llama.config, name) for name in same}))
    missing, unexpected = qwen2.load_state_dict(llama.state_dict(), strict=False)
    assert not unexpected and all(name.endswith("_proj.bias") for name in missing)
    for name, bias in qwen2.named_parameters():
        if name in missing:
            bias.data.zero_()
    qwen2.config.save_pretrained(folder)  # Qwen2's tokenizer class, chosen from config.json, adds its unk token
    tokenizer = AutoTokenizer.from_pretrained(ASSETS_DIR / "tiny-llama")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = MODEL_TEMPLATE
    tokenizer.save_pretrained(folder)
    qwen2.resize_token_embeddings(len(AutoTokenizer.from_pretrained(folder)))
    qwen2.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sharegpt_chats(tmp_path_factory):
    """32 ShareGPT chats: half with a system prompt, half of two turns; the assistant names each review's sentiment."""
    rows = [json.loads(line) for line in (ASSETS_DIR / "sentiment" / "train.jsonl").read_text().splitlines()[:64]]
    chats = []
    for index in range(32):
        first, second = rows[2 * index], rows[2 * index + 1]
        turns = [{"from": "human", "value": f"Review: {first['input']}"}, {"from": "gpt", "value": first["output"]}]
        if index % 2:
            turns += [{"from": "human", "value": f"Review: {second['input']}"},
                      {"from": "gpt", "value": second["output"]}]
        if index % 4 < 2:
            turns.insert(0, {"from": "system", "value": "You name the sentiment of film reviews."})
        chats.append({"conversations": turns})
    path = tmp_path_factory.mktemp("chats") / "my_chats.jsonl"
    path.write_text("".join(json.dumps(chat) + "\n" for chat in chats))
    return path


def test_masks_without_markers_equal_those_of_the_marked_template(tiny_config, chat_model, sharegpt_chats):
    config = tiny_config(f"model.name_or_path={chat_model}", f"data.path={sharegpt_chats}", "data.format=sharegpt")
    rendered = prepare_sft_data(config.data, load_tokenizer(config.model), seed=42)
    config.data.chat_template = MARKED_MODEL_TEMPLATE
    marked = prepare_sft_data(config.data, load_tokenizer(config.model), seed=42)
    assert (rendered.chat_masking, marked.chat_masking) == (BY_RENDERED_TURNS, BY_MARKERS)
    assert rendered.train["input_ids"] == marked.train["input_ids"]
    assert rendered.train["labels"] == marked.train["labels"]
    tokenizer = load_tokenizer(config.model)
    example = rendered.train[1]  # a system prompt and two turns: only the answers and their end-of-turn are trained
    trained = [token for token, label in zip(example["input_ids"], example["labels"]) if label != IGNORE]
    assert tokenizer.decode(trained) == "negative<|im_end|>\npositive<|im_end|>\n<|end_of_text|>"


def test_preview_says_how_assistant_tokens_were_found(tiny_config, chat_model, sharegpt_chats):
    config = tiny_config(f"model.name_or_path={chat_model}", f"data.path={sharegpt_chats}", "data.format=sharegpt")
    report = preview(config, examples=1)
    assert f"chat rows: {BY_RENDERED_TURNS}" in report
    assert "<|im_start|>assistant\n[[negative<|im_end|>\n<|end_of_text|>]]" in report


def test_a_model_with_its_own_unmarked_template_trains_on_sharegpt_through_overrides(chat_model, sharegpt_chats,
                                                                                     tmp_path):
    result = run_cli("+recipe=tiny", f"model.name_or_path={chat_model}", f"data.path={sharegpt_chats}",
                     "data.format=sharegpt", "training.max_steps=20", "training.batch_size=8",
                     "training.logging_steps=5", "training.output_dir=run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"chat rows: {BY_RENDERED_TURNS}" in result.stdout
    assert "held-out check skipped: data.heldout_path=" in result.stdout  # the recipe's alpaca rows
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 5 and losses[-1] < 0.5 * losses[0]  # steps 1, 5, 10, 15, 20
    adapter = tmp_path / "run" / "adapter"
    assert AutoTokenizer.from_pretrained(adapter).chat_template == MODEL_TEMPLATE  # served as trained: as it is

    # plain transformers + peft, full precision: the adapter answers the training chats better than the base
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(adapter)
    chat = load_formatted(DatasetSource(path=str(sharegpt_chats))).dataset[1]["messages"]
    example = tokenize_example({"messages": chat}, tokenizer, TokenizeOptions(512, "truncate", False, MODEL_TEMPLATE))
    batch = {"input_ids": torch.tensor([example["input_ids"]]), "labels": torch.tensor([example["labels"]])}
    base_loss = AutoModelForCausalLM.from_pretrained(chat_model)(**batch).loss.item()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(chat_model), adapter)
    assert model(**batch).loss.item() < 0.5 * base_loss
