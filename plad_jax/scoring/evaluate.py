"""Evaluation on texts: win rates, ROUGE, lengths, length buckets; the report with its plots.

Given each model's responses to the same test prompts (METHODS.md section 4):

- win rate vs reference: share of prompts where the scorer prefers the model's response to the
  human reference, ties one half. Undefined (None) for a reference-based scorer such as ROUGE-L,
  which would score the reference against itself (1.0); the mean score is reported instead.
- T-S WR: share of prompts where the scorer prefers the teacher's response to the model's
  (`teacher_student_win_rate`; `evaluate_responses(..., teacher=name)` fills it per model on the
  test prompts; the paper's figure is on the distillation pairs, which the caller may set instead).
- ROUGE-1/2/L F1 against the references (`rouge-score`, Porter stemmer), mean length in words.
- By length bucket of the model's own response ((0,10], (10,20], (20,30], (30,40], >40 words;
  empty responses count in the first): n, win rate vs reference and mean score.

`write_report` turns the metrics into `metrics.json`, `report.md` and PNG plots (process 0 only).
All rates are fractions in [0, 1]; report.md shows them as percentages.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence

import numpy as np
from etils import epath

from plad_jax.scoring.rewards import is_reference_based, scorer_name, win_rate

BUCKET_EDGES = (10, 20, 30, 40)
BUCKETS = ("(0,10]", "(10,20]", "(20,30]", "(30,40]", ">40")
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
PLOTS = {
    "curves": "training_curves.png",
    "models": "win_rate.png",
    "buckets": "win_rate_by_length.png",
}


def word_count(text: str) -> int:
    return len(text.split())


def length_bucket(words: int) -> str:
    """The bucket label of a response of `words` words; 0 falls in the first bucket."""
    for edge, label in zip(BUCKET_EDGES, BUCKETS):
        if words <= edge:
            return label
    return BUCKETS[-1]


def rouge_f1(responses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 of responses against references."""
    from rouge_score import rouge_scorer

    rouge = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for response, reference in zip(responses, references):
        scores = rouge.score(reference, response)  # (target, prediction)
        for t in ROUGE_TYPES:
            totals[t] += scores[t].fmeasure
    return {t: totals[t] / len(responses) if responses else math.nan for t in ROUGE_TYPES}


def teacher_student_win_rate(
    teacher_texts: Sequence[str],
    student_texts: Sequence[str],
    prompts: Sequence[str],
    scorer,
    references: Sequence[str] | None = None,
) -> float:
    """T-S WR: share of prompts where `scorer` prefers the teacher's response to the student's (ties
    1/2)."""
    if not len(teacher_texts) == len(student_texts) == len(prompts):
        raise ValueError(
            f"{len(prompts)} prompts, {len(teacher_texts)} teacher and {len(student_texts)} "
            "student texts"
        )
    prompts, teacher_texts, student_texts = list(prompts), list(teacher_texts), list(student_texts)
    scores = _score_both(scorer, prompts, teacher_texts, student_texts, references)
    return win_rate(scores[0], scores[1])


def _score_both(scorer, prompts, first, second, references):
    """Scores of two response lists in one scorer call (a batched scorer fills its batches)."""
    n = len(prompts)
    refs = None if references is None else list(references) * 2
    scores = np.asarray(scorer.score(prompts * 2, list(first) + list(second), refs), np.float64)
    if scores.shape != (2 * n,):
        raise ValueError(f"scorer returned {scores.shape} scores for {2 * n} responses")
    return scores[:n], scores[n:]


