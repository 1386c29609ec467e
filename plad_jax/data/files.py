"""Local data files (jsonl, json, csv, parquet) and folders of split files, read into columns.

A table is `dict[column name, list of values]`, every list one entry per row. A row of a jsonl
file that lacks a column holds `None` there; `require_columns` and the task readers turn that into
a `DataError` naming the row.

A folder holds one or more files per split, found by name: `train.jsonl`,
`train-00000-of-00002.parquet`, `data/test.csv`, `valid.jsonl` (the validation split also answers to
`valid`, `val`, `dev`). This covers the Hugging Face hub layout (`data/<split>-*.parquet`) and
OpenAI's TL;DR jsonl files.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path

from plad_jax.data.example import DataError

FORMATS = ("jsonl", "json", "csv", "parquet")
SPLIT_NAMES = {
    "train": ("train",),
    "validation": ("validation", "valid", "val", "dev"),
    "test": ("test",),
}

Table = dict[str, list]
BOM, NEWLINE = codecs.BOM_UTF8, b"\n"


def file_format(path: str | os.PathLike) -> str | None:
    """The format a file name says (`.jsonl`, `.json`, `.csv`, `.parquet`), or None."""
    suffix = Path(path).suffix.lower().lstrip(".")
    return suffix if suffix in FORMATS else None


def read_table(path: str | os.PathLike, fmt: str, columns: Sequence[str] | None = None) -> Table:
    """All rows of one file as columns; with `columns`, only those (each must exist)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    if fmt == "parquet":
        table = _read_parquet(path, columns)
    elif fmt == "csv":
        table = _read_csv(path)
    elif fmt in ("jsonl", "json"):
        table = _read_json(path)
    else:
        raise DataError(f"cannot read {path}: format {fmt!r} is not one of {', '.join(FORMATS)}")
    if num_rows(table) == 0:
        raise DataError(f"{path} has no examples")
    if columns is not None:
        require_columns(table, columns, str(path))
        table = {c: table[c] for c in columns}
    return table


def require_columns(table: Table, columns: Sequence[str], source: str):
    """DataError naming the first missing column and the columns that are there."""
    for column in columns:
        if column not in table:
            present = ", ".join(repr(c) for c in table) or "none"
            raise DataError(
                f"{source} has no field {column!r}; its fields are {present} "
                f"(set the field names with --set data.prompt_field=... / data.response_field=...)"
            )


def num_rows(table: Table) -> int:
    return len(next(iter(table.values()))) if table else 0


def concat_tables(tables: Sequence[Table]) -> Table:
    """Row-wise concatenation; a column missing from one table is None in its rows."""
    columns = list(dict.fromkeys(c for t in tables for c in t))
    out: Table = {c: [] for c in columns}
    for t in tables:
        n = num_rows(t)
        for c in columns:
            out[c].extend(t.get(c, [None] * n))
    return out


def split_files(folder: str | os.PathLike, fmt: str | None = None) -> dict[str, list[Path]]:
    """Files of each split found in `folder` or `folder/data`, sorted; splits with no file left
    out."""
    folder = Path(folder)
    found: dict[str, list[Path]] = {}
    for place in (folder, folder / "data"):
        if not place.is_dir():
            continue
        for split, names in SPLIT_NAMES.items():
            if split in found:
                continue
            files = sorted(
                p for p in place.iterdir() if p.is_file() and _is_split_file(p, names, fmt)
            )
            if files:
                found[split] = files
    return found


def _is_split_file(path: Path, names: Sequence[str], fmt: str | None) -> bool:
    this = file_format(path)
    if this is None or (fmt is not None and this != fmt and {this, fmt} != {"json", "jsonl"}):
        return False
    stem = path.name[: -len(path.suffix)].lower()
    return any(stem == n or stem.startswith((n + "-", n + "_")) for n in names)


def _read_parquet(path: Path, columns) -> Table:
    import pyarrow.parquet as pq

    present = _parquet_call(path, lambda: pq.read_schema(path).names)
    if columns is not None:
        require_columns({c: [] for c in present}, columns, str(path))
    wanted = list(columns) if columns is not None else None
    table = _parquet_call(path, lambda: pq.read_table(path, columns=wanted))
    try:
        return table.to_pydict()
    except UnicodeDecodeError as e:  # pyarrow checks a string's bytes only when Python reads it
        raise DataError(
            f"{path}: {_bad_parquet_value(table)}: text that is not UTF-8 "
            f"({e.reason}); write the file with UTF-8 strings"
        ) from None


def _parquet_call(path: Path, read):
    """`read()`, a DataError if the file is not parquet or is damaged past its footer."""
    try:
        return read()
    # pyarrow raises several types for a file that is not parquet
    except Exception as e:  # noqa: BLE001
        raise DataError(
            f"{path} is not a readable parquet file ({type(e).__name__}: {first_line(e)})"
        ) from None


