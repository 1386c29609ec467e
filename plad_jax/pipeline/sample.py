"""The `sample` stage: one teacher and one student sample per prompt of D, stored as pairs."""

from __future__ import annotations

import logging

import jax

from plad_jax.data import pairs
from plad_jax.pipeline.context import Context

logger = logging.getLogger(__name__)


def sample_stage(ctx: Context, stage_dir: str):
    """One teacher and one student sample per prompt of D. Each process samples every
    `process_count`-th prompt; a prompt's samples depend only on its index in D and the seed, so
    the pairs are the same on any number of processes."""
    teacher, student = (
        ctx.stage_model("sft_teacher", "teacher"),
        ctx.stage_model("sft_student", "student"),
    )
    everything = ctx.splits.d
    indices = list(range(jax.process_index(), len(everything), jax.process_count()))
    examples = [everything[i] for i in indices]
    prompts = [e.prompt for e in examples]
    cfg, seed = ctx.config.sample, ctx.config.seed
    common = dict(
        temperature=cfg.temperature,
        max_new_tokens=cfg.max_new_tokens,
        sample_ids=indices,
        stop=ctx.stop_strings(cfg),
    )
    t_texts, t_ids, t_logp = ctx.sample_responses(teacher, "teacher", prompts, seed=seed, **common)
    s_texts, s_ids, s_logp = ctx.sample_responses(
        student, "student", prompts, seed=seed + 1, **common
    )
    rows = [
        dict(
            prompt=e.prompt,
            reference=e.response,
            teacher=t,
            student=s,
            chosen="teacher",
            index=i,
            teacher_ids=ti,
            student_ids=si,
            teacher_logp=float(tl),
            student_logp=float(sl),
        )
        for i, e, t, s, ti, si, tl, sl in zip(
            indices, examples, t_texts, s_texts, t_ids, s_ids, t_logp, s_logp
        )
    ]
    stats = {}
    if ctx.config.pairs.real_ratio > 0:
        rows, stats = pairs.relabel(
            rows,
            ctx.scorer(ctx.config.pairs),
            ctx.config.pairs.real_ratio,
            seed,
            population=len(everything),
        )
        stats = {k: v for k, v in stats.items() if k != "pairs"}  # this process's counts
    pairs.write_pairs(stage_dir, rows, jax.process_index())
    return {"pairs": len(everything), **stats}
