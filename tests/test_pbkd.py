"""PbKD: the identities of METHODS.md section 3, masks, chunking, the reward model, the loops end to
end."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from plad_jax import losses
from plad_jax.losses import pbkd, pbkd_mm


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# -- preference model, advantages, dual ascent -----------------------------------------------------


def test_bradley_terry_nll_of_equal_rewards_is_log2_and_matches_numpy():
    r = jnp.array([0.3, -2.0, 5.0])
    loss, metrics = pbkd.bradley_terry_nll(r, r)
    assert float(loss) == pytest.approx(math.log(2.0), rel=1e-6)
    r_w, r_l = np.array([1.0, -0.5, 2.0, 9.0]), np.array([0.0, 0.5, -1.0, -9.0])
    mask = np.array([1, 1, 1, 0])
    loss, metrics = pbkd.bradley_terry_nll(jnp.asarray(r_w), jnp.asarray(r_l), jnp.asarray(mask))
    expected = np.mean(np.log1p(np.exp(-(r_w - r_l)))[:3])
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert float(metrics["accuracy"][0] / metrics["accuracy"][1]) == pytest.approx(2 / 3)


def test_bounded_reward_is_tanh_bounded():
    raw = jnp.array([-1e6, -1.0, 0.0, 0.01, 1e6])
    out = np.asarray(pbkd.bounded_reward(raw, 5.0))
    np.testing.assert_allclose(
        out, 5.0 * np.tanh(np.array([-1e6, -1.0, 0.0, 0.01, 1e6]) / 5.0), rtol=1e-6
    )
    assert np.all(np.abs(out) <= 5.0)


def test_leave_one_out_advantages_sum_to_zero_per_prompt_and_match_definition():
    rewards = np.random.default_rng(0).normal(size=(3, 4))
    adv = np.asarray(pbkd.leave_one_out_advantages(jnp.asarray(rewards)))
    np.testing.assert_allclose(adv.sum(axis=1), 0.0, atol=1e-5)
    expected = rewards - (rewards.sum(1, keepdims=True) - rewards) / 3
    np.testing.assert_allclose(adv, expected, rtol=1e-5, atol=1e-6)
    # masked: sample 3 of prompt 0 is padding (any value), prompt 2 has one real sample (no
    # baseline)
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    garbage = np.where(mask, rewards, 1e9)
    adv = np.asarray(pbkd.leave_one_out_advantages(jnp.asarray(garbage), jnp.asarray(mask)))
    r0 = rewards[0, :3]
    np.testing.assert_allclose(adv[0, :3], r0 - (r0.sum() - r0) / 2, rtol=1e-5)
    assert adv[0, 3] == 0 and np.all(adv[2] == 0)
    np.testing.assert_allclose((adv * mask).sum(axis=1)[:2], 0.0, atol=1e-4)


def test_dual_ascent_moves_lambda_by_the_violation_and_clips():
    up = pbkd.dual_ascent(1.0, nll=0.9, nll_star=0.5, alpha_lam=0.5, eps=0.1, lam_max=10.0)
    assert float(up) == pytest.approx(1.0 + 0.5 * 0.3)
    assert (
        float(pbkd.dual_ascent(0.05, nll=0.5, nll_star=0.5, alpha_lam=1.0, eps=0.1, lam_max=10.0))
        == 0.0
    )
    assert (
        float(pbkd.dual_ascent(9.9, nll=5.0, nll_star=0.0, alpha_lam=1.0, eps=0.0, lam_max=10.0))
        == 10.0
    )


def test_reward_model_loss_is_minus_gap_plus_lambda_nll_plus_c_r2():
    rng = np.random.default_rng(1)
    rt, rs, rc, rr = rng.normal(size=3), rng.normal(size=6), rng.normal(size=3), rng.normal(size=3)
    loss, metrics = pbkd.reward_model_loss(*map(jnp.asarray, (rt, rs, rc, rr)), lam=0.7, c=0.1)
    gap = rt.mean() - rs.mean()
    nll = np.mean(np.log1p(np.exp(-(rc - rr))))
    sq = np.mean(np.concatenate([rt, rs, rc, rr]) ** 2)
    assert float(loss) == pytest.approx(-gap + 0.7 * nll + 0.1 * sq, rel=1e-5)
    assert float(metrics["loss"][0] / metrics["loss"][1]) == pytest.approx(float(loss), rel=1e-6)


# -- exact expectations by enumeration -------------------------------------------------------------


def test_reinforce_with_loo_baseline_is_unbiased_by_enumeration():
    """E over all k=2 sample pairs of grad(reinforce_loss) == -grad(E_q r - beta KL(q || q_ref))."""
    rng = np.random.default_rng(2)
    n, beta = 4, 0.3  # four possible responses, drawn with q = softmax(theta)
    reward, logq_ref = rng.normal(size=n), np.log(softmax(rng.normal(size=n)))
    theta = jnp.asarray(rng.normal(size=n))

    def objective(th):
        logq = jax.nn.log_softmax(th)
        return jnp.sum(jnp.exp(logq) * (reward - beta * (logq - logq_ref)))

    def expected_surrogate(th):
        logq = jax.nn.log_softmax(th)
        pairs = np.array(list(itertools.product(range(n), repeat=2)))  # [n^2, 2]
        weight = jax.lax.stop_gradient(jnp.exp(logq[pairs[:, 0]] + logq[pairs[:, 1]]))
        per_pair = jax.vmap(
            lambda p: pbkd.reinforce_loss(
                logq[p][None], jnp.asarray(reward)[p][None], jnp.asarray(logq_ref)[p][None], beta
            )[0]
        )(pairs)
        return jnp.sum(weight * per_pair)

    got = jax.jit(jax.grad(expected_surrogate))(theta)
    np.testing.assert_allclose(got, -jax.grad(objective)(theta), rtol=1e-5, atol=1e-6)


VOCAB3, LEN2 = 3, 2


def _enumerable_example(seed=3):
    """Root and child-state logits of a teacher, a student and a Q table; vocabulary 3, length 2."""
    rng = np.random.default_rng(seed)
    tables = {
        name: (rng.normal(size=VOCAB3), rng.normal(size=(VOCAB3, VOCAB3)))
        for name in ("p", "q", "Q")
    }
    seqs = np.array(list(itertools.product(range(VOCAB3), repeat=LEN2)))  # [9, 2]
    return tables, seqs


def _per_sequence(table, seqs):
    """[9, 2, V]: the table's row for s_1 (root) and s_2 (after y_1) of every sequence."""
    root, child = table
    return np.stack([np.broadcast_to(root, (len(seqs), VOCAB3)), child[seqs[:, 0]]], axis=1)


