"""Preference pairs: construction, Parquet storage (one shard per process), reward relabelling.

A pair is one distillation prompt with one teacher sample and one student sample. PLaD's
pseudo-preference says the teacher's is better (`chosen = "teacher"`); `relabel` lets a scorer
overturn that on a `real_ratio` share of pairs (the paper's real-preference extension).

Rows are plain dicts with these keys (`PAIR_SCHEMA` gives the Parquet types):

    prompt, reference        text; reference = the example's target, "" when it has none
    teacher, student         the sampled response texts
    chosen                   "teacher" | "student": which response is preferred
    teacher_ids, student_ids list<int32>: the tokens each model generated, in its own vocabulary
    teacher_logp, student_logp   float32 sequence log-prob under the sampler, or None
    score_teacher, score_student float32 scores from `relabel`'s scorer, or None when not scored
    relabelled               True when `relabel` scored the pair (whether or not it swapped)
    index                    int64 position of the prompt in the distillation split, or None:
                             `read_pairs` returns rows in this order, so the pairs are the same
                             list whatever number of processes sampled them

Teacher and student may use different tokenizers, so training never uses `teacher_ids`: the
student re-tokenizes the texts (`preference_texts`). The ids and log-probs are kept for analysis
and for methods that share one vocabulary.

Storage: `<stage dir>/pairs-{process:05d}.parquet`, written whole to `<name>.tmp` and renamed, so
a reader never sees half a shard and a leftover `.tmp` from a killed run is ignored. Paths may be
local or `gs://` (via `etils.epath`).
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from etils import epath

from plad_jax.errors import PairsError  # noqa: F401 (re-exported)

PAIR_SCHEMA = pa.schema(
    [
        ("prompt", pa.string()),
        ("reference", pa.string()),
        ("teacher", pa.string()),
        ("student", pa.string()),
        ("chosen", pa.string()),
        ("teacher_ids", pa.list_(pa.int32())),
        ("student_ids", pa.list_(pa.int32())),
        ("teacher_logp", pa.float32()),
        ("student_logp", pa.float32()),
        ("score_teacher", pa.float32()),
        ("score_student", pa.float32()),
        ("relabelled", pa.bool_()),
        ("index", pa.int64()),
    ]
)
PAIR_COLUMNS = tuple(PAIR_SCHEMA.names)
REQUIRED = ("prompt", "teacher", "student")
DEFAULTS = {
    "reference": "",
    "chosen": "teacher",
    "teacher_ids": [],
    "student_ids": [],
    "teacher_logp": None,
    "student_logp": None,
    "score_teacher": None,
    "score_student": None,
    "relabelled": False,
    "index": None,
}
CHOICES = ("teacher", "student")
SHARD_PATTERN = re.compile(r"pairs-(\d{5})\.parquet")


def shard_name(process_index: int) -> str:
    return f"pairs-{process_index:05d}.parquet"


def build_pairs(
    prompts: Sequence[str],
    teacher: Sequence[str],
    student: Sequence[str],
    *,
    references: Sequence[str] | None = None,
    teacher_ids: Sequence[Sequence[int]] | None = None,
    student_ids: Sequence[Sequence[int]] | None = None,
    teacher_logp: Sequence[float] | None = None,
    student_logp: Sequence[float] | None = None,
) -> list[dict]:
    """Pseudo-preference rows (teacher chosen) from parallel columns; omitted columns take
    defaults."""
    n = len(prompts)
    columns = {
        "prompt": prompts,
        "teacher": teacher,
        "student": student,
        "reference": references,
        "teacher_ids": teacher_ids,
        "student_ids": student_ids,
        "teacher_logp": teacher_logp,
        "student_logp": student_logp,
    }
    for name, values in columns.items():
        if values is not None and len(values) != n:
            raise ValueError(f"build_pairs: {len(values)} {name} for {n} prompts")
    return [
        _complete({name: values[i] for name, values in columns.items() if values is not None})
        for i in range(n)
    ]


def _complete(row: dict) -> dict:
    """`row` with defaults filled in and values normalised to the stored types; bad keys are
    bugs."""
    unknown = set(row) - set(PAIR_COLUMNS)
    missing = [k for k in REQUIRED if k not in row]
    if unknown or missing:
        raise ValueError(f"pair row has unknown keys {sorted(unknown)} / lacks {missing}")
    out = {**DEFAULTS, **row}
    if out["chosen"] not in CHOICES:
        raise ValueError(f"pair row has chosen={out['chosen']!r}, expected one of {CHOICES}")
    for key in ("teacher_ids", "student_ids"):
        out[key] = [int(t) for t in np.asarray(out[key]).reshape(-1)]
    for key in ("teacher_logp", "student_logp", "score_teacher", "score_student"):
        out[key] = None if out[key] is None else float(out[key])
    out["relabelled"] = bool(out["relabelled"])
    out["index"] = None if out["index"] is None else int(out["index"])
    return out


# -- storage -------------------------------------------------------------------------------------


def write_pairs(stage_dir, rows: Sequence[dict], process_index: int) -> epath.Path:
    """Write this process's rows as `stage_dir/pairs-{process_index:05d}.parquet`, atomically.

    Every process writes its own shard, also when it has no rows (an empty shard says "done,
    nothing here", which `read_pairs` tells apart from a missing one). A fresh sampling run
    should start from an empty directory: `read_pairs` reads every shard there, so shards left by
    an earlier run with more processes would be read too. Returns the shard path.
    """
    directory = epath.Path(stage_dir)
    directory.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist([_complete(dict(r)) for r in rows], schema=PAIR_SCHEMA)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    final = directory / shard_name(process_index)
    tmp = directory / (final.name + ".tmp")
    tmp.write_bytes(buffer.getvalue())
    tmp.replace(final)
    return final


def shard_paths(stage_dir) -> list[epath.Path]:
    """The shards in `stage_dir`, by process index; PairsError if there are none or one is
    missing."""
    directory = epath.Path(stage_dir)
    if not directory.is_dir():
        raise PairsError(f"pairs directory {directory} does not exist; run the sample stage first")
    found = {}
    for path in directory.iterdir():
        match = SHARD_PATTERN.fullmatch(path.name)
        if match:
            found[int(match.group(1))] = path
    if not found:
        raise PairsError(
            f"no pair shards (pairs-*.parquet) in {directory}; run the sample stage first"
        )
    for index in range(max(found) + 1):
        if index not in found:
            raise PairsError(
                f"pair shard {directory / shard_name(index)} is missing (shards up to "
                f"{shard_name(max(found))} exist); rerun the sample stage"
            )
    return [found[i] for i in sorted(found)]


def read_pairs(stage_dir) -> list[dict]:
    """All rows of all shards: by `index` when every row has one (the split's order, however many
    processes wrote the shards), else shard by shard in process order, rows in the order written."""
    rows = []
    for path in shard_paths(stage_dir):
        rows.extend(_read_shard(path))
    if rows and all(r["index"] is not None for r in rows):
        rows.sort(key=lambda r: r["index"])
    return rows


def _read_shard(path: epath.Path) -> list[dict]:
    try:
        table = pq.read_table(io.BytesIO(path.read_bytes()))
    except (OSError, pa.ArrowException) as e:
        raise PairsError(
            f"pair shard {path} cannot be read ({type(e).__name__}: "
            f"{' '.join(str(e).split())[:200]}); delete it and rerun the sample stage"
        ) from None
    if "index" not in table.column_names:  # shards written before the column existed
        table = table.append_column("index", pa.nulls(table.num_rows, pa.int64()))
    missing = [c for c in PAIR_COLUMNS if c not in table.column_names]
    if missing:
        raise PairsError(
            f"pair shard {path} lacks the columns {', '.join(missing)}; it was not written by "
            f"plad_jax.data.pairs.write_pairs, rerun the sample stage"
        )
    try:
        table = table.select(list(PAIR_COLUMNS)).cast(PAIR_SCHEMA)
    except (pa.ArrowException, ValueError) as e:
        raise PairsError(
            f"pair shard {path} has columns of the wrong type ({' '.join(str(e).split())[:200]}); "
            f"rerun the sample stage"
        ) from None
    return table.to_pylist()


# -- real-preference relabelling -----------------------------------------------------------------


def relabel(
    pairs: Sequence[dict], scorer, real_ratio: float, seed: int, *, population: int | None = None
) -> tuple[list[dict], dict]:
    """Score a `real_ratio` share of pairs with `scorer` and prefer the student where it scores
    higher.

    The share is `round(real_ratio * population)` pair positions drawn without replacement by
    `seed` from `range(population)` (the same pairs and seed pick the same rows). By default the
    population is these pairs and a pair's position is its place in `pairs`; a process holding
    only its shard of the pairs passes the total count as `population` and rows whose `index` is
    the position, so every process draws the same global choice. A scored pair gets `score_teacher`,
    `score_student`, `relabelled = True`, and `chosen = "student"` only when the student's score is
    strictly higher (a tie keeps the teacher, PLaD's default). Pairs without references are
    scored with `references=None`, so a scorer that needs them says so. The input is not modified.

    Returns `(rows, stats)` with stats `{"pairs", "scored", "swapped"}`.
    """
    if not 0 <= real_ratio <= 1:
        raise ValueError(f"real_ratio must be in [0, 1], got {real_ratio}")
    rows = [dict(p) for p in pairs]
    if population is None:
        population, positions = len(rows), range(len(rows))
    else:
        positions = [r["index"] for r in rows]
    drawn = set(
        np.random.default_rng(seed)
        .choice(population, size=round(real_ratio * population), replace=False)
        .tolist()
    )
    picked = [i for i, position in enumerate(positions) if position in drawn]
    count = len(picked)
    stats = {"pairs": len(rows), "scored": count, "swapped": 0}
    if count == 0:
        return rows, stats
    chosen_rows = [rows[i] for i in picked]
    prompts = [r["prompt"] for r in chosen_rows]
    references = [r.get("reference") or "" for r in chosen_rows]
    references = references if any(references) else None
    # One call with both sides, so a batched scorer fills its batches.
    scores = np.asarray(
        scorer.score(
            prompts + prompts,
            [r["teacher"] for r in chosen_rows] + [r["student"] for r in chosen_rows],
            None if references is None else references + references,
        ),
        np.float64,
    )
    if scores.shape != (2 * count,):
        raise ValueError(f"scorer returned {scores.shape} scores for {2 * count} responses")
    for row, s_teacher, s_student in zip(chosen_rows, scores[:count], scores[count:]):
        row.update(
            score_teacher=float(s_teacher),
            score_student=float(s_student),
            relabelled=True,
            chosen="student" if s_student > s_teacher else "teacher",
        )
        stats["swapped"] += int(row["chosen"] == "student")
    return rows, stats


def preference_texts(pairs: Sequence[dict]) -> tuple[list[str], list[str], list[str]]:
    """`(prompts, chosen texts, rejected texts)` for the student to tokenize with its own
    tokenizer."""
    prompts, chosen, rejected = [], [], []
    for p in pairs:
        if p["chosen"] not in CHOICES:
            raise ValueError(f"pair has chosen={p['chosen']!r}, expected one of {CHOICES}")
        teacher_first = p["chosen"] == "teacher"
        prompts.append(p["prompt"])
        chosen.append(p["teacher"] if teacher_first else p["student"])
        rejected.append(p["student"] if teacher_first else p["teacher"])
    return prompts, chosen, rejected
