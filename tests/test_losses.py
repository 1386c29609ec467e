"""Tests for plad_jax.losses.

Every expected number comes from an independent float64 NumPy reference written below (or by
hand), and, for DPO / GKD / the CPO hinge, from TRL's own functions when TRL is installed.
"""

import types
import warnings
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from plad_jax import losses

B, T, V, D = 3, 6, 7, 5
LENGTHS = np.array([6, 3, 1])  # real tokens per row (right padding); row 2 has a single token


# Eager dispatch compiles every small op of the span score separately; one jit is much faster.
span_score = jax.jit(losses.ngram_span_score, static_argnames="max_n")


def right_mask(lengths, length):
    return (np.arange(length)[None, :] < np.asarray(lengths)[:, None]).astype(np.int32)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture
def token_batch(rng):
    """Student/teacher logits [B, T, V], targets [B, T], mask [B, T] (padding = garbage)."""
    mask = right_mask(LENGTHS, T)
    student = rng.normal(size=(B, T, V)).astype(np.float32) * 2.0
    teacher = rng.normal(size=(B, T, V)).astype(np.float32) * 2.0
    targets = rng.integers(0, V, size=(B, T))
    targets = np.where(mask == 1, targets, -100)  # padding ids outside the vocabulary
    return student, teacher, targets, mask


# ------------------------------------------------------------------------------------------
# Independent NumPy references (float64)
# ------------------------------------------------------------------------------------------


def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    shifted = x - x.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def np_token_mean(per_token, mask):
    return (per_token * mask).sum() / mask.sum()


def np_kl(log_a, log_b):
    return (np.exp(log_a) * (log_a - log_b)).sum(-1)


def np_log_sigmoid(x):
    return -np.logaddexp(0.0, -np.asarray(x, np.float64))


def np_span_score(cand, cand_len, ref, ref_len, max_n):
    """Brute force, one row at a time, with explicit Python loops over spans."""

    def spans(h, length, n):
        unit = [h[t] / np.linalg.norm(h[t]) for t in range(length)]
        return [sum(unit[i : i + n]) / n for i in range(length - n + 1)]

    def cos(u, v):
        return float(np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v)))

    score = 0.0
    for n in range(1, max_n + 1):
        c_spans, r_spans = spans(cand, cand_len, n), spans(ref, ref_len, n)
        if not c_spans or not r_spans:
            continue
        recall = np.mean([max(cos(r, c) for c in c_spans) for r in r_spans])
        precision = np.mean([max(cos(c, r) for r in r_spans) for c in c_spans])
        if precision + recall > 0:
            score += 2 * precision * recall / (precision + recall)
    return score


def pad_tokens(rng, x, mask, extra_t, extra_b, scale=1e3):
    """Garbage everywhere mask == 0, plus `extra_t` padded positions and `extra_b` padded rows."""
    b, t = mask.shape
    new_mask = np.zeros((b + extra_b, t + extra_t), mask.dtype)
    new_mask[:b, :t] = mask
    garbage = (rng.normal(size=(b + extra_b, t + extra_t) + x.shape[2:]) * scale).astype(x.dtype)
    out = garbage.copy()
    out[:b, :t] = x
    keep = new_mask.astype(bool).reshape(new_mask.shape + (1,) * (x.ndim - 2))
    return np.where(keep, out, garbage), new_mask


def pad_rows(rng, x, extra_b):
    return np.concatenate([x, (rng.normal(size=extra_b) * 1e3).astype(x.dtype)])


def assert_metrics_equal(m1, m2):
    assert m1.keys() == m2.keys()
    for k in m1:
        np.testing.assert_allclose(
            np.array(m1[k]), np.array(m2[k]), rtol=1e-5, atol=1e-6, err_msg=k
        )


# ------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------


