"""Pair shards: round trip over two processes, atomic writes, clear errors, seeded relabelling."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from plad_jax.data.pairs import (
    PAIR_COLUMNS,
    PairsError,
    build_pairs,
    preference_texts,
    read_pairs,
    relabel,
    write_pairs,
)


def _rows(process, n):
    """Rows with every field set, the optional ones varied (empty reference, None log-probs)."""
    rows = []
    for i in range(n):
        rows.append(
            {
                "prompt": f"p{process}-{i} prompt ünïcode",
                "reference": "" if i % 2 else f"ref {i}",
                "teacher": f"teacher says {i}",
                "student": f"student says {i}",
                "chosen": "teacher",
                "teacher_ids": list(range(i + 1)),
                "student_ids": [7] * (i % 3),
                "teacher_logp": None if i == 1 else -1.25 * i,
                "student_logp": -0.5 - i,
                "score_teacher": None,
                "score_student": None,
                "relabelled": False,
                "index": None,
            }
        )
    return rows


def test_round_trip_two_shards_in_process_order(tmp_path):
    rows0, rows1 = _rows(0, 3), _rows(1, 2)
    write_pairs(
        tmp_path, rows1, process_index=1
    )  # written out of order: reading is by process index
    write_pairs(tmp_path, rows0, process_index=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "pairs-00000.parquet",
        "pairs-00001.parquet",
    ]
    assert read_pairs(tmp_path) == rows0 + rows1  # all values here are exact in float32

    schema = pq.read_schema(tmp_path / "pairs-00000.parquet")
    assert tuple(schema.names) == PAIR_COLUMNS
    assert schema.field("teacher_ids").type.value_type == pa.int32()
    assert (
        schema.field("teacher_logp").type == pa.float32()
        and schema.field("relabelled").type == pa.bool_()
    )


def test_rows_with_an_index_read_back_in_split_order_whatever_the_shards(tmp_path):
    rows = [{**r, "index": i} for i, r in enumerate(_rows(0, 5))]
    write_pairs(tmp_path / "one", rows, 0)
    write_pairs(tmp_path / "two", rows[0::2], 0)  # two processes, every other prompt each
    write_pairs(tmp_path / "two", rows[1::2], 1)
    assert read_pairs(tmp_path / "one") == read_pairs(tmp_path / "two") == rows


def test_shards_without_the_index_column_still_read(tmp_path):
    rows = _rows(0, 2)
    table = pa.Table.from_pylist([{k: v for k, v in r.items() if k != "index"} for r in rows])
    pq.write_table(table, tmp_path / "pairs-00000.parquet")
    assert read_pairs(tmp_path) == rows


def test_defaults_and_float32_storage(tmp_path):
    pairs = build_pairs(["p"], ["t"], ["s"], teacher_logp=[-0.1])
    write_pairs(tmp_path, pairs, 0)
    (row,) = read_pairs(tmp_path)
    assert row["reference"] == "" and row["chosen"] == "teacher" and row["teacher_ids"] == []
    assert row["student_logp"] is None and row["relabelled"] is False
    assert row["teacher_logp"] == float(np.float32(-0.1))
    with pytest.raises(ValueError, match="unknown keys"):
        write_pairs(tmp_path, [{**pairs[0], "score": 1.0}], 0)


def test_leftover_tmp_is_ignored_and_rewrite_replaces(tmp_path):
    write_pairs(tmp_path, _rows(0, 2), 0)
    (tmp_path / "pairs-00001.parquet.tmp").write_bytes(b"half a shard from a killed process")
    assert len(read_pairs(tmp_path)) == 2
    write_pairs(tmp_path, _rows(0, 1), 0)  # a rerun replaces the shard whole
    assert len(read_pairs(tmp_path)) == 1
    assert not (tmp_path / "pairs-00000.parquet.tmp").exists()


def test_empty_shard_is_not_missing(tmp_path):
    write_pairs(tmp_path, [], 0)
    write_pairs(tmp_path, _rows(1, 1), 1)
    assert len(read_pairs(tmp_path)) == 1


def test_corrupt_missing_and_absent_shards_name_the_file(tmp_path):
    with pytest.raises(PairsError, match="no pair shards"):
        read_pairs(tmp_path)
    with pytest.raises(PairsError, match="does not exist"):
        read_pairs(tmp_path / "nowhere")
    write_pairs(tmp_path, _rows(0, 1), 0)
    write_pairs(tmp_path, _rows(2, 1), 2)
    with pytest.raises(PairsError, match="pairs-00001.parquet is missing"):
        read_pairs(tmp_path)
    (tmp_path / "pairs-00001.parquet").write_bytes(b"not parquet")
    with pytest.raises(PairsError) as info:
        read_pairs(tmp_path)
    assert str(tmp_path / "pairs-00001.parquet") in str(info.value) and "\n" not in str(info.value)


class StubScorer:
    """Score = the number written at the end of the response; records what it was asked."""

    name = "stub"

    def __init__(self):
        self.calls = []

    def score(self, prompts, responses, references=None):
        self.calls.append((list(prompts), list(responses), references))
        return np.array([float(r.split()[-1]) for r in responses])


def _scored_pairs(n):
    # Pair i: teacher scores 10, student scores i -> the student wins for i > 10, ties at i == 10.
    return build_pairs(
        [f"x{i}" for i in range(n)],
        ["t 10"] * n,
        [f"s {i}" for i in range(n)],
        references=[f"r{i}" for i in range(n)],
    )


def test_relabel_ratio_zero_scores_nothing():
    scorer = StubScorer()
    rows, stats = relabel(_scored_pairs(6), scorer, real_ratio=0.0, seed=0)
    assert stats == {"pairs": 6, "scored": 0, "swapped": 0} and scorer.calls == []
    assert all(
        r["chosen"] == "teacher" and not r["relabelled"] and r["score_teacher"] is None
        for r in rows
    )


def test_relabel_ratio_one_swaps_exactly_where_the_student_wins():
    pairs = _scored_pairs(14)
    rows, stats = relabel(pairs, StubScorer(), real_ratio=1.0, seed=3)
    assert stats == {
        "pairs": 14,
        "scored": 14,
        "swapped": 3,
    }  # students 11, 12, 13 beat 10; 10 ties
    assert [r["chosen"] for r in rows] == ["teacher"] * 11 + ["student"] * 3
    assert all(r["relabelled"] for r in rows)
    assert [r["score_student"] for r in rows] == list(range(14)) and {
        r["score_teacher"] for r in rows
    } == {10}
    assert all(p["chosen"] == "teacher" and not p["relabelled"] for p in pairs)  # input left alone


def test_relabel_share_is_seeded():
    pairs = _scored_pairs(40)
    rows_a, stats_a = relabel(pairs, StubScorer(), real_ratio=0.25, seed=7)
    rows_b, _ = relabel(pairs, StubScorer(), real_ratio=0.25, seed=7)
    rows_c, _ = relabel(pairs, StubScorer(), real_ratio=0.25, seed=8)
    picked = [i for i, r in enumerate(rows_a) if r["relabelled"]]
    assert stats_a["scored"] == len(picked) == 10
    assert picked == [i for i, r in enumerate(rows_b) if r["relabelled"]]
    assert picked != [i for i, r in enumerate(rows_c) if r["relabelled"]]
    assert stats_a["swapped"] == sum(i > 10 for i in picked)
    assert all(
        (r["chosen"] == "student") == (r["relabelled"] and i > 10) for i, r in enumerate(rows_a)
    )


def test_relabel_over_process_shards_picks_the_same_pairs_as_one_process():
    pairs = [{**p, "index": i} for i, p in enumerate(_scored_pairs(40))]
    whole, _ = relabel(pairs, StubScorer(), real_ratio=0.3, seed=3)
    shards = [
        relabel(pairs[k::3], StubScorer(), real_ratio=0.3, seed=3, population=40)[0]
        for k in range(3)
    ]
    merged = sorted((r for shard in shards for r in shard), key=lambda r: r["index"])
    assert merged == whole
    assert sum(r["relabelled"] for r in merged) == 12


def test_relabel_passes_references_and_prompts():
    scorer = StubScorer()
    relabel(_scored_pairs(2), scorer, real_ratio=1.0, seed=0)
    ((prompts, responses, references),) = scorer.calls
    assert prompts == ["x0", "x1", "x0", "x1"] and responses == ["t 10", "t 10", "s 0", "s 1"]
    assert references == ["r0", "r1", "r0", "r1"]
    scorer = StubScorer()
    relabel(build_pairs(["x"], ["t 1"], ["s 2"]), scorer, real_ratio=1.0, seed=0)
    assert scorer.calls[0][2] is None  # pairs without references: the scorer is told so


def test_preference_texts_follow_chosen():
    pairs = build_pairs(["a", "b"], ["ta", "tb"], ["sa", "sb"])
    pairs[1]["chosen"] = "student"
    assert preference_texts(pairs) == (["a", "b"], ["ta", "sb"], ["sa", "tb"])
