"""bench/efficacy.py --quick: its methods (one per kind of machinery) on both tasks run end to end
and its numbers are sane (finite, in range, teacher and initial student rows present); not that any
method wins. Also the extraction task's exact reward and the `python` scorer hook that plugs it into
the pipeline."""

from __future__ import annotations

import csv
import json
import math
import os
import random
import time

import pytest

from bench import efficacy, extraction
from plad_jax.config import ConfigError, resolve
from plad_jax.scoring import rewards


def test_field_f1_is_exact():
    gold = " job: baker; age: 41"
    assert extraction.field_f1(" age: 41; job: baker", gold) == 1.0  # order does not matter
    assert extraction.field_f1(" JOB: Baker ;age:41", gold) == 1.0  # nor case and spaces
    assert extraction.field_f1(" job: baker", gold) == pytest.approx(2 / 3)  # P 1, R 1/2
    assert extraction.field_f1(" job: baker; age: 42; city: Oslo", gold) == pytest.approx(
        2 * (1 / 3) * 0.5 / (1 / 3 + 0.5)
    )
    assert extraction.field_f1("baker 41", gold) == 0.0 and extraction.field_f1("", gold) == 0.0


def test_examples_answer_from_the_record():
    for row in extraction.make_examples(50, seed=3):
        record, question = row["prompt"].split("\nQUESTION: give the ")
        fields = extraction.parse_fields(row["response"])
        name = question.split(" of ")[1].split(".")[0]
        assert list(fields) == question.split(" of ")[0].split(" and ")
        for value in fields.values():  # the gold value is stated in a sentence about that person
            assert any(name in s and value.lower() in s.lower() for s in record.split(". "))
    assert extraction.make_examples(5, seed=1) == extraction.make_examples(5, seed=1)
    assert extraction.make_example(random.Random(0)) != extraction.make_example(random.Random(1))


def test_python_scorer_from_the_config():
    scorer = rewards.make_scorer("python", "bench.extraction:FieldF1Scorer")
    assert scorer.name == "field_f1" and rewards.is_reference_based(scorer)
    assert list(
        scorer.score(["p", "p"], [" a: 1; b: 2", " a: 1"], [" a: 1; b: 2"] * 2)
    ) == pytest.approx([1.0, 2 / 3])
    for spec in (
        "bench.extraction",
        "bench.nothing_here:X",
        "bench.extraction:NoSuchScorer",
        "bench.extraction:NAMES",
    ):
        with pytest.raises(rewards.UserError):
            rewards.make_scorer("python", spec)
    config = resolve(
        "demo", ["eval.scorer=python", "eval.reward_model=bench.extraction:FieldF1Scorer"]
    )
    assert config.eval.scorer == "python"
    with pytest.raises(ConfigError, match="eval.reward_model"):
        resolve("demo", ["eval.scorer=python", "eval.reward_model="])


