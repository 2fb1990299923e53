"""Row formats and their conversion to TRL's dataset shapes: prompt/completion, messages, text, and for the
preference methods prompt/chosen/rejected and prompt/completion/label.

Each converter checks its row and raises ValueError with the reason (the loader adds the file and row
index). alpaca rows become prompt/completion, sharegpt rows become messages, implicit preference pairs (two
conversations sharing their first turns, as UltraFeedback ships them) become prompt/chosen/rejected.
"""

from __future__ import annotations

from typing import Any

from trl.data_utils import extract_prompt

from qlora.config import METHOD_FORMATS, PREFERENCE_FORMATS, methods_for
from qlora.errors import QLoRAError

# Stanford Alpaca's template, the one most alpaca-format checkpoints were trained with.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task{with_input}. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)
# With a `system` field, the system text replaces Alpaca's fixed preamble.
ALPACA_PROMPT_WITH_SYSTEM = "{system}\n\n### Instruction:\n{instruction}\n\n{input_block}### Response:\n"

# The fields that identify each format, in the order auto-detection tries them (among the training method's).
REQUIRED_FIELDS = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "preference": ("prompt", "chosen", "rejected"),
    "implicit_preference": ("chosen", "rejected"),
    "unpaired_preference": ("prompt", "completion", "label"),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "text": ("text",),
}
OPTIONAL_FIELDS = {"alpaca": ("input", "system")}
# The TRL shape each format becomes.
TRL_SHAPES = {"messages": "messages", "sharegpt": "messages", "prompt_completion": "prompt/completion",
              "alpaca": "prompt/completion", "text": "text"}

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "tool": "tool"}


def matching_formats(columns: list[str]) -> list[str]:
    """The formats whose required fields the columns have, in REQUIRED_FIELDS' order of preference."""
    return [name for name, required in REQUIRED_FIELDS.items() if all(column in columns for column in required)]


def detect_format(columns: list[str], method: str = "sft") -> str:
    """The first format of training.method=`method` whose fields the columns have."""
    matching = matching_formats(columns)
    for name in matching:
        if name in METHOD_FORMATS[method]:
            return name
    expected = "; ".join(f"{name} ({', '.join(REQUIRED_FIELDS[name])})" for name in METHOD_FORMATS[method])
    if matching:
        raise QLoRAError(
            f"the dataset's columns {columns} are {matching[0]} data, which training.method={method} cannot train "
            f"on: it needs {expected}. Train it with training.method={'|'.join(methods_for(matching[0]))}, or give "
            f"data in one of those formats."
        )
    raise QLoRAError(
        f"cannot tell the dataset's format from its columns {columns}. Expected one of: {expected}"
        ". Rename the columns with data.columns (e.g. data.columns.instruction=question) "
        "or set data.format explicitly."
    )


def to_trl_example(row: dict[str, Any], format: str) -> dict[str, Any]:
    """One row in `format` as TRL's prompt/completion, messages, text, prompt/chosen/rejected or
    prompt/completion/label example (ValueError if malformed)."""
    if format in PREFERENCE_FORMATS:
        return _preference_example(row, format)
    if format in ("alpaca", "prompt_completion", "text"):
        for name in REQUIRED_FIELDS[format]:
            _require_text(row, name)
        for name in OPTIONAL_FIELDS.get(format, ()):
            if row.get(name) is not None and not isinstance(row[name], str):
                raise ValueError(f"field {name!r} must be text, got {type(row[name]).__name__}")
    if format == "alpaca":
        return {"prompt": alpaca_prompt(row), "completion": row["output"]}
    if format == "prompt_completion":
        return {"prompt": row["prompt"], "completion": row["completion"]}
    if format == "text":
        return {"text": row["text"]}
    if format == "sharegpt":
        turns = _require_turns(row, "conversations")
        return {"messages": [_sharegpt_message(turn, i) for i, turn in enumerate(turns)]}
    turns = _require_turns(row, "messages")
    return {"messages": [_chat_message(turn, i) for i, turn in enumerate(turns)]}


def alpaca_prompt(row: dict[str, Any]) -> str:
    context = row.get("input") or ""
    input_block = f"### Input:\n{context}\n\n" if context else ""
    if row.get("system"):
        return ALPACA_PROMPT_WITH_SYSTEM.format(
            system=row["system"], instruction=row["instruction"], input_block=input_block
        )
    return ALPACA_PROMPT.format(
        with_input=", paired with an input that provides further context" if context else "",
        instruction=row["instruction"],
        input_block=input_block,
    )


