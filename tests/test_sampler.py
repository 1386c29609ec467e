"""Sampler: greedy parity with transformers `generate`, cache-consistent log-probs, sampling
distributions on a fixed-logits stub, exact EOS/padding semantics, sharded == single device, and the
text helper.

Compile time dominates on CPU, so shapes are shared: every real-model call uses the same four
prompts (one compiled program per family and sampling setting).
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from plad_jax import backend
from plad_jax import sharding as shd
from plad_jax.generation import sampler
from plad_jax.models import from_pretrained
from tests.helpers import FAMILIES, LLAMA, PROMPT_LENS, hf_greedy, prompt_batch

NEW = 32


def reachable_eos(continuations):
    """A token greedy decoding reaches early in some row and never in another: the test's EOS."""
    for row in continuations:
        for pos in range(1, 20):
            tok = row[pos]
            if tok not in row[:pos] and any(tok not in other for other in continuations):
                return tok
    raise AssertionError(f"no usable EOS in {continuations}")


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """family -> (HF model, directory, our LanguageModel); EOS chosen so some rows stop early."""
    out = {}
    ids, mask = prompt_batch()
    for name, (config_cls, model_cls, kwargs) in FAMILIES.items():
        torch.manual_seed(0)
        config = getattr(transformers, config_cls)(**kwargs, eos_token_id=None)
        model = getattr(transformers, model_cls)(config).eval()
        model.generation_config.eos_token_id = None
        eos = reachable_eos(hf_greedy(model, ids, mask, NEW))
        model.config.eos_token_id = model.generation_config.eos_token_id = eos
        path = str(tmp_path_factory.mktemp(name))
        model.save_pretrained(path)
        out[name] = (model, path, from_pretrained(path))
    return out


@pytest.fixture(scope="module")
def greedy(families):
    """family -> our greedy Generation on `prompt_batch()` (single device)."""
    ids, mask = prompt_batch()
    return {
        name: sampler.generate(lm, ids, mask, max_new_tokens=NEW, temperature=0.0)
        for name, (_, _, lm) in families.items()
    }


# -- greedy parity with transformers ------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_greedy_equals_transformers_generate(families, greedy, name):
    model, _, lm = families[name]
    ids, mask = prompt_batch()
    expected = hf_greedy(model, ids, mask, NEW)
    out = greedy[name]
    assert out.tokens.shape == out.mask.shape == out.logprobs.shape == (len(PROMPT_LENS), NEW)
    eos = lm.eos_token_ids[0]
    stopped = [row[-1] == eos for row in expected]
    assert any(stopped) and not all(stopped), (
        "the test needs rows that stop early and rows that do not"
    )
    for b, want in enumerate(expected):
        got = out.tokens[b, : out.mask[b].sum()].tolist()
        assert got == want, (name, b)
        assert (out.tokens[b, len(want) :] == lm.pad_token_id).all()  # EOS kept, then padding
        assert (out.logprobs[b, len(want) :] == 0).all()


def test_greedy_logprobs_are_model_logprobs(families, greedy):
    """Greedy defines logprobs as log_softmax(logits)[token] (temperature 1)."""
    _, _, lm = families["llama_gqa"]
    out = greedy["llama_gqa"]
    ids, mask = prompt_batch()
    logits = np.asarray(lm.logits(ids, mask, out.tokens, out.mask), np.float64)
    real = out.mask.astype(bool)
    assert (out.tokens[real] == logits.argmax(-1)[real]).all()
    expected = np.take_along_axis(log_softmax(logits), out.tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(out.logprobs[real], expected[real], atol=1e-4)


# -- sampled log-probs against a full forward pass ----------------------------------------------


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def filtered_logprobs(logits, temperature, top_k, top_p):
    """NumPy reference of the sampling distribution: temperature -> top-k -> top-p, renormalised."""
    scaled = np.asarray(logits, np.float64) / temperature
    order = np.argsort(-scaled, axis=-1, kind="stable")
    ranked = np.take_along_axis(scaled, order, -1)
    keep = np.ones_like(ranked, bool)
    if top_k:
        keep[..., top_k:] = False
    probs = np.exp(log_softmax(np.where(keep, ranked, -np.inf)))
    keep &= np.cumsum(probs, -1) - probs < top_p
    out = np.full_like(scaled, -np.inf)
    np.put_along_axis(out, order, log_softmax(np.where(keep, ranked, -np.inf)), -1)
    return out


@pytest.mark.parametrize(
    "name,temperature,top_k,top_p",
    [
        ("llama_gqa", 0.7, 0, 1.0),
        ("t5_v1_1", 0.7, 0, 1.0),
        ("gpt_neo", 0.7, 0, 1.0),
        ("llama_gqa", 1.3, 12, 0.8),
    ],
)
def test_logprobs_match_full_forward_pass(families, name, temperature, top_k, top_p):
    _, _, lm = families[name]
    ids, mask = prompt_batch()
    out = sampler.generate(
        lm,
        ids,
        mask,
        max_new_tokens=NEW,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        num_samples=2,
        seed=3,
    )
    assert out.tokens.shape == (2 * len(PROMPT_LENS), NEW)
    rep = lambda a: np.repeat(a, 2, axis=0)  # rows grouped by prompt
    logits = np.asarray(lm.logits(rep(ids), rep(mask), out.tokens, out.mask))
    expected = np.take_along_axis(
        filtered_logprobs(logits, temperature, top_k, top_p), out.tokens[..., None], -1
    )[..., 0]
    real = out.mask.astype(bool)
    assert np.isfinite(expected[real]).all(), "a token outside the top-k / nucleus was drawn"
    assert np.max(np.abs(out.logprobs[real] - expected[real])) <= 1e-4
    assert (out.logprobs[~real] == 0).all() and (out.tokens[~real] == lm.pad_token_id).all()


def test_same_seed_same_samples_other_seed_other_samples(families):
    _, _, lm = families["llama_gqa"]
    ids, mask = prompt_batch()
    run = lambda seed: sampler.generate(
        lm, ids, mask, max_new_tokens=NEW, temperature=0.7, num_samples=2, seed=seed
    )
    a, b, c = run(3), run(3), run(4)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.logprobs, b.logprobs)
    assert (a.tokens != c.tokens).any()
    assert (a.tokens[0::2] != a.tokens[1::2]).any(), "two samples of one prompt must differ"