@pytest.mark.slow
def test_quick_benchmark_runs_every_method_with_sane_numbers(tmp_path, capsys):
    start = time.process_time()
    assert efficacy.main(["--quick", "--out", str(tmp_path)]) == 0
    cpu_seconds = time.process_time() - start
    printed = capsys.readouterr().out
    assert "method efficacy (quick)" in printed and "teacher" in printed
    with open(tmp_path / "summary.csv", encoding="utf-8") as f:
        summary = list(csv.DictReader(f))
    for task in ("extraction", "demo"):
        rows = {r["method"]: r for r in summary if r["task"] == task}
        assert set(rows) == {"teacher", "initial student", *efficacy.QUICK_METHODS[task]}, task
        teacher, student = (
            float(rows["teacher"]["reward"]),
            float(rows["initial student"]["reward"]),
        )
        for method, r in rows.items():
            for key in ("wr_ref", "reward", "rouge1", "rouge2", "rougeL"):
                assert 0.0 <= float(r[key]) <= 1.0, (task, method, key, r[key])
            assert math.isfinite(float(r["length"])) and float(r["length"]) >= 0
            if method != "teacher":
                assert 0.0 <= float(r["ts_wr"]) <= 1.0, (task, method, r["ts_wr"])
            if teacher != student:
                assert math.isfinite(float(r["gap_closed"])), (task, method)
        assert (
            float(rows["teacher"]["gap_closed"] or 1.0) == pytest.approx(1.0) or teacher == student
        )
    with open(tmp_path / "efficacy.csv", encoding="utf-8") as f:
        per_seed = list(csv.DictReader(f))
    assert len(per_seed) == sum(
        2 + len(m) for m in efficacy.QUICK_METHODS.values()
    )  # teacher, initial, methods; 1 seed
    assert os.path.getsize(tmp_path / "efficacy.png") > 1000
    # Its budget, as CPU time (all threads) so that other jobs on a shared runner do not count:
    # under 5 minutes of CPU means under 5 minutes of wall time on 2 cores of its own. Measured: ~2
    # min CPU.
    assert cpu_seconds < 300, f"--quick used {cpu_seconds:.0f} s of CPU, over its 5 minute budget"


def _rows(rewards_by_method):
    """efficacy.csv-like rows: one task, the given per-seed rewards for each method."""
    rows = []
    for method, per_seed in rewards_by_method.items():
        for seed, reward in enumerate(per_seed):
            rows.append(
                {
                    "task": "t",
                    "seed": seed,
                    "method": method,
                    "wr_ref": 0.0,
                    "reward": reward,
                    "ts_wr": 0.5,
                    "rouge1": 0.0,
                    "rouge2": 0.0,
                    "rougeL": 0.0,
                    "length": 1.0,
                    "seconds": 0.0,
                }
            )
    return rows


def test_summary_gap_noise_and_reproduction_check(tmp_path):
    first = efficacy.summarise(
        _rows(
            {
                "teacher": [0.8] * 3,
                "initial student": [0.2, 0.3, 0.25],
                "up": [0.5, 0.6, 0.55],
                "flat": [0.1, 0.4, 0.25],
            }
        )
    )
    by = {s["method"]: s for s in first}
    # gap closed is taken per seed, then averaged
    assert by["up"]["gap_closed"] == pytest.approx((0.3 / 0.6 + 0.3 / 0.5 + 0.3 / 0.55) / 3)
    assert by["up"]["gain"] == pytest.approx(0.3) and by["teacher"]["gap_closed"] == pytest.approx(
        1.0
    )
    assert by["up"]["beyond_noise"] == "yes (+)" and by["flat"]["beyond_noise"] == "no"
    efficacy.write_csv(tmp_path / "summary.csv", first)
    second = efficacy.summarise(
        _rows(
            {
                "teacher": [0.8] * 3,
                "initial student": [0.25] * 3,
                "up": [0.56, 0.56, 0.56],
                "flat": [0.9, 0.9, 0.9],
            }
        )
    )
    text = efficacy.compare(second, tmp_path / "summary.csv")
    lines = {line.split()[1]: line for line in text.splitlines()[2:-1]}
    assert lines["up"].split()[4] == "yes" and lines["flat"].split()[4] == "no"
    # in: 4 rewards (teacher, initial student, up, flat) + 2 gaps (up, flat); within: all but flat's
    # two
    assert text.splitlines()[-1].startswith("4 of 6 means")


