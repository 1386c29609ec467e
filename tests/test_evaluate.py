"""Evaluation metrics on hand-made texts with a stub scorer (exact numbers), and the report
files."""

import json
import re
from collections import Counter

import numpy as np
import pytest

from plad_jax.scoring.evaluate import (
    BUCKETS,
    evaluate_responses,
    length_bucket,
    teacher_student_win_rate,
    write_report,
)
from plad_jax.scoring.rewards import RougeScorer


class GoodCounter:
    """Score = how often the response says "good"; judges answers, not closeness to a reference."""

    name = "good-counter"

    def score(self, prompts, responses, references=None):
        assert len(prompts) == len(responses)
        return np.array([r.split().count("good") for r in responses], np.float64)


def _words(n, first=""):
    return " ".join(([first] if first else []) + ["aa"] * (n - bool(first)))


PROMPTS = ["q0", "q1", "q2", "q3"]
REFERENCES = ["good", "good good", "cc dd", "bad"]  # scores 1, 2, 0, 0
RESPONSES = {
    # scores 2, 1, 0, 1 vs 1, 2, 0, 0 -> win, loss, tie, win; lengths 2, 15, 0, 45 words
    "A": ["good good", _words(15, "good"), "", _words(45, "good")],
    # scores 0, 3, 1, 1 -> loss, win, win, win; lengths 1, 3, 1, 1
    "B": ["bad", "good good good", "good", "good"],
}


def test_length_buckets_edges():
    assert [length_bucket(w) for w in (0, 1, 10, 11, 20, 21, 30, 31, 40, 41, 500)] == [
        "(0,10]",
        "(0,10]",
        "(0,10]",
        "(10,20]",
        "(10,20]",
        "(20,30]",
        "(20,30]",
        "(30,40]",
        "(30,40]",
        ">40",
        ">40",
    ]


def test_win_rates_lengths_and_buckets_are_exact():
    metrics = evaluate_responses(PROMPTS, RESPONSES, REFERENCES, GoodCounter(), teacher="A")
    a, b = metrics["models"]["A"], metrics["models"]["B"]
    assert (
        metrics["n"] == 4
        and metrics["scorer"] == "good-counter"
        and metrics["buckets"] == list(BUCKETS)
    )
    assert a["win_rate"] == (1 + 0 + 0.5 + 1) / 4 and b["win_rate"] == 3 / 4
    assert a["mean_length"] == (2 + 15 + 0 + 45) / 4 and b["mean_length"] == 6 / 4
    assert a["mean_score"] == 1.0 and b["mean_score"] == 5 / 4
    # T-S WR of B against teacher A: A's 2, 1, 0, 1 vs B's 0, 3, 1, 1 -> 1, 0, 0, 1/2
    assert a["ts_win_rate"] is None and b["ts_win_rate"] == 1.5 / 4
    assert a["length_buckets"] == {
        "(0,10]": {"n": 2, "win_rate": 0.75, "mean_score": 1.0},
        "(10,20]": {"n": 1, "win_rate": 0.0, "mean_score": 1.0},
        "(20,30]": {"n": 0, "win_rate": None, "mean_score": None},
        "(30,40]": {"n": 0, "win_rate": None, "mean_score": None},
        ">40": {"n": 1, "win_rate": 1.0, "mean_score": 1.0},
    }
    assert b["length_buckets"]["(0,10]"] == {"n": 4, "win_rate": 0.75, "mean_score": 1.25}
    assert all(b["length_buckets"][k]["n"] == 0 for k in BUCKETS[1:])


def _ngrams(text, n):
    tokens = re.findall(r"[a-z0-9]+", text.lower())
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)), tokens


def _rouge_n(prediction, reference, n):
    pred, _ = _ngrams(prediction, n)
    ref, _ = _ngrams(reference, n)
    overlap = sum((pred & ref).values())
    if overlap == 0:
        return 0.0
    p, r = overlap / sum(pred.values()), overlap / sum(ref.values())
    return 2 * p * r / (p + r)


