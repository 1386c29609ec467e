"""PbKD (Jia, 2025, arXiv 2505.18952) as pure functions of arrays. The design is OUR RECONSTRUCTION.

Only the paper's abstract is public. It fixes the frame: distillation as a min-max between the
student `q` and a reward model `r`, the value being the teacher-student gap `J(p, r) - J(q, r)`
(`J(pi, r) = E_{y ~ pi} r(x, y)`), with `r` kept near-optimal on preference data (a confidence
set), offline and online, plus a white-box variant whose reward is written through a Q-function.
Everything concrete below (Bradley-Terry, the Lagrangian with dual ascent, REINFORCE with a
leave-one-out baseline, the moment-matching reward) is the design of `METHODS.md` section 3.

Conventions as in `plad_jax.losses`: fp32 inside, every mean masked, `(loss, metrics)` with
metrics as `(sum, count)` pairs; `metrics["loss"]` is `(loss * n, n)` with `n` the real rows, so
its ratio is the loss and `train.make_train_step` weighs micro-batches by rows.

Pieces:
- preference model: `bradley_terry_nll`, `bounded_reward`;
- adversary (reward model) side: `reward_model_loss` (`-gap + lam * NLL + c * mean(r^2)`) and
  `dual_ascent` for `lam`;
- student side: `leave_one_out_advantages`, `reinforce_loss` (KL-shaped reward), `cheap_loss`
  (`CE + lam * DPO`);
- white-box moment matching (MM) lives in `plad_jax.losses.pbkd_mm`.

The MM identity (derived here, tested in tests/test_pbkd.py). Write `s_h = (x, y_<h)`, `V_p(s) =
sum_a p(a|s) Q(s, a)` and the sequence reward `R(y) = sum_h [Q(s_h, y_h) - V_p(s_h)]`. Under the
teacher every term has mean zero, so `J(p, R) = 0`; under the student the h-th term has mean
`sum_a q(a|s_h) Q(s_h, a) - V_p(s_h) = -g_h` with `g_h = sum_a (p - q)(a|s_h) Q(s_h, a)`. Hence

    J(p, R) - J(q, R) = E_{y ~ q} [ sum_h g_h(s_h) ],

the expected per-sequence MM gap over student samples, exactly (no approximation beyond the
Monte-Carlo average over samples). Shapes: B rows (prompts), k samples per prompt, T positions,
V vocabulary, F feature width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from plad_jax import losses
from plad_jax.losses import Metrics, _masked_sum_count, _metric, masked_mean

F32 = jnp.float32


def _rows_loss_metric(
    loss: jax.Array, mask: jax.Array | None, rows: int
) -> tuple[jax.Array, jax.Array]:
    """`(loss * n, n)` with `n` the real rows: a metric whose ratio is `loss`, weighted by rows."""
    n = jnp.asarray(rows, F32) if mask is None else jnp.sum(mask.astype(bool).astype(F32))
    return jax.lax.stop_gradient(loss * n), n


# --------------------------------------------------------------------------------------------
# Preference model
# --------------------------------------------------------------------------------------------


def bounded_reward(raw: jax.Array, r_max: float) -> jax.Array:
    """`r_max * tanh(raw / r_max)`, fp32: about `raw` near 0, never beyond `+-r_max`."""
    if r_max <= 0:
        raise ValueError(f"bounded_reward: r_max must be positive, got {r_max}")
    return r_max * jnp.tanh(raw.astype(F32) / r_max)


def bradley_terry_nll(
    r_w: jax.Array, r_l: jax.Array, mask: jax.Array | None = None
) -> tuple[jax.Array, Metrics]:
    """Bradley-Terry negative log-likelihood, `-mean_b log sigmoid(r_w[b] - r_l[b])`, over real
    pairs.

    Args:
      r_w, r_l: [B] rewards of the preferred and the dispreferred response.
      mask: optional [B] pair mask.
    Metrics: `loss`, `accuracy` (r_w > r_l), `margin` (r_w - r_l).
    """
    diff = r_w.astype(F32) - r_l.astype(F32)  # [B]
    nll = -jax.nn.log_sigmoid(diff)
    metrics = {
        "loss": _metric(nll, mask),
        "accuracy": _metric((diff > 0).astype(F32), mask),
        "margin": _metric(diff, mask),
    }
    return masked_mean(nll, mask), metrics


# --------------------------------------------------------------------------------------------
# The adversary: Lagrangian of the confidence set, dual ascent on lambda
# --------------------------------------------------------------------------------------------


def reward_model_loss(
    r_teacher: jax.Array,
    r_student: jax.Array,
    r_chosen: jax.Array,
    r_rejected: jax.Array,
    lam: float | jax.Array,
    c: float,
    *,
    teacher_mask: jax.Array | None = None,
    student_mask: jax.Array | None = None,
    pair_mask: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
    """The reward model's loss: `-gap + lam * NLL + c * mean(r^2)` (minimised).

    `gap = mean r(teacher samples) - mean r(student samples)` estimates `J(p, r) - J(q, r)`; the
    RM maximises it while `lam * NLL` (Bradley-Terry on the preference pairs) holds it inside the
    confidence set. Neither term sees a constant shift of `r`; `c * mean(r^2)` over every reward
    in the loss pins the shift (toward 0) and, with the tanh bound, keeps `r` off saturation.

    Args:
      r_teacher: [Bt]; r_student: [Bs] (e.g. B*k samples); r_chosen, r_rejected: [Bp].
      lam: the current Lagrange multiplier (no gradient). c: the r^2 weight.
      *_mask: optional row masks of the matching arrays.
    Metrics: `loss`, `gap`, `nll`, `bt_accuracy`, `reward_sq`, `r_teacher`, `r_student`.
    """
    gap = masked_mean(r_teacher, teacher_mask) - masked_mean(r_student, student_mask)
    nll, bt = bradley_terry_nll(r_chosen, r_rejected, pair_mask)
    sq = [
        _masked_sum_count(jnp.square(r.astype(F32)), m)
        for r, m in (
            (r_teacher, teacher_mask),
            (r_student, student_mask),
            (r_chosen, pair_mask),
            (r_rejected, pair_mask),
        )
    ]
    reward_sq = sum(s for s, _ in sq) / jnp.maximum(sum(n for _, n in sq), 1.0)
    loss = -gap + jax.lax.stop_gradient(jnp.asarray(lam, F32)) * nll + c * reward_sq
    metrics = {
        "loss": _rows_loss_metric(loss, teacher_mask, r_teacher.shape[0]),
        "gap": (jax.lax.stop_gradient(gap), jnp.ones((), F32)),
        "nll": bt["loss"],
        "bt_accuracy": bt["accuracy"],
        "reward_sq": (jax.lax.stop_gradient(reward_sq), jnp.ones((), F32)),
        "r_teacher": _metric(r_teacher.astype(F32), teacher_mask),
        "r_student": _metric(r_student.astype(F32), student_mask),
    }
    return loss, metrics


def dual_ascent(
    lam: float | jax.Array,
    nll: float | jax.Array,
    nll_star: float | jax.Array,
    *,
    alpha_lam: float,
    eps: float,
    lam_max: float,
) -> jax.Array:
    """One dual-ascent step on the multiplier: `clip(lam + alpha_lam * (NLL - NLL* - eps), 0,
    lam_max)`.

    `lam` grows while the reward model fits the preferences worse than the warm-up fit `NLL*`
    allows (`NLL > NLL* + eps`, outside the confidence set) and shrinks back toward 0 inside it.
    """
    violation = jnp.asarray(nll, F32) - jnp.asarray(nll_star, F32) - eps
    return jnp.clip(jnp.asarray(lam, F32) + alpha_lam * violation, 0.0, lam_max)


# --------------------------------------------------------------------------------------------
# The student: REINFORCE with a leave-one-out baseline; the cheap CE + lambda * DPO variant
# --------------------------------------------------------------------------------------------


def leave_one_out_advantages(rewards: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Each sample's reward minus the mean reward of the other real samples of its prompt.

    `A[b, i] = r[b, i] - (sum_{j != i} m[b, j] r[b, j]) / (sum_{j != i} m[b, j])`. Over the real
    samples of a prompt the advantages sum to 0 (when it has at least 2). A sample with no real
    sibling has no baseline and gets 0, as does every padded sample.

    Args:
      rewards: [B, k] rewards of k samples per prompt. mask: optional [B, k], 1 = real sample.
    Returns:
      [B, k] float32 advantages (carrying the gradient of `rewards`, if any; callers stop it).
    """
    r = rewards.astype(F32)
    m = jnp.ones_like(r) if mask is None else mask.astype(bool).astype(F32)
    r = jnp.where(m > 0, r, 0.0)
    others = jnp.sum(m, axis=1, keepdims=True) - m  # [B, k]
    baseline = (jnp.sum(r, axis=1, keepdims=True) - r) / jnp.maximum(others, 1.0)
    return jnp.where((m > 0) & (others > 0), r - baseline, 0.0)


