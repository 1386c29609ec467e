"""Losses for distillation and preference training: pure functions of arrays.

Every loss returns `(loss, metrics)`: `loss` is a float32 scalar and `metrics` maps a name to a
`(sum, count)` pair of float32 scalars, so hosts and logging windows aggregate by adding sums and
counts and dividing once (never by averaging averages). Inputs of any float dtype are cast up to
float32 first. Masks are 0/1 arrays (1 = real token / real row); every mean is over real entries
only, so padded positions and padded batch rows never count, whatever values they hold (any
finite values; token targets may be anything, e.g. -100). A mean over zero real entries is 0.

Families (the function names are the contract):
- building blocks: `masked_mean`, `token_logprobs`, `sequence_logprobs`, and
  `chunked_token_logprobs` (the same log-probs from final hidden states, one sequence chunk of
  logits at a time, so no [B, T, V] array is ever whole);
- supervised: `sft_loss`, `seqkd_loss` (SeqKD = SFT on teacher samples), `sft_loss_tokens` (the
  same loss from per-token log-probs and argmax hits);
- PLaD (arXiv 2406.02886): `rank_calibration` (Eq. 4), `margin_calibration` (Eq. 5) and its
  score `ngram_span_score` (Eq. 6-8). The optional SLiC-style regulariser `+ alpha * CE(y+)` is
  composed by the caller:
  `rank_calibration(...)[0] + alpha * sft_loss(logits_pos, y_pos, m_pos)[0]`;
- token-level distillation, teacher logits given: `kd_forward_kl`, `tvd_loss`, `js_loss`,
  `reverse_kl_loss`, `generalized_jsd_loss`;
- pairwise preference: `dpo_loss`, `hinge_loss` (SLiC-HF / CPO hinge).

Shapes: B batch, T response length, V vocabulary, D hidden width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Metrics = dict[str, tuple[jax.Array, jax.Array]]

F32 = jnp.float32


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


def masked_mean(x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """`sum(x * mask) / max(sum(mask), 1)` over all axes, in float32 (`mask` has x's shape).

    Masked-out entries are dropped with `where`, so NaN/inf there never leaks into the result.
    """
    total, count = _masked_sum_count(x, mask)
    return total / jnp.maximum(count, 1.0)


def _masked_sum_count(x: jax.Array, mask: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """`(sum of x over real entries, number of real entries)`, both float32 scalars."""
    x = x.astype(F32)
    if mask is None:
        return jnp.sum(x), jnp.asarray(x.size, F32)
    real = mask.astype(bool)
    return jnp.sum(jnp.where(real, x, 0.0)), jnp.sum(real.astype(F32))


def _metric(x: jax.Array, mask: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """A `(sum, count)` metric of `x` over real entries, with no gradient."""
    return _masked_sum_count(jax.lax.stop_gradient(x), mask)


def _log_probs(logits: jax.Array, temperature: float = 1.0) -> jax.Array:
    """`log_softmax(logits / temperature)` over the last axis, in float32."""
    return jax.nn.log_softmax(logits.astype(F32) / temperature, axis=-1)


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-token log-probabilities `log_softmax(logits)[b, t, targets[b, t]]`, float32.

    Computed as `logits[target] - logsumexp(logits)` so no [B, T, V] log-prob array is kept.
    Out-of-range targets (padding ids such as -100) are clipped into the vocabulary; the value
    at a padded position is meaningless and must be masked by the caller.

    Args:
      logits: [B, T, V] next-token logits, any float dtype.
      targets: [B, T] int token ids.
    Returns:
      [B, T] float32 log q(targets[b, t] | ...).
    """
    logits = logits.astype(F32)  # [B, T, V]
    normaliser = jax.nn.logsumexp(logits, axis=-1)  # [B, T]
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1, mode="clip")[..., 0]
    return picked - normaliser  # [B, T]


LOGIT_CHUNK_BYTES = 64 * 2**20  # one chunk's fp32 [B, t, V] logits in `chunked_token_logprobs`