def _brute_force_rewards(tables, seqs):
    """NumPy: sequence probabilities under p and q, and R(y) = sum_h Q(s_h, y_h) - E_p Q(s_h, .)."""

    def prob(name):
        root, child = softmax(tables[name][0]), softmax(tables[name][1])
        return root[seqs[:, 0]] * child[seqs[:, 0], seqs[:, 1]]

    p_root, p_child = softmax(tables["p"][0]), softmax(tables["p"][1])
    q_root, q_child = tables["Q"]
    v_root, v_child = p_root @ q_root, np.sum(p_child * q_child, axis=1)  # E_p Q at each state
    reward = q_root[seqs[:, 0]] - v_root + q_child[seqs[:, 0], seqs[:, 1]] - v_child[seqs[:, 0]]
    return prob("p"), prob("q"), reward


def test_mm_gap_equals_performance_difference_by_brute_force():
    tables, seqs = _enumerable_example()
    p_seq, q_seq, reward = _brute_force_rewards(tables, seqs)
    logits = {k: jnp.asarray(_per_sequence(v, seqs)) for k, v in tables.items()}
    mask = jnp.ones(seqs.shape, jnp.int32)
    terms = pbkd_mm.mm_position_terms(logits["p"], logits["q"], logits["Q"], jnp.asarray(seqs))
    j_p, j_q = float(p_seq @ reward), float(q_seq @ reward)
    assert j_p == pytest.approx(
        0.0, abs=1e-12
    )  # sanity of the brute force: E_p R = 0 by construction
    np.testing.assert_allclose(
        pbkd_mm.mm_sequence_reward(terms, mask), reward, rtol=1e-5, atol=1e-6
    )
    expected_gap = float(q_seq @ np.asarray(pbkd_mm.mm_gap(terms, mask)))  # E_{y ~ q} sum_h g_h
    assert expected_gap == pytest.approx(j_p - j_q, rel=1e-5, abs=1e-7)
    assert abs(j_p - j_q) > 1e-2  # the example is not degenerate