def evaluate_responses(
    prompts: Sequence[str],
    responses_by_model: Mapping[str, Sequence[str]],
    references: Sequence[str] | None,
    scorer,
    *,
    teacher: str | None = None,
) -> dict:
    """Metrics of every model's responses to `prompts` (see the module docstring).

    references: the human targets, one per prompt, or None (then no win rate vs reference and
        no ROUGE). teacher: the name in `responses_by_model` whose responses are the teacher's;
        every model then gets `ts_win_rate` against it (None for the teacher itself, or when
        `teacher` is None).

    Returns `{"n", "scorer", "reference_based", "buckets", "models": {name: {"n", "win_rate",
    "ts_win_rate", "mean_score", "rouge1", "rouge2", "rougeL", "mean_length", "length_buckets":
    {bucket: {"n", "win_rate", "mean_score"}}}}}`; a value that cannot be computed is None.
    """
    prompts = list(prompts)
    n = len(prompts)
    for name, responses in responses_by_model.items():
        if len(responses) != n:
            raise ValueError(f"model {name!r} has {len(responses)} responses for {n} prompts")
    if references is not None and len(references) != n:
        raise ValueError(f"{len(references)} references for {n} prompts")
    if teacher is not None and teacher not in responses_by_model:
        raise ValueError(f"teacher {teacher!r} is not among the models {list(responses_by_model)}")
    references = None if references is None else list(references)
    # A reference-based scorer (ROUGE) cannot score without references, nor judge the reference
    # itself.
    can_score = references is not None or not is_reference_based(scorer)
    versus_reference = references is not None and not is_reference_based(scorer)
    reference_scores = (
        np.asarray(scorer.score(prompts, references, references), np.float64)
        if versus_reference
        else None
    )

    models, scores_by_model = {}, {}
    for name, responses in responses_by_model.items():
        responses = list(responses)
        scores = (
            np.asarray(scorer.score(prompts, responses, references), np.float64)
            if can_score
            else None
        )
        scores_by_model[name] = scores
        wins = None if reference_scores is None else _wins(scores, reference_scores)
        lengths = [word_count(r) for r in responses]
        metrics = {
            "n": n,
            "win_rate": _mean(wins),
            "ts_win_rate": None,
            "mean_score": _mean(scores),
        }
        rouge = (
            rouge_f1(responses, references)
            if references is not None
            else dict.fromkeys(ROUGE_TYPES)
        )
        metrics.update({t: _finite(v) for t, v in rouge.items()})
        metrics["mean_length"] = _mean(np.asarray(lengths, np.float64))
        metrics["length_buckets"] = _bucket_metrics(lengths, scores, wins)
        models[name] = metrics
    if (
        teacher is not None and can_score
    ):  # T-S WR from the scores above: each response is scored once
        for name, metrics in models.items():
            if name != teacher:
                metrics["ts_win_rate"] = _finite(
                    win_rate(scores_by_model[teacher], scores_by_model[name])
                )
    return {
        "n": n,
        "scorer": scorer_name(scorer),
        "reference_based": is_reference_based(scorer),
        "buckets": list(BUCKETS),
        "models": models,
    }


def _wins(scores, reference_scores):
    """Per row: 1 when the model beats the reference, 1/2 on a tie, else 0."""
    return (scores > reference_scores) + 0.5 * (scores == reference_scores)


def _bucket_metrics(lengths, scores, wins) -> dict:
    labels = np.array([length_bucket(w) for w in lengths], dtype=object)
    out = {}
    for label in BUCKETS:
        rows = labels == label
        out[label] = {
            "n": int(rows.sum()),
            "win_rate": None if wins is None else _mean(wins[rows]),
            "mean_score": None if scores is None else _mean(scores[rows]),
        }
    return out


def _mean(values) -> float | None:
    return None if values is None or len(values) == 0 else _finite(float(np.mean(values)))


def _finite(value) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


# -- report --------------------------------------------------------------------------------------


def write_report(
    out_dir,
    metrics: dict,
    curves: Mapping[str, Sequence[tuple[int, float]]] | None = None,
    *,
    process_index: int = 0,
) -> list[epath.Path]:
    """Write metrics.json, report.md and the PNG plots into `out_dir` (local or gs://).

    Only process 0 writes; other processes return []. `curves` maps a run name (a stage, a
    method) to its `(step, loss)` points; without any, there is no training-curves plot.
    Returns the paths written.
    """
    if process_index != 0:
        return []
    out = epath.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    curves = {name: list(points) for name, points in (curves or {}).items() if len(points)}
    figures = {"models": _model_plot(metrics), "buckets": _bucket_plot(metrics)}
    if curves:
        figures["curves"] = _curve_plot(curves)
    written = []
    for key, png in figures.items():
        written.append(_write(out / PLOTS[key], png))
    written.append(
        _write(out / "metrics.json", json.dumps(metrics, indent=2, sort_keys=True).encode())
    )
    written.append(
        _write(out / "report.md", _markdown(metrics, [k for k in PLOTS if k in figures]).encode())
    )
    return written


def _write(path: epath.Path, data: bytes) -> epath.Path:
    path.write_bytes(data)
    return path


def _headline(metrics: dict) -> tuple[str, str]:
    """The per-model quantity the plots show: win rate vs reference, or, for a reference-based
    scorer, its mean score."""
    if metrics.get("reference_based"):
        return "mean_score", f"mean {metrics.get('scorer', 'score')} vs reference"
    return "win_rate", "win rate vs reference"


