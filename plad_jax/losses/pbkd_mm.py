"""White-box PbKD by moment matching (MM): a Q-network over the vocabulary meets teacher
probabilities.

OUR RECONSTRUCTION of the paper's white-box variant (METHODS.md section 3). With a Q-network
`Q(s, a)` over the shared vocabulary, teacher `p` and student `q`, at every response position
`h` (state `s_h = (x, y_<h)`):

    g_h   = sum_a (p(a|s_h) - q(a|s_h)) Q(s_h, a)                 per-position gap
    R(y)  = sum_h [ Q(s_h, y_h) - sum_a p(a|s_h) Q(s_h, a) ]       sequence reward
                                                                  (for Bradley-Terry)
    J(p, R) - J(q, R) = E_{y ~ q} sum_h g_h                         (derivation: losses.pbkd)

Memory. Every term is a sum over the vocabulary at every position, so a direct implementation
holds several `[B, T, V]` arrays (softmaxes, products, and their cotangents in the backward pass).
`mm_position_terms` walks the positions in chunks of `chunk` (`lax.map` over a rematerialised
body), so those intermediates exist for one `[B, chunk, V]` block at a time. Inputs may be logits
`[B, T, V]`, or `Projected(features [B, T, F], params, project)` whose logits are computed per chunk
from features (hidden states and an output head): then no `[B, T, V]` array exists at all, in the
forward or the backward pass, and peak memory is bounded by `chunk x V` (`bench/pbkd_memory.py`).

The Q-step (`mm_q_loss`) maximises the gap minus the lambda-weighted Bradley-Terry NLL of `R`; the
student step (`mm_student_loss`) minimises the gap: the exact expectation over the vocabulary
(gradient through `q(.|s_h)`) plus a score-function term for the states the student visits, with a
leave-one-out baseline over its k samples per prompt.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from plad_jax.losses import Metrics, _masked_sum_count, _metric, masked_mean
from plad_jax.losses.pbkd import (
    _rows_loss_metric,
    bounded_reward,
    bradley_terry_nll,
    leave_one_out_advantages,
)

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Projected:
    """Logits made per chunk: `project(params, features[:, start:start + c]) -> [B, c, V]`.

    features: [B, T, F] (e.g. final hidden states); params: any pytree (e.g. an output head).
    """

    features: jax.Array
    params: Any
    project: Callable[[Any, jax.Array], jax.Array]


Source = jax.Array | Projected


class MMTerms(NamedTuple):
    """Per-position MM quantities, each [B, T] float32 (meaningless at padded positions)."""

    v_teacher: jax.Array  # sum_a p(a|s_h) Q(s_h, a)
    v_student: jax.Array  # sum_a q(a|s_h) Q(s_h, a)
    q_taken: jax.Array  # Q(s_h, y_h)
    logq_taken: jax.Array  # log q(y_h | s_h)


def _block(source: Source, start, size: int) -> jax.Array:
    """Positions `[start, start + size)` of a source as float32 logits [B, size, V]."""
    if isinstance(source, Projected):
        features = jax.lax.dynamic_slice_in_dim(source.features, start, size, axis=1)
        return source.project(source.params, features).astype(F32)
    return jax.lax.dynamic_slice_in_dim(source, start, size, axis=1).astype(F32)


def _block_terms(teacher, student, q_values, tokens, start, size: int, q_max) -> MMTerms:
    """`MMTerms` of positions `[start, start + size)`; the teacher carries no gradient."""
    log_p = jax.nn.log_softmax(
        jax.lax.stop_gradient(_block(teacher, start, size)), axis=-1
    )  # [B, c, V]
    log_q = jax.nn.log_softmax(_block(student, start, size), axis=-1)  # [B, c, V]
    q = _block(q_values, start, size)
    q = q if q_max is None else bounded_reward(q, q_max)  # [B, c, V]
    y = jax.lax.dynamic_slice_in_dim(tokens, start, size, axis=1)[..., None]  # [B, c, 1]
    return MMTerms(
        v_teacher=jnp.sum(jnp.exp(log_p) * q, axis=-1),
        v_student=jnp.sum(jnp.exp(log_q) * q, axis=-1),
        q_taken=jnp.take_along_axis(q, y, axis=-1, mode="clip")[..., 0],
        logq_taken=jnp.take_along_axis(log_q, y, axis=-1, mode="clip")[..., 0],
    )


def mm_position_terms(
    teacher: Source,
    student: Source,
    q_values: Source,
    tokens: jax.Array,
    *,
    chunk: int | None = None,
    q_max: float | None = None,
) -> MMTerms:
    """The per-position MM terms over a sequence, `chunk` positions at a time.

    Args:
      teacher: teacher logits [B, T, V] (or `Projected`); no gradient flows into it.
      student: student logits [B, T, V] (or `Projected`), row b column t predicting `tokens[b, t]`.
      q_values: raw Q-network outputs [B, T, V] (or `Projected`) on the same states.
      tokens: [B, T] int, the response tokens `y_h` (padding may hold anything).
      chunk: positions per block; None or >= T computes the whole sequence at once. The last
        block is shifted back to end at T (its first positions are recomputed, not padded), so
        no input is ever copied or padded.
      q_max: if set, `Q = bounded_reward(raw, q_max)`; None uses the raw values.
    Returns:
      `MMTerms`, each [B, T]. Chunked and unchunked results agree (values and gradients).
    """
    length = tokens.shape[1]
    if chunk is None or chunk >= length:
        return _block_terms(teacher, student, q_values, tokens, 0, length, q_max)
    if chunk < 1:
        raise ValueError(f"mm_position_terms: chunk must be >= 1, got {chunk}")
    n = -(-length // chunk)
    starts = jnp.minimum(jnp.arange(n) * chunk, length - chunk)  # [n]
    # Remat: the backward pass recomputes each block from its inputs instead of keeping n blocks.
    body = jax.checkpoint(
        lambda s: _block_terms(teacher, student, q_values, tokens, s, chunk, q_max),
        prevent_cse=False,
    )
    stacked = jax.lax.map(body, starts)  # each field [n, B, chunk]
    overlap = n * chunk - length  # leading positions of the last block already computed

    def join(x):
        x = jnp.moveaxis(x, 0, 1).reshape(x.shape[1], n * chunk)  # [B, n * chunk]
        return jnp.concatenate([x[:, : (n - 1) * chunk], x[:, (n - 1) * chunk + overlap :]], axis=1)

    return MMTerms(*(join(x) for x in stacked))


# --------------------------------------------------------------------------------------------
# Sequence-level quantities
# --------------------------------------------------------------------------------------------


def _masked_row_sum(x: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.sum(jnp.where(mask.astype(bool), x.astype(F32), 0.0), axis=-1)


def mm_gap(terms: MMTerms, mask: jax.Array) -> jax.Array:
    """[B] per-sequence gap `sum_h mask * g_h`, `g_h = v_teacher - v_student` (mask [B, T])."""
    return _masked_row_sum(terms.v_teacher - terms.v_student, mask)


def mm_sequence_reward(terms: MMTerms, mask: jax.Array) -> jax.Array:
    """[B] Bradley-Terry sequence reward `R(y) = sum_h mask * (Q(s_h, y_h) - sum_a p(a|s_h) Q(s_h,
    a))`."""
    return _masked_row_sum(terms.q_taken - terms.v_teacher, mask)


def _real_rows(mask: jax.Array) -> jax.Array:
    """[B] bool: the row has at least one real position (filler rows have none)."""
    return jnp.any(mask.astype(bool), axis=-1)


# --------------------------------------------------------------------------------------------
# The two players
# --------------------------------------------------------------------------------------------


def mm_q_loss(
    samples: MMTerms,
    sample_mask: jax.Array,
    chosen: MMTerms,
    chosen_mask: jax.Array,
    rejected: MMTerms,
    rejected_mask: jax.Array,
    lam: float | jax.Array,
    c: float,
) -> tuple[jax.Array, Metrics]:
    """The Q-network's loss: `-gap + lam * NLL(R) + c * mean(R^2)` (minimised).

    `gap` = mean over student-sampled rows of `mm_gap`; `NLL` = Bradley-Terry on the sequence
    rewards `R` of the (chosen, rejected) pairs; `mean(R^2)` over those pairs pins the reward scale.

    Args:
      samples, sample_mask: terms [Bs, T] on student samples and their position mask.
      chosen, rejected (+ masks): terms [Bp, T] on the preference pairs.
      lam: the multiplier (no gradient); c: weight of the R^2 term.
    Metrics: `loss`, `gap`, `nll`, `bt_accuracy`, `reward_sq`.
    """
    rows = _real_rows(sample_mask)
    gap = masked_mean(mm_gap(samples, sample_mask), rows)
    r_w, r_l = mm_sequence_reward(chosen, chosen_mask), mm_sequence_reward(rejected, rejected_mask)
    pairs = _real_rows(chosen_mask) & _real_rows(rejected_mask)
    nll, bt = bradley_terry_nll(r_w, r_l, pairs)
    sq_w, n_w = _masked_sum_count(jnp.square(r_w), pairs)
    sq_l, n_l = _masked_sum_count(jnp.square(r_l), pairs)
    reward_sq = (sq_w + sq_l) / jnp.maximum(n_w + n_l, 1.0)
    loss = -gap + jax.lax.stop_gradient(jnp.asarray(lam, F32)) * nll + c * reward_sq
    one = jnp.ones((), F32)
    metrics = {
        "loss": _rows_loss_metric(loss, rows, rows.shape[0]),
        "gap": _metric(mm_gap(samples, sample_mask), rows),
        "nll": bt["loss"],
        "bt_accuracy": bt["accuracy"],
        "reward_sq": (jax.lax.stop_gradient(reward_sq), one),
    }
    return loss, metrics


def mm_student_loss(samples: MMTerms, sample_mask: jax.Array, k: int) -> tuple[jax.Array, Metrics]:
    """The student's loss: a surrogate whose gradient is that of `E_{y ~ q} sum_h g_h` (minimised).

    `G_i = sum_h g_h` depends on the student twice: through `q(.|s_h)` inside `g_h` (exact, the
    sum over the vocabulary) and through which states it visits (score function). The surrogate
    `G_i + stop_gradient(A_i) * log q(y_i)` with `A = leave_one_out_advantages(G)` over the k
    samples of a prompt has exactly that expected gradient (`g_h` does not depend on tokens at or
    after h, so scoring the whole sequence adds only zero-mean terms).

    Args:
      samples: terms [B*k, T] on the student's own samples (gradient through `v_student` and
        `logq_taken`), rows grouped by prompt (rows `b*k ... b*k + k - 1`).
      sample_mask: [B*k, T] position mask. k: samples per prompt.
    Metrics: `loss` (the surrogate), `gap` (mean `G`), `abs_advantage`.
    """
    rows = _real_rows(sample_mask)  # [B*k]
    gap = mm_gap(samples, sample_mask)  # [B*k], differentiable
    logq = _masked_row_sum(samples.logq_taken, sample_mask)  # [B*k]
    advantages = leave_one_out_advantages(
        jax.lax.stop_gradient(gap).reshape(-1, k), rows.reshape(-1, k)
    )
    surrogate = gap + jax.lax.stop_gradient(advantages.reshape(-1)) * logq
    loss = masked_mean(surrogate, rows)
    metrics = {
        "loss": _rows_loss_metric(loss, rows, rows.shape[0]),
        "gap": _metric(gap, rows),
        "abs_advantage": _metric(jnp.abs(advantages.reshape(-1)), rows),
    }
    return loss, metrics