def test_mm_gap_is_zero_when_student_is_teacher():
    rng = np.random.default_rng(4)
    logits = jnp.asarray(rng.normal(size=(2, 5, 7)))
    q_values = jnp.asarray(rng.normal(size=(2, 5, 7)) * 3)
    terms = pbkd_mm.mm_position_terms(
        logits, logits, q_values, jnp.zeros((2, 5), jnp.int32), chunk=2
    )
    np.testing.assert_allclose(pbkd_mm.mm_gap(terms, jnp.ones((2, 5))), 0.0, atol=1e-5)


def test_mm_student_surrogate_gradient_is_unbiased_by_enumeration():
    """E over all pairs of k=2 student sequences of grad(mm_student_loss) == grad E_q[sum_h g_h]."""
    tables, seqs = _enumerable_example(5)
    _, _, reward = _brute_force_rewards(tables, seqs)  # E_q G = J(p) - J(q) = -E_q R, R fixed
    teacher, q_values = (jnp.asarray(_per_sequence(tables[k], seqs)) for k in ("p", "Q"))
    theta = (jnp.asarray(tables["q"][0]), jnp.asarray(tables["q"][1]))

    def exact(th):
        root, child = jax.nn.log_softmax(th[0]), jax.nn.log_softmax(th[1])
        logq = root[seqs[:, 0]] + child[seqs[:, 0], seqs[:, 1]]
        return -jnp.sum(jnp.exp(logq) * reward)

    pairs = np.array(list(itertools.product(range(len(seqs)), repeat=2)))  # [81, 2]

    def expected_surrogate(th):
        student = jnp.stack(
            [jnp.broadcast_to(th[0], (len(seqs), VOCAB3)), th[1][seqs[:, 0]]], axis=1
        )
        terms = pbkd_mm.mm_position_terms(teacher, student, q_values, jnp.asarray(seqs))
        logq = jnp.sum(terms.logq_taken, axis=1)
        weight = jax.lax.stop_gradient(jnp.exp(logq[pairs[:, 0]] + logq[pairs[:, 1]]))

        def one(pair):
            picked = pbkd_mm.MMTerms(*(x[pair] for x in terms))
            return pbkd_mm.mm_student_loss(picked, jnp.ones((2, LEN2)), k=2)[0]

        return jnp.sum(weight * jax.vmap(one)(pairs))

    got, want = jax.jit(jax.grad(expected_surrogate))(theta), jax.grad(exact)(theta)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


# -- chunking and masks ----------------------------------------------------------------------------


def _random_mm_inputs(seed, b=3, t=7, v=11):
    rng = np.random.default_rng(seed)
    arrays = [jnp.asarray(rng.normal(size=(b, t, v)) * s) for s in (1.0, 1.0, 2.0)]
    tokens = jnp.asarray(rng.integers(0, v, size=(b, t)))
    mask = jnp.asarray((np.arange(t)[None] < np.array([7, 4, 1])[:b, None]).astype(np.int32))
    return arrays, tokens, mask


