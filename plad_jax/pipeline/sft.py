"""The `sft_teacher` and `sft_student` stages: SFT on D0, best checkpoint on validation."""

from __future__ import annotations

import logging
import os

import numpy as np

from plad_jax import methods
from plad_jax.pipeline.context import Context
from plad_jax.pipeline.train import sft_batches, train_model
from plad_jax.scoring import rewards

logger = logging.getLogger(__name__)


def sft_stage(role: str):
    def stage(ctx: Context, stage_dir: str):
        lm = ctx.with_lora(ctx.base_model(role), role)
        train_cfg = getattr(ctx.config, f"sft_{role}")
        d0 = ctx.splits.d0
        encoded = ctx.encode(role, [e.prompt for e in d0], [e.response for e in d0])
        logger.info(
            "sft_%s: %d examples, %d prompts cut to %d tokens",
            role,
            len(d0),
            encoded.num_prompts_cut,
            ctx.config.data.max_prompt_tokens,
        )
        select = None
        if train_cfg.select_best and ctx.splits.validation:
            select = lambda model: validation_score(ctx, model, role, train_cfg.validation_examples)
        lm, summary = train_model(
            ctx,
            lm,
            stage_dir,
            train_cfg,
            methods.SFT(),
            sft_batches(encoded, train_cfg.batch_size),
            len(d0),
            select=select,
        )
        if lm is not None:  # else the selection already wrote the best checkpoint there
            lm.save_pretrained(os.path.join(stage_dir, "params"))
        return {**summary, "examples": len(d0), "prompts_cut": encoded.num_prompts_cut}

    return stage


def validation_score(ctx: Context, lm, role: str, n: int) -> float:
    """The paper's model selection on validation, greedy decoding, scored with `eval.scorer`: the
    win rate against the targets, or, for a scorer that measures closeness to the target (ROUGE-L),
    the mean score (a win rate against the target itself would always be 0)."""
    examples = ctx.splits.validation[:n]
    prompts, refs = [e.prompt for e in examples], [e.response for e in examples]
    texts, _, _ = ctx.sample_responses(
        lm,
        role,
        prompts,
        temperature=0.0,
        max_new_tokens=ctx.config.eval.max_new_tokens,
        seed=ctx.config.seed,
        desc="validation",
        stop=ctx.stop_strings(ctx.config.eval),
    )
    scorer = ctx.scorer(ctx.config.eval)
    scores = scorer.score(prompts, texts, refs)
    if rewards.is_reference_based(scorer):
        return float(np.mean(scores))
    return rewards.win_rate(scores, scorer.score(prompts, refs, refs))