# -- sharded == single device -------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_sharded_greedy_equals_single_device(families, greedy, name):
    _, path, _ = families[name]
    lm = from_pretrained(
        path, mesh=shd.make_mesh((2, 2, 2))
    )  # rows over data x fsdp, heads over tensor
    ids, mask = prompt_batch()
    out = sampler.generate(lm, ids, mask, max_new_tokens=NEW, temperature=0.0)
    np.testing.assert_array_equal(out.tokens, greedy[name].tokens)
    np.testing.assert_array_equal(out.mask, greedy[name].mask)
    np.testing.assert_allclose(
        out.logprobs, greedy[name].logprobs, rtol=1e-3, atol=1e-4
    )  # T5 logits are large


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_cache_is_sharded_over_batch_and_heads(families, name):
    """Keys [(L,) B, heads, S, Dh] or [(L,) B, heads, Dh, S] (GQA) and values [(L,) B, heads, S, Dh]
    (stacked or one array per layer): B over (data, fsdp), heads over tensor; every other per-row
    leaf (masks, positions) over (data, fsdp)."""
    _, _, lm = families[name]
    ids = jnp.ones((8, 16), jnp.int32)
    _, cache = jax.eval_shape(lambda p: lm.prefill(p, ids, ids, 4), lm.params)
    specs = sampler._cache_specs(lm.prefill, lm.params, cache, shd.make_mesh((2, 2, 2)))
    is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
    batch = shd.BATCH_AXES
    for key in cache:
        leaves, leaf_specs = (
            jax.tree.leaves(cache[key]),
            jax.tree.leaves(specs[key], is_leaf=is_spec),
        )
        assert len(leaves) == len(leaf_specs), key
        for leaf, spec in zip(leaves, leaf_specs):
            expected = [None] * leaf.ndim
            if key in ("k", "v", "cross_k", "cross_v"):
                expected[leaf.ndim - 4], expected[-3] = batch, "tensor"
            elif leaf.ndim:
                expected[0] = batch
            assert spec == jax.sharding.PartitionSpec(*expected), key