def _mm_scalar(teacher, student, q_values, tokens, mask, chunk):
    terms = pbkd_mm.mm_position_terms(teacher, student, q_values, tokens, chunk=chunk, q_max=4.0)
    return (
        jnp.sum(pbkd_mm.mm_gap(terms, mask))
        + 0.3 * jnp.sum(pbkd_mm.mm_sequence_reward(terms, mask))
        + 0.1 * jnp.sum(jnp.where(mask > 0, terms.logq_taken, 0.0))
    )


@pytest.mark.parametrize("chunk", [1, 3])  # 3 does not divide T = 7: the last block overlaps
def test_chunked_mm_equals_unchunked_values_and_gradients(chunk):
    (teacher, student, q_values), tokens, mask = _random_mm_inputs(6)
    terms = jax.jit(pbkd_mm.mm_position_terms, static_argnames="chunk")
    for a, b in zip(
        terms(teacher, student, q_values, tokens),
        terms(teacher, student, q_values, tokens, chunk=chunk),
    ):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    grad = jax.jit(jax.grad(_mm_scalar, argnums=(1, 2)), static_argnums=5)
    for a, b in zip(
        grad(teacher, student, q_values, tokens, mask, None),
        grad(teacher, student, q_values, tokens, mask, chunk),
    ):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_projected_sources_equal_logits_and_carry_head_gradients():
    rng = np.random.default_rng(7)
    b, t, f, v = 2, 5, 4, 9
    feats = [jnp.asarray(rng.normal(size=(b, t, f))) for _ in range(3)]
    heads = [jnp.asarray(rng.normal(size=(f, v))) for _ in range(3)]
    tokens, mask = jnp.asarray(rng.integers(0, v, size=(b, t))), jnp.ones((b, t))
    project = lambda w, h: h @ w

    def via_projection(ws, chunk):
        srcs = [pbkd_mm.Projected(h, w, project) for h, w in zip(feats, ws)]
        return _mm_scalar(*srcs, tokens, mask, chunk)

    def via_logits(ws):
        return _mm_scalar(*[h @ w for h, w in zip(feats, ws)], tokens, mask, None)

    assert float(via_projection(heads, 2)) == pytest.approx(float(via_logits(heads)), rel=1e-5)
    chunked_grad = jax.jit(jax.grad(via_projection), static_argnums=1)
    for a, bb in zip(jax.jit(jax.grad(via_logits))(heads), chunked_grad(heads, 2)):
        np.testing.assert_allclose(bb, a, rtol=1e-5, atol=1e-6)


def test_mm_padding_never_changes_the_result():
    (teacher, student, q_values), tokens, mask = _random_mm_inputs(8)
    scalar = jax.jit(_mm_scalar, static_argnums=5)
    base = scalar(teacher, student, q_values, tokens, mask, 3)
    pad = mask == 0
    noisy = [jnp.where(pad[..., None], 1e3 * jnp.sign(x), x) for x in (teacher, student, q_values)]
    again = scalar(*noisy, jnp.where(pad, 5, tokens), mask, 3)
    assert float(again) == pytest.approx(float(base), rel=1e-6)
    wider = [
        jnp.pad(x, ((0, 0), (0, 5), (0, 0)), constant_values=7.0)
        for x in (teacher, student, q_values)
    ]
    longer = scalar(*wider, jnp.pad(tokens, ((0, 0), (0, 5))), jnp.pad(mask, ((0, 0), (0, 5))), 3)
    assert float(longer) == pytest.approx(float(base), rel=1e-6)
    samples = pbkd_mm.mm_position_terms(teacher, student, q_values, tokens, chunk=3)
    loss, _ = pbkd_mm.mm_q_loss(samples, mask, samples, mask, samples, mask, lam=1.0, c=0.1)
    padded_rows = pbkd_mm.MMTerms(*(jnp.concatenate([x, jnp.full_like(x, 9.0)]) for x in samples))
    wide_mask = jnp.concatenate([mask, jnp.zeros_like(mask)])
    loss2, _ = pbkd_mm.mm_q_loss(
        padded_rows, wide_mask, padded_rows, wide_mask, padded_rows, wide_mask, lam=1.0, c=0.1
    )
    assert float(loss2) == pytest.approx(float(loss), rel=1e-6)


