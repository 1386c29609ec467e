"""The `distill` stage: the method's batches from the pairs, its training (or its own loop),
the distilled student and its optional GGUF."""

from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp

from plad_jax import methods
from plad_jax.data import pairs
from plad_jax.methods import Method
from plad_jax.methods.base import Setting
from plad_jax.pipeline.context import Context
from plad_jax.pipeline.train import parts_batches, train_model

logger = logging.getLogger(__name__)


def distill_stage(ctx: Context, stage_dir: str):
    cfg, method = ctx.config.distill, ctx.method
    student = ctx.with_lora(ctx.stage_model("sft_student", "student"), "student")
    teacher = None
    if method.shared_vocabulary:
        methods.check_shared_vocabulary(
            method, ctx.config, ctx.tokenizer("teacher"), ctx.tokenizer("student")
        )
    if "teacher" in method.frozen_models:
        teacher = ctx.stage_model("sft_teacher", "teacher")
    rows = pairs.read_pairs(ctx.path("sample"))
    if method.own_loop:
        return own_loop_distill(ctx, stage_dir, method, student, teacher, rows)
    summary = {}
    for round_ in range(cfg.rounds):
        if round_ > 0:  # iterative PLaD: new student samples from the student distilled so far
            rows = resampled_rows(ctx, student, rows, round_)
        batch_fn, n = method_batches(ctx, method, rows, cfg.batch_size)
        # A frozen reference is the student as it starts (LoRA: adapters at their start). A copy:
        # the train step donates the trainable params, which must not be the reference's buffers.
        reference = None
        if "reference" in method.frozen_models:
            reference = jax.tree.map(jnp.copy, student.params)
        tag = "" if cfg.rounds == 1 else f"-round{round_}"
        student, summary = train_model(
            ctx,
            student,
            stage_dir,
            cfg,
            method,
            batch_fn,
            n,
            teacher=teacher,
            reference=reference,
            tag=tag,
        )
    student.save_pretrained(os.path.join(stage_dir, "params"))
    exported = export_gguf(ctx, student, stage_dir)
    return {"method": method.name, "rounds": cfg.rounds, **summary, **exported}


def resampled_rows(ctx: Context, student, rows, round_: int):
    """The pair rows with a new student sample each, from `student` (iterative distillation)."""
    ids = [r["index"] if r["index"] is not None else i for i, r in enumerate(rows)]
    texts, _, _ = ctx.sample_responses(
        student,
        "student",
        [r["prompt"] for r in rows],
        sample_ids=ids,
        temperature=ctx.config.sample.temperature,
        max_new_tokens=ctx.config.sample.max_new_tokens,
        seed=ctx.config.seed + 100 * round_,
        desc=f"round {round_}",
        stop=ctx.stop_strings(ctx.config.sample),
    )
    return [{**r, "student": t, "chosen": "teacher"} for r, t in zip(rows, texts)]


def export_gguf(ctx: Context, student, stage_dir: str) -> dict:
    """`distill.export_gguf`: the distilled student as one GGUF file beside its safetensors."""
    dtype = ctx.config.distill.export_gguf
    if not dtype:
        return {}
    path = os.path.join(stage_dir, f"student-{dtype}.gguf")
    student.save_gguf(path, dtype, tokenizer=ctx.tokenizer("student"))
    logger.info("distill: student written as GGUF (%s) to %s", dtype, path)
    return {"gguf": path}


def own_loop_distill(ctx: Context, stage_dir: str, method: Method, student, teacher, rows):
    """A method that trains itself (`Method.own_loop`, PbKD's game): it gets the pairs, the
    distillation TrainConfig and, when `pairs.real_ratio` > 0, the pairs scorer to label fresh
    pairs."""
    d = ctx.config.data
    scorer = ctx.scorer(ctx.config.pairs) if ctx.config.pairs.real_ratio > 0 else None
    setting = Setting(
        train=ctx.config.distill,
        workdir=stage_dir,
        tokenizer=ctx.tokenizer("student"),
        max_prompt_tokens=d.max_prompt_tokens,
        max_response_tokens=d.max_response_tokens,
        scorer=scorer,
        seed=ctx.config.seed,
    )
    student, summary = method.train_own(student, rows, setting, teacher=teacher)
    student.save_pretrained(os.path.join(stage_dir, "params"))
    return {"method": method.name, **summary, **export_gguf(ctx, student, stage_dir)}


def method_batches(ctx: Context, method: Method, rows, batch_size: int):
    """(batch_fn, number of rows) of the student's batches for `method`, from the pairs, as its
    `Method.batches` declares them (texts re-tokenized by the student)."""
    spec, prompts = method.batches, [r["prompt"] for r in rows]
    parts = {}  # batch field (`data.join_parts`) -> encoding; every part's rows share their prompts
    if spec.responses:  # several sources: the rows of each, one after the other (a mix)
        texts = [text for source in spec.responses for text in _texts(rows, source)]
        parts["response"] = ctx.encode("student", prompts * len(spec.responses), texts)
    if spec.pairs:
        parts["chosen"] = ctx.encode("student", prompts, _texts(rows, "chosen"))
        parts["rejected"] = ctx.encode("student", prompts, _texts(rows, "rejected"))
    if spec.reference:
        parts["reference"] = ctx.encode(
            "student", prompts, [method.reference_text(r) for r in rows]
        )
    return parts_batches(parts, batch_size), len(next(iter(parts.values())))


def _texts(rows, source: str) -> list[str]:
    """One text per pair row: target (the human reference), teacher, student, chosen, rejected."""
    if source == "target":
        return [r["reference"] for r in rows]
    if source == "chosen":
        return [r[r["chosen"]] for r in rows]
    if source == "rejected":
        return [r["student" if r["chosen"] == "teacher" else "teacher"] for r in rows]
    return [r[source] for r in rows]