def _rouge_l(prediction, reference):
    _, a = _ngrams(prediction, 1)
    _, b = _ngrams(reference, 1)
    table = np.zeros((len(a) + 1, len(b) + 1), int)
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1, j + 1] = (
                table[i, j] + 1 if x == y else max(table[i, j + 1], table[i + 1, j])
            )
    lcs = table[-1, -1]
    return 0.0 if lcs == 0 else 2 * lcs / (len(a) + len(b))  # F1 of P = lcs/|a|, R = lcs/|b|


def test_rouge_against_independent_ngram_counts():
    references = ["the cat sat on the mat", "a dog ran", "it was a red car", "so big"]
    responses = {"m": ["the cat is on the mat", "the dog ran off", "red car", "not it"]}
    m = evaluate_responses(PROMPTS, responses, references, GoodCounter())["models"]["m"]
    for key, fn in (
        ("rouge1", lambda p, r: _rouge_n(p, r, 1)),
        ("rouge2", lambda p, r: _rouge_n(p, r, 2)),
        ("rougeL", _rouge_l),
    ):
        expected = np.mean([fn(p, r) for p, r in zip(responses["m"], references)])
        assert m[key] == pytest.approx(expected, abs=1e-12), key
    assert m["rouge1"] == pytest.approx((5 / 6 + 4 / 7 + 4 / 7 + 0) / 4)


def test_reference_based_scorer_has_no_win_rate_vs_reference():
    references = ["the cat sat", "a dog ran", "it was red", "so big"]
    responses = {
        "t": ["the cat sat", "a dog", "red", "big so"],
        "s": ["a cat", "dog", "it was", "no"],
    }
    metrics = evaluate_responses(PROMPTS, responses, references, RougeScorer(), teacher="t")
    t, s = metrics["models"]["t"], metrics["models"]["s"]
    assert (
        metrics["reference_based"]
        and t["win_rate"] is None
        and t["length_buckets"]["(0,10]"]["win_rate"] is None
    )
    assert (
        t["mean_score"] == pytest.approx(t["rougeL"])
        and t["length_buckets"]["(0,10]"]["mean_score"] is not None
    )
    # rougeL t: 1, 0.8, 0.5, 0.5 ; s: 0.4, 0.5, 0.8, 0 -> teacher wins 3 of 4
    assert s["ts_win_rate"] == 0.75


def test_without_references():
    metrics = evaluate_responses(PROMPTS, RESPONSES, None, GoodCounter())
    a = metrics["models"]["A"]
    assert (
        a["win_rate"] is None
        and a["rouge1"] is None
        and a["mean_score"] == 1.0
        and a["ts_win_rate"] is None
    )
    metrics = evaluate_responses(PROMPTS, RESPONSES, None, RougeScorer())
    assert metrics["models"]["A"]["mean_score"] is None


def test_teacher_student_win_rate_and_length_checks():
    assert (
        teacher_student_win_rate(
            ["good", "x", "good good"], ["x", "good", "good good"], ["p"] * 3, GoodCounter()
        )
        == 0.5
    )
    with pytest.raises(ValueError, match="has 1 responses for 4 prompts"):
        evaluate_responses(PROMPTS, {"A": ["x"]}, None, GoodCounter())


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_write_report_files_and_images(tmp_path):
    import matplotlib.image

    metrics = evaluate_responses(PROMPTS, RESPONSES, REFERENCES, GoodCounter(), teacher="A")
    curves = {"sft_student": [(0, 3.0), (5, 2.0), (10, 1.5)], "distill": [(0, 1.0), (10, 0.6)]}
    written = write_report(tmp_path, metrics, curves, process_index=0)
    names = {
        "metrics.json",
        "report.md",
        "training_curves.png",
        "win_rate.png",
        "win_rate_by_length.png",
    }
    assert {p.name for p in written} == names == {p.name for p in tmp_path.iterdir()}

    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    report = (tmp_path / "report.md").read_text()
    assert (
        "| model | win rate vs ref | T-S WR | ROUGE-1 | ROUGE-2 | ROUGE-L | mean length (words) |"
        in report
    )
    assert "| A | 62.5 | n/a |" in report and "| B | 75.0 | 37.5 |" in report
    assert "| B | 75.0 (n=4) | n/a (n=0) |" in report
    for png in ("training_curves.png", "win_rate.png", "win_rate_by_length.png"):
        assert f"]({png})" in report
        assert (tmp_path / png).read_bytes()[:8] == PNG_MAGIC
        image = matplotlib.image.imread(tmp_path / png)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100 and image.std() > 0