def test_cheap_loss_is_ce_plus_lambda_dpo():
    rng = np.random.default_rng(9)
    logits, ids, mask = (
        jnp.asarray(rng.normal(size=(2, 4, 6))),
        jnp.asarray(rng.integers(0, 6, (2, 4))),
        jnp.ones((2, 4)),
    )
    ce, ce_metrics = losses.sft_loss(logits, ids, mask)
    lp = [jnp.asarray(rng.normal(size=2)) for _ in range(4)]
    loss, metrics = pbkd.cheap_loss(ce, ce_metrics, *lp, lam=0.5, beta=0.1)
    z = (lp[0] - lp[1]) - (lp[2] - lp[3])
    assert float(loss) == pytest.approx(
        float(ce) + 0.5 * float(np.mean(np.log1p(np.exp(-0.1 * np.asarray(z))))), rel=1e-5
    )


# -- tiny models, tokenizer and pairs for the reward model and the loops ---------------------------

WORDS = "the cat sat on a mat dog ran in park good bad summary short text please".split()


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator(
        [" ".join(WORDS)],
        trainers.WordLevelTrainer(special_tokens=["<pad>", "<s>", "</s>", "<unk>"]),
    )
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=raw,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )


def tiny_llama(tokenizer, seed, hidden=16):
    from plad_jax.models import init_model

    return init_model(
        {
            "model_type": "llama",
            "vocab_size": len(tokenizer),
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "max_position_embeddings": 64,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 0,
            "initializer_range": 0.2,
        },
        seed=seed,
    )


@pytest.fixture(scope="module")
def student(tokenizer):
    return tiny_llama(tokenizer, 1)


PROMPTS = [
    "the cat sat",
    "a dog ran in",
    "text please",
    "the park",
    "summary of the mat",
    "on a mat",
]


def pair_rows():
    from plad_jax.data import pairs

    return pairs.build_pairs(
        PROMPTS,
        [
            "the cat good",
            "dog ran good",
            "short text good",
            "park good",
            "mat good",
            "on a mat good",
        ],
        ["bad", "the the bad", "a bad", "in in bad bad bad", "bad mat", "bad bad"],
        references=["cat sat good", "dog good", "text good", "park good", "mat good", "good"],
    )


# -- reward model ----------------------------------------------------------------------------------


def test_reward_head_reads_the_last_real_response_token(student):
    from plad_jax.scoring import reward_model

    rm = reward_model.from_backbone(student, r_max=2.0, head_std=1.0)
    pi, pm = np.array([[5, 6, 7], [8, 9, 0]]), np.array([[1, 1, 1], [1, 1, 0]])
    ri, rm_ = np.array([[10, 11, 0, 0], [12, 13, 14, 0]]), np.array([[1, 1, 0, 0], [1, 1, 1, 0]])
    score = jax.jit(rm.apply)
    base = np.asarray(score(rm.params, pi, pm, ri, rm_))
    _, hidden = jax.jit(student.apply)(student.params, pi, pm, ri, rm_)
    last = np.asarray(hidden)[[0, 1], [1, 2]]  # the states at each row's last real token
    expected = 2.0 * np.tanh((last @ np.asarray(rm.head["w"]) + float(rm.head["b"])) / 2.0)
    np.testing.assert_allclose(base, expected, rtol=1e-5, atol=1e-6)
    garbage = np.where(rm_ > 0, ri, 15)  # other tokens under the padding, and more padding
    wide = [
        np.pad(a, ((0, 0), (0, 3)), constant_values=c)
        for a, c in ((pi, 4), (pm, 0), (garbage, 9), (rm_, 0))
    ]
    np.testing.assert_allclose(score(rm.params, *wide), base, rtol=1e-5, atol=1e-6)
    changed = ri.copy()
    changed[0, 1] = 16  # the last real token of row 0
    assert abs(float(score(rm.params, pi, pm, changed, rm_)[0]) - base[0]) > 1e-4
    assert np.all(np.abs(base) <= 2.0)


