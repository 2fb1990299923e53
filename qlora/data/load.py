"""Load rows from a local file, a folder of files or a Hub dataset, and convert them to TRL's shapes."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets

from qlora.config import PREFERENCE_FORMATS, DataConfig, DatasetSource
from qlora.data.files import RowOrigins, Rows, read_local
from qlora.data.formats import detect_format, to_trl_example
from qlora.errors import QLoRAError
from qlora.hub import prepare_hub_access, why_not_loaded

log = logging.getLogger(__name__)

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
    origins: RowOrigins
    kept: list[int] | None = None  # the raw row index of each row, where malformed rows were skipped

    def locate(self, index: int) -> str:
        """The file and line (or row) that row `index` of `dataset` came from."""
        return self.origins.locate(self.kept[index] if self.kept is not None else index)


def data_sources(data: DataConfig) -> list[DatasetSource]:
    """data.datasets, or else the one dataset of data.path."""
    if data.datasets:
        if data.path is not None:
            log.info("data.datasets is set: training on its %d datasets, not on data.path", len(data.datasets))
        return list(data.datasets)
    assert data.path is not None  # validate() requires path or datasets
    return [DatasetSource(path=data.path, format=data.format, split=data.split, columns=data.columns)]


def load_sft_dataset(path: str, format: str = "auto") -> datasets.Dataset:
    """Rows of `path` as prompt/completion, messages or text examples; a bad row raises naming its line or row."""
    return load_formatted(DatasetSource(path=path, format=format)).dataset


def load_formatted(source: DatasetSource, on_error: str = "raise", num_proc: int | None = None,
                   method: str = "sft", read: Rows | None = None) -> FormattedRows:
    """Load `source` (or take its rows `read` already, by read_rows), rename its columns, detect its format (among
    training.method=`method`'s) and convert each row, raising or skipping bad ones."""
    if read is None:
        read = read_rows(source.path, source.split, on_error)
    rows, origins = read.dataset, read.origins  # only origins in convert: datasets hashes it for its cache
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
                    f"{origins.locate(index)}: {error}. Fix the row, or set data.on_error=skip to skip "
                    f"and count such rows."
                ) from error
            return {**placeholder, "qlora_error": str(error)}

    formatted = rows.map(
        convert, with_indices=True, remove_columns=rows.column_names, num_proc=num_proc,
        desc=f"formatting {format} rows",
    )
    errors = [(index, error) for index, error in enumerate(formatted["qlora_error"]) if error]
    kept = None
    if errors:
        kept = [index for index, error in enumerate(formatted["qlora_error"]) if not error]
        index, error = errors[0]
        log.warning("%s: skipped %d malformed row(s) (data.on_error=skip), e.g. %s: %s",
                    source.path, len(errors), origins.locate(index), error)
        formatted = formatted.filter(lambda error: not error, input_columns="qlora_error", num_proc=num_proc)
    formatted = formatted.remove_columns("qlora_error")
    skipped = len(errors) + read.skipped
    if len(formatted) == 0:
        raise QLoRAError(f"{source.path}: no usable rows ({skipped} malformed, {len(rows) + read.skipped} in all).")
    return FormattedRows(formatted, format, skipped, origins, kept)


def load_rows(path: str, split: str = "train") -> datasets.Dataset:
    """The raw rows of a local file, a folder of files of one type, or split `split` of a Hub dataset."""
    return read_rows(path, split).dataset


def read_rows(path: str, split: str = "train", on_error: str = "raise") -> Rows:
    """load_rows's rows, with where each came from (file and line or row) and the unreadable lines skipped."""
    if Path(path).expanduser().exists():
        return read_local(path, on_error)
    try:
        prepare_hub_access(path)
        return Rows(datasets.load_dataset(path, split=split), RowOrigins(f"{path} (split {split})"))
    except (FileNotFoundError, ConnectionError, datasets.exceptions.DatasetNotFoundError) as error:
        raise QLoRAError(
            f"could not load dataset {path} (split {split}): {why_not_loaded(path, error, repo_type='dataset')}"
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