def logit_chunk(batch: int, vocab: int, budget: int = LOGIT_CHUNK_BYTES) -> int:
    """Positions per chunk such that one chunk's fp32 [batch, t, vocab] fits in `budget` bytes."""
    return max(1, budget // (4 * batch * vocab))


def chunked_token_logprobs(
    project, hidden: jax.Array, targets: jax.Array, chunk: int
) -> tuple[jax.Array, jax.Array]:
    """`token_logprobs(project(hidden), targets)` and argmax hits, one sequence chunk at a time.

    A [B, T, V] fp32 logit array and its gradient are the largest arrays of a training step on a
    big vocabulary (batch 4, 576 positions, 49,152 tokens: 450 MB a copy, and the backward pass of
    a log-softmax holds several). Here the positions are walked in chunks of `chunk` (`lax.map`),
    each under `jax.checkpoint`: the forward keeps only [B, T] results, the backward recomputes one
    chunk's logits, so one chunk's [B, chunk, V] arrays are alive at a time. Values equal the
    direct computation up to float rounding of the products.

    Args:
      project: hidden [B, t, D] -> logits [B, t, V] (a model's output layer; weights closed over).
      hidden: [B, T, D] the states whose logits predict `targets`.
      targets: [B, T] int token ids (out-of-range ids are clipped, as in `token_logprobs`).
      chunk: positions per chunk (`logit_chunk` sizes it from the batch and vocabulary).
    Returns:
      ([B, T] float32 log q(targets), [B, T] bool argmax == target).
    """
    b, t = targets.shape
    chunk = max(1, min(t, chunk))
    n = -(-t // chunk)
    pad = lambda x: jnp.pad(x, [(0, 0), (0, n * chunk - t)] + [(0, 0)] * (x.ndim - 2))
    split = lambda x: jnp.moveaxis(pad(x).reshape((b, n, chunk) + x.shape[2:]), 1, 0)  # [n, B, c..]

    @jax.checkpoint
    def one(args):
        h, y = args
        logits = project(h).astype(F32)  # [B, c, V]
        return token_logprobs(logits, y), jnp.argmax(logits, axis=-1) == y

    logps, hits = jax.lax.map(one, (split(hidden), split(targets)))  # [n, B, c]
    join = lambda x: jnp.moveaxis(x, 0, 1).reshape(b, n * chunk)[:, :t]
    return join(logps), join(hits)


def sequence_logprobs(token_logps: jax.Array, mask: jax.Array, score: str = "mean") -> jax.Array:
    """Sequence log-probability per row from per-token log-probs.

    `score="sum"`:  `S_b = sum_t mask[b, t] * token_logps[b, t]`;
    `score="mean"`: `S_b / max(sum_t mask[b, t], 1)` (length-normalised; a row with no real
    token gives 0, not NaN).

    Args:
      token_logps: [B, T] per-token log-probs (e.g. from `token_logprobs`).
      mask: [B, T] 1 = real response token.
      score: "sum" or "mean".
    Returns:
      [B] float32.
    """
    if score not in ("sum", "mean"):
        raise ValueError(f"sequence_logprobs: score must be 'sum' or 'mean', got {score!r}.")
    real = mask.astype(bool)  # [B, T]
    total = jnp.sum(jnp.where(real, token_logps.astype(F32), 0.0), axis=-1)  # [B]
    if score == "sum":
        return total
    return total / jnp.maximum(jnp.sum(real.astype(F32), axis=-1), 1.0)  # [B]


# --------------------------------------------------------------------------------------------
# Supervised: SFT and SeqKD
# --------------------------------------------------------------------------------------------


def sft_loss(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, Metrics]:
    """Token-level cross-entropy, averaged over the real tokens of the whole batch.

    `loss = sum_{b,t} mask * (-log q(targets[b, t])) / sum_{b,t} mask` (a token mean, so long
    responses weigh more than short ones, as in standard LM training).

    Args:
      logits: [B, T, V]; targets: [B, T] int; mask: [B, T] 1 = real token.
    Metrics: `loss` (per token), `token_accuracy` (argmax == target).
    """
    hits = jnp.argmax(logits, axis=-1) == targets  # [B, T]
    return sft_loss_tokens(token_logprobs(logits, targets), hits, mask)


def sft_loss_tokens(
    token_logps: jax.Array, hits: jax.Array, mask: jax.Array
) -> tuple[jax.Array, Metrics]:
    """`sft_loss` from per-token log-probs and argmax hits, both [B, T] (as
    `chunked_token_logprobs` gives them)."""
    nll = -token_logps.astype(F32)  # [B, T]
    metrics = {"loss": _metric(nll, mask), "token_accuracy": _metric(hits.astype(F32), mask)}
    return masked_mean(nll, mask), metrics


def seqkd_loss(
    logits: jax.Array, teacher_tokens: jax.Array, mask: jax.Array
) -> tuple[jax.Array, Metrics]:
    """SeqKD (Kim & Rush, 2016): `sft_loss` on teacher-generated responses.

    `logits` [B, T, V] are the student's, teacher-forced on `teacher_tokens` [B, T]; `mask` [B, T]
    marks the real tokens of the teacher samples (EOS included).
    """
    return sft_loss(logits, teacher_tokens, mask)


# --------------------------------------------------------------------------------------------
# PLaD calibration losses (Eq. 4, Eq. 5)
# --------------------------------------------------------------------------------------------


def rank_calibration(
    logp_pos: jax.Array,
    logp_neg: jax.Array,
    margin: float | jax.Array,
    mask: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
    """PLaD ranking calibration loss (Eq. 4), mean over real pairs.

    `loss = mean_b max(0, margin - logp_pos[b] + logp_neg[b])`

    The hinge is `relu`, so a pair whose margin already holds (`logp_pos - logp_neg >= margin`)
    gets exactly zero gradient. Add `alpha * sft_loss(...)` on y+ for the SLiC-style regulariser.

    Args:
      logp_pos, logp_neg: [B] student sequence log-probs of the preferred (teacher) and the
        dispreferred (student) response, from `sequence_logprobs`.
      margin: the paper's beta, a scalar (or [B]).
      mask: optional [B] row mask, 0 = padded batch row.
    Metrics: `loss`, `hinge_active` (share of pairs with a positive hinge), `accuracy`
      (share with logp_pos > logp_neg), `logp_pos`, `logp_neg`.
    """
    return _calibration_hinge(logp_pos, logp_neg, jnp.asarray(margin, F32), mask)


def margin_calibration(
    logp_pos: jax.Array,
    logp_neg: jax.Array,
    score_pos: jax.Array,
    score_neg: jax.Array,
    beta: float | jax.Array,
    mask: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
    """PLaD margin calibration loss (Eq. 5), mean over real pairs.

    `loss = mean_b max(0, beta * (score_pos[b] - score_neg[b]) - logp_pos[b] + logp_neg[b])`

    The scores (e.g. `ngram_span_score` of each response against the reference) set a per-pair
    margin and carry no gradient. Arguments and metrics as in `rank_calibration`, plus
    `score_pos`, `score_neg` [B].
    """
    score_gap = jax.lax.stop_gradient(score_pos.astype(F32) - score_neg.astype(F32))  # [B]
    return _calibration_hinge(logp_pos, logp_neg, beta * score_gap, mask)


def _calibration_hinge(
    logp_pos: jax.Array, logp_neg: jax.Array, margin: jax.Array, mask: jax.Array | None
) -> tuple[jax.Array, Metrics]:
    """`mean_b relu(margin - logp_pos + logp_neg)` with the shared calibration metrics."""
    logp_pos, logp_neg = logp_pos.astype(F32), logp_neg.astype(F32)  # [B]
    hinge = jax.nn.relu(margin - logp_pos + logp_neg)  # [B]
    metrics = {
        "loss": _metric(hinge, mask),
        "hinge_active": _metric((hinge > 0).astype(F32), mask),
        "accuracy": _metric((logp_pos > logp_neg).astype(F32), mask),
        "logp_pos": _metric(logp_pos, mask),
        "logp_neg": _metric(logp_neg, mask),
    }
    return masked_mean(hinge, mask), metrics


# --------------------------------------------------------------------------------------------
# PLaD score function (Eq. 6-8)
# --------------------------------------------------------------------------------------------


def ngram_span_score(
    cand_hidden: jax.Array,
    cand_mask: jax.Array,
    ref_hidden: jax.Array,
    ref_mask: jax.Array,
    max_n: int = 4,
) -> jax.Array:
    """Span-level BERTScore of a candidate against a reference: `s = sum_{n=1..max_n} F_n`.

    1. Token vectors are L2-normalised: `e_t = h_t / ||h_t||`.
    2. An n-gram span vector is the mean of n consecutive real token vectors
       `v_i = (e_i + ... + e_{i+n-1}) / n`; only spans lying fully inside the real tokens count.
    3. With `cos(u, v) = u.v / (||u|| ||v||)` over the real spans of each side:
       `R_n = mean_{r in ref spans} max_{c in cand spans} cos(r, c)` (recall),
       `P_n = mean_{c in cand spans} max_{r in ref spans} cos(c, r)` (precision),
       `F_n = 2 P_n R_n / (P_n + R_n)`, and `F_n = 0` when either side has no n-gram span or
       `P_n + R_n <= 0` (undefined or meaningless harmonic mean).
    Identical candidate and reference with at least `max_n` tokens score `max_n`, the maximum.
    The score is a margin, not a training signal: it is computed under `stop_gradient`.
    Padding (any values at masked positions, any padded length) does not change it.

    Args:
      cand_hidden: [B, Tc, D] token representations of the candidate response.
      cand_mask: [B, Tc] 1 = real token.
      ref_hidden: [B, Tr, D] token representations of the reference text.
      ref_mask: [B, Tr] 1 = real token.
      max_n: largest span length N.
    Returns:
      [B] float32 scores, at most `max_n`.
    """
    cand = _unit_tokens(jax.lax.stop_gradient(cand_hidden), cand_mask)  # [B, Tc, D]
    ref = _unit_tokens(jax.lax.stop_gradient(ref_hidden), ref_mask)  # [B, Tr, D]
    score = jnp.zeros(cand.shape[0], F32)  # [B]
    for n in range(1, max_n + 1):
        if n > cand.shape[1] or n > ref.shape[1]:
            break  # no span of this length fits either array: F_n = 0 for every row
        cand_spans, cand_ok = _ngram_spans(cand, cand_mask, n)  # [B, Sc, D], [B, Sc]
        ref_spans, ref_ok = _ngram_spans(ref, ref_mask, n)  # [B, Sr, D], [B, Sr]
        score = score + _span_f1(cand_spans, cand_ok, ref_spans, ref_ok)
    return score


def _unit_tokens(hidden: jax.Array, mask: jax.Array) -> jax.Array:
    """L2-normalised float32 token vectors; padded (and all-zero) positions become 0."""
    hidden = jnp.where(mask.astype(bool)[..., None], hidden.astype(F32), 0.0)  # [B, T, D]
    return _unit(hidden)


def _unit(x: jax.Array) -> jax.Array:
    """`x / ||x||` over the last axis, with a zero vector kept at zero."""
    sq_norm = jnp.sum(x * x, axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq_norm, 1e-24))


def _ngram_spans(unit: jax.Array, mask: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """Unit-length n-gram span vectors (mean of n token vectors, renormalised) and validity.

    Span i covers positions i..i+n-1; it is valid iff all n positions are real.
    Returns `[B, T-n+1, D]` vectors and a `[B, T-n+1]` bool mask.
    """
    length = unit.shape[1]
    real = mask.astype(bool)  # [B, T]
    span_sum = sum(unit[:, k : length - n + 1 + k] for k in range(n))  # [B, S, D]
    valid = jnp.all(jnp.stack([real[:, k : length - n + 1 + k] for k in range(n)]), axis=0)
    return _unit(span_sum / n), valid


def _span_f1(cand: jax.Array, cand_ok: jax.Array, ref: jax.Array, ref_ok: jax.Array) -> jax.Array:
    """`F_n` per row from unit span vectors `[B, S, D]` and their `[B, S]` validity masks."""
    cosine = jnp.einsum("brd,bcd->brc", ref, cand, precision=jax.lax.Precision.HIGHEST)
    pair_ok = ref_ok[:, :, None] & cand_ok[:, None, :]  # [B, Sr, Sc]
    cosine = jnp.where(pair_ok, cosine, -jnp.inf)
    has_cand, has_ref = jnp.any(cand_ok, axis=-1), jnp.any(ref_ok, axis=-1)  # [B]
    recall = _row_mean(jnp.max(cosine, axis=2), ref_ok & has_cand[:, None])  # [B]
    precision = _row_mean(jnp.max(cosine, axis=1), cand_ok & has_ref[:, None])  # [B]
    total = precision + recall
    defined = has_cand & has_ref & (total > 0)
    return jnp.where(defined, 2.0 * precision * recall / jnp.where(defined, total, 1.0), 0.0)


def _row_mean(x: jax.Array, ok: jax.Array) -> jax.Array:
    """Mean of `x` [B, S] over the entries where `ok`, per row; 0 for a row with none."""
    total = jnp.sum(jnp.where(ok, x, 0.0), axis=-1)
    return total / jnp.maximum(jnp.sum(ok.astype(F32), axis=-1), 1.0)


# --------------------------------------------------------------------------------------------
# Token-level distillation against teacher logits (teacher-forced or on-policy sequences)
# --------------------------------------------------------------------------------------------


def kd_forward_kl(
    student_logits: jax.Array, teacher_logits: jax.Array, mask: jax.Array, temperature: float = 1.0
) -> tuple[jax.Array, Metrics]:
    """Word-level KD (Hinton et al., 2015): masked token mean of `tau^2 * KL(p^tau || q^tau)`.

    `KL(p^tau || q^tau) = sum_v p^tau(v) (log p^tau(v) - log q^tau(v))` with
    `p^tau = softmax(teacher_logits / tau)` and `q^tau = softmax(student_logits / tau)`; the
    `tau^2` keeps gradient magnitudes comparable across temperatures.

    Args:
      student_logits, teacher_logits: [B, T, V] on the same tokens and vocabulary.
      mask: [B, T] 1 = real token. temperature: tau > 0.
    """
    log_q = _log_probs(student_logits, temperature)  # [B, T, V]
    log_p = _log_probs(jax.lax.stop_gradient(teacher_logits), temperature)  # [B, T, V]
    return _token_mean(_kl(log_p, log_q) * temperature**2, mask)


def tvd_loss(
    student_logits: jax.Array, teacher_logits: jax.Array, mask: jax.Array
) -> tuple[jax.Array, Metrics]:
    """f-distill total variation distance: masked token mean of `0.5 * sum_v |p(v) - q(v)|`.

    `p` = teacher softmax, `q` = student softmax, both [B, T, V]; mask [B, T].
    """
    p = jax.nn.softmax(jax.lax.stop_gradient(teacher_logits).astype(F32), axis=-1)  # [B, T, V]
    q = jax.nn.softmax(student_logits.astype(F32), axis=-1)  # [B, T, V]
    return _token_mean(0.5 * jnp.sum(jnp.abs(p - q), axis=-1), mask)


def js_loss(
    student_logits: jax.Array, teacher_logits: jax.Array, mask: jax.Array
) -> tuple[jax.Array, Metrics]:
    """f-distill Jensen-Shannon: masked token mean of `0.5 KL(p || m) + 0.5 KL(q || m)`.

    `p` = teacher softmax, `q` = student softmax, `m = (p + q) / 2` (taken in log space:
    `log m = logaddexp(log p, log q) - log 2`). Shapes as in `tvd_loss`.
    """
    log_p = _log_probs(jax.lax.stop_gradient(teacher_logits))  # [B, T, V]
    log_q = _log_probs(student_logits)  # [B, T, V]
    log_m = jnp.logaddexp(log_p, log_q) - jnp.log(2.0)
    return _token_mean(0.5 * _kl(log_p, log_m) + 0.5 * _kl(log_q, log_m), mask)


def reverse_kl_loss(
    student_logits: jax.Array, teacher_logits: jax.Array, mask: jax.Array
) -> tuple[jax.Array, Metrics]:
    """MiniLLM-style reverse KL: masked token mean of `KL(q || p) = sum_v q(v) (log q(v) - log
    p(v))`.

    This is the exact per-position reverse KL over the whole vocabulary (the GKD-style form),
    evaluated on student-sampled (on-policy) sequences, not MiniLLM's sequence-level policy
    gradient. Gradients flow through both `q` factors. Shapes as in `tvd_loss`.
    """
    log_q = _log_probs(student_logits)  # [B, T, V]
    log_p = _log_probs(jax.lax.stop_gradient(teacher_logits))  # [B, T, V]
    return _token_mean(_kl(log_q, log_p), mask)


def generalized_jsd_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    mask: jax.Array,
    beta: float = 0.5,
    temperature: float = 1.0,
) -> tuple[jax.Array, Metrics]:
    """Generalized JSD of GKD (Agarwal et al., 2024, Eq. 1), as TRL's GKDTrainer defines it.

    With `p = softmax(teacher_logits / tau)`, `q = softmax(student_logits / tau)` (no tau^2):
    - `beta == 0`: `KL(p || q)` (forward KL);
    - `beta == 1`: `KL(q || p)` (reverse KL);
    - otherwise, `m = beta p + (1 - beta) q` and `JSD = beta KL(p || m) + (1 - beta) KL(q || m)`.
    The loss is the masked token mean. `beta` must be a Python float in [0, 1] (it selects the
    branch at trace time). Shapes as in `tvd_loss`.
    """
    log_q = _log_probs(student_logits, temperature)  # [B, T, V]
    log_p = _log_probs(jax.lax.stop_gradient(teacher_logits), temperature)  # [B, T, V]
    if beta == 0:
        return _token_mean(_kl(log_p, log_q), mask)
    if beta == 1:
        return _token_mean(_kl(log_q, log_p), mask)
    log_m = jnp.logaddexp(log_p + jnp.log(beta), log_q + jnp.log1p(-beta))
    return _token_mean(beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m), mask)


def _kl(log_a: jax.Array, log_b: jax.Array) -> jax.Array:
    """`KL(a || b) = sum_v a(v) (log a(v) - log b(v))` over the last axis, from log-probs."""
    return jnp.sum(jnp.exp(log_a) * (log_a - log_b), axis=-1)


def _token_mean(per_token: jax.Array, mask: jax.Array) -> tuple[jax.Array, Metrics]:
    """Masked token mean of a [B, T] per-position loss, with its `loss` metric."""
    return masked_mean(per_token, mask), {"loss": _metric(per_token, mask)}


# --------------------------------------------------------------------------------------------
# Pairwise preference losses: DPO, SLiC-HF / CPO hinge
# --------------------------------------------------------------------------------------------


def dpo_loss(
    policy_pos: jax.Array,
    policy_neg: jax.Array,
    ref_pos: jax.Array,
    ref_neg: jax.Array,
    beta: float,
    label_smoothing: float = 0.0,
    mask: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
    """DPO (Rafailov et al., 2023), with conservative label smoothing (cDPO); mean over real pairs.

    `z = (policy_pos - policy_neg) - (ref_pos - ref_neg)`,
    `loss = mean_b [-(1 - ls) log sigmoid(beta z) - ls log sigmoid(-beta z)]`.
    `beta` multiplies the log-ratio difference exactly once (MaxText issue #1530 applied it twice).

    Args:
      policy_pos, policy_neg: [B] sequence log-probs (usually `score="sum"`) of the chosen and
        rejected responses under the trained policy.
      ref_pos, ref_neg: [B] the same under the frozen reference (no gradient).
      beta: inverse temperature. label_smoothing: ls in [0, 0.5).
      mask: optional [B] row mask.
    Metrics: `loss`; `rewards_chosen` = beta (policy_pos - ref_pos), `rewards_rejected`
      = beta (policy_neg - ref_neg); `reward_accuracy` (chosen > rejected); `reward_margin`.
    """
    policy_pos, policy_neg = policy_pos.astype(F32), policy_neg.astype(F32)  # [B]
    ref_pos, ref_neg = jax.lax.stop_gradient((ref_pos.astype(F32), ref_neg.astype(F32)))  # [B]
    z = (policy_pos - policy_neg) - (ref_pos - ref_neg)  # [B]
    per_pair = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * z)
    per_pair = per_pair - label_smoothing * jax.nn.log_sigmoid(-beta * z)
    chosen, rejected = beta * (policy_pos - ref_pos), beta * (policy_neg - ref_neg)  # [B]
    metrics = {
        "loss": _metric(per_pair, mask),
        "rewards_chosen": _metric(chosen, mask),
        "rewards_rejected": _metric(rejected, mask),
        "reward_accuracy": _metric((chosen > rejected).astype(F32), mask),
        "reward_margin": _metric(chosen - rejected, mask),
    }
    return masked_mean(per_pair, mask), metrics


def hinge_loss(
    logp_pos: jax.Array, logp_neg: jax.Array, beta: float, mask: jax.Array | None = None
) -> tuple[jax.Array, Metrics]:
    """SLiC-HF / CPO hinge loss (TRL `CPOTrainer`, `loss_type="hinge"`); mean over real pairs.

    `loss = mean_b relu(1 - beta * (logp_pos[b] - logp_neg[b]))` on [B] policy sequence
    log-probs; no reference model. Optional [B] row `mask`.
    Metrics: `loss`, `hinge_active`, `accuracy` (logp_pos > logp_neg).
    """
    logp_pos, logp_neg = logp_pos.astype(F32), logp_neg.astype(F32)  # [B]
    hinge = jax.nn.relu(1.0 - beta * (logp_pos - logp_neg))  # [B]
    metrics = {
        "loss": _metric(hinge, mask),
        "hinge_active": _metric((hinge > 0).astype(F32), mask),
        "accuracy": _metric((logp_pos > logp_neg).astype(F32), mask),
    }
    return masked_mean(hinge, mask), metrics