def test_cache_specs_find_heads_in_every_key_value_layout():
    """A model of another stack: its cache's heads axis is found whatever the order of seq, heads
    and head_dim, for one array per layer and for layers stacked in front."""

    def prefill(params, ids, mask, new):
        b, s = ids.shape[0], ids.shape[1] + new
        return None, {
            "seq_heads_dim": jnp.zeros((b, s, 4, 8)),
            "heads_seq_dim": jnp.zeros((b, 4, s, 8)),
            "heads_dim_seq": jnp.zeros((b, 4, 8, s)),
            "stacked": jnp.zeros((3, b, 4, 8, s)),
            "pos": jnp.zeros((b, s), jnp.int32),
        }

    _, cache = jax.eval_shape(lambda: prefill(None, jnp.ones((8, 16)), None, 4))
    specs = sampler._cache_specs(prefill, {}, cache, shd.make_mesh((2, 2, 2)))
    P, batch = jax.sharding.PartitionSpec, shd.BATCH_AXES
    assert specs == {
        "seq_heads_dim": P(batch, None, "tensor", None),
        "heads_seq_dim": P(batch, "tensor", None, None),
        "heads_dim_seq": P(batch, "tensor", None, None),
        "stacked": P(None, batch, "tensor", None, None),
        "pos": P(batch, None),
    }


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_attention_over_cache_prefixes_changes_nothing(families, greedy, name, monkeypatch):
    """With 8-slot blocks the decode steps read cache prefixes of 8, 16, ... slots (the test caches
    are shorter than the default block): same tokens as transformers (via `greedy`), same
    logprobs."""
    from plad_jax.models import layers

    _, path, _ = families[name]
    monkeypatch.setattr(layers, "CACHE_BLOCK", 8)
    lm = from_pretrained(path)
    ids, mask = prompt_batch()
    jax.clear_caches()  # retrace: the compiled programs are shared by every model of this family
    try:
        out = sampler.generate(lm, ids, mask, max_new_tokens=NEW, temperature=0.0)
    finally:
        jax.clear_caches()
    np.testing.assert_array_equal(out.tokens, greedy[name].tokens)
    np.testing.assert_allclose(out.logprobs, greedy[name].logprobs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "choice",
    [
        dict(gqa_keys_slots_minor=False),
        dict(cache_prefix_switch=False),
        dict(donate=False),
        backend.DEFAULTS["gpu"].__dict__,
    ],
)
def test_backend_choices_change_no_sample(families, greedy, choice, monkeypatch):
    """Each per-backend choice (here: other backends' defaults, forced on CPU) keeps the LLaMA GQA
    tokens equal to transformers' (via `greedy`) and the logprobs; the choice really is traced in:
    the cache's key layout follows `gqa_keys_slots_minor`, and the sampler keys programs on it."""
    from plad_jax.models import layers

    _, _, lm = families["llama_gqa"]
    monkeypatch.setattr(layers, "CACHE_BLOCK", 8)  # so the prefix switch has branches at NEW = 32
    ids, mask = prompt_batch()
    with backend.override(**choice) as chosen:
        cache = jax.eval_shape(lambda p: lm.prefill(p, ids, mask, NEW)[1], lm.params)
        out = sampler.generate(lm, ids, mask, max_new_tokens=NEW, temperature=0.0)
    head_dim = LLAMA["hidden_size"] // LLAMA["num_attention_heads"]
    assert cache["k"][0].shape[-1] == (
        ids.shape[1] + NEW if chosen.gqa_keys_slots_minor else head_dim
    )
    np.testing.assert_array_equal(out.tokens, greedy["llama_gqa"].tokens)
    np.testing.assert_allclose(out.logprobs, greedy["llama_gqa"].logprobs, rtol=1e-5, atol=1e-5)


def test_backend_defaults_keep_cpu_as_tuned_and_reject_unknown_choices():
    assert backend.defaults("cpu") == backend.BackendChoices(True, True, None, True)
    assert backend.defaults("cuda") == backend.DEFAULTS["gpu"]
    assert (
        not backend.DEFAULTS["gpu"].gqa_keys_slots_minor
        and backend.DEFAULTS["gpu"].parity_precision == "highest"
    )
    with pytest.raises(ValueError, match="unknown backend choice"):
        backend.configure(slots_minor=True)
    assert backend.choices() == backend.defaults()


# -- decoding semantics on scripted and fixed-logits stubs --------------------------------------


class StubLM:
    """A LanguageModel-shaped stub: row r's logits at step t are `table[first prompt token of r,
    t]`."""

    mesh = None
    is_encoder_decoder = False

    def __init__(self, table, eos=(), pad=0):
        self.params = {"table": jnp.asarray(table, jnp.float32)}  # [prompts, steps, V]
        self.eos_token_ids, self.pad_token_id = tuple(eos), pad

    def prefill(self, params, prompt_ids, prompt_mask, max_new_tokens):
        cache = {"row": prompt_ids[:, 0], "step": jnp.zeros(prompt_ids.shape[:1], jnp.int32)}
        return params["table"][cache["row"], 0], cache

    def decode(self, params, tokens, cache):
        cache = {"row": cache["row"], "step": cache["step"] + 1}
        steps = params["table"].shape[1]
        return params["table"][cache["row"], jnp.minimum(cache["step"], steps - 1)], cache