def test_bradley_terry_training_on_separable_pairs_reduces_nll(student, tokenizer):
    from plad_jax import data
    from plad_jax.data import preferences
    from plad_jax.scoring import reward_model
    from plad_jax.training.step import (
        OptimizerConfig,
        TrainState,
        make_optimizer,
        make_train_step,
        reduce_metrics,
    )

    rm = reward_model.from_backbone(student)
    prefs = preferences.preference_rows(pair_rows())  # chosen: "... good", rejected: "... bad"
    chosen, rejected = preferences.encode_preferences(tokenizer, prefs, 8, 6)
    c, r = data.make_batch(chosen, range(len(prefs))), data.make_batch(rejected, range(len(prefs)))
    batch = data.join_parts({"chosen": c, "rejected": r})
    assert isinstance(batch, data.PairBatch) and batch.response_ids is None
    optimizer = make_optimizer(OptimizerConfig(learning_rate=3e-2, total_steps=100))
    step = make_train_step(reward_model.bt_loss_fn(rm), optimizer)
    state = TrainState.create(jax.tree.map(jnp.copy, rm.params), optimizer)
    seen = []
    for _ in range(6):
        state, metrics = step(state, batch, {})
        seen.append(reduce_metrics(metrics)["nll"])
    assert seen[0] == pytest.approx(math.log(2.0), rel=1e-5)  # zero head: every reward 0
    assert seen[-1] < 0.5 * seen[0], seen


def test_reward_model_save_load_and_scorer(student, tokenizer, tmp_path):
    from plad_jax import data
    from plad_jax.models import CheckpointError
    from plad_jax.scoring import reward_model

    rm = reward_model.from_backbone(student, r_max=3.0, head_std=0.5, seed=4)
    reward_model.save(rm, str(tmp_path / "rm"))
    again = reward_model.load(str(tmp_path / "rm"))
    assert again.r_max == 3.0
    responses = ["the cat good", "bad", "dog ran", "park"]
    enc = data.encode_texts(tokenizer, PROMPTS[:4], responses, 8, 6)
    batch = data.make_batch(enc, range(4)).inputs()
    score = jax.jit(lambda p, *x: rm.apply(p, *x))  # both models have one structure
    direct = np.asarray(score(rm.params, *batch))
    np.testing.assert_allclose(score(again.params, *batch), direct, rtol=1e-6, atol=1e-7)
    scorer = reward_model.as_scorer(
        again, tokenizer, max_prompt_tokens=8, max_response_tokens=6, batch_size=3
    )
    np.testing.assert_allclose(
        scorer.score(PROMPTS[:4], responses), direct, rtol=1e-5, atol=1e-6
    )  # 3 + 1 rows
    student.save_pretrained(str(tmp_path / "plain"))
    with pytest.raises(CheckpointError, match="reward_head.safetensors"):
        reward_model.load(str(tmp_path / "plain"))


def test_preference_rows_from_a_scorer_or_pseudo_labels():
    from plad_jax.data import preferences

    class LengthScorer:  # prefers the longer response
        def score(self, prompts, responses, references=None):
            return np.array([len(r) for r in responses], float)

    rows = pair_rows()
    kept, stats = preferences.label_pairs(rows, None)
    assert stats["swapped"] == 0 and [p["chosen"] for p in preferences.preference_rows(kept)] == [
        r["teacher"] for r in rows
    ]
    scored, stats = preferences.label_pairs(rows, LengthScorer(), seed=0)
    longer_student = [len(r["student"]) > len(r["teacher"]) for r in rows]
    assert stats["swapped"] == sum(longer_student) >= 1
    for row, pref, swap in zip(rows, preferences.preference_rows(scored), longer_student):
        assert (pref["chosen"], pref["rejected"]) == (
            (row["student"], row["teacher"]) if swap else (row["teacher"], row["student"])
        )


