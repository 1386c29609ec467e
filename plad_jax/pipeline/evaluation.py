"""The `eval` stage: teacher, initial and distilled student on the test split; metrics, report."""

from __future__ import annotations

import json
import logging
import os

import jax
import numpy as np

from plad_jax.data import pairs
from plad_jax.errors import ConfigError
from plad_jax.pipeline.context import Context
from plad_jax.scoring import evaluate
from plad_jax.scoring.calibration import calibration

logger = logging.getLogger(__name__)


def eval_stage(ctx: Context, stage_dir: str):
    cfg = ctx.config.eval
    split = getattr(ctx.splits, cfg.split)
    if not split:
        raise ConfigError(f"eval.split={cfg.split}: the {cfg.split} split is empty")
    examples = split[: cfg.num_examples] if cfg.num_examples else split
    prompts, refs = [e.prompt for e in examples], [e.response for e in examples]
    responses, calibrated, scorer = {}, {}, ctx.scorer(cfg)
    for name, stage, role in (
        ("teacher", "sft_teacher", "teacher"),
        ("initial student", "sft_student", "student"),
        ("distilled student", "distill", "student"),
    ):
        lm = ctx.stage_model(stage, role)
        responses[name], _, _ = ctx.sample_responses(
            lm,
            role,
            prompts,
            temperature=cfg.temperature,
            max_new_tokens=cfg.max_new_tokens,
            seed=ctx.config.seed,
            desc=f"eval {name}",
            stop=ctx.stop_strings(cfg),
        )
        if cfg.calibration_samples:
            calibrated[name] = model_calibration(ctx, lm, role, prompts, refs, scorer, name)
    metrics = evaluate.evaluate_responses(prompts, responses, refs, scorer, teacher="teacher")
    metrics["split"] = cfg.split
    if calibrated:
        metrics["calibration"] = {
            "k": cfg.calibration_samples,
            "temperature": ctx.config.sample.temperature,
            "models": calibrated,
        }
    rows = pairs.read_pairs(ctx.path("sample"))
    metrics["teacher_student_win_rate"] = evaluate.teacher_student_win_rate(
        [r["teacher"] for r in rows],
        [r["student"] for r in rows],
        [r["prompt"] for r in rows],
        scorer,
        references=[r["reference"] for r in rows],
    )
    curves = {}
    for stage in ("sft_teacher", "sft_student", "distill"):
        path = ctx.path(stage, "curve.json")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                curves[stage] = [tuple(x) for x in json.load(f)]
    evaluate.write_report(stage_dir, metrics, curves, process_index=jax.process_index())
    if (
        jax.process_index() == 0
    ):  # every model's text per test prompt, for per-row analysis after the run
        from etils import epath  # local or gs://, as the report

        epath.Path(stage_dir, "responses.jsonl").write_text(
            "".join(
                json.dumps(
                    {
                        "prompt": p,
                        "reference": r,
                        **{name: texts[i] for name, texts in responses.items()},
                    }
                )
                + "\n"
                for i, (p, r) in enumerate(zip(prompts, refs))
            )
        )
    return {
        name: {"win_rate": m.get("win_rate"), "mean_score": m.get("mean_score")}
        for name, m in metrics.get("models", {}).items()
    }


def model_calibration(ctx: Context, lm, role: str, prompts, refs, scorer, name: str) -> dict:
    """`scoring.calibration` of one model: K samples per test prompt at `sample.temperature`,
    each scored against its reference and ranked by the model's own length-normalised
    likelihood."""
    k = ctx.config.eval.calibration_samples
    texts, _, _ = ctx.sample_responses(
        lm,
        role,
        prompts,
        temperature=ctx.config.sample.temperature,
        max_new_tokens=ctx.config.eval.max_new_tokens,
        seed=ctx.config.seed + 1,
        desc=f"calibration {name}",
        stop=ctx.stop_strings(ctx.config.eval),
        num_samples=k,
    )
    repeated = [p for p in prompts for _ in range(k)]
    rewards = scorer.score(repeated, texts, [r for r in refs for _ in range(k)])
    loglik = ctx.loglikelihood(lm, role, repeated, texts)
    n = len(prompts)
    return calibration(loglik.reshape(n, k), np.asarray(rewards, np.float64).reshape(n, k))
