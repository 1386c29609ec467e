"""GPT-Neo: parity with transformers on tiny random models, KV-cached decoding, HF round trip.

Weights are redrawn larger than HF's init (std 0.02) so attention is sharp: otherwise unscaled vs
scaled scores, or a window off by one, would hide inside near-uniform attention. The local window
(4 positions) is shorter than every long row, so local layers cut inside the test sequences.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from plad_jax.models import CheckpointError, from_pretrained
from plad_jax.models.gpt_neo import GPTNeoConfig
from tests.helpers import (
    PROMPT_LENS,
    RESPONSE_LENS,
    max_abs_diff_real,
    padded_batch,
    reference_logits,
)

VOCAB = 96
WINDOW = 4
VARIANTS = {
    # the GPT-Neo default: alternating global/local layers, gelu_new, output layer tied to wte
    "tied": dict(num_layers=4, attention_types=[[["global", "local"], 2]]),
    # untied lm_head, exact gelu, explicit MLP width, a local layer first
    "untied": dict(
        num_layers=2,
        attention_types=[[["local"], 1], [["global"], 1]],
        tie_word_embeddings=False,
        activation_function="gelu",
        intermediate_size=48,
    ),
}


def hf_config(**overrides):
    base = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_heads=4,
        window_size=WINDOW,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return transformers.GPTNeoConfig(**{**base, **overrides})


def random_hf_model(config, seed):
    """A GPTNeoForCausalLM with every weight redrawn: N(0, 0.2) matrices, norms around 1."""
    torch.manual_seed(seed)
    model = transformers.GPTNeoForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln_" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.2 if p.ndim == 2 else 0.1)
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """variant -> (HF model, its directory, our LanguageModel loaded from it)."""
    out = {}
    for seed, name in enumerate(sorted(VARIANTS)):
        model = random_hf_model(hf_config(**VARIANTS[name]), seed=seed)
        path = str(tmp_path_factory.mktemp(f"gpt_neo_{name}"))
        model.save_pretrained(path)
        out[name] = (model, path, from_pretrained(path))
    return out


@pytest.fixture(scope="module")
def batch():
    return padded_batch(0, VOCAB, PROMPT_LENS, RESPONSE_LENS)


@pytest.fixture(scope="module")
def scores(models, batch):
    """variant -> our `LanguageModel.logits` on `batch`, as numpy (computed once per variant)."""
    return {name: np.asarray(lm.logits(*batch)) for name, (_, _, lm) in models.items()}


def test_config_from_hf_expands_attention_types():
    config = GPTNeoConfig.from_hf(
        hf_config(num_layers=4, attention_types=[[["global", "local"], 2]]).to_dict()
    )
    assert config.attention_layers == (None, WINDOW, None, WINDOW)
    assert config.intermediate_size == 4 * 32 and config.head_dim == 8
    assert config.tie_word_embeddings and config.eos_token_id == (2,)
    assert config.activation_function == "gelu_new"


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(num_layers=3), "expands to 4 layers"),
        (dict(attention_types=[[["global", "sparse"], 2]]), "only 'global' and 'local'"),
        (dict(activation_function="gelu_10"), "activation_function 'gelu_10'"),
    ],
)
def test_config_from_hf_rejects_bad_fields(bad, message):
    hf = {**hf_config(num_layers=4, attention_types=[[["global", "local"], 2]]).to_dict(), **bad}
    with pytest.raises(ValueError, match=message):
        GPTNeoConfig.from_hf(hf)


def test_bad_config_is_a_checkpoint_error_naming_the_field(models, tmp_path):
    model, path, _ = models["tied"]
    shutil.copy(os.path.join(path, "model.safetensors"), tmp_path)
    hf = {**model.config.to_dict(), "num_layers": model.config.num_layers + 1}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(CheckpointError, match="config.json: attention_types expands to"):
        from_pretrained(str(tmp_path))
    del hf["num_layers"]
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(CheckpointError, match="missing field"):
        from_pretrained(str(tmp_path))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_transformers(variant, models, scores, batch):
    model, _, _ = models[variant]
    ours, ref = scores[variant], reference_logits(model, *batch)
    assert ours.shape == ref.shape and ours.dtype == np.float32
    assert max_abs_diff_real(ours, ref, batch[3]) <= 1e-4


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_local_window_cuts_inside_the_test_rows(variant, models, scores, batch):
    """Both attention kinds are present, and the window changes the logits these rows get."""
    model, _, lm = models[variant]
    assert set(lm.config.attention_layers) == {None, WINDOW}
    assert max(p + r for p, r in zip(PROMPT_LENS, RESPONSE_LENS)) > WINDOW
    layers = model.config.num_layers
    all_global = transformers.GPTNeoForCausalLM(
        hf_config(**{**VARIANTS[variant], "attention_types": [[["global"], layers]]})
    ).eval()
    all_global.load_state_dict(model.state_dict())
    assert max_abs_diff_real(scores[variant], reference_logits(all_global, *batch), batch[3]) > 1e-2


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_prefill_then_teacher_forced_decode_equals_logits(variant, models, scores, batch):
    """Cached decoding (window shorter than the sequence, padding mid-sequence) equals scoring."""
    _, _, lm = models[variant]
    pi, pm, ri, _ = (jnp.asarray(a) for a in batch)
    logits, cache = jax.jit(lm.prefill, static_argnums=3)(lm.params, pi, pm, ri.shape[1])
    assert len(cache["k"]) == lm.config.num_layers
    assert cache["k"][0].shape == (pi.shape[0], 4, pi.shape[1] + ri.shape[1], 8)
    decode = jax.jit(lm.decode, donate_argnums=2)
    steps = [logits]
    for t in range(ri.shape[1] - 1):
        logits, cache = decode(lm.params, ri[:, t], cache)
        steps.append(logits)
    cached = np.stack([np.asarray(s) for s in steps], axis=1)
    assert max_abs_diff_real(cached, scores[variant], batch[3]) <= 1e-5
    assert int(cache["index"]) == pi.shape[1] + ri.shape[1] - 1


# The next three check variant-independent plumbing, on the default (tied) variant only.


def test_padding_never_changes_real_positions(models, scores, batch):
    """More padding, filled with arbitrary ids, after both prompt and response: same real logits."""
    _, _, lm = models["tied"]
    pi, pm, ri, rm = batch
    pad = lambda a, v: np.concatenate([a, np.full((a.shape[0], 3), v, a.dtype)], axis=1)
    junk_prompt = np.where(pm == 0, 77, pi)
    padded = np.asarray(lm.logits(pad(junk_prompt, 55), pad(pm, 0), pad(ri, 66), pad(rm, 0)))
    real = rm.astype(bool)
    np.testing.assert_allclose(
        padded[:, : ri.shape[1]][real], scores["tied"][real], rtol=0, atol=1e-5
    )


def test_response_hidden_states_are_final_layer_states(models, batch):
    model, _, lm = models["tied"]
    _, hidden = jax.jit(lm.apply)(lm.params, *batch)
    pi, pm, ri, rm = batch
    with torch.no_grad():
        for b in range(pi.shape[0]):
            p, r = pi[b, : pm[b].sum()], ri[b, : rm[b].sum()]
            ids = torch.tensor(np.concatenate([p, r]))[None]
            ref = model.transformer(input_ids=ids).last_hidden_state[0, len(p) :].numpy()
            np.testing.assert_allclose(np.asarray(hidden)[b, : len(r)], ref, rtol=0, atol=1e-4)


def test_bf16_compute_with_fp32_params(models, batch):
    """bf16 activations over fp32 params: close to the fp32 reference, not equal to it."""
    model, path, _ = models["tied"]
    lm = from_pretrained(path, compute_dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(lm.params))
    ours = lm.logits(*batch)
    assert ours.dtype == jnp.float32
    ref = reference_logits(model, *batch)
    assert max_abs_diff_real(ours, ref, batch[3]) < 0.05 * np.abs(ref[batch[3].astype(bool)]).max()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_save_pretrained_round_trips_through_transformers(variant, models, batch, tmp_path):
    model, _, lm = models[variant]
    lm.save_pretrained(str(tmp_path))
    reloaded = transformers.GPTNeoForCausalLM.from_pretrained(str(tmp_path)).eval()
    expected, got = model.state_dict(), reloaded.state_dict()
    assert sorted(expected) == sorted(got)
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    assert reloaded.config.attention_layers == model.config.attention_layers
    assert reloaded.config.tie_word_embeddings == model.config.tie_word_embeddings
    np.testing.assert_array_equal(
        reference_logits(reloaded, *batch), reference_logits(model, *batch)
    )
    # and back: the directory we wrote loads into the same params
    again = jax.tree.leaves(from_pretrained(str(tmp_path)).params)
    assert all(np.array_equal(a, b) for a, b in zip(again, jax.tree.leaves(lm.params), strict=True))