def _bad_parquet_value(table) -> str:
    """'row R, field F' of the first string value that is not UTF-8 (only on that error path)."""
    for name in table.column_names:
        for row, value in enumerate(table.column(name), 1):
            try:
                value.as_py()
            except UnicodeDecodeError:
                return f"row {row}, field {name!r}"
    return "a value"


def _read_csv(path: Path) -> Table:
    data = path.read_bytes()
    reader = csv.DictReader(io.StringIO(_decode(path, data, _csv_row), newline=""))
    table: Table = {c: [] for c in reader.fieldnames or []}
    try:
        for row in reader:
            for c in table:
                table[c].append(row.get(c))
    except csv.Error as e:
        raise DataError(f"{path}: line {reader.line_num}: {e}") from None
    return table


def _read_json(path: Path) -> Table:
    """A JSON array of objects, or one object per line (jsonl)."""
    data = path.read_bytes()
    if data.lstrip(BOM + b" \t\r\n").startswith(b"["):
        numbered = _json_array(path, data, _decode(path, data))
    else:
        numbered = _json_lines(path, data, _decode(path, data, _jsonl_row))
    for where, row in numbered:
        if not isinstance(row, dict):
            raise DataError(f"{path}: {where} is a {type(row).__name__}, not an object with fields")
    columns = list(dict.fromkeys(c for _, row in numbered for c in row))
    return {c: [row.get(c) for _, row in numbered] for c in columns}


def _json_array(path: Path, data: bytes, text: str) -> list:
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        offset = _byte_offset(data, text, e.pos)
        raise DataError(
            f"{path}: not valid JSON: {e.msg}: line {e.lineno} column {e.colno} "
            f"(char {e.pos}, byte offset {offset} in the file)"
        ) from None
    return [(f"row {i}", row) for i, row in enumerate(rows, 1)]


def _json_lines(path: Path, data: bytes, text: str) -> list:
    """(where, object) of each non-blank line. Split on '\\n' only, as jsonl is: a JSON string may
    hold U+2028 and the other characters `str.splitlines` also breaks at."""
    numbered, start = [], 0
    for line_no, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                numbered.append((f"line {line_no}", json.loads(line)))
            except json.JSONDecodeError as e:
                offset = _byte_offset(data, text, start + e.pos)
                raise DataError(
                    f"{path}: row {len(numbered) + 1}: not valid JSON: {e.msg}: "
                    f"line {line_no} column {e.colno} (char {e.pos} of the line, "
                    f"byte offset {offset} in the file)"
                ) from None
        start += len(line) + 1
    return numbered


def _decode(path: Path, data: bytes, row_of=None) -> str:
    """The file's text (a UTF-8 byte-order mark skipped). A byte that is not UTF-8 is a DataError
    naming the row (`row_of(data, line)`), line, column and byte offset in the file, where the
    codec's own error counts from wherever a reader's buffer began."""
    skip = len(BOM) if data.startswith(BOM) else 0
    try:
        return data[skip:].decode("utf-8")
    except UnicodeDecodeError as e:
        offset = skip + e.start
        line_start = data.rfind(b"\n", 0, offset) + 1
        line = data.count(b"\n", 0, offset) + 1
        column = len(data[line_start:offset].decode("utf-8", "replace").lstrip("\ufeff")) + 1
        row = row_of(data, line) if row_of else ""
        row = f" {row}:" if row else ""
        raise DataError(
            f"{path}:{row} byte 0x{data[offset]:02x} is not UTF-8 ({e.reason}): "
            f"line {line} column {column} (byte offset {offset} in the file); "
            "save the file as UTF-8"
        ) from None


def _byte_offset(data: bytes, text: str, pos: int) -> int:
    """Byte offset in the file of character `pos` of its decoded text."""
    return (len(BOM) if data.startswith(BOM) else 0) + len(text[:pos].encode("utf-8"))


def _jsonl_row(data: bytes, line: int) -> str:
    """Rows are the non-blank lines (the numbering of the task readers' errors)."""
    return f"row {sum(1 for chunk in data.split(NEWLINE, line)[:line] if chunk.strip())}"


def _csv_row(data: bytes, line: int) -> str:
    """The record that holds physical line `line` (a quoted field may span lines); 0: the header."""
    reader = csv.reader(io.StringIO(data.decode("utf-8", "surrogateescape"), newline=""))
    try:
        for record, _ in enumerate(reader):
            if reader.line_num >= line:
                return f"row {record}" if record else "the header"
    except csv.Error:
        pass
    return ""


def first_line(e: BaseException, limit: int = 200) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:limit]
