"""Tasks: where examples come from and how a source's fields become (prompt, response).

task: default source; fields

- `tldr`: hub `trl-lib/tldr`; `prompt`, `completion`; or OpenAI's jsonl `subreddit`, `title`,
  `post`, `summary`
- `hh`: hub `Anthropic/hh-rlhf`, `helpful-base`; `chosen` transcript, cut after its last
  `\\n\\nAssistant:`
- `jsonl`, `csv`, `parquet`: a local file or folder (`path`); `prompt_field` (default `prompt`),
  `response_field` (default `response`; "" = prompts only)
- `demo`: built here from the Python standard library (`demo.py`); docstring body -> one-line
  summary

`path` is a local file (its split is `train`), a local folder of split files (`files.py`), a
folder written by `datasets.save_to_disk`, or a hub dataset name loaded with
`datasets.load_dataset` when the machine is online. OpenAI's TL;DR rows become exactly the
`trl-lib/tldr` text: `SUBREDDIT: r/{subreddit}\\n\\nTITLE: {title}\\n\\nPOST: {post}\\n\\nTL;DR:`
and the response `" " + summary`. A task's responses may have stop strings (`STOP_STRINGS`; `hh`:
the next `\\n\\nHuman:` turn), where sampling ends unless `sample.stop` / `eval.stop` say otherwise.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from plad_jax.data import files
from plad_jax.data.example import DataError, Example

logger = logging.getLogger(__name__)

TASKS = ("tldr", "hh", "jsonl", "csv", "parquet", "demo")
FILE_TASKS = ("jsonl", "csv", "parquet")
HUB_DEFAULTS = {"tldr": ("trl-lib/tldr", None), "hh": ("Anthropic/hh-rlhf", "helpful-base")}

TLDR_PROMPT = "SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"
TLDR_OPENAI_FIELDS = ("subreddit", "title", "post")
HH_ASSISTANT = "\n\nAssistant:"
HH_HUMAN = "\n\nHuman:"
# Where a sampled response ends by default (`sample.stop` / `eval.stop` = none): an hh response
# is one Assistant turn, so a model that runs on into a next Human turn is cut there.
STOP_STRINGS = {"hh": (HH_HUMAN,)}


def task_stop_strings(task: str) -> tuple[str, ...]:
    """The stop strings of `task`'s responses (empty for tasks whose responses have no turns)."""
    return STOP_STRINGS.get(task, ())


def load_task(
    task: str,
    path: str | None = None,
    *,
    prompt_field: str | None = None,
    response_field: str | None = None,
    hub_data_dir: str | None = None,
) -> dict[str, list[Example]]:
    """The splits the source has (`train`, and `validation` / `test` when present) as examples.

    `prompt_field` / `response_field` name the columns for the file tasks and override the
    automatic layout of `tldr`; `response_field=""` reads prompts only. `hub_data_dir` is passed
    to `load_dataset` (default `helpful-base` for `hh`).
    """
    if task not in TASKS:
        raise DataError(f"unknown task {task!r}: choose one of {', '.join(TASKS)}")
    if task == "demo":
        from plad_jax.data.demo import docstring_examples

        return {"train": docstring_examples()}
    if task in FILE_TASKS and not path:
        raise DataError(
            f"task {task!r} reads a local {task} file: set --set data.path=FILE_OR_FOLDER"
        )
    tables = _read_source(task, path, hub_data_dir)
    if "train" not in tables:
        raise DataError(
            f"{_source_name(task, path)} has no train split (found: {', '.join(tables) or 'none'})"
        )
    out = {}
    for split, (source, table) in tables.items():
        examples = table_examples(
            task, table, source, prompt_field=prompt_field, response_field=response_field
        )
        if not examples:
            raise DataError(f"{source} has no examples")
        out[split] = examples
    logger.info(
        "task %s from %s: %s",
        task,
        _source_name(task, path),
        ", ".join(f"{s} {len(e)}" for s, e in out.items()),
    )
    return out


def table_examples(
    task: str,
    table: files.Table,
    source: str,
    *,
    prompt_field: str | None = None,
    response_field: str | None = None,
) -> list[Example]:
    """Examples of one split's table, by the task's layout; rows with an empty prompt are
    dropped."""
    if task == "hh" and prompt_field is None:
        files.require_columns(table, ["chosen"], source)
        examples = [
            split_hh_transcript(_text(t, source, "chosen", i), source, i)
            for i, t in enumerate(table["chosen"])
        ]
    elif task == "tldr" and prompt_field is None and response_field is None:
        examples = _tldr_examples(table, source)
    else:
        prompts = prompt_field or "prompt"
        responses = (
            response_field
            if response_field is not None
            else ("completion" if task == "tldr" else "response")
        )
        files.require_columns(table, [prompts] + ([responses] if responses else []), source)
        examples = [
            Example(
                _text(p, source, prompts, i),
                _text(table[responses][i], source, responses, i) if responses else "",
            )
            for i, p in enumerate(table[prompts])
        ]
    kept = [e for e in examples if e.prompt.strip()]
    if len(kept) < len(examples):
        logger.warning(
            "%s: dropped %d of %d rows with an empty prompt",
            source,
            len(examples) - len(kept),
            len(examples),
        )
    return kept


