"""Load a dataset from a local file or the Hub and convert it to TRL's shape."""

from __future__ import annotations

from pathlib import Path

import datasets

from qlora.data.formats import detect_format, to_trl_example
from qlora.errors import QLoRAError

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def load_sft_dataset(path: str, format: str = "auto") -> datasets.Dataset:
    """Rows of `path` as prompt/completion, messages or text examples; bad rows name their index."""
    rows = load_rows(path)
    if format == "auto":
        format = detect_format(rows.column_names)

    def convert(row: dict, index: int) -> dict:
        try:
            return to_trl_example(row, format)
        except ValueError as error:
            raise QLoRAError(f"{path}, row {index}: {error}. Fix the row or remove it.") from error

    return rows.map(convert, with_indices=True, remove_columns=rows.column_names, desc=f"formatting {format} rows")


def load_rows(path: str) -> datasets.Dataset:
    local = Path(path).expanduser()
    try:
        if local.is_file():
            builder = BUILDERS.get(local.suffix)
            if builder is None:
                raise QLoRAError(f"{path}: unsupported file type {local.suffix!r}; use one of {', '.join(BUILDERS)}.")
            return datasets.load_dataset(builder, data_files=str(local), split="train")
        return datasets.load_dataset(path, split="train")
    except (FileNotFoundError, ConnectionError, datasets.exceptions.DatasetNotFoundError) as error:
        raise QLoRAError(
            f"could not load dataset {path}: not a local file and not reachable on the Hub. Details: {error}"
        ) from error