def test_eos_is_kept_then_padding_and_rows_grouped_by_prompt():
    v, eos, pad = 10, 9, 7
    script = [
        [3, 4, 9, 5, 5, 5],
        [1, 2, 3, 4, 5, 6],
        [9, 1, 1, 1, 1, 1],
    ]  # greedy tokens per prompt
    table = np.full((3, 6, v), -5.0)
    for r, row in enumerate(script):
        table[r, np.arange(6), row] = 5.0
    lm = StubLM(table, eos=(eos, 8), pad=pad)
    ids = np.array([[0, 5, 5], [1, 0, 0], [2, 5, 0]], np.int32)
    mask = np.array([[1, 1, 1], [1, 0, 0], [1, 1, 0]], np.int32)
    out = sampler.generate(
        lm, ids, mask, max_new_tokens=6, temperature=0.0, num_samples=2, pad_batch_to=8
    )
    want = np.array(
        [[3, 4, 9, pad, pad, pad], [1, 2, 3, 4, 5, 6], [9, pad, pad, pad, pad, pad]]
    ).repeat(2, 0)
    want_mask = np.array([[1, 1, 1, 0, 0, 0], [1] * 6, [1, 0, 0, 0, 0, 0]]).repeat(2, 0)
    np.testing.assert_array_equal(out.tokens, want)
    np.testing.assert_array_equal(out.mask, want_mask)
    expected = np.take_along_axis(
        log_softmax(table[:, :6].repeat(2, 0)), want[..., None].clip(0, v - 1), -1
    )[..., 0]
    np.testing.assert_allclose(out.logprobs, np.where(want_mask, expected, 0.0), atol=1e-6)


def chi2_pvalue(counts, probs):
    expected = counts.sum() * probs
    stat = float(np.sum((counts - expected) ** 2 / expected))
    return float(jax.scipy.special.gammaincc((len(counts) - 1) / 2, stat / 2))


FIXED = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0], np.float32)


# (temperature, top_k, top_p, support size worked out by hand from the cumulative probabilities)
@pytest.mark.parametrize(
    "temperature,top_k,top_p,support_size",
    [
        (1.0, 0, 1.0, 8),
        (0.6, 0, 1.0, 8),
        (1.7, 3, 1.0, 3),
        (1.0, 0, 0.75, 3),  # cumulative 0.405, 0.650, 0.799: the third token reaches 0.75
        (2.0, 5, 0.6, 3),
    ],
)  # top-5 at T=2 renormalised: cumulative 0.310, 0.551, 0.740
def test_sampling_distribution(temperature, top_k, top_p, support_size):
    draws_per_row, rows = 16, 1024
    lm = StubLM(np.broadcast_to(FIXED, (1, 1, FIXED.size)))
    out = sampler.generate(
        lm,
        np.zeros((1, 1), np.int32),
        np.ones((1, 1), np.int32),
        max_new_tokens=draws_per_row,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        num_samples=rows,
        seed=11,
    )
    want = np.exp(filtered_logprobs(FIXED, temperature, top_k, top_p))
    counts = np.bincount(out.tokens.ravel(), minlength=FIXED.size)
    support = want > 0
    assert counts[~support].sum() == 0, "drew a token outside the top-k / nucleus"
    assert support.sum() == support_size
    assert chi2_pvalue(counts[support], want[support]) > 1e-3
    np.testing.assert_allclose(out.logprobs, np.log(want[out.tokens]), atol=1e-5)


def test_nucleus_keeps_the_smallest_prefix_reaching_top_p():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = jnp.log(jnp.asarray(probs, jnp.float32))[None].repeat(4000, 0)
    for top_p, support in [(0.5, 1), (0.51, 2), (0.8, 2), (0.81, 3), (1.0, 4), (1e-6, 1)]:
        tokens, _ = sampler.sample_logits(logits, jax.random.key(0), 1.0, 0, top_p)
        assert set(np.unique(tokens)) == set(range(support)), top_p


def test_top_k_one_and_greedy_are_argmax():
    logits = jax.random.normal(jax.random.key(1), (64, 50))
    greedy_tokens, greedy_lp = sampler.sample_logits(logits, jax.random.key(2), 0.0)
    top1, top1_lp = sampler.sample_logits(logits, jax.random.key(2), 1.0, 1)
    np.testing.assert_array_equal(greedy_tokens, np.argmax(logits, -1))
    np.testing.assert_array_equal(top1, greedy_tokens)
    np.testing.assert_allclose(top1_lp, 0.0, atol=1e-6)  # the only candidate: probability 1
    np.testing.assert_allclose(
        greedy_lp, jax.nn.log_softmax(logits)[np.arange(64), greedy_tokens], atol=1e-6
    )


def test_row_samples_do_not_depend_on_batch_or_prompt_padding():
    table = np.random.default_rng(0).normal(size=(4, 5, 12)).astype(np.float32)
    lm = StubLM(table)
    ids, mask = np.array([[0], [1], [2]], np.int32), np.ones((3, 1), np.int32)
    base = sampler.generate(lm, ids, mask, max_new_tokens=5, temperature=1.0, seed=5)
    padded = sampler.generate(
        lm,
        np.pad(ids, ((0, 0), (0, 20))),
        np.pad(mask, ((0, 0), (0, 20))),
        max_new_tokens=5,
        temperature=1.0,
        seed=5,
        pad_batch_to=16,
    )
    np.testing.assert_array_equal(base.tokens, padded.tokens)