# -- the loops end to end --------------------------------------------------------------------------

LOOP_CFG = dict(
    num_samples=2,
    max_new_tokens=4,
    rm_warmup_steps=1,
    rounds=2,
    mm_chunk=3,
    steps_per_round=2,
    rm_learning_rate=1e-3,
    alpha_ce=0.5,
)


def run_method(method, workdir, student, tokenizer, programs, teacher=None, **overrides):
    from plad_jax.config import TrainConfig
    from plad_jax.config.pbkd import PbKDConfig
    from plad_jax.methods.base import Setting
    from plad_jax.methods.pbkd.game import run_pbkd

    # checkpoints every 5 steps and at each phase end: online saves steps 1, 3, 4, 5 and 6
    train = TrainConfig(batch_size=2, learning_rate=1e-2, checkpoint_every=5, keep=1, log_every=1)
    setting = Setting(train, str(workdir), tokenizer, 8, 6, seed=3)
    cfg = PbKDConfig(**{**LOOP_CFG, **overrides})
    return run_pbkd(method, student, pair_rows(), cfg, setting, teacher=teacher, programs=programs)


def leaves(lm):
    return [np.asarray(x) for x in jax.tree.leaves(lm.params)]


@pytest.fixture(scope="module")
def programs():
    """Compiled steps shared by the runs below (`run_pbkd(programs=...)`), so each compiles once."""
    return {}


@pytest.fixture(scope="module")
def online_run(student, tokenizer, programs, tmp_path_factory):
    """pbkd_online run once without interruption: (student, summary, workdir)."""
    workdir = tmp_path_factory.mktemp("online")
    lm, summary = run_method("pbkd_online", workdir, student, tokenizer, programs)
    return lm, summary, workdir


# Offline with the online run's schedule lengths (4 student steps, 6 adversary steps) reuses its
# programs.
OFFLINE = dict(steps_per_round=4, rm_warmup_steps=2)


@pytest.mark.parametrize("method", ["pbkd_offline", "pbkd_cheap", "pbkd_mm"])
def test_run_pbkd_end_to_end(method, student, tokenizer, programs, online_run, tmp_path):
    initial = leaves(student)
    teacher = tiny_llama(tokenizer, 2, hidden=24) if method == "pbkd_mm" else None
    # pbkd_mm: no warm-up steps (its warm-up loss still runs, as the NLL* evaluation) to compile
    # less
    overrides = (
        OFFLINE
        if method == "pbkd_offline"
        else dict(rm_warmup_steps=0)
        if method == "pbkd_mm"
        else {}
    )
    lm, summary = run_method(
        method, tmp_path, student, tokenizer, programs, teacher=teacher, **overrides
    )
    assert any(np.abs(a - b).max() > 0 for a, b in zip(leaves(lm), initial))  # the student moved
    for a, b in zip(leaves(student), initial):
        np.testing.assert_array_equal(a, b)  # the caller's model is untouched
    assert summary["method"] == method and summary["pairs"] == len(PROMPTS)
    assert all(np.isfinite(v) for v in summary.values() if isinstance(v, float))
    assert (tmp_path / "checkpoints").is_dir() and (tmp_path / "curve.json").exists()
    if method == "pbkd_offline":
        assert summary["steps"] == 6 and 0.0 <= summary["lam"] and summary["nll_star"] > 0
        from plad_jax.scoring import reward_model

        scorer = reward_model.load_scorer(
            str(tmp_path / "reward_model"), max_prompt_tokens=8, max_response_tokens=6
        )
        assert np.all(
            np.abs(scorer.score(PROMPTS[:2], ["good", "bad"])) <= LOOP_CFG.get("r_max", 5.0)
        )
        from plad_jax.scoring.rewards import make_scorer

        # eval.scorer=jax_reward_model with this directory
        by_config = make_scorer("jax_reward_model", str(tmp_path / "reward_model"), 4)
        np.testing.assert_allclose(
            by_config.score(PROMPTS[:2], ["good", "bad"]),
            scorer.score(PROMPTS[:2], ["good", "bad"]),
            rtol=1e-6,
        )
    if method == "pbkd_mm":
        assert summary["steps"] == 2 and (tmp_path / "q_network" / "config.json").exists()


