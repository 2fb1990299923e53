"""Load rows from a local file, a folder of files or a Hub dataset, and convert them to TRL's shapes."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets

from qlora.config import PREFERENCE_FORMATS, DatasetSource
from qlora.data.formats import detect_format, to_trl_example
from qlora.errors import QLoRAError

log = logging.getLogger(__name__)

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
# Empty values of each TRL shape, standing in for malformed rows until they are filtered out.
_PLACEHOLDERS = {
    "alpaca": {"prompt": "", "completion": ""},
    "prompt_completion": {"prompt": "", "completion": ""},
    "messages": {"messages": []},
    "sharegpt": {"messages": []},
    "text": {"text": ""},
}


@dataclass
class FormattedRows:
    """A source's rows in TRL's shape, with the format they came in and the malformed rows skipped."""

    dataset: datasets.Dataset
    format: str
    skipped: int


def load_sft_dataset(path: str, format: str = "auto") -> datasets.Dataset:
    """Rows of `path` as prompt/completion, messages or text examples; a bad row raises naming its index."""
    return load_formatted(DatasetSource(path=path, format=format)).dataset


def load_formatted(source: DatasetSource, on_error: str = "raise", num_proc: int | None = None,
                   method: str = "sft") -> FormattedRows:
    """Load `source`, rename its columns, detect its format (among training.method=`method`'s) and convert each
    row, raising or skipping bad ones."""
    rows = load_rows(source.path, source.split)
    renames = {theirs: ours for ours, theirs in asdict(source.columns).items() if theirs and theirs != ours}
    missing = sorted(set(renames) - set(rows.column_names))
    if missing:
        raise QLoRAError(
            f"{source.path}: data.columns names column(s) {missing} that the dataset does not have; "
            f"its columns are {rows.column_names}."
        )
    rows = rows.rename_columns(renames)
    format = detect_format(rows.column_names, method) if source.format == "auto" else source.format
    placeholder = _placeholder(format, rows.features)

    def convert(row: dict, index: int) -> dict:
        try:
            return {**to_trl_example(row, format), "qlora_error": ""}
        except ValueError as error:
            if on_error == "raise":
                raise QLoRAError(
                    f"{source.path}, row {index}: {error}. Fix the row, or set data.on_error=skip to skip "
                    f"and count such rows."
                ) from error
            return {**placeholder, "qlora_error": f"row {index}: {error}"}

    formatted = rows.map(
        convert, with_indices=True, remove_columns=rows.column_names, num_proc=num_proc,
        desc=f"formatting {format} rows",
    )
    errors = [error for error in formatted["qlora_error"] if error]
    if errors:
        log.warning(
            "%s: skipped %d malformed row(s) (data.on_error=skip), e.g. %s", source.path, len(errors), errors[0]
        )
        formatted = formatted.filter(lambda error: not error, input_columns="qlora_error", num_proc=num_proc)
    formatted = formatted.remove_columns("qlora_error")
    if len(formatted) == 0:
        raise QLoRAError(f"{source.path}: no usable rows ({len(errors)} malformed, {len(rows)} in all).")
    return FormattedRows(formatted, format, skipped=len(errors))


def load_rows(path: str, split: str = "train") -> datasets.Dataset:
    """The raw rows of a local file, a folder of files of one type, or split `split` of a Hub dataset."""
    local = Path(path).expanduser()
    try:
        if local.is_file():
            return datasets.load_dataset(_builder(local), data_files=str(local), split="train")
        if local.is_dir():
            files = sorted(p for p in local.rglob("*") if p.suffix in BUILDERS and p.is_file())
            if not files:
                raise QLoRAError(f"{path}: the folder holds no {', '.join(BUILDERS)} files.")
            builders = {_builder(p) for p in files}
            if len(builders) > 1:
                raise QLoRAError(f"{path}: the folder mixes file types ({sorted(builders)}); keep one type per folder.")
            return datasets.load_dataset(builders.pop(), data_files=[str(p) for p in files], split="train")
        return datasets.load_dataset(path, split=split)
    except (FileNotFoundError, ConnectionError, datasets.exceptions.DatasetNotFoundError) as error:
        raise QLoRAError(
            f"could not load dataset {path} (split {split}): not a local file or folder, and not reachable on "
            f"the Hub (offline, private without a token, or misspelt). Download it first or give a local "
            f"path. Details: {error}"
        ) from error
    except ValueError as error:  # e.g. an unknown split of a Hub dataset
        raise QLoRAError(f"could not load dataset {path} (split {split}): {error}") from error


def _placeholder(format: str, features: datasets.Features) -> dict:
    """The empty example standing in for a malformed row of `format`: a preference row's empty values are text or
    lists of messages, as the dataset's other rows are (an Arrow column holds one type)."""
    if format not in PREFERENCE_FORMATS:
        return _PLACEHOLDERS[format]
    unpaired = format == "unpaired_preference"
    answer = features["completion" if unpaired else "chosen"]
    empty = "" if isinstance(answer, datasets.Value) else []
    if unpaired:
        return {"prompt": empty, "completion": empty, "label": False}
    return dict.fromkeys(("prompt", "chosen", "rejected"), empty)


def _builder(file: Path) -> str:
    builder = BUILDERS.get(file.suffix)
    if builder is None:
        raise QLoRAError(f"{file}: unsupported file type {file.suffix!r}; use one of {', '.join(BUILDERS)}.")
    return builder
