"""PbKD's players as `loss_fn(params, frozen, batch, rng)` / `frozen_fn(frozen, batch)` for
`train.py`.

`pbkd.py` and `pbkd_mm.py` hold the math on arrays; this file wires it to models, like
`plad_jax.methods` does for the other methods. One PbKD step is two train steps, one per player, on
the same `GameBatch` (`plad_jax.data.batch`: every field's shape and padding):

    prompt_ids, prompt_mask          [B, P]    the prompts
    response_ids, response_mask      [B, Rt]   the teacher's sample per prompt (student tokenizer)
    chosen_*, rejected_*             [B, R]    the preference pair per prompt
    sample_ids, sample_mask          [B*k, Rs] k fresh student samples per prompt, rows grouped by
                                               prompt (rows b*k ... b*k + k - 1), EOS included

(`pbkd_cheap` reads a `PairBatch`: no samples.) The frozen side of each step (in `frozen`): the
other player's params, the reference (initial student) for the KL term, the teacher for `pbkd_mm`,
and `lam`, the current multiplier (in `frozen`, not the batch, so micro-batching never splits it
and a new value never recompiles). Frozen models run in `frozen_fn`, before and outside
`value_and_grad`; their outputs (`SampleScores`, `MMLogits`, `ReferenceLogprobs`) reach the loss
as `batch.frozen_outputs`.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from plad_jax import losses
from plad_jax.config.pbkd import PbKDConfig
from plad_jax.data import GameBatch, PairBatch, ReferenceLogprobs
from plad_jax.losses import pbkd, pbkd_mm
from plad_jax.models.language_model import LanguageModel
from plad_jax.scoring.reward_model import RewardModel, real_pairs


@flax.struct.dataclass(kw_only=True)
class SampleScores:
    """`frozen_outputs` of the REINFORCE student's step, one value per student sample.

    reference_logp: [B*k] float32, each sample's summed log-prob under the reference (the
        initial student), for the KL term.
    reward: [B*k] float32, the reward model's bounded reward of each sample.
    """

    reference_logp: jax.Array
    reward: jax.Array


@flax.struct.dataclass(kw_only=True)
class MMLogits:
    """`frozen_outputs` of the moment-matching steps ([N, R, V] float32 logits, position t
    predicting token t of its rows); each step fills the fields it reads, the rest stay None.

    teacher: [B*k, Rs, V] the teacher on the student samples.
    teacher_chosen, teacher_rejected: [B, Rc, V], [B, Rr, V] the teacher on y+ and y-.
    student: [B*k, Rs, V] the current student on its samples (the Q-network's step).
    q_values: [B*k, Rs, V] the frozen Q-network's raw outputs on the samples (the student's step).
    """

    teacher: jax.Array | None = None
    teacher_chosen: jax.Array | None = None
    teacher_rejected: jax.Array | None = None
    student: jax.Array | None = None
    q_values: jax.Array | None = None


def full_params(params, frozen):
    """`combine` for full fine-tuning (LoRA passes `lora.objective_combine`)."""
    return params


def joined(parts):
    """One forward pass for several row groups: `(arrays, split)`.

    parts: `(prompt_ids, prompt_mask, response_ids, response_mask)` tuples ([Bi, Pi], [Bi, Ri]).
    arrays: the four concatenated along rows, prompts and responses right-padded to one width
    (padding never changes a real position). split(x): a [sum Bi, ...] output cut back into the
    groups; outputs with a response axis ([N, R, ...]) are trimmed to each group's own width.
    One call of a model instead of one per group means one copy of its graph to compile and a
    larger, better-filled batch.
    """
    p = max(part[0].shape[1] for part in parts)
    r = max(part[2].shape[1] for part in parts)
    pad = lambda x, width: jnp.pad(x, ((0, 0), (0, width - x.shape[1])))
    arrays = tuple(
        jnp.concatenate([pad(part[i], p if i < 2 else r) for part in parts]) for i in range(4)
    )
    rows = [part[0].shape[0] for part in parts]
    widths = [part[2].shape[1] for part in parts]

    def split(x):
        out, start = [], 0
        for n, width in zip(rows, widths):
            piece = x[start : start + n]
            out.append(piece[:, :width] if piece.ndim >= 2 else piece)
            start += n
        return out

    return arrays, split


def _samples(batch: GameBatch, k: int):
    """(prompt ids, prompt mask, sample ids, sample mask) of the B*k student samples."""
    return (
        jnp.repeat(batch.prompt_ids, k, axis=0),
        jnp.repeat(batch.prompt_mask, k, axis=0),
        batch.sample_ids,
        batch.sample_mask,
    )


def _sample_rows(batch: GameBatch) -> jax.Array:
    """[B*k] bool: real samples (a sample always holds at least its first token)."""
    return jnp.any(batch.sample_mask.astype(bool), axis=1)


def _student_logits(cfg: PbKDConfig, lm: LanguageModel, params, batch: GameBatch, rng):
    """Student logits on its k samples per prompt [B*k, Rs, V], and on the teacher samples
    [B, Rt, V] when the CE anchor is on (else None), from one forward pass."""
    parts = [_samples(batch, cfg.num_samples)] + (
        [batch.response_inputs()] if cfg.alpha_ce > 0 else []
    )
    arrays, split = joined(parts)
    logits = split(lm.apply(params, *arrays, rng=rng)[0])
    return logits[0], (logits[1] if cfg.alpha_ce > 0 else None)


def _teacher_ce(cfg: PbKDConfig, teacher_logits, batch, loss, metrics):
    """`loss + alpha_ce * CE(teacher samples)` when alpha_ce > 0 (the anchor)."""
    if cfg.alpha_ce <= 0:
        return loss, metrics
    ce, ce_metrics = losses.sft_loss(teacher_logits, batch.response_ids, batch.response_mask)
    return loss + cfg.alpha_ce * ce, {**metrics, "ce_teacher": ce_metrics["loss"]}


# -- black-box PbKD (offline / online): reward model vs REINFORCE student --------------------------


def reward_model_objective(cfg: PbKDConfig, rm: RewardModel):
    """The reward model's step: `pbkd.reward_model_loss` (`-gap + lam * NLL + c * mean(r^2)`).

    frozen: `{"lam": scalar}`. Returns `loss_fn` (no frozen_fn: nothing frozen runs a model).
    """
    k = cfg.num_samples

    def loss_fn(params, frozen, batch, rng):
        del rng
        real = real_pairs(batch)
        arrays, split = joined(
            [
                batch.response_inputs(),
                _samples(batch, k),
                batch.chosen_inputs(),
                batch.rejected_inputs(),
            ]
        )
        r_teacher, r_student, r_pos, r_neg = split(rm.apply(params, *arrays))
        return pbkd.reward_model_loss(
            r_teacher,
            r_student,
            r_pos,
            r_neg,
            frozen["lam"],
            cfg.c_reg,
            teacher_mask=real,
            student_mask=_sample_rows(batch),
            pair_mask=real,
        )

    return loss_fn


def reinforce_objective(
    cfg: PbKDConfig, student: LanguageModel, rm: RewardModel, combine=full_params
):
    """The student's step: `pbkd.reinforce_loss` on its k samples per prompt (+ alpha_ce * CE
    anchor).

    frozen: `{"reference": initial student params (full), "rm": reward model params}` (+ LoRA base).
    Returns `(loss_fn, frozen_fn)`; frozen_fn gives the samples' `SampleScores`.
    """
    k = cfg.num_samples

    def frozen_fn(frozen, batch: GameBatch) -> SampleScores:
        samples = _samples(batch, k)
        ref_logits, _ = student.apply(frozen["reference"], *samples)
        ref_logp = _sum_logp(ref_logits, samples[2], samples[3])
        return SampleScores(reference_logp=ref_logp, reward=rm.apply(frozen["rm"], *samples))

    def loss_fn(params, frozen, batch: GameBatch, rng):
        logits, teacher_logits = _student_logits(cfg, student, combine(params, frozen), batch, rng)
        logp = _sum_logp(logits, batch.sample_ids, batch.sample_mask)
        shape, scores = (-1, k), batch.frozen_outputs
        loss, metrics = pbkd.reinforce_loss(
            logp.reshape(shape),
            scores.reward.reshape(shape),
            scores.reference_logp.reshape(shape),
            cfg.beta_kl,
            _sample_rows(batch).reshape(shape),
        )
        return _teacher_ce(cfg, teacher_logits, batch, loss, metrics)

    return loss_fn, frozen_fn


# -- white-box PbKD (moment matching): Q-network vs student ----------------------------------------


def _mm_terms(cfg, teacher_logits, student_logits, q_raw, ids):
    return pbkd_mm.mm_position_terms(
        teacher_logits, student_logits, q_raw, ids, chunk=cfg.mm_chunk, q_max=cfg.r_max
    )


def _mm_pair_terms(cfg, batch: GameBatch, q_pos, q_neg):
    """MM terms of the chosen and the rejected responses (student slot = teacher: R needs only p and
    Q)."""
    logits = batch.frozen_outputs
    return [
        _mm_terms(cfg, logits.teacher_chosen, logits.teacher_chosen, q_pos, batch.chosen_ids),
        _mm_terms(cfg, logits.teacher_rejected, logits.teacher_rejected, q_neg, batch.rejected_ids),
    ]


def _groups(batch: GameBatch, k: int, *, pairs: bool, samples: bool):
    return ([_samples(batch, k)] if samples else []) + (
        [batch.chosen_inputs(), batch.rejected_inputs()] if pairs else []
    )


def mm_teacher_fn(teacher: LanguageModel, k: int, *, pairs: bool = True, samples: bool = True):
    """frozen_fn part: `MMLogits` of the teacher (`frozen["teacher"]`) on the samples and/or the
    pairs, one forward."""

    def frozen_fn(frozen, batch: GameBatch) -> MMLogits:
        arrays, split = joined(_groups(batch, k, pairs=pairs, samples=samples))
        logits = split(teacher.apply(frozen["teacher"], *arrays)[0])
        names = (["teacher"] if samples else []) + (
            ["teacher_chosen", "teacher_rejected"] if pairs else []
        )
        return MMLogits(**dict(zip(names, logits)))

    return frozen_fn


def mm_bt_objective(cfg: PbKDConfig, qnet: LanguageModel, teacher: LanguageModel):
    """Warm-up of the Q-network: Bradley-Terry NLL of the MM sequence reward R (+ c_reg *
    mean(R^2)).

    frozen: `{"teacher": params}`. Returns `(loss_fn, frozen_fn)`. Metrics: `loss`, `nll`,
        `accuracy`.
    """

    def loss_fn(params, frozen, batch, rng):
        del frozen, rng
        arrays, split = joined(_groups(batch, cfg.num_samples, pairs=True, samples=False))
        chosen, rejected = _mm_pair_terms(cfg, batch, *split(qnet.apply(params, *arrays)[0]))
        r_w = pbkd_mm.mm_sequence_reward(chosen, batch.chosen_mask)
        r_l = pbkd_mm.mm_sequence_reward(rejected, batch.rejected_mask)
        real = real_pairs(batch)
        nll, metrics = pbkd.bradley_terry_nll(r_w, r_l, real)
        reg = losses.masked_mean(jnp.square(jnp.stack([r_w, r_l])), jnp.stack([real, real]))
        loss = nll + cfg.c_reg * reg
        n = metrics["loss"][1]
        return loss, {
            **metrics,
            "nll": metrics["loss"],
            "loss": (jax.lax.stop_gradient(loss) * n, n),
        }

    return loss_fn, mm_teacher_fn(teacher, cfg.num_samples, samples=False)


def mm_q_objective(
    cfg: PbKDConfig, qnet: LanguageModel, teacher: LanguageModel, student: LanguageModel
):
    """The Q-network's step: `pbkd_mm.mm_q_loss` (maximise the gap minus lam * NLL of R).

    frozen: `{"teacher", "student" (full params), "lam"}`. Returns `(loss_fn, frozen_fn)`.
    """
    k = cfg.num_samples
    teacher_fn = mm_teacher_fn(teacher, k)

    def frozen_fn(frozen, batch: GameBatch) -> MMLogits:
        student_logits, _ = student.apply(frozen["student"], *_samples(batch, k))
        return teacher_fn(frozen, batch).replace(student=student_logits)

    def loss_fn(params, frozen, batch: GameBatch, rng):
        del rng
        arrays, split = joined(_groups(batch, k, pairs=True, samples=True))
        q_samples, q_pos, q_neg = split(qnet.apply(params, *arrays)[0])
        logits = batch.frozen_outputs
        terms = _mm_terms(cfg, logits.teacher, logits.student, q_samples, batch.sample_ids)
        chosen, rejected = _mm_pair_terms(cfg, batch, q_pos, q_neg)
        return pbkd_mm.mm_q_loss(
            terms,
            batch.sample_mask,
            chosen,
            batch.chosen_mask,
            rejected,
            batch.rejected_mask,
            frozen["lam"],
            cfg.c_reg,
        )

    return loss_fn, frozen_fn


def mm_student_objective(
    cfg: PbKDConfig,
    student: LanguageModel,
    teacher: LanguageModel,
    qnet: LanguageModel,
    combine=full_params,
):
    """The student's step: `pbkd_mm.mm_student_loss` (+ alpha_ce * CE anchor on teacher samples).

    frozen: `{"teacher", "qnet"}` (+ LoRA base). Returns `(loss_fn, frozen_fn)`.
    """
    k = cfg.num_samples
    teacher_fn = mm_teacher_fn(teacher, k, pairs=False)

    def frozen_fn(frozen, batch: GameBatch) -> MMLogits:
        q_raw, _ = qnet.apply(frozen["qnet"], *_samples(batch, k))
        return teacher_fn(frozen, batch).replace(q_values=q_raw)

    def loss_fn(params, frozen, batch: GameBatch, rng):
        logits, teacher_logits = _student_logits(cfg, student, combine(params, frozen), batch, rng)
        frozen_logits = batch.frozen_outputs
        terms = _mm_terms(
            cfg, frozen_logits.teacher, logits, frozen_logits.q_values, batch.sample_ids
        )
        loss, metrics = pbkd_mm.mm_student_loss(terms, batch.sample_mask, k)
        return _teacher_ce(cfg, teacher_logits, batch, loss, metrics)

    return loss_fn, frozen_fn


# -- cheap PbKD: CE on teacher samples + lam * DPO ------------------------------------------------


def cheap_objective(student: LanguageModel, *, lam: float, beta: float, combine=full_params):
    """`pbkd.cheap_loss` for a `PairBatch` whose `response_*` are the teacher samples.

    frozen: `{"reference": initial student params}` (+ LoRA base). Returns `(loss_fn, frozen_fn)`;
    frozen_fn gives the reference's `ReferenceLogprobs` of y+ and y- ([B] summed log-probs).
    """

    def logits_of(params, parts, rng=None):
        arrays, split = joined(parts)
        return split(student.apply(params, *arrays, rng=rng)[0])

    def pair_logps(pos_logits, neg_logits, batch: PairBatch):
        return (
            _sum_logp(pos_logits, batch.chosen_ids, batch.chosen_mask),
            _sum_logp(neg_logits, batch.rejected_ids, batch.rejected_mask),
        )

    def frozen_fn(frozen, batch: PairBatch) -> ReferenceLogprobs:
        pair = [batch.chosen_inputs(), batch.rejected_inputs()]
        chosen, rejected = pair_logps(*logits_of(frozen["reference"], pair), batch)
        return ReferenceLogprobs(chosen=chosen, rejected=rejected)

    def loss_fn(params, frozen, batch: PairBatch, rng):
        parts = [batch.response_inputs(), batch.chosen_inputs(), batch.rejected_inputs()]
        logits, pos_logits, neg_logits = logits_of(combine(params, frozen), parts, rng)
        ce, ce_metrics = losses.sft_loss(logits, batch.response_ids, batch.response_mask)
        pos, neg = pair_logps(pos_logits, neg_logits, batch)
        reference = batch.frozen_outputs
        return pbkd.cheap_loss(
            ce,
            ce_metrics,
            pos,
            neg,
            reference.chosen,
            reference.rejected,
            lam=lam,
            beta=beta,
            mask=real_pairs(batch),
        )

    return loss_fn, frozen_fn


def _sum_logp(logits, ids, mask):
    """[N] summed log-probs of `ids` under `logits` [N, R, V]."""
    return losses.sequence_logprobs(losses.token_logprobs(logits, ids), mask, "sum")
