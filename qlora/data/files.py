"""Local data files (.jsonl, .json, .parquet, .csv, or a folder of one type) read into rows.

Every error names the file and the 1-based line (JSON lines) or row (CSV, Parquet, a JSON array), as an
editor shows them. `datasets` reads the files; only when it cannot are JSON lines read here, line by line,
to find the line it stopped at, or with data.on_error=skip to leave such lines out.
"""

from __future__ import annotations

import json
import logging
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import datasets

from qlora.errors import QLoRAError

log = logging.getLogger(__name__)

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass
class RowOrigins:
    """Names where each row came from: a file and 1-based line or row, or a Hub dataset and row."""

    name: str  # the path as the user gave it
    files: list[Path] = field(default_factory=list)  # local files in the order their rows were read; none: the Hub

    def locate(self, index: int) -> str:
        """'my.jsonl, line 7' (or 'rows.csv, row 6') for the row at 0-based `index`."""
        if not self.files:
            return f"{self.name}, row {index + 1}"
        for file in self.files:
            if _is_json_lines(file):
                lines = _row_lines(file)
                if index < len(lines):
                    return f"{file}, line {lines[index]}"
                index -= len(lines)
                continue
            count = _row_count(file) if len(self.files) > 1 else index + 1  # one file: no need to count
            if index < count:
                return f"{file}, row {index + 1}"
            index -= count
        raise IndexError(index)


@dataclass
class Rows:
    """A source's raw rows, where each came from, and the unreadable lines left out (data.on_error=skip)."""

    dataset: datasets.Dataset
    origins: RowOrigins
    skipped: int = 0


def read_local(path: str, on_error: str) -> Rows:
    """The rows of a local file or folder; an empty or unreadable file is an error naming it and the line."""
    files = _without_empty_files(_data_files(path), on_error)
    builder = _builder(files[0])
    try:
        with _datasets_errors_unlogged():
            dataset = datasets.load_dataset(builder, data_files=[str(file) for file in files], split="train")
    except (datasets.exceptions.DatasetGenerationError, StopIteration, ValueError) as error:
        if builder != "json":
            raise _unreadable(files, error) from error
        return _read_json_lines(path, files, on_error, error)
    return Rows(dataset, RowOrigins(path, files))


def _data_files(path: str) -> list[Path]:
    local = Path(path).expanduser()
    if local.is_file():
        _builder(local)
        return [local]
    files = sorted(p for p in local.rglob("*") if p.suffix in BUILDERS and p.is_file())
    if not files:
        raise QLoRAError(f"{path}: the folder holds no {', '.join(BUILDERS)} files.")
    builders = {_builder(p) for p in files}
    if len(builders) > 1:
        raise QLoRAError(f"{path}: the folder mixes file types ({sorted(builders)}); keep one type per folder.")
    return files


def _builder(file: Path) -> str:
    builder = BUILDERS.get(file.suffix)
    if builder is None:
        raise QLoRAError(f"{file}: unsupported file type {file.suffix!r}; use one of {', '.join(BUILDERS)}.")
    return builder


def _without_empty_files(files: list[Path], on_error: str) -> list[Path]:
    """The files with content; empty ones are an error, or, in a folder with data.on_error=skip, left out."""
    empty = [file for file in files if file.stat().st_size == 0]
    if empty and (on_error == "raise" or len(empty) == len(files)):
        way_out = ", or set data.on_error=skip to leave the folder's empty files out" if len(files) > len(empty) else ""
        raise QLoRAError(f"{empty[0]}: the file is empty; give a file with rows{way_out}.")
    for file in empty:
        log.warning("%s: the file is empty, left out (data.on_error=skip)", file)
    return [file for file in files if file not in empty]


def _read_json_lines(path: str, files: list[Path], on_error: str, error: Exception) -> Rows:
    """JSON lines read line by line, after `datasets` could not: the first bad line raises, or bad lines are
    skipped and counted."""
    rows, bad = [], []
    for file in files:
        if not _is_json_lines(file):
            _check_json_document(file)
            raise _unreadable([file], error) from error
        for number, line in enumerate(file.read_text(encoding="utf-8").split("\n"), start=1):
            problem, row = _parse_line(line)
            if problem:
                bad.append(f"{file}, line {number}: {problem}")
            elif row is not None:
                rows.append(row)
    if not bad:
        if not rows:
            raise QLoRAError(f"{path}: no rows, only blank lines.") from error
        raise _unreadable(files, error) from error
    if on_error == "raise":
        raise QLoRAError(f"{bad[0]}. Fix the line, or set data.on_error=skip to skip and count such lines.")
    log.warning("%s: skipped %d unreadable line(s) (data.on_error=skip), e.g. %s", path, len(bad), bad[0])
    if not rows:
        raise QLoRAError(f"{path}: no readable rows ({len(bad)} unreadable lines, e.g. {bad[0]}).")
    columns = list(dict.fromkeys(name for row in rows for name in row))  # every row's fields, as `datasets` reads them
    table = datasets.Dataset.from_list([{name: row.get(name) for name in columns} for row in rows])
    return Rows(table, RowOrigins(path, files), skipped=len(bad))


def _parse_line(line: str) -> tuple[str, dict | None]:
    """(problem, row) of one JSON line: ('', None) for a blank line, which `datasets` skips too."""
    if not line.strip():
        return "", None
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        return f"not valid JSON ({error.msg} at column {error.colno})", None
    if not isinstance(row, dict):
        return f"not a JSON object but a {type(row).__name__}", None
    return "", row


def _check_json_document(file: Path) -> None:
    """A .json file holding one JSON document (an array of rows): its syntax error names the line."""
    try:
        json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise QLoRAError(f"{file}, line {error.lineno}: not valid JSON ({error.msg} at column {error.colno}).")


def _unreadable(files: list[Path], error: BaseException) -> QLoRAError:
    cause = error.__cause__ or error
    reason = re.sub(r"\s+", " ", str(cause)).strip().rstrip(".") or type(cause).__name__
    where = str(files[0]) if len(files) == 1 else f"one of the {len(files)} files in {files[0].parent}"
    if "corresponds to no data" in reason:  # a CSV file with a header only
        return QLoRAError(f"{where}: no rows to read.")
    return QLoRAError(f"{where}: could not be read ({reason}).")


@contextmanager
def _datasets_errors_unlogged() -> Iterator[None]:
    """datasets logs the error it then raises (with 0-based rows); ours says it once, naming file and line."""
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _is_json_lines(file: Path) -> bool:
    """A .jsonl file, or a .json file not holding one array (`datasets` reads both)."""
    if file.suffix == ".jsonl":
        return True
    if file.suffix != ".json":
        return False
    with file.open(encoding="utf-8") as handle:
        return handle.read(4096).lstrip()[:1] != "["


def _row_lines(file: Path) -> list[int]:
    """The 1-based line number of each row of a JSON lines file: non-blank lines that are JSON objects."""
    lines = file.read_text(encoding="utf-8").split("\n")
    return [number for number, line in enumerate(lines, start=1) if _parse_line(line)[1] is not None]


def _row_count(file: Path) -> int:
    return datasets.load_dataset(_builder(file), data_files=str(file), split="train").num_rows
