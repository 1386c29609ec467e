"""PbKD's preference set, round by round: prompt chunks, fresh student samples, labels, storage,
batches.

Offline PbKD (and `pbkd_mm`, `pbkd_cheap`) has one round whose set is every given pair row. Online
PbKD cuts the rows into T contiguous chunks: round 0 keeps chunk 0's stored student samples (the
initial student drew them), round t >= 1 replaces chunk t's student samples by fresh ones from the
current student and labels them against the chunk's teacher samples; the set of round t is chunks
0..t. Labels come from the scorer, or are the stored / pseudo labels (teacher preferred) without
one (`plad_jax.data.preferences`).

Each round's labelled rows are written once to `<workdir>/rounds/round-<t>/pairs-00000.parquet`
(`pairs.write_pairs`, atomic) and read back on resume, so a restarted run trains on exactly the
samples and labels it had, without sampling or scoring again.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np

from plad_jax import data
from plad_jax.data import pairs, preferences
from plad_jax.generation import sampler


@dataclasses.dataclass(frozen=True)
class Encoding:
    """A preference set in the student's tokens, rows aligned: prompt + teacher sample, chosen,
    rejected."""

    teacher: data.EncodedExamples
    chosen: data.EncodedExamples
    rejected: data.EncodedExamples

    def __len__(self) -> int:
        return len(self.teacher)


def chunk_bounds(num_rows: int, rounds: int) -> list[tuple[int, int]]:
    """`[begin, end)` of each round's chunk of rows: contiguous, sizes differing by at most one."""
    edges = np.linspace(0, num_rows, rounds + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def round_sizes(num_rows: int, rounds: int) -> list[int]:
    """Size of the preference set in each round (it grows by one chunk per round)."""
    return [end for _, end in chunk_bounds(num_rows, rounds)]


def round_dir(workdir: str, round_: int) -> str:
    return os.path.join(workdir, "rounds", f"round-{round_}")


def fresh_student_rows(
    rows,
    student,
    tokenizer,
    *,
    max_new_tokens: int,
    temperature: float,
    batch_size: int,
    max_prompt_tokens: int,
    seed: int,
) -> list[dict]:
    """`rows` with their student samples replaced by new ones from `student` (labels reset to
    teacher)."""
    texts = sampler.generate_text(
        student,
        tokenizer,
        [r["prompt"] for r in rows],
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        max_prompt_tokens=max_prompt_tokens,
        temperature=temperature,
        seed=seed,
        progress=False,
    )
    return [
        {
            **r,
            "student": t,
            "chosen": "teacher",
            "student_ids": [],
            "student_logp": None,
            "score_teacher": None,
            "score_student": None,
            "relabelled": False,
        }
        for r, t in zip(rows, texts)
    ]


def round_rows(workdir: str, round_: int, make_rows, scorer, seed: int) -> tuple[list[dict], dict]:
    """The labelled rows of round `round_`'s chunk: read if stored, else `make_rows()`, labelled,
    stored.

    Returns `(rows, stats)`; stats (`pairs`, `swapped`, ...) are recounted when read back.
    """
    directory = round_dir(workdir, round_)
    try:
        rows = pairs.read_pairs(directory)
        return rows, {
            "pairs": len(rows),
            "swapped": sum(r["chosen"] == "student" for r in rows),
            "resumed": True,
        }
    except pairs.PairsError:
        pass
    rows, stats = preferences.label_pairs(make_rows(), scorer, seed=seed + round_)
    if jax.process_index() == 0:  # every process holds the same rows; one writes them
        pairs.write_pairs(directory, rows, 0)
    return rows, stats


def encode(tokenizer, rows, max_prompt_tokens: int, max_response_tokens: int) -> Encoding:
    """The student-token encoding of a labelled preference set."""
    teacher = data.encode_texts(
        tokenizer,
        [r["prompt"] for r in rows],
        [r["teacher"] for r in rows],
        max_prompt_tokens,
        max_response_tokens,
    )
    chosen, rejected = preferences.encode_preferences(
        tokenizer, preferences.preference_rows(rows), max_prompt_tokens, max_response_tokens
    )
    return Encoding(teacher, chosen, rejected)


def make_batch(encoding: Encoding, rows) -> data.GameBatch:
    """Host `GameBatch` of the prompts, teacher samples (`response_*`) and preference pair of `rows`
    (the game adds the student samples; `pbkd_cheap` reads it as the `PairBatch` it is)."""
    parts = {"response": encoding.teacher, "chosen": encoding.chosen, "rejected": encoding.rejected}
    made = {name: data.make_batch(encoded, rows) for name, encoded in parts.items()}
    return data.join_parts(made, data.GameBatch)