def _preference_example(row: dict[str, Any], format: str) -> dict[str, Any]:
    """A pair (prompt/chosen/rejected) or an unpaired completion with its label, all text or all messages."""
    if format == "implicit_preference":
        return _implicit_pair(row)
    names = ("prompt", "completion") if format == "unpaired_preference" else ("prompt", "chosen", "rejected")
    example = {name: _text_or_turns(row, name, answer=name != "prompt") for name in names}
    kinds = {name: "text" if isinstance(value, str) else "messages" for name, value in example.items()}
    if len(set(kinds.values())) > 1:
        raise ValueError(f"fields {', '.join(names)} must be all text or all lists of messages, got "
                         + ", ".join(f"{name} {kind}" for name, kind in kinds.items()))
    if format == "unpaired_preference":
        if not isinstance(row.get("label"), bool):
            raise ValueError(f"field 'label' must be true (a desirable completion) or false, got {row.get('label')!r}")
        example["label"] = row["label"]
    return example


def _implicit_pair(row: dict[str, Any]) -> dict[str, Any]:
    """Two whole conversations that share their first turns (the prompt) and differ in the answer."""
    pair = extract_prompt({name: _messages(row, name) for name in ("chosen", "rejected")})
    if not pair["prompt"]:
        raise ValueError("chosen and rejected share no first turn: their common beginning is the prompt they answer")
    for name in ("chosen", "rejected"):
        if not pair[name] or pair[name][-1]["role"] != "assistant":
            raise ValueError(f"{name} must go on from the shared prompt to an assistant answer")
    return pair


def _text_or_turns(row: dict[str, Any], name: str, answer: bool) -> str | list[dict[str, str]]:
    """row[name] as text or as validated messages; an answer's messages must end with the assistant's turn."""
    if isinstance(row.get(name), list):
        turns = _messages(row, name)
        if answer and turns[-1]["role"] != "assistant":
            raise ValueError(f"field {name!r} must end with an assistant turn (the answer), got {turns[-1]['role']!r}")
        return turns
    _require_text(row, name)
    return row[name]


def _messages(row: dict[str, Any], name: str) -> list[dict[str, str]]:
    """row[name] as checked messages; a bad turn is named with its field (a pair has three)."""
    turns = _require_turns(row, name)
    try:
        return [_chat_message(turn, i) for i, turn in enumerate(turns)]
    except ValueError as error:
        raise ValueError(f"field {name!r}: {error}") from error


def _require_text(row: dict[str, Any], name: str) -> None:
    _require(row, name, str, "text", "is empty", lambda value: bool(value.strip()))


def _require_turns(row: dict[str, Any], name: str) -> list:
    return _require(row, name, list, "a list of turns", "is an empty conversation", bool)


def _require(row: dict[str, Any], name: str, kind: type, described: str, empty: str, filled) -> Any:
    """row[name], refused with the reason when it is missing, of another type, or empty."""
    value = row.get(name)
    if value is None:
        raise ValueError(f"missing field {name!r}")
    if not isinstance(value, kind):
        raise ValueError(f"field {name!r} must be {described}, got {type(value).__name__}")
    if not filled(value):
        raise ValueError(f"field {name!r} {empty}")
    return value


def _sharegpt_message(turn: Any, index: int) -> dict[str, str]:
    if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
        raise ValueError(f"turn {index} must have 'from' and 'value', got {turn!r}")
    role = SHAREGPT_ROLES.get(turn["from"])
    if role is None:
        raise ValueError(f"turn {index} has unknown speaker from={turn['from']!r}; use one of {sorted(SHAREGPT_ROLES)}")
    return _chat_message({"role": role, "content": turn["value"]}, index)


def _chat_message(turn: Any, index: int) -> dict[str, str]:
    if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
        raise ValueError(f"turn {index} must have 'role' and 'content', got {turn!r}")
    if turn["role"] not in ROLES:
        raise ValueError(f"turn {index} has unknown role {turn['role']!r}; use one of {', '.join(ROLES)}")
    if not isinstance(turn["content"], str):
        raise ValueError(f"turn {index} content must be text, got {type(turn['content']).__name__}")
    return {"role": turn["role"], "content": turn["content"]}
