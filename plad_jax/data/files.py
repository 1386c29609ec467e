"""Local data files (jsonl, json, csv, parquet) and folders of split files, read into columns.

A table is `dict[column name, list of values]`, every list one entry per row. A row of a jsonl
file that lacks a column holds `None` there; `require_columns` and the task readers turn that into
a `DataError` naming the row.

A folder holds one or more files per split, found by name: `train.jsonl`, `train-00000-of-00002.parquet`,
`data/test.csv`, `valid.jsonl` (the validation split also answers to `valid`, `val`, `dev`). This
covers the Hugging Face hub layout (`data/<split>-*.parquet`) and OpenAI's TL;DR jsonl files.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path

from plad_jax.data.example import DataError

FORMATS = ("jsonl", "json", "csv", "parquet")
SPLIT_NAMES = {"train": ("train",), "validation": ("validation", "valid", "val", "dev"), "test": ("test",)}

Table = dict[str, list]


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
            raise DataError(f"{source} has no field {column!r}; its fields are {present} "
                            f"(set the field names with --set data.prompt_field=... / data.response_field=...)")


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
    """Files of each split found in `folder` or `folder/data`, sorted; splits with no file left out."""
    folder = Path(folder)
    found: dict[str, list[Path]] = {}
    for place in (folder, folder / "data"):
        if not place.is_dir():
            continue
        for split, names in SPLIT_NAMES.items():
            if split in found:
                continue
            files = sorted(p for p in place.iterdir() if p.is_file() and _is_split_file(p, names, fmt))
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

    try:
        present = pq.read_schema(path).names
    except Exception as e:  # noqa: BLE001 -- pyarrow raises several types for a file that is not parquet
        raise DataError(f"{path} is not a readable parquet file ({type(e).__name__}: {first_line(e)})") from None
    if columns is not None:
        require_columns({c: [] for c in present}, columns, str(path))
    return pq.read_table(path, columns=list(columns) if columns is not None else None).to_pydict()


def _read_csv(path: Path) -> Table:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
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
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        numbered = list(enumerate(rows, 1))
    else:
        numbered = []
        for line_no, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    numbered.append((line_no, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: line {line_no}: not valid JSON ({e.msg})") from None
    for where, row in numbered:
        if not isinstance(row, dict):
            raise DataError(f"{path}: row {where} is a {type(row).__name__}, not an object with fields")
    columns = list(dict.fromkeys(c for _, row in numbered for c in row))
    return {c: [row.get(c) for _, row in numbered] for c in columns}


def first_line(e: BaseException, limit: int = 200) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:limit]