def test_sample_ids_make_samples_independent_of_batching():
    table = np.random.default_rng(1).normal(size=(6, 5, 12)).astype(np.float32)
    lm = StubLM(table)
    rows = np.arange(6, dtype=np.int32)[:, None]
    whole = sampler.generate(
        lm, rows, np.ones_like(rows), max_new_tokens=5, temperature=1.0, seed=5, num_samples=2
    )
    # prompts 4 and 1 alone, in another order, each keeping its id: the same samples as in the whole
    # batch
    part = sampler.generate(
        lm,
        rows[[4, 1]],
        np.ones((2, 1), np.int32),
        max_new_tokens=5,
        temperature=1.0,
        seed=5,
        num_samples=2,
        sample_ids=[4, 1],
    )
    np.testing.assert_array_equal(part.tokens, whole.tokens[[8, 9, 2, 3]])
    moved = sampler.generate(
        lm,
        rows[[4, 1]],
        np.ones((2, 1), np.int32),
        max_new_tokens=5,
        temperature=1.0,
        seed=5,
        num_samples=2,
    )  # default ids 0, 1: other streams
    assert not np.array_equal(moved.tokens, part.tokens)
    by_text = sampler.generate_many(
        lm,
        [[4], [1], [3]],
        max_new_tokens=5,
        temperature=1.0,
        seed=5,
        batch_size=2,
        sample_ids=[4, 1, 3],
        progress=False,
    )
    one_each = sampler.generate(
        lm, rows, np.ones_like(rows), max_new_tokens=5, temperature=1.0, seed=5
    )
    assert [s.ids for s in by_text] == [
        list(one_each.tokens[i]) for i in (4, 1, 3)
    ]  # no EOS in the stub


def test_no_prompt_rows_gives_empty_output():
    """A host with nothing left to sample still takes part in a multi-host step."""
    out = sampler.generate(
        StubLM(np.zeros((1, 1, 4))),
        np.zeros((0, 3), np.int32),
        np.zeros((0, 3), np.int32),
        max_new_tokens=2,
        num_samples=3,
    )
    assert out.tokens.shape == out.mask.shape == out.logprobs.shape == (0, 2)


def test_bucket_length():
    assert [sampler.prompt_bucket(n) for n in (1, 16, 17, 33, 100, 128, 129, 300, 1000)] == [
        16,
        16,
        32,
        64,
        128,
        128,
        256,
        384,
        1024,
    ]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(num_samples=0), "num_samples"),
    ],
)
def test_bad_settings_are_one_clear_error(kwargs, message):
    lm = StubLM(np.zeros((1, 1, 4)))
    with pytest.raises(ValueError, match=message):
        sampler.generate(
            lm,
            np.zeros((1, 2), np.int32),
            np.ones((1, 2), np.int32),
            **{"max_new_tokens": 2, **kwargs},
        )


def test_empty_prompt_row_is_an_error():
    lm = StubLM(np.zeros((1, 1, 4)))
    with pytest.raises(ValueError, match="prompt row 1 has no real token"):
        sampler.generate(
            lm, np.zeros((2, 2), np.int32), np.array([[1, 0], [0, 0]], np.int32), max_new_tokens=2
        )


def test_prompt_plus_new_tokens_past_the_position_table_is_an_error(families):
    """GPT-Neo's learned positions end at max_position_embeddings: no silent clamping past them."""
    lm = families["gpt_neo"][2]
    limit = lm.max_positions
    ids, mask = np.full((2, limit), 5, np.int32), np.ones((2, limit), np.int32)
    mask[0, limit - 8 :] = 0  # row 0: limit - 8 real tokens, which leaves room for 8 new ones
    assert sampler.generate(
        lm, ids[:1], mask[:1], max_new_tokens=8, temperature=0.0
    ).tokens.shape == (1, 8)
    with pytest.raises(
        ValueError,
        match=f"prompt \\+ max_new_tokens=2 of {limit + 2} tokens exceeds the {limit} "
        "positions of this gpt_neo model",
    ):
        sampler.generate(lm, ids, mask, max_new_tokens=2)
    with pytest.raises(ValueError, match=f"prompt \\+ response of {limit + 1} tokens exceeds"):
        lm.logits(ids[1:], mask[1:], ids[1:, :1], mask[1:, :1])
    assert (
        families["llama_gqa"][2].max_positions is None
        and families["t5_v1_1"][2].max_positions is None
    )


