"""Distillation objectives: each method as a `loss_fn(params, frozen, batch, rng)` for `train.py`.

`losses.py` holds the math on arrays; this file wires it to models. Batches are dicts of right-
padded int arrays:

    prompt_ids, prompt_mask              [B, P]  every method
    response_ids, response_mask          [B, R]  sft, seqkd (teacher samples), kd (targets),
                                                 fdistill_* (teacher and student samples mixed),
                                                 minillm (student samples, resampled each epoch)
    pos_ids, pos_mask, neg_ids, neg_mask [B, R]  plad_*, dpo, slic: y+ (teacher), y- (student)
    ref_ids, ref_mask                    [B, F]  plad_margin: the reference text the scores use
    response_ids + pos_* + neg_*                 pbkd_cheap: teacher samples (CE) and the pairs (DPO)

Frozen models run in `frozen_fn`, before and outside the gradient: teacher logits for kd,
fdistill and minillm, reference log-probs for dpo. `combine(params, frozen)` turns the trainable
leaves into the student's full params (identity for full fine-tuning; base + adapters for LoRA).

PbKD (`PBKD_METHODS`, our reconstruction of arXiv 2505.18952): only `pbkd_cheap` (CE on teacher
samples + lam * DPO) is one loss over one model and so an objective here. `pbkd_offline`,
`pbkd_online` and `pbkd_mm` alternate two players (reward model or Q-network, and the student) with
fresh student samples each step; their per-player losses are in `plad_jax.pbkd_objectives` and the
loop in `plad_jax.pbkd_loop.run_pbkd`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from plad_jax import losses, pbkd_objectives
from plad_jax.models.language_model import LanguageModel
from plad_jax.pbkd_config import PBKD_METHODS

METHODS = ("sft", "seqkd", "kd", "fdistill_tvd", "fdistill_js", "minillm", "dpo", "slic",
           "plad_rank", "plad_margin") + PBKD_METHODS
PAIR_METHODS = ("dpo", "slic", "plad_rank", "plad_margin")
TEACHER_LOGIT_METHODS = ("kd", "fdistill_tvd", "fdistill_js", "minillm")


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    method: str = "plad_rank"
    score: str = "mean"  # sequence log-prob: "mean" (length-normalised) or "sum"
    beta: float = 1.0  # PLaD margin / margin scale; DPO and SLiC beta
    alpha: float = 0.0  # weight of the CE regulariser on y+ (SLiC-style), PLaD and DPO
    kd_temperature: float = 1.0
    label_smoothing: float = 0.0  # DPO
    span_max_n: int = 4  # PLaD margin score: n-grams 1..N
    lam: float = 1.0  # pbkd_cheap: weight of DPO next to CE on teacher samples (beta = DPO beta)


def full_params(params, frozen):
    """`combine` for full fine-tuning: the trainable params are the student."""
    return params


def _response_logits(lm, params, batch, ids="response_ids", mask="response_mask", rng=None):
    return lm.apply(params, batch["prompt_ids"], batch["prompt_mask"], batch[ids], batch[mask], rng=rng)


def _pair_forward(lm, params, batch, rng=None):
    """Per-token log-probs, argmax hits and hidden states of y+ and y- in one forward over a 2B
    batch (`LanguageModel.token_logprobs`: no [2B, R, V] logits are kept)."""
    r = max(batch["pos_ids"].shape[1], batch["neg_ids"].shape[1])
    pad = lambda x: jnp.pad(x, ((0, 0), (0, r - x.shape[1])))
    prompt = jnp.concatenate([batch["prompt_ids"]] * 2)
    prompt_mask = jnp.concatenate([batch["prompt_mask"]] * 2)
    ids = jnp.concatenate([pad(batch["pos_ids"]), pad(batch["neg_ids"])])
    mask = jnp.concatenate([pad(batch["pos_mask"]), pad(batch["neg_mask"])])
    logps, hits, hidden = lm.token_logprobs(params, prompt, prompt_mask, ids, mask, rng=rng)
    b = batch["pos_ids"].shape[0]
    halves = lambda rows: tuple(x[rows] for x in (logps, hits, hidden, mask))
    return halves(slice(None, b)), halves(slice(b, None))


def _seq_logp(token_logps, mask, score):
    return losses.sequence_logprobs(token_logps, mask, score)


def _with_ce(loss, metrics, cfg, token_logps, hits, mask):
    """Add `alpha * CE(y+)` (the SLiC-style regulariser) when alpha > 0."""
    if cfg.alpha <= 0:
        return loss, metrics
    ce, ce_metrics = losses.sft_loss_tokens(token_logps, hits, mask)
    return loss + cfg.alpha * ce, {**metrics, "ce_pos": ce_metrics["loss"]}


def make_objective(cfg: ObjectiveConfig, student: LanguageModel, *, teacher: LanguageModel | None = None,
                   combine=full_params):
    """(loss_fn, frozen_fn) for `train.make_train_step`; `frozen` carries "teacher" / "reference"."""
    if cfg.method not in METHODS:
        raise ValueError(f"unknown method '{cfg.method}' (choose from {', '.join(METHODS)})")
    if cfg.method in TEACHER_LOGIT_METHODS and teacher is None:
        raise ValueError(f"method '{cfg.method}' needs a teacher with the student's vocabulary")
    if teacher is not None and cfg.method in TEACHER_LOGIT_METHODS and teacher.vocab_size != student.vocab_size:
        raise ValueError(f"method '{cfg.method}' compares token distributions: teacher vocabulary "
                         f"{teacher.vocab_size} != student vocabulary {student.vocab_size}")
    method = cfg.method
    if method == "pbkd_cheap":
        return pbkd_objectives.cheap_objective(student, lam=cfg.lam, beta=cfg.beta, combine=combine)
    if method in PBKD_METHODS:
        raise ValueError(f"method '{method}' alternates a reward model and the student with fresh samples; "
                         f"run it with plad_jax.pbkd_loop.run_pbkd (per-player losses: plad_jax.pbkd_objectives)")

    def frozen_fn(frozen, batch):
        if method in TEACHER_LOGIT_METHODS:
            logits, _ = _response_logits(teacher, frozen["teacher"], batch)
            return {"teacher_logits": logits}
        if method == "dpo":
            pos, neg = _pair_forward(student, frozen["reference"], batch)
            return {"ref_pos": _seq_logp(pos[0], pos[3], "sum"),
                    "ref_neg": _seq_logp(neg[0], neg[3], "sum")}
        return {}

    def loss_fn(params, frozen, batch, rng):
        student_params = combine(params, frozen)
        if method in ("sft", "seqkd"):
            logps, hits, _ = student.token_logprobs(
                student_params, batch["prompt_ids"], batch["prompt_mask"], batch["response_ids"],
                batch["response_mask"], rng=rng)
            return losses.sft_loss_tokens(logps, hits, batch["response_mask"])
        if method in TEACHER_LOGIT_METHODS:
            logits, _ = _response_logits(student, student_params, batch, rng=rng)
            mask, teacher_logits = batch["response_mask"], batch["teacher_logits"]
            if method == "kd":
                return losses.kd_forward_kl(logits, teacher_logits, mask, cfg.kd_temperature)
            if method == "fdistill_tvd":
                return losses.tvd_loss(logits, teacher_logits, mask)
            if method == "fdistill_js":
                return losses.js_loss(logits, teacher_logits, mask)
            return losses.reverse_kl_loss(logits, teacher_logits, mask)
        return _pair_loss(cfg, student, student_params, batch, rng)

    return loss_fn, (frozen_fn if method in TEACHER_LOGIT_METHODS + ("dpo",) else None)


def _pair_loss(cfg, student, params, batch, rng=None):
    (lp, kp, hp, mp), (ln, _, hn, mn) = _pair_forward(student, params, batch, rng)
    if cfg.method == "dpo":
        loss, metrics = losses.dpo_loss(_seq_logp(lp, mp, "sum"), _seq_logp(ln, mn, "sum"),
                                        batch["ref_pos"], batch["ref_neg"], cfg.beta, cfg.label_smoothing)
        return _with_ce(loss, metrics, cfg, lp, kp, mp)
    logp_pos, logp_neg = _seq_logp(lp, mp, cfg.score), _seq_logp(ln, mn, cfg.score)
    if cfg.method == "slic":
        loss, metrics = losses.hinge_loss(logp_pos, logp_neg, cfg.beta)
    elif cfg.method == "plad_rank":
        loss, metrics = losses.rank_calibration(logp_pos, logp_neg, cfg.beta)
    else:
        _, ref_hidden = student.apply(params, batch["prompt_ids"], batch["prompt_mask"],
                                      batch["ref_ids"], batch["ref_mask"])
        score = lambda h, m: losses.ngram_span_score(h, m, ref_hidden, batch["ref_mask"], cfg.span_max_n)
        loss, metrics = losses.margin_calibration(logp_pos, logp_neg, score(hp, mp), score(hn, mn), cfg.beta)
    return _with_ce(loss, metrics, cfg, lp, kp, mp)


def sequence_logprobs(lm: LanguageModel, params, prompt_ids, prompt_mask, response_ids, response_mask,
                      score: str = "sum") -> jax.Array:
    """[B] sequence log-probs of responses under `lm` (for pairs, evaluation and PbKD)."""
    logps, _, _ = lm.token_logprobs(params, prompt_ids, prompt_mask, response_ids, response_mask)
    return _seq_logp(logps, response_mask, score)
