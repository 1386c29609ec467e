"""PbKD's players as `loss_fn(params, frozen, batch, rng)` / `frozen_fn(frozen, batch)` for
`train.py`.

`pbkd.py` and `pbkd_mm.py` hold the math on arrays; this file wires it to models, like
`plad_jax.methods` does for the other methods. One PbKD step is two train steps, one per player, on
the same batch (dicts of right-padded int arrays):

    prompt_ids, prompt_mask        [B, P]    the prompts
    teacher_ids, teacher_mask      [B, Rt]   the teacher's sample per prompt (student tokenizer)
    pos_ids, pos_mask, neg_ids, neg_mask [B, R]  the preference pair per prompt (chosen, rejected)
    sample_ids, sample_mask        [B*k, Rs] k fresh student samples per prompt, rows grouped by
                                             prompt (rows b*k ... b*k + k - 1), EOS included

The frozen side of each step (in `frozen`): the other player's params, the reference (initial
student) for the KL term, the teacher for `pbkd_mm`, and `lam`, the current multiplier (in
`frozen`, not the batch, so micro-batching never splits it and a new value never recompiles).
Frozen models run in `frozen_fn`, before and outside `value_and_grad`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from plad_jax import losses
from plad_jax.config.pbkd import PbKDConfig
from plad_jax.losses import pbkd, pbkd_mm
from plad_jax.models.language_model import LanguageModel
from plad_jax.scoring.reward_model import RewardModel, real_pairs


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


def _part(batch, name: str):
    """(prompt ids, prompt mask, `name`_ids, `name`_mask) of a batch."""
    return batch["prompt_ids"], batch["prompt_mask"], batch[f"{name}_ids"], batch[f"{name}_mask"]


def _samples(batch, k: int):
    """(prompt ids, prompt mask, sample ids, sample mask) of the B*k student samples."""
    return (
        jnp.repeat(batch["prompt_ids"], k, axis=0),
        jnp.repeat(batch["prompt_mask"], k, axis=0),
        batch["sample_ids"],
        batch["sample_mask"],
    )


def _sample_rows(batch) -> jax.Array:
    """[B*k] bool: real samples (a sample always holds at least its first token)."""
    return jnp.any(batch["sample_mask"].astype(bool), axis=1)


def _student_logits(cfg: PbKDConfig, lm: LanguageModel, params, batch, rng):
    """Student logits on its k samples per prompt [B*k, Rs, V], and on the teacher samples
    [B, Rt, V] when the CE anchor is on (else None), from one forward pass."""
    parts = [_samples(batch, cfg.num_samples)] + (
        [_part(batch, "teacher")] if cfg.alpha_ce > 0 else []
    )
    arrays, split = joined(parts)
    logits = split(lm.apply(params, *arrays, rng=rng)[0])
    return logits[0], (logits[1] if cfg.alpha_ce > 0 else None)


def _teacher_ce(cfg: PbKDConfig, teacher_logits, batch, loss, metrics):
    """`loss + alpha_ce * CE(teacher samples)` when alpha_ce > 0 (the anchor)."""
    if cfg.alpha_ce <= 0:
        return loss, metrics
    ce, ce_metrics = losses.sft_loss(teacher_logits, batch["teacher_ids"], batch["teacher_mask"])
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
            [_part(batch, "teacher"), _samples(batch, k), _part(batch, "pos"), _part(batch, "neg")]
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
    Returns `(loss_fn, frozen_fn)`; frozen_fn adds `ref_logp` and `sample_reward` ([B*k]).
    """
    k = cfg.num_samples

    def frozen_fn(frozen, batch):
        samples = _samples(batch, k)
        ref_logits, _ = student.apply(frozen["reference"], *samples)
        ref_logp = losses.sequence_logprobs(
            losses.token_logprobs(ref_logits, samples[2]), samples[3], "sum"
        )
        return {"ref_logp": ref_logp, "sample_reward": rm.apply(frozen["rm"], *samples)}

    def loss_fn(params, frozen, batch, rng):
        logits, teacher_logits = _student_logits(cfg, student, combine(params, frozen), batch, rng)
        logp = losses.sequence_logprobs(
            losses.token_logprobs(logits, batch["sample_ids"]), batch["sample_mask"], "sum"
        )
        shape = (-1, k)
        loss, metrics = pbkd.reinforce_loss(
            logp.reshape(shape),
            batch["sample_reward"].reshape(shape),
            batch["ref_logp"].reshape(shape),
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


def _mm_pair_terms(cfg, batch, q_pos, q_neg):
    """MM terms of the chosen and the rejected responses (student slot = teacher: R needs only p and
    Q)."""
    out = []
    for side, q_raw in (("pos", q_pos), ("neg", q_neg)):
        teacher = batch[f"teacher_logits_{side}"]
        out.append(_mm_terms(cfg, teacher, teacher, q_raw, batch[f"{side}_ids"]))
    return out


def _groups(batch, k: int, *, pairs: bool, samples: bool):
    return ([_samples(batch, k)] if samples else []) + (
        [_part(batch, "pos"), _part(batch, "neg")] if pairs else []
    )


def mm_teacher_fn(teacher: LanguageModel, k: int, *, pairs: bool = True, samples: bool = True):
    """frozen_fn part: teacher logits on the samples and/or the pairs (`frozen["teacher"]`), one
    forward."""

    def frozen_fn(frozen, batch):
        arrays, split = joined(_groups(batch, k, pairs=pairs, samples=samples))
        logits = split(teacher.apply(frozen["teacher"], *arrays)[0])
        names = (["teacher_logits"] if samples else []) + (
            ["teacher_logits_pos", "teacher_logits_neg"] if pairs else []
        )
        return dict(zip(names, logits))

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
        r_w = pbkd_mm.mm_sequence_reward(chosen, batch["pos_mask"])
        r_l = pbkd_mm.mm_sequence_reward(rejected, batch["neg_mask"])
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

    def frozen_fn(frozen, batch):
        student_logits, _ = student.apply(frozen["student"], *_samples(batch, k))
        return {**teacher_fn(frozen, batch), "student_logits": student_logits}

    def loss_fn(params, frozen, batch, rng):
        del rng
        arrays, split = joined(_groups(batch, k, pairs=True, samples=True))
        q_samples, q_pos, q_neg = split(qnet.apply(params, *arrays)[0])
        terms = _mm_terms(
            cfg, batch["teacher_logits"], batch["student_logits"], q_samples, batch["sample_ids"]
        )
        chosen, rejected = _mm_pair_terms(cfg, batch, q_pos, q_neg)
        return pbkd_mm.mm_q_loss(
            terms,
            batch["sample_mask"],
            chosen,
            batch["pos_mask"],
            rejected,
            batch["neg_mask"],
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

    def frozen_fn(frozen, batch):
        q_raw, _ = qnet.apply(frozen["qnet"], *_samples(batch, k))
        return {**teacher_fn(frozen, batch), "q_values": q_raw}

    def loss_fn(params, frozen, batch, rng):
        logits, teacher_logits = _student_logits(cfg, student, combine(params, frozen), batch, rng)
        terms = _mm_terms(
            cfg, batch["teacher_logits"], logits, batch["q_values"], batch["sample_ids"]
        )
        loss, metrics = pbkd_mm.mm_student_loss(terms, batch["sample_mask"], k)
        return _teacher_ce(cfg, teacher_logits, batch, loss, metrics)

    return loss_fn, frozen_fn


# -- cheap PbKD: CE on teacher samples + lam * DPO ------------------------------------------------


def cheap_objective(student: LanguageModel, *, lam: float, beta: float, combine=full_params):
    """`pbkd.cheap_loss` for a batch of prompt, `response_*` (teacher samples) and `pos_*`/`neg_*`.

    frozen: `{"reference": initial student params}` (+ LoRA base). Returns `(loss_fn, frozen_fn)`;
    frozen_fn adds the reference's `ref_pos`, `ref_neg` ([B] summed log-probs).
    """

    def logits_of(params, batch, names, rng=None):
        arrays, split = joined([_part(batch, name) for name in names])
        return split(student.apply(params, *arrays, rng=rng)[0])

    def seq_logp(logits, batch, name):
        return losses.sequence_logprobs(
            losses.token_logprobs(logits, batch[f"{name}_ids"]), batch[f"{name}_mask"], "sum"
        )

    def frozen_fn(frozen, batch):
        pos, neg = logits_of(frozen["reference"], batch, ("pos", "neg"))
        return {"ref_pos": seq_logp(pos, batch, "pos"), "ref_neg": seq_logp(neg, batch, "neg")}

    def loss_fn(params, frozen, batch, rng):
        logits, pos_logits, neg_logits = logits_of(
            combine(params, frozen), batch, ("response", "pos", "neg"), rng
        )
        ce, ce_metrics = losses.sft_loss(logits, batch["response_ids"], batch["response_mask"])
        pos, neg = seq_logp(pos_logits, batch, "pos"), seq_logp(neg_logits, batch, "neg")
        return pbkd.cheap_loss(
            ce,
            ce_metrics,
            pos,
            neg,
            batch["ref_pos"],
            batch["ref_neg"],
            lam=lam,
            beta=beta,
            mask=real_pairs(batch),
        )

    return loss_fn, frozen_fn