def test_sampling_memo_answers_repeats_and_only_repeats(monkeypatch):
    """The bench's memo of `Context.sample_responses` and `Context.loglikelihood`: the same call
    (whatever its progress label) is answered from memory; another seed, prompt, text, setting or
    weight is computed again."""
    import types

    import numpy as np

    from plad_jax.config import Config
    from plad_jax.pipeline.context import Context

    calls = []
    monkeypatch.setattr(
        Context, "sample_responses", lambda ctx, lm, role, prompts, **kw: calls.append(kw) or kw
    )
    monkeypatch.setattr(
        Context,
        "loglikelihood",
        lambda ctx, lm, role, prompts, texts: calls.append((prompts, texts)) or np.zeros(1),
    )
    tok = types.SimpleNamespace(get_vocab=lambda: {"a": 0, "b": 1})
    ctx = types.SimpleNamespace(config=Config(), tokenizer=lambda role: tok)
    lm = types.SimpleNamespace(params={"w": np.zeros(3, np.float32)})
    other = types.SimpleNamespace(params={"w": np.ones(3, np.float32)})
    with efficacy.SamplingMemo() as memo:
        sample = lambda model, prompts=("p",), **kw: Context.sample_responses(
            ctx, model, "student", list(prompts), **{"seed": 0, "sample_ids": [0], **kw}
        )
        first = sample(lm, desc="eval")
        assert sample(lm, desc="validation") is first  # the label is not part of the call
        sample(lm, seed=1)
        sample(lm, prompts=("q",))
        sample(lm, num_samples=2)
        sample(other)
        likelihood = lambda model, texts=("a",): Context.loglikelihood(
            ctx, model, "student", ["p"], list(texts)
        )
        scores = likelihood(lm)
        assert likelihood(lm) is scores
        likelihood(lm, texts=("b",))
        likelihood(other)
    assert (memo.hits, memo.misses, len(calls)) == (2, 8, 8)
    assert len([c for c in calls if isinstance(c, tuple)]) == 3  # the likelihood calls


@pytest.mark.slow
def test_real_track_quick_selects_on_validation_and_resumes_from_its_ledger(tmp_path, capsys):
    """`--track real --quick` (a random GGUF teacher and a student cut from it): each method's
    learning rate is chosen on validation before any test evaluation of it, only the chosen point
    is tested, the table carries the chosen setting and calibration; a restart measures nothing
    the ledger holds, and a row lost to a kill is measured again to the same numbers."""
    from bench import efficacy_real

    out = tmp_path / "real"
    argv = ["--track", "real", "--quick", "--tasks", "extraction", "--out", str(out)]
    assert efficacy.main(argv) == 0
    ledger = out / "ledger.jsonl"
    lines = ledger.read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    grid = len(efficacy_real.GRID)
    for method in efficacy_real.QUICK_REAL_METHODS:
        mine = [r for r in rows if r["key"]["method"] == method]
        splits = [r["key"]["split"] for r in mine]
        assert splits == ["validation"] * grid + ["test"]  # selection first, then test only
        rewards = [r["models"]["distilled student"]["reward"] for r in mine[:grid]]
        chosen = max(range(grid), key=lambda i: (rewards[i], -i))
        assert mine[-1]["key"]["point"] == chosen
        assert mine[-1]["setting"] == efficacy_real.describe(method, chosen)
    with open(out / "summary.csv", encoding="utf-8") as f:
        summary = {r["method"]: r for r in csv.DictReader(f)}
    assert set(summary) == {"teacher", "initial student", *efficacy_real.QUICK_REAL_METHODS}
    for s in summary.values():
        assert 0 <= float(s["reward"]) <= 1 and s["cal_gain"] != ""
    assert summary["kd"]["chosen"].startswith("kd_temperature=1.0 lr=")

    ledger.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:40])  # killed mid-write
    before = (out / "summary.csv").read_text()
    assert efficacy.main(argv) == 0
    again = [json.loads(line) for line in ledger.read_text().splitlines()[len(lines) - 1 :]]
    assert [r["key"] for r in again] == [rows[-1]["key"]]  # only the lost row is measured
    assert again[0]["models"] == {
        name: {**m, "seconds": again[0]["seconds"]} for name, m in rows[-1]["models"].items()
    }
    assert (out / "summary.csv").read_text() == before
    assert all(r["host"] == efficacy_real.host() for r in rows)

    # A resume whose shared SFT models differ from the rows' (another CPU trained them): one
    # line, exit 2, the ledger untouched and the missing row not measured against other models.
    record = json.loads((out / "shared.json").read_text())
    (name,) = record
    assert record[name]["host"] == efficacy_real.host()
    record[name]["digest"] = "0" * 16
    (out / "shared.json").write_text(json.dumps(record))
    kept = "\n".join(ledger.read_text().splitlines()[:-1]) + "\n"
    ledger.write_text(kept)
    capsys.readouterr()
    assert efficacy.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("efficacy: error: ") and "\n" not in err
    assert "0000000000000000" in err and "ledger.jsonl" in err
    assert ledger.read_text() == kept


