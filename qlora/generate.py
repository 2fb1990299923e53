"""`python -m qlora.generate run=outputs/<run> prompt="..."`: answers from the base model + adapter.

Three modes: one `prompt` (streamed to the terminal), `chat=true` (a conversation, with the tokenizer's
chat template), and `input_file=prompts.jsonl` (a batch, written to `output_file`). Prompts are wrapped
the way training wrapped them (the alpaca template for alpaca runs, the chat template for chat runs)
unless `template=` says otherwise.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase, TextStreamer, set_seed

from qlora.cli import run_hydra_command
from qlora.config import GenerateConfig, TrainConfig, typed_config
from qlora.data.formats import alpaca_prompt, detect_format
from qlora.data.load import load_rows
from qlora.errors import QLoRAError
from qlora.runs import load_adapted_model

log = logging.getLogger("qlora")
TEMPLATES = ("auto", "raw", "alpaca", "chat")


def generate(config: GenerateConfig) -> list[str]:
    modes = [config.prompt is not None, config.chat, config.input_file is not None]
    if sum(modes) != 1:
        raise QLoRAError('give exactly one of prompt="...", chat=true or input_file=prompts.jsonl.')
    if config.template not in TEMPLATES:
        raise QLoRAError(f"template={config.template} is not supported. Allowed values: {', '.join(TEMPLATES)}.")
    set_seed(config.seed)
    model, tokenizer, template = load_model(config)
    if config.chat:
        return chat(model, tokenizer, config)
    if config.prompt is not None:
        prompt = format_prompt({"prompt": config.prompt}, template, tokenizer)
        return [answer(model, tokenizer, [prompt], config, stream=config.stream)[0]]
    return answer_file(model, tokenizer, template, config)


def load_model(config: GenerateConfig) -> tuple[PeftModel, PreTrainedTokenizerBase, str]:
    """The adapted model, its tokenizer, and the template that wraps prompts."""
    model, tokenizer, run = load_adapted_model(config.run, config.adapter, config.base,
                                               trust_remote_code=config.trust_remote_code)
    template = config.template
    if template == "auto":
        template = "alpaca" if run and trained_format(run) == "alpaca" else "chat" if tokenizer.chat_template else "raw"
    if (template == "chat" or config.chat) and not tokenizer.chat_template:
        raise QLoRAError("the tokenizer has no chat template, so chat=true or template=chat cannot format turns. "
                         "Use template=raw or template=alpaca, or train with a chat template.")
    return model, tokenizer, template


def trained_format(run: TrainConfig) -> str | None:
    """The format of the run's training data: as configured, or detected from its columns again."""
    if run.data.format != "auto" or run.data.path is None:
        return run.data.format if run.data.path is not None else None
    try:
        return detect_format(load_rows(run.data.path, run.data.split).column_names, run.training.method)
    except (QLoRAError, OSError):
        return None  # the training data is gone: fall back to the tokenizer's chat template or raw text


def format_prompt(row: dict[str, Any], template: str, tokenizer: PreTrainedTokenizerBase) -> str:
    """The text the model continues, for a row with `prompt`, `instruction` (+`input`) or `messages`."""
    if "messages" in row:
        messages = row["messages"]
        if messages and messages[-1]["role"] == "assistant":  # the reference answer, not part of the prompt
            messages = messages[:-1]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if "instruction" in row:  # an alpaca row brings its own shape
        template = "alpaca"
    text = row.get("prompt", row.get("instruction"))
    if not isinstance(text, str):
        raise QLoRAError(f"cannot find a prompt in {row}: give a prompt, instruction or messages field.")
    if template == "alpaca":
        return alpaca_prompt({**row, "instruction": text})
    if template == "chat":
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return text


@torch.no_grad()
def answer(model: PeftModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], config: GenerateConfig,
           stream: bool = False) -> list[str]:
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"  # generation continues on the right
    try:
        batch = tokenizer(prompts, return_tensors="pt", padding=True).to(model.device)
    finally:
        tokenizer.padding_side = padding_side
    sampling = dict(do_sample=True, temperature=config.temperature, top_p=config.top_p, top_k=config.top_k) \
        if config.temperature > 0 else dict(do_sample=False)
    output = model.generate(
        **batch, **sampling, max_new_tokens=config.max_new_tokens, repetition_penalty=config.repetition_penalty,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None,
    )
    return tokenizer.batch_decode(output[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)


def chat(model: PeftModel, tokenizer: PreTrainedTokenizerBase, config: GenerateConfig) -> list[str]:
    """A conversation on the terminal: each turn sees the whole history. /exit or end of input stops."""
    messages: list[dict[str, str]] = []
    replies = []
    print("chat: type a message and press enter; /exit or Ctrl-D ends, /reset clears the history")
    for line in sys.stdin:
        text = line.strip()
        if text == "/exit":
            break
        if text == "/reset":
            messages.clear()
            continue
        messages.append({"role": "user", "content": text})
        prompt = format_prompt({"messages": messages}, "chat", tokenizer)
        print("assistant: ", end="", flush=True)
        reply = answer(model, tokenizer, [prompt], config, stream=config.stream)[0]
        if not config.stream:
            print(reply)
        messages.append({"role": "assistant", "content": reply})
        replies.append(reply)
    return replies


def answer_file(model: PeftModel, tokenizer: PreTrainedTokenizerBase, template: str, config: GenerateConfig) -> list[str]:
    source = Path(config.input_file).expanduser()
    if not source.is_file():
        raise QLoRAError(f"input_file={source} does not exist.")
    rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    prompts = [format_prompt(row, template, tokenizer) for row in rows]
    answers: list[str] = []
    for start in range(0, len(prompts), config.batch_size):
        answers += answer(model, tokenizer, prompts[start:start + config.batch_size], config)
    target = Path(config.output_file or source.with_suffix(".generated.jsonl")).expanduser()
    target.write_text("".join(json.dumps({**row, "generated": text}) + "\n" for row, text in zip(rows, answers)))
    log.info("answered %d prompts from %s into %s", len(answers), source, target)
    return answers


def main() -> None:
    run_hydra_command("generate", lambda cfg: generate(typed_config(cfg)))


if __name__ == "__main__":
    main()
