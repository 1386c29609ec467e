"""Method efficacy: on tasks where the teacher is truly better, how much of the teacher-student gap
does each distillation method close?

What runs, per task and seed, in this process (`plad_jax.pipeline.runner.run`, so models compile
once): sft_teacher, sft_student and sample once (teacher and initial student built from scratch,
LLaMA style; full: teacher hidden 128 x 4 layers, student 48 x 2), then the run directory is forked
per method and distill + eval run on the fork, so every method starts from the same initial student,
pairs and seed. The teacher is trained once per task (seed 0) and copied into every seed's run: the
seeds vary the student's init and SFT, the pairs and distillation, which is what a method's gain
depends on. Methods:

    sft kd seqkd fdistill_tvd fdistill_js minillm dpo plad_rank plad_margin
    plad_iter (plad_rank, distill.rounds=2)
    plad_real (plad_rank, pairs.real_ratio=0.5, the task's scorer)
    pbkd_cheap pbkd_offline pbkd_online pbkd_mm

(plad_real re-runs the sample stage on its fork: relabelling happens when the pairs are made.)

Tasks:
- `extraction` (`bench/extraction.py`): records of a few people in varied sentences; the question
  asks two fields of one person; exact reward = F1 of the (field, value) pairs, the pipeline's
  scorer through `eval.scorer=python` (`bench.extraction:FieldF1Scorer`). Tokenizer: the demo
  task's SentencePiece machinery trained on this task's texts.
- `demo` (the `demo` preset's task: stdlib docstring -> summary line, ROUGE-L).

Columns (test split, greedy decoding; mean +- std over seeds):
- WR ref: win-or-tie rate against the reference. Both rewards score the reference itself 1.0, so no
  response can beat it; the column is the share of prompts where the response ties it (reward 1:
  an exact match of the requested fields / of the summary).
- reward: mean reward (field F1, or ROUGE-L F1 on demo): `eval/metrics.json` mean_score.
- T-S WR: share of test prompts where the teacher's reward beats the model's (ties 1/2); lower =
  closer to the teacher.
- R-1/R-2/R-L: ROUGE F1 against the references; len: mean words.
- gap closed: (reward(method) - reward(initial student)) / (reward(teacher) - reward(initial
  student)), per seed, then mean +- std.
- beyond noise: gain = reward(method) - reward(initial student) per seed; "yes" when
  |mean gain| > 2 * std of the gain over seeds (sign shown), "no" otherwise; "n/a" with one seed.

Outputs under --out: efficacy.csv (one row per task, method and seed; written after every seed),
summary.csv (the table), efficacy.png (mean reward per model, gap closed per method, per task), the
table printed, and the run directories. `--summarise` redoes the summary from efficacy.csv;
`--compare other/summary.csv` also prints, per method, whether this run's mean lies within the
other run's mean +- std (the reproduction check: a second run on new seeds, `--first-seed 3`).

    python bench/efficacy.py --quick          # CI: tiny models, 1 seed, 5 + 2 methods
                                              # (QUICK_METHODS), few steps
    python bench/efficacy.py                  # full: 3 seeds, both tasks
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import math
import os
import platform
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `bench.extraction` must import (it is the python scorer's module)
    sys.path.insert(0, ROOT)

from bench import extraction  # noqa: E402

SCORER_SPEC = "bench.extraction:FieldF1Scorer"
PRE = ("sft_teacher", "sft_student", "sample")
POST = ("distill", "eval")
METHODS = {
    "sft": ["distill.method=sft"],
    "kd": ["distill.method=kd"],
    "seqkd": ["distill.method=seqkd"],
    "fdistill_tvd": ["distill.method=fdistill_tvd"],
    "fdistill_js": ["distill.method=fdistill_js"],
    "minillm": ["distill.method=minillm"],
    "dpo": ["distill.method=dpo"],
    "plad_rank": ["distill.method=plad_rank"],
    "plad_margin": ["distill.method=plad_margin"],
    "plad_iter": ["distill.method=plad_rank", "distill.rounds=2"],
    "plad_real": ["distill.method=plad_rank", "pairs.real_ratio=0.5"],
    "pbkd_cheap": ["distill.method=pbkd_cheap"],
    "pbkd_offline": ["distill.method=pbkd_offline"],
    "pbkd_online": ["distill.method=pbkd_online"],
    "pbkd_mm": ["distill.method=pbkd_mm"],
}
# --quick (CI): one method per kind of machinery, on tiny models for a few steps: targets (sft),
# teacher logits (kd), pairs relabelled by the task's scorer (plad_real), PbKD. tests/test_stages.py
# runs every method and option on the pipeline itself.
QUICK_METHODS = {
    "extraction": ("sft", "kd", "plad_real", "pbkd_cheap"),
    "demo": ("sft", "plad_rank"),
}
RESAMPLE = {"plad_real"}  # methods whose pairs differ from the shared ones


def _llama(hidden, layers, heads, positions):
    return json.dumps(
        {
            "model_type": "llama",
            "hidden_size": hidden,
            "intermediate_size": 4 * hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": heads,
            "max_position_embeddings": positions,
            "tie_word_embeddings": True,
        }
    )


@dataclasses.dataclass(frozen=True)
class Size:
    """Model sizes and step counts of one mode (the same for both tasks unless a field says so)."""

    teacher: tuple  # hidden, layers, heads
    student: tuple
    n_examples: int  # extraction examples generated (before the splits)
    d0: int
    d: int
    test: int
    validation: int
    teacher_epochs: int
    student_epochs: int
    distill_epochs: int
    distill_max_steps: int | None
    sft_max_steps: int | None
    batch: int
    pbkd_rounds: int
    pbkd_samples: int
    pbkd_warmup: int
    select_best: bool = True  # the teacher's best checkpoint on validation (quick: the last)


QUICK = Size(
    teacher=(48, 2, 2),
    student=(16, 1, 1),
    n_examples=400,
    d0=96,
    d=32,
    test=24,
    validation=16,
    teacher_epochs=3,
    student_epochs=1,
    distill_epochs=1,
    distill_max_steps=2,
    sft_max_steps=None,
    batch=16,
    pbkd_rounds=1,
    pbkd_samples=2,
    pbkd_warmup=2,
    select_best=False,
)
# Full: sized so that the whole run (both tasks, 3 seeds, 15 methods) fits in an hour on 2 CPU
# cores, the teacher clearly beats the student (extraction: field F1 ~0.7 vs ~0.25) and the student
# has learnt the answer format (so a method has something to move rather than a blank to fill).
FULL = Size(
    teacher=(128, 4, 4),
    student=(48, 2, 2),
    n_examples=8000,
    d0=4000,
    d=512,
    test=256,
    validation=64,
    teacher_epochs=6,
    student_epochs=4,
    distill_epochs=2,
    distill_max_steps=None,
    sft_max_steps=None,
    batch=32,
    pbkd_rounds=1,
    pbkd_samples=2,
    pbkd_warmup=10,
)


def overrides(task: str, size: Size, seed: int, task_files: dict) -> list[str]:
    """`--set` items of the base config (the demo preset) for this task, size and seed."""
    t, s = size.teacher, size.student
    sets = [
        f"seed={seed}",
        f"teacher.init={_llama(*t, 256)}",
        f"student.init={_llama(*s, 256)}",
        f"data.max_d0={size.d0}",
        f"data.max_d={size.d}",
        f"data.max_test={size.test}",
        f"data.max_validation={size.validation}",
        f"eval.num_examples={size.test}",
        f"sft_teacher.epochs={size.teacher_epochs}",
        f"sft_student.epochs={size.student_epochs}",
        f"sft_teacher.validation_examples={size.validation}",
        f"distill.epochs={size.distill_epochs}",
        f"distill.max_steps={size.distill_max_steps if size.distill_max_steps else 'none'}",
        f"pbkd.rounds={size.pbkd_rounds}",
        f"pbkd.num_samples={size.pbkd_samples}",
        f"pbkd.rm_warmup_steps={size.pbkd_warmup}",
        f"sft_teacher.select_best={str(size.select_best).lower()}",
    ]
    for section in ("sft_teacher", "sft_student", "distill"):
        sets.append(f"{section}.batch_size={size.batch}")
        if section != "distill" and size.sft_max_steps:
            sets.append(f"{section}.max_steps={size.sft_max_steps}")
    if task == "extraction":
        sets += [
            "data.task=jsonl",
            f"data.path={task_files['data']}",
            f"teacher.tokenizer={task_files['tokenizer']}",
            f"student.tokenizer={task_files['tokenizer']}",
            "data.max_prompt_tokens=80",
            "data.max_response_tokens=16",
            "sample.max_new_tokens=16",
            "eval.max_new_tokens=16",
            "pbkd.max_new_tokens=16",
            "eval.scorer=python",
            f"eval.reward_model={SCORER_SPEC}",
            "pairs.scorer=python",
            f"pairs.reward_model={SCORER_SPEC}",
        ]
    else:  # demo: its preset's scorer (ROUGE-L) for eval and relabelling
        sets += ["data.task=demo"]
    return sets


def prepare_extraction(out: str, size: Size) -> dict:
    """The extraction data file and its tokenizer (the demo task's SentencePiece machinery)."""
    from plad_jax.data import build_demo_tokenizer

    folder = os.path.join(out, "extraction-data")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"records-{size.n_examples}.jsonl")
    if not os.path.exists(path):
        extraction.write_jsonl(path + ".tmp", size.n_examples, seed=1234)
        os.replace(path + ".tmp", path)
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    texts = [t for r in rows for t in (r["prompt"], r["response"])]
    tok = build_demo_tokenizer(
        os.path.join(folder, f"tokenizer-{size.n_examples}"), texts, vocab_size=600
    )
    return {"data": path, "tokenizer": tok}