def test_masked_mean_by_hand():
    x = jnp.array([[1.0, 2.0, jnp.nan], [4.0, jnp.inf, 6.0]])
    mask = jnp.array([[1, 1, 0], [1, 0, 0]])
    assert float(losses.masked_mean(x, mask)) == pytest.approx(7.0 / 3.0)
    assert float(losses.masked_mean(jnp.array([2.0, 4.0]))) == pytest.approx(3.0)
    assert float(losses.masked_mean(x, jnp.zeros_like(mask))) == 0.0  # empty mean is 0, not NaN


def test_token_logprobs_matches_numpy(token_batch):
    student, _, targets, mask = token_batch
    got = losses.token_logprobs(jnp.asarray(student, jnp.bfloat16), jnp.asarray(targets))
    assert got.dtype == jnp.float32 and got.shape == (B, T)
    ref = np_log_softmax(np.asarray(jnp.asarray(student, jnp.bfloat16), np.float32))
    safe = np.where(mask == 1, targets, 0)
    expected = np.take_along_axis(ref, safe[..., None], -1)[..., 0]
    np.testing.assert_allclose(
        np.where(mask == 1, got, 0), np.where(mask == 1, expected, 0), rtol=1e-5
    )


@pytest.mark.parametrize("chunk", [1, 4, T, 50])
def test_chunked_token_logprobs_match_log_softmax_values_and_gradients(rng, chunk):
    """Chunks that split T unevenly (4 of 6), one per position, one for all, one past T: the same
    log-probs, argmax hits and gradients (w.r.t. hidden states and the output weights) as a
    log_softmax of the whole [B, T, V] logits; padded targets (-100) stay harmless."""
    mask = right_mask(LENGTHS, T)
    hidden = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
    weight = jnp.asarray(rng.normal(size=(D, V)), jnp.float32)
    targets = jnp.asarray(np.where(mask == 1, rng.integers(0, V, (B, T)), -100))

    def direct(h, w):
        logits = h @ w
        safe = jnp.clip(targets, 0, V - 1)
        logps = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), safe[..., None], -1)[..., 0]
        return logps, jnp.argmax(logits, -1) == targets

    chunked = lambda h, w: losses.chunked_token_logprobs(lambda x: x @ w, h, targets, chunk)
    (want, want_hits), (got, got_hits) = direct(hidden, weight), chunked(hidden, weight)
    assert got.shape == (B, T) and got.dtype == jnp.float32
    real = mask == 1
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(got_hits)[real], np.asarray(want_hits)[real])
    loss = lambda f: lambda h, w: losses.masked_mean(f(h, w)[0], jnp.asarray(mask))
    want_grads = jax.grad(loss(direct), argnums=(0, 1))(hidden, weight)
    got_grads = jax.jit(jax.grad(loss(chunked), argnums=(0, 1)))(hidden, weight)
    for g, w in zip(got_grads, want_grads):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)
    assert float(jnp.max(jnp.abs(got_grads[0][~real]))) == 0.0  # padded positions get no gradient


def test_sft_loss_tokens_equals_sft_loss(token_batch):
    student, _, targets, mask = token_batch
    logits, targets, mask = jnp.asarray(student), jnp.asarray(targets), jnp.asarray(mask)
    hits = jnp.argmax(logits, -1) == targets
    loss, metrics = losses.sft_loss(logits, targets, mask)
    got, got_metrics = losses.sft_loss_tokens(losses.token_logprobs(logits, targets), hits, mask)
    assert float(got) == float(loss)
    for name in ("loss", "token_accuracy"):
        np.testing.assert_array_equal(got_metrics[name], metrics[name])


def test_logit_chunk_fits_the_budget():
    assert losses.logit_chunk(4, 49152) == 85  # 4 x 85 x 49,152 fp32 = 63.8 MiB <= 64 MiB
    assert losses.logit_chunk(4, 49152, budget=1) == 1


