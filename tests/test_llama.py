"""LLaMA-class parity with transformers (fp32): Llama MHA/GQA/MQA, tied/untied, RoPE scalings,
Mistral sliding window, Qwen2 biases; prefill+decode against the full pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from plad_jax.models import from_pretrained
from tests.helpers import (
    PROMPT_LENS,
    RESPONSE_LENS,
    max_abs_diff_real,
    padded_batch,
    randomize_weights,
    reference_logits,
)

VOCAB = 96
BASE = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
    bos_token_id=1,
    eos_token_id=2,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8,
    "rope_theta": 500000.0,
}
CASES = {
    "llama_mha": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=4)),
    "llama_gqa_tied": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(num_key_value_heads=2, tie_word_embeddings=True),
    ),
    "llama_mqa_bias": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(num_key_value_heads=1, attention_bias=True, mlp_bias=True),
    ),
    "llama3_rope": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(num_key_value_heads=2, rope_parameters=LLAMA3_ROPE),
    ),
    "llama_linear_rope": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            num_key_value_heads=2,
            rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
        ),
    ),
    "mistral_window": (
        "MistralConfig",
        "MistralForCausalLM",
        dict(num_key_value_heads=2, sliding_window=5, head_dim=12),
    ),
    "qwen2": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        dict(num_key_value_heads=2, tie_word_embeddings=True),
    ),
}


def build(name, tmp_path_factory):
    config_cls, model_cls, extra = CASES[name]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**BASE, **extra)
    model = randomize_weights(
        getattr(transformers, model_cls)(config).eval(), seed=sorted(CASES).index(name)
    )
    path = str(tmp_path_factory.mktemp(name))
    model.save_pretrained(path)
    return model, path


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    model, path = build(request.param, tmp_path_factory)
    return request.param, model, from_pretrained(path)


def test_logits_match_transformers(case):
    name, model, lm = case
    batch = padded_batch(0, VOCAB, PROMPT_LENS, RESPONSE_LENS)
    ours = lm.logits(*batch)
    assert ours.dtype == jnp.float32 and ours.shape == batch[2].shape + (VOCAB,)
    assert max_abs_diff_real(ours, reference_logits(model, *batch), batch[3]) <= 1e-4, name


def test_padding_never_changes_real_positions(case):
    _, _, lm = case
    pi, pm, ri, rm = padded_batch(1, VOCAB, PROMPT_LENS, RESPONSE_LENS)
    base = np.asarray(lm.logits(pi, pm, ri, rm))
    # More padding, filled with arbitrary token ids, on both sides.
    pad = lambda a, v: np.concatenate([a, np.full((a.shape[0], 3), v, a.dtype)], axis=1)
    junk_p = np.where(pm == 0, 77, pi)
    padded = np.asarray(lm.logits(pad(junk_p, 55), pad(pm, 0), pad(ri, 66), pad(rm, 0)))
    real = rm.astype(bool)
    np.testing.assert_allclose(padded[:, : ri.shape[1]][real], base[real], atol=1e-5)


def test_prefill_decode_equals_full_pass(case):
    _, _, lm = case
    pi, pm, ri, _ = padded_batch(2, VOCAB, PROMPT_LENS, (6,) * len(PROMPT_LENS))
    rm = np.ones_like(ri)
    full = np.asarray(lm.logits(pi, pm, ri, rm))
    prefill, decode = jax.jit(lm.prefill, static_argnums=3), jax.jit(lm.decode)
    logits, cache = prefill(lm.params, jnp.asarray(pi), jnp.asarray(pm), ri.shape[1])
    c, slots = lm.config, pi.shape[1] + ri.shape[1]
    gqa = c.num_heads > c.num_kv_heads  # keys slots-minor when query heads share key heads
    key_shape = (c.num_kv_heads, c.head_dim, slots) if gqa else (c.num_kv_heads, slots, c.head_dim)
    assert cache["k"][0].shape == (pi.shape[0],) + key_shape
    assert cache["v"][0].shape == (pi.shape[0], c.num_kv_heads, slots, c.head_dim)
    steps = [logits]
    for t in range(ri.shape[1] - 1):
        logits, cache = decode(lm.params, jnp.asarray(ri[:, t]), cache)
        steps.append(logits)
    np.testing.assert_allclose(np.stack(steps, 1), full, atol=1e-5)


def test_bf16_compute_with_fp32_params(tmp_path_factory):
    model, path = build("llama_gqa_tied", tmp_path_factory)
    lm = from_pretrained(path, compute_dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(lm.params))
    batch = padded_batch(0, VOCAB, PROMPT_LENS, RESPONSE_LENS)
    ours = lm.logits(*batch)
    assert ours.dtype == jnp.float32
    # bf16 activations: within 5% of the largest logit of the fp32 reference, not equal to it.
    ref = reference_logits(model, *batch)
    err = max_abs_diff_real(ours, ref, batch[3])
    assert 1e-4 < err < 0.05 * np.nanmax(np.abs(ref))
