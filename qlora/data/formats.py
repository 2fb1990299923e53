"""Row formats and their conversion to TRL's dataset shapes.

TRL then does the rest: it tokenizes, applies chat templates, appends EOS, and trains only on the
completion (prompt/completion rows) or the assistant turns (messages rows, with a template that marks them).
"""

from __future__ import annotations

from typing import Any

from qlora.errors import QLoRAError

# Stanford Alpaca's template, the one most alpaca-format checkpoints were trained with.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task{with_input}. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)

# The fields that identify each format, in the order auto-detection tries them.
REQUIRED_FIELDS = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "text": ("text",),
}


def alpaca_prompt(instruction: str, context: str | None = None) -> str:
    """An instruction (and optional input) in the Stanford Alpaca template, ready for the response."""
    return ALPACA_PROMPT.format(
        with_input=", paired with an input that provides further context" if context else "",
        instruction=instruction,
        input_block=f"### Input:\n{context}\n\n" if context else "",
    )


def detect_format(columns: list[str]) -> str:
    for name, required in REQUIRED_FIELDS.items():
        if all(column in columns for column in required):
            return name
    raise QLoRAError(
        f"cannot tell the dataset's format from its columns {columns}. Expected one of: "
        + "; ".join(f"{name} ({', '.join(fields)})" for name, fields in REQUIRED_FIELDS.items())
        + ". Rename the columns or set data.format explicitly."
    )


def to_trl_example(row: dict[str, Any], format: str) -> dict[str, Any]:
    """One row in `format` as TRL's prompt/completion, messages or text example."""
    missing = [f for f in REQUIRED_FIELDS[format] if not isinstance(row.get(f), (str, list)) or not row.get(f)]
    if missing:
        raise ValueError(f"missing or empty field(s) {missing} for data.format={format}")
    if format == "alpaca":
        return {"prompt": alpaca_prompt(row["instruction"], row.get("input")), "completion": row["output"]}
    if format == "prompt_completion":
        return {"prompt": row["prompt"], "completion": row["completion"]}
    if format == "messages":
        return {"messages": row["messages"]}
    return {"text": row["text"]}