def enable_compile_cache(out: str) -> None:
    """XLA's persistent compilation cache under `out`: every fork builds its train step afresh (a
    new function object, so jit's in-memory cache misses) but the program is the same as the
    previous fork's, so it is read back instead of compiled again."""
    import jax

    jax.config.update("jax_compilation_cache_dir", os.path.join(out, "xla-cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def run_stages(sets, run_dir, stages, preset="demo"):
    from plad_jax import config as cfg
    from plad_jax import fetch
    from plad_jax.pipeline import runner as pipeline

    config = fetch.resolve_config(cfg.resolve(preset, sets, run_dir=run_dir))
    pipeline.run(config, run_dir, stages)


class SamplingMemo:
    """Reuses `Context.sample_responses` and `Context.loglikelihood` (plad_jax.pipeline.context)
    results for identical calls within this process.

    Every fork evaluates the same teacher and initial student on the same prompts with the same
    seed (greedy, and the calibration samples with their likelihoods), and plad_real's fork
    resamples the shared pairs; those calls are pure functions of (weights, inputs, settings,
    seed), so the bench answers repeats from memory instead of decoding again. The key holds a
    digest of every weight, so a model that differs in one value misses."""

    def __init__(self):
        self.cache, self.hits, self.misses = {}, 0, 0

    def __enter__(self):
        from plad_jax.pipeline.context import Context

        memo = self
        self._original = Context.sample_responses, Context.loglikelihood
        Context.sample_responses = lambda ctx, *args, **kwargs: memo._sample(ctx, *args, **kwargs)
        Context.loglikelihood = lambda ctx, *args: memo._loglikelihood(ctx, *args)
        return self

    def __exit__(self, *exc):
        from plad_jax.pipeline.context import Context

        Context.sample_responses, Context.loglikelihood = self._original

    @staticmethod
    def _model_key(ctx, lm, role) -> tuple:
        """The weights (a digest of every leaf), model class, tokenizer and prompt limit."""
        import hashlib

        import jax
        import numpy as np

        digest = hashlib.sha256()
        for leaf in jax.tree.leaves(lm.params):
            digest.update(np.asarray(leaf).tobytes())
        vocab = hashlib.sha256(
            json.dumps(sorted(ctx.tokenizer(role).get_vocab().items())).encode()
        ).hexdigest()
        return digest.hexdigest(), type(lm).__name__, vocab, ctx.config.data.max_prompt_tokens

    @property
    def calls(self) -> int:
        return self.hits + self.misses

    def _remember(self, key, compute):
        if key in self.cache:
            self.hits += 1
            return self.cache[key]
        self.misses += 1
        self.cache[key] = out = compute()
        return out

    def _sample(self, ctx, lm, role, prompts, **kwargs):
        cfg = ctx.config.sample
        settings = tuple(  # every argument but the progress label, lists as tuples
            (k, tuple(v) if isinstance(v, list | tuple) else v)
            for k, v in sorted(kwargs.items())
            if k != "desc"
        )
        key = (
            "sample",
            self._model_key(ctx, lm, role),
            tuple(prompts),
            settings,
            cfg.batch_size,
            cfg.top_k,
            cfg.top_p,
        )
        return self._remember(key, lambda: self._original[0](ctx, lm, role, prompts, **kwargs))

    def _loglikelihood(self, ctx, lm, role, prompts, texts):
        key = (
            "loglikelihood",
            self._model_key(ctx, lm, role),
            tuple(prompts),
            tuple(texts),
            ctx.config.data.max_response_tokens,
            ctx.config.eval.batch_size,
        )
        return self._remember(key, lambda: self._original[1](ctx, lm, role, prompts, texts))


def fork(base: str, run_dir: str, resample: bool):
    shutil.rmtree(run_dir, ignore_errors=True)
    skip = shutil.ignore_patterns("checkpoints*", "tb", *(["sample"] if resample else []))
    shutil.copytree(base, run_dir, ignore=skip)


def exact_match_rate(task: str, eval_dir: str, model: str) -> float:
    """Share of test prompts where `model`'s response ties the reference (reward 1.0)."""
    from plad_jax.scoring.rewards import RougeScorer

    with open(os.path.join(eval_dir, "responses.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    scorer = extraction.FieldF1Scorer() if task == "extraction" else RougeScorer()
    scores = scorer.score(
        [r["prompt"] for r in rows], [r[model] for r in rows], [r["reference"] for r in rows]
    )
    return float((scores >= 1.0 - 1e-9).mean())


def calibration_columns(metrics: dict, model: str) -> dict:
    """The model's calibration (eval.calibration_samples): Spearman of its own likelihood with the
    reward over its K samples per prompt, and the reward gained by picking its most likely sample;
    empty when the run did not measure it."""
    c = metrics.get("calibration", {}).get("models", {}).get(model)
    return {"cal_spearman": c["spearman"], "cal_gain": c["best_of_k_gain"]} if c else {}


def model_row(task, seed, method, eval_dir, model, seconds):
    with open(os.path.join(eval_dir, "metrics.json"), encoding="utf-8") as f:
        metrics = json.load(f)
    m = metrics["models"][model]
    return {
        "task": task,
        "seed": seed,
        "method": method,
        "wr_ref": exact_match_rate(task, eval_dir, model),
        "reward": m["mean_score"],
        "ts_wr": m["ts_win_rate"],
        "rouge1": m["rouge1"],
        "rouge2": m["rouge2"],
        "rougeL": m["rougeL"],
        "length": m["mean_length"],
        "seconds": seconds,
        **calibration_columns(metrics, model),
    }


def run_task_seed(task, seed, size, out, task_files, methods, log):
    """Rows for the teacher, the initial student and every method on one task and seed."""
    sets = overrides(task, size, seed, task_files)
    base = os.path.join(out, "runs", task, f"seed{seed}", "base")
    t0 = time.perf_counter()
    # One teacher per task (trained with seed 0), copied into every seed's run: the seeds vary the
    # student's init and SFT, the sampled pairs and distillation, i.e. what a method's gain depends
    # on.
    teacher_run = os.path.join(out, "runs", task, "teacher")
    run_stages(overrides(task, size, 0, task_files), teacher_run, ("sft_teacher",))
    for name in ("sft_teacher", "tokenizer"):
        if os.path.isdir(os.path.join(teacher_run, name)) and not os.path.exists(
            os.path.join(base, name)
        ):
            shutil.copytree(
                os.path.join(teacher_run, name),
                os.path.join(base, name),
                ignore=shutil.ignore_patterns("checkpoints*"),
            )
    run_stages(sets, base, PRE)
    prep = time.perf_counter() - t0
    log(f"{task} seed {seed}: shared stages {prep:.0f} s")
    rows = []
    for method in methods:
        run_dir = os.path.join(out, "runs", task, f"seed{seed}", method)
        t0 = time.perf_counter()
        if not os.path.exists(os.path.join(run_dir, "eval", "DONE")):
            fork(base, run_dir, method in RESAMPLE)
            stages = (("sample",) if method in RESAMPLE else ()) + POST
            run_stages(sets + METHODS[method], run_dir, stages)
        seconds = time.perf_counter() - t0
        eval_dir = os.path.join(run_dir, "eval")
        if not rows:  # teacher and initial student: the same greedy outputs in every fork
            rows.append(model_row(task, seed, "teacher", eval_dir, "teacher", prep))
            rows.append(model_row(task, seed, "initial student", eval_dir, "initial student", 0.0))
        rows.append(model_row(task, seed, method, eval_dir, "distilled student", seconds))
        r = rows[-1]
        log(
            f"{task} seed {seed} {method}: reward {r['reward']:.3f} (teacher "
            f"{rows[0]['reward']:.3f}, initial student {rows[1]['reward']:.3f}), {seconds:.0f} s"
        )
        for sub in (
            "distill/checkpoints",
            "distill/checkpoints-round0",
            "distill/checkpoints-round1",
        ):
            shutil.rmtree(
                os.path.join(run_dir, sub), ignore_errors=True
            )  # disk: the forks keep params only
    return rows


# -- summary ---------------------------------------------------------------------------------------

METRICS = ("wr_ref", "reward", "ts_wr", "rouge1", "rouge2", "rougeL", "length", "gap_closed")
CALIBRATION = ("cal_spearman", "cal_gain")  # real track: eval.calibration_samples


def _mean_std(values):
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    std = (
        math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
        if len(values) > 1
        else 0.0
    )
    return mean, std


def summarise(rows):
    """Per (task, method): mean and std over seeds of every metric, gap closed, gain and its noise
    test."""
    by_seed = {}
    for r in rows:
        by_seed.setdefault((r["task"], r["seed"]), {})[r["method"]] = r
    for per_method in by_seed.values():
        teacher, student = per_method["teacher"]["reward"], per_method["initial student"]["reward"]
        for r in per_method.values():
            gap = teacher - student
            r["gap_closed"] = (r["reward"] - student) / gap if gap != 0 else float("nan")
            r["gain"] = r["reward"] - student
    summary = []
    order = list(dict.fromkeys((r["task"], r["method"]) for r in rows))
    for task, method in order:
        group = [r for r in rows if r["task"] == task and r["method"] == method]
        s = {"task": task, "method": method, "seeds": len(group)}
        for key in METRICS + ("gain",) + tuple(k for k in CALIBRATION if k in group[0]):
            s[key], s[key + "_std"] = _mean_std([r[key] for r in group])
        if group[0].get("chosen"):
            s["chosen"] = group[0]["chosen"]
        if method in ("teacher", "initial student"):
            s["beyond_noise"] = "-"
        elif len(group) < 2:
            s["beyond_noise"] = "n/a"
        else:
            s["beyond_noise"] = (
                ("yes (+)" if s["gain"] > 0 else "yes (-)")
                if abs(s["gain"]) > 2 * s["gain_std"]
                else "no"
            )
        summary.append(s)
    return summary


def _fmt(mean, std, pct=False, digits=3):
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    if pct:
        return f"{100 * mean:.1f}+-{100 * std:.1f}"
    return f"{mean:.{digits}f}+-{std:.{digits}f}"


def _render(head, lines) -> str:
    """Rows of cells as left-aligned columns under a header and a rule."""
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    return "\n".join(out + ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines])


def table(summary) -> str:
    head = (
        "task",
        "method",
        "WR ref %",
        "reward",
        "T-S WR %",
        "R-1",
        "R-2",
        "R-L",
        "len",
        "gap closed",
        "beyond noise",
    )
    extra = [k for k in CALIBRATION if any(k in s for s in summary)]
    chosen = any(s.get("chosen") for s in summary)
    head += tuple({"cal_spearman": "Spearman", "cal_gain": "best-of-K gain"}[k] for k in extra)
    head += ("chosen",) if chosen else ()
    lines = []
    for s in summary:
        cal = tuple(_fmt(s.get(k), s.get(k + "_std")) for k in extra)
        lines.append(
            (
                s["task"],
                s["method"],
                _fmt(s["wr_ref"], s["wr_ref_std"], pct=True),
                _fmt(s["reward"], s["reward_std"]),
                _fmt(s["ts_wr"], s["ts_wr_std"], pct=True) if s["method"] != "teacher" else "-",
                _fmt(s["rouge1"], s["rouge1_std"]),
                _fmt(s["rouge2"], s["rouge2_std"]),
                _fmt(s["rougeL"], s["rougeL_std"]),
                _fmt(s["length"], s["length_std"], digits=1),
                _fmt(s["gap_closed"], s["gap_closed_std"], digits=2),
                s["beyond_noise"],
            )
            + cal
            + ((s.get("chosen", "-"),) if chosen else ())
        )
    return _render(head, lines)


def write_csv(path, rows):
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, keys)
        writer.writeheader()
        writer.writerows(rows)


def plot(path, summary):
    """Per task: mean reward per model (teacher and initial student included) and the share of the
    gap closed per method, each mean +- std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def value(s, key):
        v = s[key]
        return 0.0 if v is None or (isinstance(v, float) and math.isnan(v)) else v

    tasks = list(dict.fromkeys(s["task"] for s in summary))
    fig, axes = plt.subplots(len(tasks), 2, figsize=(15, 3.8 * len(tasks)), squeeze=False)
    for (left, right), task in zip(axes, tasks):
        rows = [s for s in summary if s["task"] == task]
        colors = [
            "tab:green"
            if s["method"] == "teacher"
            else "tab:gray"
            if s["method"] == "initial student"
            else "tab:blue"
            for s in rows
        ]
        left.bar(
            range(len(rows)),
            [value(s, "reward") for s in rows],
            yerr=[value(s, "reward_std") for s in rows],
            capsize=3,
            color=colors,
        )
        left.set_xticks(range(len(rows)), [s["method"] for s in rows], rotation=45, ha="right")
        left.set_ylabel("mean reward")
        left.set_title(f"{task}: mean reward on test (mean +- std over seeds)")
        methods = [s for s in rows if s["method"] not in ("teacher", "initial student")]
        right.bar(
            range(len(methods)),
            [value(s, "gap_closed") for s in methods],
            yerr=[value(s, "gap_closed_std") for s in methods],
            capsize=3,
            color="tab:blue",
        )
        right.axhline(0, color="black", linewidth=0.8)
        right.axhline(1, color="tab:green", linestyle="--", linewidth=0.8, label="teacher")
        right.set_xticks(
            range(len(methods)), [s["method"] for s in methods], rotation=45, ha="right"
        )
        right.set_ylabel("share of T-S gap closed")
        right.set_title(f"{task}: (method - initial) / (teacher - initial)")
        right.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def read_rows(path):
    """efficacy.csv back as rows (numbers as floats), to summarise a run (or a partial one)
    again."""
    with open(path, encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for key in (
            "seed",
            "wr_ref",
            "reward",
            "ts_wr",
            "rouge1",
            "rouge2",
            "rougeL",
            "length",
            "seconds",
            *CALIBRATION,
        ):
            if key not in r:  # calibration: real-track rows only
                continue
            r[key] = (
                None
                if r.get(key) in (None, "")
                else (int(r[key]) if key == "seed" else float(r[key]))
            )
    return [{k: v for k, v in r.items() if k not in ("gap_closed", "gain")} for r in rows]


def compare(summary, other_path) -> str:
    """Does this run reproduce another's table? Per (task, method): this run's mean reward and gap
    closed against the other's mean +- std, and whether this mean lies within the other's std."""
    with open(other_path, encoding="utf-8") as f:
        other = {(r["task"], r["method"]): r for r in csv.DictReader(f)}
    head = (
        "task",
        "method",
        "reward (this)",
        "reward (other)",
        "in std",
        "gap closed (this)",
        "gap closed (other)",
        "in std",
        "beyond noise (this / other)",
    )
    lines, inside, total = [], 0, 0
    for s in summary:
        o = other.get((s["task"], s["method"]))
        if o is None:
            continue
        cells = [s["task"], s["method"]]
        for key in ("reward", "gap_closed"):
            mean, std = float(o[key] or "nan"), float(o[key + "_std"] or "nan")
            ok = s[key] is not None and abs(s[key] - mean) <= std + 1e-12
            if s["method"] not in ("teacher", "initial student") or key == "reward":
                inside, total = inside + ok, total + 1
            cells += [_fmt(s[key], s[key + "_std"]), _fmt(mean, std), "yes" if ok else "no"]
        cells.append(f"{s['beyond_noise']} / {o['beyond_noise']}")
        lines.append(tuple(cells))
    return (
        _render(head, lines) + f"\n{inside} of {total} means lie within the other run's mean +- std"
    )


def report(out, rows, header, other=None):
    """Summarise, write summary.csv / efficacy.csv / efficacy.png, print the table."""
    summary = summarise(rows)
    write_csv(os.path.join(out, "efficacy.csv"), rows)
    write_csv(os.path.join(out, "summary.csv"), summary)
    plot(os.path.join(out, "efficacy.png"), summary)
    print(header)
    print(table(summary))
    if other:
        print(f"\nagainst {other}:")
        print(compare(summary, other))
    print(f"\nwritten: {out}/summary.csv, efficacy.csv, efficacy.png")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, 1 seed, few steps (CI)")
    parser.add_argument(
        "--track",
        choices=("scratch", "real"),
        default="scratch",
        help="scratch: models built from scratch (fast); real: SmolLM2-135M-Instruct and a "
        "student cut from it, each method tuned on validation (bench/efficacy_real.py)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="output folder (default runs/efficacy[-quick]; the full real track: "
        "bench/results/efficacy-real, whose ledger, probe and table are committed)",
    )
    parser.add_argument(
        "--probe",
        default=None,
        metavar="DEPTHS",
        help="real track: only the sizing probe, students of these depths (e.g. 6,8,12) against "
        "the teacher on validation; writes probe.json",
    )
    parser.add_argument("--seeds", type=int, default=None, help="seeds (default 3, quick 1)")
    parser.add_argument(
        "--first-seed",
        type=int,
        default=0,
        help="seeds run from here (a second run on new seeds: --first-seed 3)",
    )
    parser.add_argument("--tasks", default="extraction,demo")
    parser.add_argument(
        "--summarise",
        action="store_true",
        help="only summarise --out's efficacy.csv again (a finished or partial run)",
    )
    parser.add_argument(
        "--compare",
        default=None,
        metavar="SUMMARY_CSV",
        help="also check this run's means against another run's summary.csv (mean +- std)",
    )
    parser.add_argument(
        "--methods", default=None, help="comma-separated (default: all; quick: QUICK_METHODS)"
    )
    args = parser.parse_args(argv)
    size = QUICK if args.quick else FULL
    name = "efficacy" + ("-real" if args.track == "real" else "") + ("-quick" if args.quick else "")
    out = os.path.abspath(args.out or os.path.join("runs", name))
    if args.track == "real" and not args.quick and not args.out:  # its ledger is committed: the
        out = os.path.join(ROOT, "bench", "results", name)  # same command resumes in a new clone
    seeds = range(args.first_seed, args.first_seed + (args.seeds or (1 if args.quick else 3)))
    tasks = [t for t in args.tasks.split(",") if t]
    chosen = [m for m in args.methods.split(",") if m] if args.methods else None
    known = METHODS if args.track == "scratch" else _real().REAL_METHODS
    unknown = [m for m in chosen or () if m not in known] + [
        t for t in tasks if t not in ("extraction", "demo")
    ]
    if unknown:
        parser.error(f"unknown methods or tasks: {', '.join(unknown)}")
    os.makedirs(out, exist_ok=True)
    if args.summarise:
        rows = read_rows(os.path.join(out, "efficacy.csv"))
        report(
            out, rows, f"method efficacy from {out}/efficacy.csv: {len(rows)} rows", args.compare
        )
        return 0
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    import jax

    start = time.perf_counter()

    def log(message):
        print(f"[{time.perf_counter() - start:6.0f} s] {message}", flush=True)

    if args.track == "real":
        from plad_jax.errors import UserError

        try:
            return main_real(args, out, seeds, tasks, chosen, log)
        except UserError as e:  # one line; every ledger row already written stays
            print(f"efficacy: error: {' '.join(str(e).split())}", file=sys.stderr)
            return 2
    if not args.quick:  # quick runs inside the test process: leave its jax config alone
        enable_compile_cache(out)
    task_files = prepare_extraction(out, size) if "extraction" in tasks else {}
    rows = []
    with SamplingMemo() as memo:
        for task in tasks:
            for seed in seeds:
                methods = chosen or (QUICK_METHODS[task] if args.quick else tuple(METHODS))
                rows += run_task_seed(task, seed, size, out, task_files, methods, log)
                write_csv(
                    os.path.join(out, "efficacy.csv"), rows
                )  # a partial run keeps what it measured
                memo.cache.clear()  # the next seed's models differ
    log(f"decoding and likelihood calls answered from memory: {memo.hits} of {memo.calls}")
    total, cpu = time.perf_counter() - start, time.process_time()
    device = (
        f"{jax.devices()[0].platform} x{jax.device_count()} "
        f"({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    )
    report(
        out,
        rows,
        f"\nmethod efficacy ({'quick' if args.quick else 'full'}): tasks {', '.join(tasks)}; "
        f"seeds {len(seeds)}; teacher {size.teacher} vs student {size.student} (hidden, layers, "
        f"heads); device {device}; {total / 60:.1f} min wall, {cpu / 60:.1f} min CPU "
        f"(load average {os.getloadavg()[0]:.1f})",
        args.compare,
    )
    return 0


def _real():
    from bench import efficacy_real

    return efficacy_real


def main_real(args, out, seeds, tasks, chosen, log) -> int:
    """The real-weights track (bench/efficacy_real.py): ledger rows, then the same report."""
    real = _real()
    size = real.QUICK_REAL if args.quick else real.REAL
    if not args.quick:
        enable_compile_cache(out)
    if args.probe:
        depths = [int(d) for d in args.probe.split(",") if d]
        rows = real.probe(out, depths, quick=args.quick, log=log)
        with open(os.path.join(out, "probe.json"), "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)
        print(
            _render(
                ("depth", "SFT steps", "SFT loss", "teacher", "student", "T-S WR %", "seconds"),
                [
                    (
                        str(r["depth"]),
                        str(r["student_steps"]),
                        f"{r['student_loss']:.2f}",
                        f"{r['teacher_reward']:.3f}",
                        f"{r['student_reward']:.3f}",
                        f"{100 * r['ts_wr']:.1f}",
                        f"{r['seconds']:.0f}",
                    )
                    for r in rows
                ],
            )
        )
        return 0
    methods = chosen or (real.QUICK_REAL_METHODS if args.quick else tuple(real.REAL_METHODS))
    start, cpu0 = time.perf_counter(), time.process_time()
    with SamplingMemo() as memo:
        rows = real.run(out, quick=args.quick, seeds=seeds, tasks=tasks, methods=methods, log=log)
    log(f"decoding and likelihood calls answered from memory: {memo.hits} of {memo.calls}")
    minutes = (time.perf_counter() - start) / 60
    report(
        out,
        rows,
        f"\nmethod efficacy, real track ({'quick' if args.quick else 'full'}): tasks "
        f"{', '.join(tasks)}; seeds {len(seeds)}; student {size.depth} of "
        f"{size.teacher_blocks} teacher blocks; D0 = D = {size.d0}; grid {real.GRID}; this "
        f"process {minutes:.1f} min wall, {(time.process_time() - cpu0) / 60:.1f} min CPU "
        f"(ledger rows measured earlier are not timed again; see their seconds)",
        args.compare,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