# -- text in, text out --------------------------------------------------------------------------

SENTENCES = [
    "the cat sat on the mat",
    "a dog ran in the park",
    "summarize the text below please",
    "the quick brown fox jumps over the lazy dog",
    "hello world",
    "it was a dark and stormy night",
]


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator(
        SENTENCES, trainers.WordLevelTrainer(special_tokens=["<pad>", "<s>", "</s>", "<unk>"])
    )
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    torch.manual_seed(1)
    config = transformers.LlamaConfig(**{**LLAMA, "vocab_size": len(tokenizer)}, eos_token_id=2)
    path = str(tmp_path_factory.mktemp("text_llama"))
    transformers.LlamaForCausalLM(config).eval().save_pretrained(path)
    return tokenizer, from_pretrained(path)


def reference_texts(lm, tokenizer, encoded):
    """Greedy responses via token-level `generate`, four rows per call (the text helper's shape)."""
    texts = []
    for start in range(0, len(encoded), 4):
        chunk = encoded[start : start + 4]
        width = max(map(len, chunk))
        ids = np.array([e + [0] * (width - len(e)) for e in chunk], np.int32)
        mask = np.array([[1] * len(e) + [0] * (width - len(e)) for e in chunk], np.int32)
        out = sampler.generate(lm, ids, mask, max_new_tokens=8, temperature=0.0, pad_batch_to=4)
        for row, row_mask in zip(out.tokens, out.mask):
            kept = [t for t, m in zip(row, row_mask) if m and t not in lm.eos_token_ids]
            texts.append(tokenizer.decode(kept, skip_special_tokens=True))
    return texts


def test_generate_text_matches_token_level_generate(text_model, caplog):
    tokenizer, lm = text_model
    prompts = SENTENCES[:5]  # batches of 2 prompts x 2 samples: 2, 2 and a short last one
    with caplog.at_level(logging.INFO, logger="plad_jax.generation.sampler"):
        texts = sampler.generate_text(
            lm,
            tokenizer,
            prompts,
            max_new_tokens=8,
            batch_size=2,
            temperature=0.0,
            num_samples=2,
            progress=False,
        )
    assert "tokens/s" in caplog.text
    expected = reference_texts(lm, tokenizer, [tokenizer(p)["input_ids"] for p in prompts])
    assert texts == [t for t in expected for _ in range(2)]  # original order, grouped by prompt
    assert any(texts), "every response is empty: the comparison would be vacuous"


def test_sampling_tokens_per_s_leaves_compilation_out(text_model, caplog):
    tokenizer, lm = text_model
    prompts = [tokenizer(p)["input_ids"] for p in SENTENCES[:4]]  # two batches, one prompt shape
    kw = dict(
        max_new_tokens=8, batch_size=2, temperature=0.0, top_k=3, progress=False
    )  # a new program
    with caplog.at_level(logging.INFO, logger="plad_jax.generation.sampler"):
        sampler.generate_many(lm, prompts, desc="first", **kw)
        sampler.generate_many(lm, prompts, desc="again", **kw)
    first, again = (
        r.getMessage() for r in caplog.records if r.getMessage().startswith(("first", "again"))
    )
    assert "tokens/s compiled;" in first and "in batches that compiled" in first, first
    assert "compil" not in again, again  # nothing compiled the second time: one plain rate


def test_generate_text_truncates_long_prompts(text_model):
    tokenizer, lm = text_model
    long_prompt = " ".join(SENTENCES * 3)
    kw = dict(max_new_tokens=8, batch_size=4, temperature=0.0, progress=False)
    texts = sampler.generate_text(lm, tokenizer, ["hello", long_prompt], max_prompt_tokens=5, **kw)
    # Left truncation keeps the last five tokens (the "<s>" at the start goes with the rest).
    tail = tokenizer(long_prompt)["input_ids"][-5:]
    assert texts == reference_texts(lm, tokenizer, [tokenizer("hello")["input_ids"], tail])
    assert sampler.generate_text(lm, tokenizer, [], **kw) == []


# -- stop strings -------------------------------------------------------------------------------

HH_TEXT = (
    "\n\nHuman: what is a cat?\n\nAssistant: A small animal.\n\nHuman: and a dog?"
    "\n\nAssistant: Sure."
)