def _upper_first(text: str) -> str:
    return text[:1].upper() + text[1:]


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def _markdown(metrics: dict, plots: list[str]) -> str:
    models = metrics["models"]
    key, label = _headline(metrics)
    lines = [
        "# Evaluation\n",
        (
            f"{metrics['n']} {metrics.get('split', 'test')} prompts; scorer: "
            f"`{metrics['scorer']}`. Rates and ROUGE in "
            "percent; win rates count ties as one half. T-S WR: how often the scorer prefers the "
            "teacher's response to this model's."
        ),
    ]
    if metrics.get("reference_based"):
        lines.append(
            f"The scorer measures closeness to the reference, so there is no win rate against it; "
            f"the tables give the {label} instead."
        )
    lines += [
        "",
        "| model | win rate vs ref | T-S WR | ROUGE-1 | ROUGE-2 | ROUGE-L | mean length (words) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in models.items():
        win = (
            _pct(m["win_rate"])
            if key == "win_rate"
            else f"n/a (mean score {_pct(m['mean_score'])})"
        )
        length = "n/a" if m["mean_length"] is None else f"{m['mean_length']:.1f}"
        lines.append(
            f"| {name} | {win} | {_pct(m['ts_win_rate'])} | {_pct(m['rouge1'])} | "
            f"{_pct(m['rouge2'])} | {_pct(m['rougeL'])} | {length} |"
        )
    lines += [
        "",
        f"{_upper_first(label)} by the model's response length in words (n = responses in the "
        "bucket):",
        "",
        "| model | " + " | ".join(metrics["buckets"]) + " |",
        "|---|" + "---|" * len(metrics["buckets"]),
    ]
    for name, m in models.items():
        cells = [
            f"{_pct(m['length_buckets'][b][key])} (n={m['length_buckets'][b]['n']})"
            for b in metrics["buckets"]
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += _calibration_lines(metrics.get("calibration"), metrics["scorer"])
    titles = {
        "curves": "Training curves",
        "models": _upper_first(label),
        "buckets": f"{_upper_first(label)} by length",
    }
    for plot in plots:
        lines += ["", f"## {titles[plot]}", "", f"![{titles[plot]}]({PLOTS[plot]})"]
    return "\n".join(lines) + "\n"


def _calibration_lines(calibration: dict | None, scorer: str) -> list[str]:
    """The report's calibration table (`scoring.calibration`), when the run measured it."""
    if not calibration:
        return []
    k = calibration["k"]
    lines = [
        "",
        "## Calibration",
        "",
        (
            f"{k} samples per test prompt at temperature {calibration['temperature']:g}. Spearman: "
            f"rank correlation of the model's own length-normalised log-likelihood with the "
            f"{scorer} of its samples, averaged over the prompts where both vary (n). Best of "
            f"{k}: the {scorer} of the sample the model finds most likely; random: the mean "
            f"{scorer} of the {k}; gain: best minus random (percent)."
        ),
        "",
        f"| model | Spearman | n | best of {k} | random | gain |",
        "|---|---|---|---|---|---|",
    ]
    for name, c in calibration["models"].items():
        rho = "n/a" if c["spearman"] is None else f"{c['spearman']:.3f}"
        lines.append(
            f"| {name} | {rho} | {c['spearman_prompts']} | {_pct(c['best_of_k'])} | "
            f"{_pct(c['random_of_k'])} | {_pct(c['best_of_k_gain'])} |"
        )
    return lines


def _figure(width=6.4, height=4.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # A bare Figure on the Agg canvas: no pyplot, no global backend switch, no display needed.
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _curve_plot(curves) -> bytes:
    figure = _figure()
    ax = figure.add_subplot()
    for name, points in curves.items():
        steps, losses = zip(*points)
        ax.plot(steps, losses, label=name)
    ax.set(xlabel="step", ylabel="loss", title="Training curves")
    ax.legend()
    return _png(figure)


def _model_plot(metrics) -> bytes:
    key, label = _headline(metrics)
    names = list(metrics["models"])
    values = [metrics["models"][n][key] for n in names]
    figure = _figure()
    ax = figure.add_subplot()
    bars = ax.bar(names, [np.nan if v is None else 100 * v for v in values], color="tab:blue")
    ax.bar_label(bars, labels=[_pct(v) for v in values])
    ax.set(ylabel=f"{label} (%)", title=_upper_first(label), ylim=(0, 110))
    return _png(figure)


def _bucket_plot(metrics) -> bytes:
    key, label = _headline(metrics)
    names, buckets = list(metrics["models"]), metrics["buckets"]
    width = 0.8 / max(len(names), 1)
    x = np.arange(len(buckets))
    figure = _figure(7.2, 4.0)
    ax = figure.add_subplot()
    for i, name in enumerate(names):
        cells = metrics["models"][name]["length_buckets"]
        values = [cells[b][key] for b in buckets]
        bars = ax.bar(
            x + (i - (len(names) - 1) / 2) * width,
            [np.nan if v is None else 100 * v for v in values],
            width,
            label=name,
        )
        ax.bar_label(
            bars,
            labels=[f"n={cells[b]['n']}" if cells[b]["n"] else "" for b in buckets],
            fontsize=7,
        )
    ax.set_xticks(x, buckets)
    ax.set(
        xlabel="response length (words)",
        ylabel=f"{label} (%)",
        title=f"{_upper_first(label)} by length",
        ylim=(0, 110),
    )
    ax.legend()
    return _png(figure)