def test_sequence_logprobs_sum_and_mean_by_hand():
    token_logps = jnp.array([[-1.0, -2.0, -3.0, 99.0], [-0.5, 99.0, 99.0, 99.0], [99.0] * 4])
    mask = jnp.array([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_allclose(
        losses.sequence_logprobs(token_logps, mask, "sum"), [-6.0, -0.5, 0.0]
    )
    np.testing.assert_allclose(
        losses.sequence_logprobs(token_logps, mask, "mean"), [-2.0, -0.5, 0.0]
    )
    np.testing.assert_allclose(losses.sequence_logprobs(token_logps, mask), [-2.0, -0.5, 0.0])
    with pytest.raises(ValueError, match="score"):
        losses.sequence_logprobs(token_logps, mask, "max")


def test_sft_loss_matches_numpy(token_batch):
    student, _, targets, mask = token_batch
    loss, metrics = losses.sft_loss(jnp.asarray(student), jnp.asarray(targets), jnp.asarray(mask))
    safe = np.where(mask == 1, targets, 0)
    nll = -np.take_along_axis(np_log_softmax(student), safe[..., None], -1)[..., 0]
    assert loss.dtype == jnp.float32 and loss.shape == ()
    np.testing.assert_allclose(loss, np_token_mean(nll, mask), rtol=1e-5)
    np.testing.assert_allclose(metrics["loss"], ((nll * mask).sum(), mask.sum()), rtol=1e-5)
    hits = ((student.argmax(-1) == targets) * mask).sum()
    np.testing.assert_allclose(metrics["token_accuracy"], (hits, mask.sum()))
    seq_loss, _ = losses.seqkd_loss(jnp.asarray(student), jnp.asarray(targets), jnp.asarray(mask))
    assert float(seq_loss) == float(loss)


# ------------------------------------------------------------------------------------------
# PLaD calibration losses
# ------------------------------------------------------------------------------------------


def test_rank_calibration_by_hand_and_zero_gradient_where_margin_holds():
    # margin - lp + ln, margin 1: [-1, 2, 0, 3, -0.5, 1, 0.5, -4]; pair [2] sits exactly on it
    lp = jnp.array([-1.0, -2.0, -1.0, -3.0, -1.0, -2.0, -1.5, -1.0])
    ln = jnp.array([-3.0, -1.0, -2.0, -1.0, -2.5, -2.0, -2.0, -6.0])
    loss, metrics = losses.rank_calibration(lp, ln, 1.0)
    assert float(loss) == (2 + 3 + 1 + 0.5) / 8
    np.testing.assert_allclose(metrics["loss"], (6.5, 8.0))
    np.testing.assert_allclose(metrics["hinge_active"], (4.0, 8.0))
    np.testing.assert_allclose(metrics["accuracy"], (5.0, 8.0))  # pair [5] is a tie: not counted

    grad_pos, grad_neg = jax.grad(lambda a, b: losses.rank_calibration(a, b, 1.0)[0], (0, 1))(
        lp, ln
    )
    active = np.array([0, 1, 0, 1, 0, 1, 1, 0])
    np.testing.assert_array_equal(grad_pos, -active / 8)
    np.testing.assert_array_equal(grad_neg, active / 8)


def test_rank_and_margin_calibration_match_numpy(rng):
    lp, ln = rng.normal(size=8).astype(np.float32) - 2, rng.normal(size=8).astype(np.float32) - 2
    sp, sn = (
        rng.uniform(0, 3, size=8).astype(np.float32),
        rng.uniform(0, 3, size=8).astype(np.float32),
    )
    row_mask = np.array([1, 1, 1, 0, 1, 1, 0, 1])
    real = row_mask == 1

    loss, _ = losses.rank_calibration(
        jnp.asarray(lp), jnp.asarray(ln), 0.7, mask=jnp.asarray(row_mask)
    )
    expected = np.maximum(0, 0.7 - lp.astype(np.float64) + ln)[real].mean()
    np.testing.assert_allclose(loss, expected, rtol=1e-6)

    args = [jnp.asarray(a) for a in (lp, ln, sp, sn)]
    loss, metrics = losses.margin_calibration(*args, beta=1.5, mask=jnp.asarray(row_mask))
    hinge = np.maximum(0, 1.5 * (sp.astype(np.float64) - sn) - lp + ln)
    np.testing.assert_allclose(loss, hinge[real].mean(), rtol=1e-6)
    np.testing.assert_allclose(metrics["hinge_active"], ((hinge[real] > 0).sum(), real.sum()))
    np.testing.assert_allclose(metrics["accuracy"], ((lp > ln)[real].sum(), real.sum()))

    score_grads = jax.grad(
        lambda s1, s2: losses.margin_calibration(args[0], args[1], s1, s2, 1.5)[0], (0, 1)
    )
    for g in score_grads(args[2], args[3]):
        np.testing.assert_array_equal(g, 0.0)  # the score sets a margin, it is not trained


# ------------------------------------------------------------------------------------------
# PLaD n-gram span score
# ------------------------------------------------------------------------------------------


@pytest.fixture
def span_batch(rng):
    """Candidate / reference hidden states [4, 6, D] with right-padding masks (garbage padding)."""
    cand_len, ref_len = np.array([6, 4, 1, 0]), np.array([5, 6, 2, 3])
    cand = rng.normal(size=(4, 6, D)).astype(np.float32) + 0.3
    ref = rng.normal(size=(4, 6, D)).astype(np.float32) + 0.3
    return cand, right_mask(cand_len, 6), ref, right_mask(ref_len, 6), cand_len, ref_len


def test_ngram_span_score_matches_brute_force(span_batch):
    cand, cm, ref, rm, cand_len, ref_len = span_batch
    got = span_score(jnp.asarray(cand), jnp.asarray(cm), jnp.asarray(ref), jnp.asarray(rm), max_n=3)
    expected = [np_span_score(cand[b], cand_len[b], ref[b], ref_len[b], 3) for b in range(4)]
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert float(got[3]) == 0.0  # empty candidate


def test_ngram_span_score_identical_texts_score_max_n(span_batch):
    h, mask = jnp.asarray(span_batch[0]), jnp.asarray(right_mask([6, 4, 3, 2], 6))
    # F_n = 1 for every n that fits: 3 for rows with >= 3 tokens, 2 (unigrams, bigrams) for 2 tokens
    np.testing.assert_allclose(
        span_score(h, mask, h, mask, max_n=3), [3.0, 3.0, 3.0, 2.0], rtol=1e-6
    )


def test_ngram_span_score_padding_invariant_and_no_gradient(rng, span_batch):
    cand, cm, ref, rm, _, _ = span_batch
    base = span_score(*map(jnp.asarray, (cand, cm, ref, rm)), max_n=3)
    cand_p, cm_p = pad_tokens(rng, cand, cm, extra_t=3, extra_b=2)
    ref_p, rm_p = pad_tokens(rng, ref, rm, extra_t=3, extra_b=2)
    padded = span_score(*map(jnp.asarray, (cand_p, cm_p, ref_p, rm_p)), max_n=3)
    np.testing.assert_allclose(padded[:4], base, rtol=1e-6)
    np.testing.assert_array_equal(padded[4:], 0.0)

    def score_sum(c, r):
        return losses.ngram_span_score(c, cm, r, rm, max_n=3).sum()

    for g in jax.jit(jax.grad(score_sum, (0, 1)))(jnp.asarray(cand), jnp.asarray(ref)):
        np.testing.assert_array_equal(g, 0.0)


# ------------------------------------------------------------------------------------------
# Token-level distillation losses
# ------------------------------------------------------------------------------------------


def np_token_losses(student, teacher, temperature=2.0):
    """Per-position [B, T] values of every token-level divergence, from the definitions."""
    log_q, log_p = np_log_softmax(student), np_log_softmax(teacher)
    p, q = np.exp(log_p), np.exp(log_q)
    log_m = np.log((p + q) / 2)
    log_qt, log_pt = np_log_softmax(student / temperature), np_log_softmax(teacher / temperature)
    return {
        "kd_forward_kl": np_kl(log_pt, log_qt) * temperature**2,
        "tvd_loss": 0.5 * np.abs(p - q).sum(-1),
        "js_loss": 0.5 * np_kl(log_p, log_m) + 0.5 * np_kl(log_q, log_m),
        "reverse_kl_loss": np_kl(log_q, log_p),
    }


TOKEN_LOSSES = {
    "kd_forward_kl": lambda s, t, m: losses.kd_forward_kl(s, t, m, temperature=2.0),
    "tvd_loss": losses.tvd_loss,
    "js_loss": losses.js_loss,
    "reverse_kl_loss": losses.reverse_kl_loss,
    "gjsd_0": lambda s, t, m: losses.generalized_jsd_loss(s, t, m, beta=0.0, temperature=2.0),
    "gjsd_03": lambda s, t, m: losses.generalized_jsd_loss(s, t, m, beta=0.3, temperature=2.0),
    "gjsd_1": lambda s, t, m: losses.generalized_jsd_loss(s, t, m, beta=1.0),
}


@pytest.mark.parametrize("name", ["kd_forward_kl", "tvd_loss", "js_loss", "reverse_kl_loss"])
def test_token_divergences_match_numpy(token_batch, name):
    student, teacher, _, mask = token_batch
    loss, metrics = TOKEN_LOSSES[name](
        jnp.asarray(student), jnp.asarray(teacher), jnp.asarray(mask)
    )
    per_token = np_token_losses(student, teacher)[name]
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, np_token_mean(per_token, mask), rtol=1e-5)
    np.testing.assert_allclose(metrics["loss"], ((per_token * mask).sum(), mask.sum()), rtol=1e-5)


def test_generalized_jsd_matches_numpy(token_batch):
    student, teacher, _, mask = token_batch
    tau = 2.0
    log_q, log_p = np_log_softmax(student / tau), np_log_softmax(teacher / tau)
    beta = 0.3
    log_m = np.log(beta * np.exp(log_p) + (1 - beta) * np.exp(log_q))
    expected = {
        "gjsd_0": np_kl(log_p, log_q),
        "gjsd_03": beta * np_kl(log_p, log_m) + (1 - beta) * np_kl(log_q, log_m),
        "gjsd_1": np_kl(np_log_softmax(student), np_log_softmax(teacher)),
    }
    for name, per_token in expected.items():
        loss, _ = TOKEN_LOSSES[name](jnp.asarray(student), jnp.asarray(teacher), jnp.asarray(mask))
        np.testing.assert_allclose(loss, np_token_mean(per_token, mask), rtol=1e-5, err_msg=name)


def test_divergences_vanish_for_equal_distributions(token_batch):
    student, _, _, mask = token_batch
    for name, fn in TOKEN_LOSSES.items():
        loss, _ = fn(jnp.asarray(student), jnp.asarray(student), jnp.asarray(mask))
        assert abs(float(loss)) < 1e-6, name


@pytest.mark.parametrize("name", sorted(TOKEN_LOSSES) + ["sft_loss"])
def test_token_losses_padding_invariant(rng, token_batch, name):
    student, teacher, targets, mask = token_batch
    student_p, mask_p = pad_tokens(rng, student, mask, extra_t=4, extra_b=2)
    teacher_p, _ = pad_tokens(rng, teacher, mask, extra_t=4, extra_b=2)
    targets_p = rng.integers(
        -5, V + 5, size=mask_p.shape
    )  # padding ids in and out of the vocabulary
    targets_p[:B, :T] = np.where(mask == 1, targets, targets_p[:B, :T])

    def run(s, t, y, m):
        if name == "sft_loss":
            return losses.sft_loss(s, y, m)
        return TOKEN_LOSSES[name](s, t, m)

    base, base_metrics = run(*map(jnp.asarray, (student, teacher, targets, mask)))
    padded, padded_metrics = run(*map(jnp.asarray, (student_p, teacher_p, targets_p, mask_p)))
    assert np.isfinite(float(padded))
    np.testing.assert_allclose(padded, base, rtol=1e-6)
    assert_metrics_equal(padded_metrics, base_metrics)


def test_losses_trace_under_jit(token_batch):
    """Training jits these: Python-level branches (score, beta) must be static, nothing traced."""
    student, teacher, targets, mask = (jnp.asarray(x) for x in token_batch)

    def all_losses(s, t, y, m):
        token = [fn(s, t, m)[0] for fn in TOKEN_LOSSES.values()]
        seq = losses.sequence_logprobs(losses.token_logprobs(s, y), m, score="sum")
        return token + [losses.sft_loss(s, y, m)[0], seq]

    for jitted, eager in zip(
        jax.jit(all_losses)(student, teacher, targets, mask),
        all_losses(student, teacher, targets, mask),
    ):
        np.testing.assert_allclose(jitted, eager, rtol=1e-5)


# ------------------------------------------------------------------------------------------
# Pairwise preference losses
# ------------------------------------------------------------------------------------------


@pytest.fixture
def pair_batch(rng):
    """Sequence log-probs [B]: policy chosen/rejected, reference chosen/rejected."""
    return tuple((rng.normal(size=8) * 3 - 20).astype(np.float32) for _ in range(4))


def np_dpo(pp, pn, rp, rn, beta, ls):
    z = (pp.astype(np.float64) - pn) - (rp - rn)
    return -(1 - ls) * np_log_sigmoid(beta * z) - ls * np_log_sigmoid(-beta * z)


@pytest.mark.parametrize("ls", [0.0, 0.2])
def test_dpo_matches_hand_formula(pair_batch, ls):
    pp, pn, rp, rn = pair_batch
    loss, metrics = losses.dpo_loss(*map(jnp.asarray, pair_batch), beta=0.1, label_smoothing=ls)
    np.testing.assert_allclose(loss, np_dpo(pp, pn, rp, rn, 0.1, ls).mean(), rtol=1e-5)
    chosen, rejected = 0.1 * (pp.astype(np.float64) - rp), 0.1 * (pn.astype(np.float64) - rn)
    np.testing.assert_allclose(metrics["rewards_chosen"], (chosen.sum(), 8), rtol=1e-4)
    np.testing.assert_allclose(metrics["rewards_rejected"], (rejected.sum(), 8), rtol=1e-4)
    np.testing.assert_allclose(
        metrics["reward_margin"], ((chosen - rejected).sum(), 8), rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(metrics["reward_accuracy"], ((chosen > rejected).sum(), 8))


def test_dpo_applies_beta_once():
    # reference log-ratio 0, policy log-ratio x: loss must be -log sigmoid(beta * x), not beta^2 x
    x = jnp.array([0.5, -1.0, 2.0, 0.0, -3.0, 1.0, 4.0, -0.25])
    zeros = jnp.zeros(8)
    for beta in (0.1, 1.0, 3.0):
        loss, _ = losses.dpo_loss(x, zeros, zeros, zeros, beta=beta)
        np.testing.assert_allclose(
            loss, np.mean(np.logaddexp(0.0, -beta * np.asarray(x))), rtol=1e-6
        )
    # beta enters only through beta * z: (beta=2, z) and (beta=1, 2z) are the same loss
    a, _ = losses.dpo_loss(x, zeros, zeros, zeros, beta=2.0)
    b, _ = losses.dpo_loss(2 * x, zeros, zeros, zeros, beta=1.0)
    np.testing.assert_allclose(a, b, rtol=1e-6)
    # d loss / d policy_pos = -beta * sigmoid(-beta z) / B
    grad = jax.grad(lambda p: losses.dpo_loss(p, zeros, zeros, zeros, beta=3.0)[0])(x)
    np.testing.assert_allclose(grad, -3.0 / (1 + np.exp(3.0 * np.asarray(x))) / 8, rtol=1e-5)


def test_hinge_loss_matches_hand_formula(pair_batch):
    pp, pn, _, _ = pair_batch
    loss, metrics = losses.hinge_loss(jnp.asarray(pp), jnp.asarray(pn), beta=0.5)
    hinge = np.maximum(0, 1 - 0.5 * (pp.astype(np.float64) - pn))
    np.testing.assert_allclose(loss, hinge.mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["hinge_active"], ((hinge > 0).sum(), 8))
    np.testing.assert_allclose(metrics["accuracy"], ((pp > pn).sum(), 8))


PAIR_LOSSES = {
    "rank_calibration": lambda a, b, c, d, m: losses.rank_calibration(a, b, 1.0, mask=m),
    "margin_calibration": lambda a, b, c, d, m: losses.margin_calibration(a, b, c, d, 0.5, mask=m),
    "dpo_loss": lambda a, b, c, d, m: losses.dpo_loss(a, b, c, d, 0.1, label_smoothing=0.1, mask=m),
    "hinge_loss": lambda a, b, c, d, m: losses.hinge_loss(a, b, 0.5, mask=m),
}


@pytest.mark.parametrize("name", sorted(PAIR_LOSSES))
def test_pair_losses_ignore_padded_rows(rng, pair_batch, name):
    fn = PAIR_LOSSES[name]
    base, base_metrics = fn(*map(jnp.asarray, pair_batch), None)
    padded_inputs = [jnp.asarray(pad_rows(rng, x, 3)) for x in pair_batch]
    row_mask = jnp.asarray(np.r_[np.ones(8), np.zeros(3)].astype(np.int32))
    padded, padded_metrics = fn(*padded_inputs, row_mask)
    np.testing.assert_allclose(padded, base, rtol=1e-6)
    assert_metrics_equal(padded_metrics, base_metrics)


# ------------------------------------------------------------------------------------------
# Parity with TRL's own definitions (skipped when TRL is not installed)
# ------------------------------------------------------------------------------------------


def _import_trl(module):
    pytest.importorskip("torch")
    pytest.importorskip("trl")
    with warnings.catch_warnings():  # "you are importing from trl.experimental"
        warnings.simplefilter("ignore")
        return pytest.importorskip(module)


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_generalized_jsd_matches_trl(token_batch, beta, temperature):
    torch = pytest.importorskip("torch")
    gkd = _import_trl("trl.experimental.gkd.gkd_trainer")
    student, teacher, _, mask = token_batch
    labels = torch.tensor(np.where(mask == 1, 0, -100))
    expected = gkd.GKDTrainer.generalized_jsd_loss(
        torch.tensor(student, dtype=torch.float64),
        torch.tensor(teacher, dtype=torch.float64),
        labels=labels,
        beta=beta,
        temperature=temperature,
    )
    loss, _ = losses.generalized_jsd_loss(
        jnp.asarray(student),
        jnp.asarray(teacher),
        jnp.asarray(mask),
        beta=beta,
        temperature=temperature,
    )
    np.testing.assert_allclose(loss, expected.item(), rtol=1e-5)


def _trl_stand_in(**attrs):
    """The few attributes TRL's loss methods read from `self`, on CPU, single process."""
    torch = pytest.importorskip("torch")

    def identity(x):
        return x

    accelerator = types.SimpleNamespace(
        device=torch.device("cpu"), gather_for_metrics=identity, gather=identity
    )
    return types.SimpleNamespace(accelerator=accelerator, **attrs)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_hinge_loss_matches_trl_cpo(pair_batch, beta):
    torch = pytest.importorskip("torch")
    cpo = _import_trl("trl.experimental.cpo.cpo_trainer")
    pp, pn, _, _ = pair_batch
    stand_in = _trl_stand_in(
        alpha=0.0, loss_type="hinge", beta=beta, label_smoothing=0.0, simpo_gamma=0.0
    )
    trl_losses, _, _ = cpo.CPOTrainer.cpo_loss(stand_in, torch.tensor(pp), torch.tensor(pn))
    loss, _ = losses.hinge_loss(jnp.asarray(pp), jnp.asarray(pn), beta=beta)
    np.testing.assert_allclose(loss, trl_losses.mean().item(), rtol=1e-5)


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_dpo_matches_trl_dpo_trainer(pair_batch, beta):
    """TRL's DPOTrainer._compute_loss ("sigmoid", precomputed reference log-probs) on a stub model
    that returns our sequence log-probs as one per-token log-prob per row."""
    torch = pytest.importorskip("torch")
    dpo = _import_trl("trl.trainer.dpo_trainer")
    pp, pn, rp, rn = (torch.tensor(x) for x in pair_batch)
    logps = torch.cat([pp, pn])[:, None]  # [2B, 1]: batch is [chosen, rejected]
    ones = torch.ones_like(logps)

    def model(**_):
        return types.SimpleNamespace(
            log_probs=logps, entropy=ones, mean_logits=ones, is_top1=ones.bool()
        )

    model.training = True
    stand_in = _trl_stand_in(
        model=model,
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=["sigmoid"],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=0.0,
        use_weighting=False,
        _metrics={"train": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros(16, 2, dtype=torch.long),
        "attention_mask": torch.ones(16, 2),
        "completion_mask": torch.ones(16, 2),
        "ref_chosen_logps": rp,
        "ref_rejected_logps": rn,
    }
    trl_loss = dpo.DPOTrainer._compute_loss(stand_in, model, inputs, return_outputs=False)
    loss, metrics = losses.dpo_loss(*map(jnp.asarray, pair_batch), beta=beta)
    np.testing.assert_allclose(loss, trl_loss.item(), rtol=1e-5)
    trl_metrics = stand_in._metrics["train"]
    for ours, theirs in [
        ("rewards_chosen", "rewards/chosen"),
        ("rewards_rejected", "rewards/rejected"),
        ("reward_accuracy", "rewards/accuracies"),
        ("reward_margin", "rewards/margins"),
    ]:
        total, count = metrics[ours]
        np.testing.assert_allclose(
            total / count, trl_metrics[theirs][0], rtol=1e-4, atol=1e-6, err_msg=ours
        )


@pytest.mark.parametrize("ls", [0.0, 0.2])
def test_dpo_label_smoothing_matches_trl_sigmoid(pair_batch, ls):
    """TRL 1.x's DPOTrainer has no label smoothing on "sigmoid"; its cDPO formula lives on in
    CPOTrainer's "sigmoid" loss, which is DPO once fed the log-ratios (policy - reference)."""
    torch = pytest.importorskip("torch")
    cpo = _import_trl("trl.experimental.cpo.cpo_trainer")
    pp, pn, rp, rn = pair_batch
    stand_in = _trl_stand_in(
        alpha=0.0, loss_type="sigmoid", beta=0.1, label_smoothing=ls, simpo_gamma=0.0
    )
    trl_losses, _, _ = cpo.CPOTrainer.cpo_loss(
        stand_in, torch.tensor(pp - rp), torch.tensor(pn - rn)
    )
    loss, _ = losses.dpo_loss(*map(jnp.asarray, pair_batch), beta=0.1, label_smoothing=ls)
    np.testing.assert_allclose(loss, trl_losses.mean().item(), rtol=1e-5)