def test_run_pbkd_online_grows_the_preference_set(online_run):
    _, summary, workdir = online_run
    from plad_jax.data import pairs

    round0, round1 = (pairs.read_pairs(workdir / "rounds" / f"round-{r}") for r in (0, 1))
    assert len(round0) + len(round1) == summary["pairs"] == len(PROMPTS)
    assert [r["student"] for r in round0] == [
        r["student"] for r in pair_rows()[:3]
    ]  # round 0: stored samples
    assert [r["student"] for r in round1] != [
        r["student"] for r in pair_rows()[3:]
    ]  # round 1: fresh samples
    assert summary["steps"] == 2 * (1 + 2)  # per round: one warm-up step and two game steps


def test_run_pbkd_resumes_after_a_crash_mid_round(
    online_run, student, tokenizer, programs, tmp_path, monkeypatch
):
    from plad_jax.methods.pbkd import game

    real_step = game._Game._game_step

    def crash_at_step_6(self, encoding, r, index, step):
        if (
            step == 6
        ):  # round 1's last game step; the newest checkpoint is step 5, inside that game phase
            raise KeyboardInterrupt("killed")
        return real_step(self, encoding, r, index, step)

    monkeypatch.setattr(game._Game, "_game_step", crash_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        run_method("pbkd_online", tmp_path, student, tokenizer, programs)
    import orbax.checkpoint as ocp

    assert ocp.CheckpointManager(str(tmp_path / "checkpoints")).latest_step() == 5
    steps_run = []

    def counted(self, encoding, r, index, step):
        steps_run.append(step)
        return real_step(self, encoding, r, index, step)

    monkeypatch.setattr(game._Game, "_game_step", counted)
    monkeypatch.setattr(game._Game, "_warmup_step", lambda *a: pytest.fail("warm-up ran again"))
    monkeypatch.setattr(
        game.pbkd_rounds, "fresh_student_rows", lambda *a, **k: pytest.fail("sampled again")
    )
    lm, summary = run_method("pbkd_online", tmp_path, student, tokenizer, programs)
    assert steps_run == [6]  # only what the checkpoint did not hold
    expected_lm, expected, _ = online_run
    for a, b in zip(leaves(lm), leaves(expected_lm)):
        np.testing.assert_array_equal(a, b)  # bit for bit the uninterrupted run
    assert summary["lam"] == expected["lam"] and summary["nll_star"] == expected["nll_star"]


def test_methods_offer_pbkd_cheap_and_point_the_game_methods_to_run_pbkd(student):
    from plad_jax import methods

    pbkd_methods = methods.names(lambda c: issubclass(c, methods.PbKD))
    assert pbkd_methods == ("pbkd_cheap", "pbkd_offline", "pbkd_online", "pbkd_mm")
    classes = [methods.resolve(m) for m in pbkd_methods]
    assert all(c.own_loop and c.section == "pbkd" for c in classes)
    loss_fn, frozen_fn = methods.get("pbkd_cheap", lam_init=0.5).objective(student)
    assert callable(loss_fn) and callable(frozen_fn)
    for method in ("pbkd_offline", "pbkd_online", "pbkd_mm"):
        with pytest.raises(ValueError, match="run_pbkd"):
            methods.get(method).objective(student)
    with pytest.raises(ValueError, match="leave-one-out baseline needs at least 2"):
        methods.get("pbkd_offline", num_samples=1)
    methods.get("pbkd_cheap", num_samples=1)  # no samples in the cheap variant