def reinforce_loss(
    logp: jax.Array,
    rewards: jax.Array,
    logp_ref: jax.Array,
    beta_kl: float,
    mask: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
    """REINFORCE with the leave-one-out baseline on the KL-shaped reward, mean over real samples.

    `shaped = r - beta_kl * (logp - logp_ref)` (the sequence log-ratio to the frozen reference is
    an unbiased estimate of KL(q || q_ref)); `A = leave_one_out_advantages(shaped)`;
    `loss = -mean_{b,i} stop_gradient(A[b, i]) * logp[b, i]`. Its gradient is the score-function
    estimate of `-grad E_q[r - beta_kl * log(q / q_ref)]` (the missing `-beta_kl * E[grad log q]`
    is zero in expectation).

    Args:
      logp: [B, k] student sequence log-probs (sum over tokens) of its own samples, with gradient.
      rewards: [B, k] reward-model scores of the samples (no gradient).
      logp_ref: [B, k] the same samples under the frozen reference (the initial student).
      beta_kl: KL weight. mask: optional [B, k] real samples.
    Metrics: `loss`, `reward`, `kl` (logp - logp_ref), `shaped_reward`, `abs_advantage`.
    """
    logp = logp.astype(F32)
    kl = jax.lax.stop_gradient(logp) - logp_ref.astype(F32)
    shaped = jax.lax.stop_gradient(rewards.astype(F32) - beta_kl * kl)  # [B, k]
    advantages = leave_one_out_advantages(shaped, mask)  # [B, k]
    per_sample = -advantages * logp
    loss = masked_mean(per_sample, mask)
    metrics = {
        "loss": _rows_loss_metric(loss, mask, logp.size),
        "reward": _metric(rewards.astype(F32), mask),
        "kl": _metric(kl, mask),
        "shaped_reward": _metric(shaped, mask),
        "abs_advantage": _metric(jnp.abs(advantages), mask),
    }
    return loss, metrics


def cheap_loss(
    ce: jax.Array,
    ce_metrics: Metrics,
    policy_pos: jax.Array,
    policy_neg: jax.Array,
    ref_pos: jax.Array,
    ref_neg: jax.Array,
    *,
    lam: float,
    beta: float,
    mask: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
    """Cheap PbKD: `CE(teacher samples) + lam * DPO(preference pairs)`, one model, no sampling.

    `ce, ce_metrics` come from `losses.sft_loss` on the teacher samples; the DPO arguments are as
    in `losses.dpo_loss` ([B] sequence log-probs, `score="sum"`). DPO is the Bradley-Terry NLL of
    the implicit reward `beta * log(q / q_ref)`, so `lam` plays the confidence-set multiplier.
    Metrics: `loss`, `ce`, `dpo`, and DPO's reward metrics.
    """
    dpo, dpo_metrics = losses.dpo_loss(policy_pos, policy_neg, ref_pos, ref_neg, beta, mask=mask)
    loss = ce + lam * dpo
    metrics = {
        **{k: v for k, v in dpo_metrics.items() if k != "loss"},
        "ce": ce_metrics["loss"],
        "dpo": dpo_metrics["loss"],
        "loss": _rows_loss_metric(loss, mask, policy_pos.shape[0]),
    }
    return loss, metrics