def byte_bpe_tokenizer():
    """A byte-level BPE tokenizer (GPT-2 / LLaMA-3 / SmolLM style) trained on HH-style turns:
    every byte is a token, and merges such as "\\n\\n" and "Human" give strings several spellings.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    raw.train_from_iterator([HH_TEXT] * 20 + ["Sure.\n\n\n\n"] * 20, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=raw, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


@pytest.fixture(scope="module")
def bpe():
    return byte_bpe_tokenizer()


def spell(tokenizer, pieces):
    """Token ids of `pieces`, each one vocabulary token (byte-level spelling, "Ċ" = newline)."""
    vocab = tokenizer.get_vocab()
    assert all(p in vocab for p in pieces), [p for p in pieces if p not in vocab]
    return [vocab[p] for p in pieces]


def scripted(scripts, vocab, eos=2, pad=0, high=20.0):
    """A StubLM whose greedy row r writes `scripts[r]` (prompt r starts with token r), then EOS:
    logit `high` for that token, 0 for the others."""
    steps = max(map(len, scripts)) + 1
    table = np.zeros((len(scripts), steps, vocab), np.float32)
    for r, script in enumerate(scripts):
        row = list(script) + [eos] * (steps - len(script))
        table[r, np.arange(steps), row] = high
    return StubLM(table, eos=(eos,), pad=pad)


STOP = "\n\nHuman:"
# The stop string as one merged newline token, as two single newlines, and starting inside a
# "\n\n\n" that the tokenizer splits "\n\n" + "\n": each must end its row inside the loop.
STOP_SCRIPTS = [
    ["Su", "re", ".", "ĊĊ", "Human", ":", "Ġand", "Ġdog"],
    ["A", "Ġsmall", "Ċ", "Ċ", "H", "u", "m", "a", "n", ":", "Ġwhat"],
    ["Su", "re", "ĊĊ", "Ċ", "Human", ":", "Ġa", "Ġcat", "?"],
]


def test_stop_string_ends_rows_inside_the_jitted_loop(bpe):
    """Every row completes the stop string at a different column, in a different tokenization:
    each is finished there (padding after), and the loop ends when the last one is, well before
    `max_new_tokens` (the loop's step count, not only the padding, shows it)."""
    scripts = [spell(bpe, s) for s in STOP_SCRIPTS]
    lm = scripted(scripts, len(bpe))
    stop = sampler.stop_strings(bpe, [STOP])
    assert stop.layout is not None
    n = 24
    sampling = sampler.SamplingConfig(n, 0.0, stop=stop.layout)
    tables = sampler.StopTable(stop.table, stop.lengths)

    @jax.jit
    def run(params):
        ids = jnp.arange(3, dtype=jnp.int32)[:, None]
        logits, cache = lm.prefill(params, ids, jnp.ones_like(ids), n)
        state = sampler.start_state(
            logits, cache, jnp.ones(3, bool), jnp.arange(3), 0, sampling, (2,), 0, tables
        )
        return sampler.decode_loop(
            lambda t, c: lm.decode(params, t, c), state, sampling, (2,), 0, stops=tables
        )

    state = run(lm.params)
    ends = [s.index(spell(bpe, [":"])[0]) + 1 for s in scripts]  # the column after each ":"
    np.testing.assert_array_equal(np.asarray(state.stop_end), ends)
    assert int(state.step) == max(ends) < n
    for r, end in enumerate(ends):
        want = scripts[r][:end] + [0] * (n - end)
        np.testing.assert_array_equal(np.asarray(state.tokens[r]), want)


def test_generate_masks_end_at_the_stop_and_text_ends_before_it(bpe):
    scripts = [spell(bpe, s) for s in STOP_SCRIPTS]
    lm = scripted(scripts, len(bpe), eos=2, pad=2)  # pad == EOS, as for many real tokenizers
    ids, mask = np.arange(3, dtype=np.int32)[:, None], np.ones((3, 1), np.int32)
    stop = sampler.stop_strings(bpe, [STOP])
    out = sampler.generate(lm, ids, mask, max_new_tokens=20, temperature=0.0, stop=stop)
    colon = spell(bpe, [":"])[0]
    np.testing.assert_array_equal(out.mask.sum(1), [s.index(colon) + 1 for s in scripts])
    kw = dict(max_new_tokens=20, temperature=0.0, progress=False)
    many = sampler.generate_many(lm, [[0], [1], [2]], stop=stop, **kw)
    texts = [bpe.decode(s.ids) for s in many]
    assert texts == ["Sure.", "A small", "Sure"]  # "\n\n\n": the token it begins inside goes too
    for s, script, r in zip(many, scripts, range(3)):
        assert s.ids == script[: len(s.ids)]
        want = out.logprobs[r, : len(s.ids)].sum()  # the kept tokens' log-probs, nothing after
        assert s.logprob == pytest.approx(float(want), abs=1e-6) and s.logprob < 0
    plain = sampler.generate_many(lm, [[0], [1], [2]], **kw)
    assert all(STOP in bpe.decode(s.ids) for s in plain)  # without the stop strings, they run on


def test_stop_string_cut_without_a_token_table():
    """A word-level vocabulary has no text pieces for the table: rows run on, the text is cut."""
    from tests.tiny_run import word_tokenizer

    tok = word_tokenizer()
    stop = sampler.stop_strings(tok, ["dog eats"])
    assert stop.layout is None
    words = tok.convert_tokens_to_ids("the cat sees the dog eats the fish".split())
    assert tok.decode(sampler.cut_at_stop(stop, words)) == "the cat sees the"
    assert sampler.cut_at_stop(stop, words[:5]) == words[:5]


@pytest.fixture(scope="module")
def bpe_llama(bpe, tmp_path_factory):
    """(HF model, our model) of a tiny random LLaMA over the byte-level BPE vocabulary."""
    torch.manual_seed(3)
    config = transformers.LlamaConfig(**{**LLAMA, "vocab_size": len(bpe)}, eos_token_id=None)
    model = transformers.LlamaForCausalLM(config).eval()
    path = str(tmp_path_factory.mktemp("bpe_llama"))
    model.save_pretrained(path)
    return model, from_pretrained(path), path


def test_stop_strings_match_transformers_and_absent_ones_change_nothing(bpe, bpe_llama):
    """Greedy with a stop string taken from the model's own output stops at the token where
    transformers' `generate(stop_strings=...)` stops; a stop string never produced changes no
    token and no log-prob."""
    model, lm, _ = bpe_llama
    prompts, ids, mask = bpe_prompts(bpe)
    plain = sampler.generate(lm, ids, mask, max_new_tokens=NEW, temperature=0.0)
    absent = sampler.generate(
        lm,
        ids,
        mask,
        max_new_tokens=NEW,
        temperature=0.0,
        stop=sampler.stop_strings(bpe, ["\x07never\x07"]),
    )
    np.testing.assert_array_equal(absent.tokens, plain.tokens)
    np.testing.assert_array_equal(absent.mask, plain.mask)
    np.testing.assert_array_equal(absent.logprobs, plain.logprobs)
    needle = text_across_tokens(bpe, plain.tokens[1].tolist())
    stopped = sampler.generate(
        lm, ids, mask, max_new_tokens=NEW, temperature=0.0, stop=sampler.stop_strings(bpe, [needle])
    )
    for b, prompt in enumerate(prompts):
        with torch.no_grad():
            ref = model.generate(
                input_ids=torch.tensor([prompt]),
                max_new_tokens=NEW,
                do_sample=False,
                stop_strings=[needle],
                tokenizer=bpe,
                pad_token_id=0,
            )[0, len(prompt) :].tolist()
        assert stopped.tokens[b, : stopped.mask[b].sum()].tolist() == ref, b
    assert stopped.mask[1].sum() < NEW


def bpe_prompts(bpe):
    texts = ("Human: what is a cat?", "Assistant: Sure.", "a small dog")
    prompts = [bpe(t)["input_ids"] for t in texts]
    ids = np.array([p + [0] * (16 - len(p)) for p in prompts], np.int32)
    mask = (np.arange(16)[None] < np.array([len(p) for p in prompts])[:, None]).astype(np.int32)
    return prompts, ids, mask


def test_sharded_stop_equals_single_device(bpe, bpe_llama):
    _, lm, path = bpe_llama
    _, ids, mask = bpe_prompts(bpe)
    plain = sampler.generate(lm, ids, mask, max_new_tokens=NEW, temperature=0.0)
    stop = sampler.stop_strings(bpe, [text_across_tokens(bpe, plain.tokens[1].tolist())])
    single = sampler.generate(lm, ids, mask, max_new_tokens=NEW, temperature=0.0, stop=stop)
    assert single.mask[1].sum() < NEW
    sharded = from_pretrained(path, mesh=shd.make_mesh((2, 2, 2)))
    out = sampler.generate(sharded, ids, mask, max_new_tokens=NEW, temperature=0.0, stop=stop)
    np.testing.assert_array_equal(out.tokens, single.tokens)
    np.testing.assert_array_equal(out.mask, single.mask)
    np.testing.assert_allclose(out.logprobs, single.logprobs, rtol=1e-5, atol=1e-5)


def text_across_tokens(tokenizer, row):
    """A stop string that greedy row `row` writes: the printable text of two neighbouring tokens,
    less its first character, so that it begins inside a token."""
    special = set(tokenizer.all_special_ids)
    for a, b in zip(row[1:], row[2:]):
        text = tokenizer.decode([a, b])
        plain = a not in special and b not in special and text.isascii() and text.isprintable()
        if plain and len(text) >= 4:
            return text[1:] if len(tokenizer.decode([a])) > 1 else text
    raise AssertionError(f"no printable pair of tokens in {tokenizer.convert_ids_to_tokens(row)}")