def test_shared_models_digest_and_check(tmp_path):
    """`shared.json` records the shared SFT models a task's rows are measured with; the same
    models pass, other models raise while the ledger holds rows of the task and are recorded
    once it holds none; the digest changes with any byte of the weights."""
    from bench import efficacy_real as real

    run = tmp_path / "shared"
    for stage in ("sft_teacher", "sft_student"):
        (run / stage / "params").mkdir(parents=True)
        (run / stage / "params" / "model.safetensors").write_bytes(b"weights " + stage.encode())
    digest = real.models_digest(str(run))
    (run / "sft_student" / "params" / "model.safetensors").write_bytes(b"weights sft_studenT")
    other = real.models_digest(str(run))
    assert digest != other and len(digest) == 16

    out = tmp_path / "out"
    out.mkdir()
    ledger = real.Ledger(str(out / "ledger.jsonl"))
    real.check_shared_models(str(out), "extraction-x", "extraction", digest, ledger)
    record = json.loads((out / "shared.json").read_text())
    assert record == {"extraction-x": {"digest": digest, "host": real.host()}}
    key = dict(task="extraction", seed=0, method="sft", point=0, split="test")
    ledger.add(key, "cfg", {"m": 1}, "lr=1", 1.0)
    real.check_shared_models(str(out), "extraction-x", "extraction", digest, ledger)  # same: ok
    with pytest.raises(real.SharedModelsError, match=f"{digest}.*{other}"):
        real.check_shared_models(str(out), "extraction-x", "extraction", other, ledger)
    assert json.loads((out / "shared.json").read_text()) == record  # left as it was
    real.check_shared_models(str(out), "demo-x", "demo", other, ledger)  # no demo rows: recorded
    assert json.loads((out / "shared.json").read_text())["demo-x"]["digest"] == other
    (out / "shared.json").write_text("{not json")
    with pytest.raises(real.SharedModelsError, match="not valid JSON"):
        real.check_shared_models(str(out), "demo-x", "demo", other, ledger)


def test_real_ledger_uses_only_rows_of_its_own_configuration(tmp_path):
    """A ledger row is reused only under the fingerprint (sizes, a method's settings) it was
    measured with; rows of another configuration stay in the file, unused."""
    import dataclasses

    from bench import efficacy_real as real

    path = str(tmp_path / "ledger.jsonl")
    key = dict(task="extraction", seed=0, method="sft", point=0, split="validation")
    size = real.QUICK_REAL
    ours = real.fingerprint(size, real.grid_point("sft", 0))
    other = real.fingerprint(dataclasses.replace(size, d0=size.d0 + 1), real.grid_point("sft", 0))
    assert ours != other and ours != real.fingerprint(size, real.grid_point("sft", 1))
    real.Ledger(path).add(key, other, {"m": 1}, "lr=1", 1.0)
    ledger = real.Ledger(path)
    assert ledger.get(ours, **key) is None and ledger.get(other, **key)["models"] == {"m": 1}
    ledger.add(key, ours, {"m": 2}, "lr=1", 1.0)
    again = real.Ledger(path)
    assert again.get(ours, **key)["models"] == {"m": 2}
    assert again.get(other, **key)["models"] == {"m": 1}