def test_write_report_process_gate_and_no_curves(tmp_path):
    metrics = evaluate_responses(PROMPTS, RESPONSES, REFERENCES, RougeScorer())
    assert write_report(tmp_path / "other", metrics, None, process_index=1) == []
    assert not (tmp_path / "other").exists()
    write_report(tmp_path / "main", metrics, None)
    files = {p.name for p in (tmp_path / "main").iterdir()}
    assert files == {"metrics.json", "report.md", "win_rate.png", "win_rate_by_length.png"}
    report = (tmp_path / "main" / "report.md").read_text()
    assert "training_curves" not in report and "n/a (mean score" in report


# -- calibration (scoring.calibration) ---------------------------------------------------------


def test_calibration_by_hand_with_k_2_and_a_tied_likelihood():
    from plad_jax.scoring.calibration import calibration

    loglik = [[-1.0, -0.5], [-0.5, -1.0], [-0.7, -0.7]]
    reward = [[0.0, 1.0], [0.0, 1.0], [0.0, 1.0]]
    c = calibration(loglik, reward)
    # rows 1 and 2 rank perfectly right and wrong (+1, -1); row 3's likelihoods tie: left out
    assert c["spearman"] == 0.0 and c["spearman_prompts"] == 2
    # most likely: reward 1, reward 0, and the tie averages the two (0.5)
    assert c["best_of_k"] == pytest.approx(0.5) and c["random_of_k"] == pytest.approx(0.5)
    assert c["best_of_k_gain"] == pytest.approx(0.0) and (c["k"], c["prompts"]) == (2, 3)


def test_calibration_ties_take_average_ranks():
    from scipy.stats import spearmanr

    from plad_jax.scoring.calibration import calibration

    # likelihood ranks 4, 1, 2.5, 2.5; reward ranks 3, 1, 3, 3: centred (1.5, -1.5, 0, 0) and
    # (0.5, -1.5, 0.5, 0.5), so rho = 3 / sqrt(4.5 * 3) = sqrt(2/3)
    loglik, reward = [[3.0, 1.0, 2.0, 2.0]], [[1.0, 0.0, 1.0, 1.0]]
    c = calibration(loglik, reward)
    assert c["spearman"] == pytest.approx((2 / 3) ** 0.5)
    assert c["spearman"] == pytest.approx(spearmanr(loglik[0], reward[0]).statistic)
    assert c["best_of_k"] == 1.0 and c["best_of_k_gain"] == pytest.approx(0.25)


def test_calibration_constant_rewards_have_no_correlation_and_no_gain():
    from plad_jax.scoring.calibration import calibration

    c = calibration([[-1.0, -2.0, -3.0], [0.0, -1.0, -0.5]], [[0.3, 0.3, 0.3], [1.0, 1.0, 1.0]])
    assert c["spearman"] is None and c["spearman_prompts"] == 0
    assert c["best_of_k"] == pytest.approx(0.65) and c["best_of_k_gain"] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="K >= 2"):
        calibration([[0.0]], [[1.0]])


def test_report_carries_the_calibration_table(tmp_path):
    metrics = evaluate_responses(PROMPTS, RESPONSES, REFERENCES, GoodCounter(), teacher="A")
    metrics["calibration"] = {
        "k": 4,
        "temperature": 0.7,
        "models": {
            "A": dict(
                spearman=0.25,
                spearman_prompts=3,
                best_of_k=0.5,
                random_of_k=0.4,
                best_of_k_gain=0.1,
                k=4,
                prompts=4,
            ),
            "B": dict(
                spearman=None,
                spearman_prompts=0,
                best_of_k=0.2,
                random_of_k=0.2,
                best_of_k_gain=0.0,
                k=4,
                prompts=4,
            ),
        },
    }
    write_report(tmp_path, metrics, {}, process_index=0)
    report = (tmp_path / "report.md").read_text()
    assert "| model | Spearman | n | best of 4 | random | gain |" in report
    assert "| A | 0.250 | 3 | 50.0 | 40.0 | 10.0 |" in report and "| B | n/a | 0 |" in report