def split_hh_transcript(transcript: str, source: str = "hh", row: int = 0) -> Example:
    """An hh-rlhf transcript cut after its last `\\n\\nAssistant:`: the prompt keeps it, the
    response is the rest."""
    cut = transcript.rfind(HH_ASSISTANT)
    if cut < 0:
        raise DataError(
            f"{source}: row {row + 1}: the transcript has no {HH_ASSISTANT.strip()!r} turn"
        )
    cut += len(HH_ASSISTANT)
    return Example(transcript[:cut], transcript[cut:])


def _tldr_examples(table: files.Table, source: str) -> list[Example]:
    if "prompt" in table and "completion" in table:
        return [
            Example(_text(p, source, "prompt", i), _text(c, source, "completion", i))
            for i, (p, c) in enumerate(zip(table["prompt"], table["completion"]))
        ]
    if all(f in table for f in TLDR_OPENAI_FIELDS):
        summaries = table.get("summary") or [""] * files.num_rows(table)
        out = []
        for i in range(files.num_rows(table)):
            fields = {f: _text(table[f][i], source, f, i) for f in TLDR_OPENAI_FIELDS}
            summary = _text(summaries[i], source, "summary", i)
            out.append(Example(TLDR_PROMPT.format(**fields), " " + summary if summary else ""))
        return out
    present = ", ".join(repr(c) for c in table) or "none"
    raise DataError(
        f"{source} has fields {present}; task 'tldr' needs 'prompt' and 'completion' "
        "(trl-lib/tldr) or 'subreddit', 'title', 'post', 'summary' (OpenAI TL;DR jsonl)"
    )


def _text(value, source: str, field: str, row: int) -> str:
    """The text of a field, or a DataError naming the (1-based) row."""
    if value is None:
        raise DataError(f"{source}: row {row + 1} has no value for field {field!r}")
    if not isinstance(value, str):
        raise DataError(
            f"{source}: row {row + 1}: field {field!r} holds {type(value).__name__}, not text"
        )
    return value


def _source_name(task: str, path: str | None) -> str:
    return path or HUB_DEFAULTS.get(task, (task,))[0]


def _read_source(
    task: str, path: str | None, hub_data_dir: str | None
) -> dict[str, tuple[str, files.Table]]:
    """split -> (source label for messages, table)."""
    fmt = task if task in FILE_TASKS else None
    if path and os.path.isfile(path):
        return {"train": (path, files.read_table(path, fmt or _format_of(path)))}
    if path and os.path.isdir(path):
        if any((Path(path) / marker).exists() for marker in ("dataset_dict.json", "state.json")):
            return _read_saved_dataset(path)
        found = files.split_files(path, fmt)
        if not found:
            kinds = fmt or "/".join(files.FORMATS)
            raise DataError(
                f"folder {path} has no split files (looked for train.{kinds}, train-*.{kinds}, "
                f"test.*, validation.* there and in {path}/data)"
            )
        return {
            split: (
                ", ".join(map(str, paths)) if len(paths) < 3 else f"{paths[0].parent}/{split}-*",
                files.concat_tables([files.read_table(p, fmt or _format_of(p)) for p in paths]),
            )
            for split, paths in found.items()
        }
    if path and (path.startswith((".", "/", "~")) or files.file_format(path) or task in FILE_TASKS):
        raise DataError(f"data file {path} does not exist")
    name, data_dir = (path, hub_data_dir) if path else HUB_DEFAULTS[task]
    return _read_hub(name, hub_data_dir or data_dir)


def _format_of(path) -> str:
    fmt = files.file_format(path)
    if fmt is None:
        raise DataError(
            f"cannot tell the format of {path}: name it .jsonl, .json, .csv or .parquet"
        )
    return fmt


def _read_hub(name: str, data_dir: str | None) -> dict[str, tuple[str, files.Table]]:
    try:
        import datasets

        loaded = datasets.load_dataset(name, data_dir=data_dir)
    # offline, unknown name, gated: all end the same way for the user
    except Exception as e:  # noqa: BLE001
        raise DataError(
            f"could not load dataset {name!r} from the Hugging Face hub ({type(e).__name__}: "
            f"{files.first_line(e, 120)}); download it and pass a local file or folder with "
            f"--set data.path=PATH"
        ) from None
    return _dataset_dict_tables(name, loaded)


def _read_saved_dataset(path: str) -> dict[str, tuple[str, files.Table]]:
    import datasets

    try:
        loaded = datasets.load_from_disk(path)
    except Exception as e:  # noqa: BLE001 -- a damaged folder raises whatever layer read it
        raise DataError(
            f"{path} is not a readable saved dataset ({type(e).__name__}: "
            f"{files.first_line(e, 120)})"
        ) from None
    if isinstance(loaded, datasets.Dataset):
        loaded = {"train": loaded}
    return _dataset_dict_tables(path, loaded)


def _dataset_dict_tables(name: str, loaded) -> dict[str, tuple[str, files.Table]]:
    out = {}
    for split, ds in loaded.items():
        canonical = next((s for s, names in files.SPLIT_NAMES.items() if split in names), None)
        if canonical is not None:
            out[canonical] = (f"{name} [{split}]", ds.to_dict())
    return out
