"""T5 family: parity with transformers on tiny random checkpoints, KV-cached decoding, HF round
trip.

Three checkpoint layouts, each saved by transformers (and loaded by it for the reference):
  v1_0        relu, output scaled by d_model**-0.5, projected onto the shared embedding
              (t5-small..11b)
  v1_1        gated-gelu, own lm_head.weight, `tie_word_embeddings: false` (hub t5-v1_1 / flan-t5);
              also num_decoder_layers != num_layers and num_heads * d_kv != d_model
  v1_1_tied   gated-gelu, unscaled, no lm_head.weight (what transformers 5 itself writes for v1.1)
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import T5Config as HFT5Config
from transformers import T5ForConditionalGeneration
from transformers.models.t5.modeling_t5 import T5Attention

from plad_jax import sharding as shd
from plad_jax.models import CheckpointError, from_pretrained
from plad_jax.models.t5 import T5Config, reconcile_hf_config, relative_position_bucket
from tests.helpers import (
    PROMPT_LENS,
    RESPONSE_LENS,
    max_abs_diff_real,
    padded_batch,
    reference_logits,
)

VOCAB = 96
BASE = dict(
    vocab_size=VOCAB,
    d_model=32,
    d_kv=8,
    d_ff=64,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=16,
    dropout_rate=0.0,
    decoder_start_token_id=0,
    pad_token_id=0,
    eos_token_id=1,
)
VARIANTS = {
    "v1_0": dict(feed_forward_proj="relu"),
    "v1_1": dict(
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, d_kv=12, num_decoder_layers=3
    ),
    "v1_1_tied": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
}


def _untie_like_the_hub(path):
    """Give a saved checkpoint its own lm_head.weight and a hub-style config (tie_word_embeddings
    false)."""
    weights = os.path.join(path, "model.safetensors")
    tensors = load_file(weights)
    generator = torch.Generator().manual_seed(1)
    shape = tensors["shared.weight"].shape
    tensors["lm_head.weight"] = (
        torch.randn(shape, generator=generator) * shape[1] ** -0.5
    )  # logits O(1)
    save_file(tensors, weights, metadata={"format": "pt"})
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    for key in ("scale_decoder_outputs", "dense_act_fn", "is_gated_act"):  # not in hub configs
        config.pop(key, None)
    config["tie_word_embeddings"] = False
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)


def _build(name, path):
    torch.manual_seed({"v1_0": 0, "v1_1": 1, "v1_1_tied": 2}[name])
    T5ForConditionalGeneration(HFT5Config(**{**BASE, **VARIANTS[name]})).save_pretrained(path)
    if name == "v1_1":
        _untie_like_the_hub(path)
    hf_model = T5ForConditionalGeneration.from_pretrained(path).eval()
    return str(path), hf_model, from_pretrained(str(path))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """name -> (directory, transformers model, our LanguageModel), built once per module."""
    built = {}

    def get(name):
        if name not in built:
            built[name] = _build(name, tmp_path_factory.mktemp(name))
        return built[name]

    return get


@pytest.fixture(scope="module")
def batch():
    """`padded_batch` widened by 5 columns of padding that hold random tokens, not 0.

    The reference runs each row alone and unpadded, so parity on this batch is also the check that
    padding (its length and its token values) never changes a real position.
    """
    rng = np.random.default_rng(7)
    wide = [np.pad(a, ((0, 0), (0, 5))) for a in padded_batch(0, VOCAB, PROMPT_LENS, RESPONSE_LENS)]
    for ids, mask in ((0, 1), (2, 3)):
        wide[ids] = np.where(
            wide[mask] == 1, wide[ids], rng.integers(0, VOCAB, wide[ids].shape)
        ).astype(np.int32)
    return tuple(wide)


@pytest.fixture(scope="module")
def ours_logits(checkpoint, batch):
    """name -> `LanguageModel.logits` on `batch` (one compile per layout)."""
    computed = {}

    def get(name):
        if name not in computed:
            computed[name] = np.asarray(checkpoint(name)[2].logits(*batch))
        return computed[name]

    return get


def test_config_layouts(checkpoint):
    v10, v11, v11_tied = (checkpoint(n)[2] for n in ("v1_0", "v1_1", "v1_1_tied"))
    assert (v10.config.tie_word_embeddings, v10.config.scale_decoder_outputs) == (True, True)
    assert (v11.config.tie_word_embeddings, v11.config.scale_decoder_outputs) == (False, False)
    assert (v11_tied.config.tie_word_embeddings, v11_tied.config.scale_decoder_outputs) == (
        True,
        False,
    )
    assert v11.config.num_decoder_layers == 3 and v11.config.activation == "gelu_new"
    assert (
        v10.is_encoder_decoder
        and v10.eos_token_ids == (1,)
        and v10.config.decoder_start_token_id == 0
    )


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_match_transformers_whatever_the_padding(checkpoint, batch, ours_logits, name):
    _, hf_model, _ = checkpoint(name)
    ref = reference_logits(hf_model, *batch)
    ours = ours_logits(name)
    assert ours.shape == ref.shape and ours.dtype == np.float32
    assert max_abs_diff_real(ours, ref, batch[3]) <= 1e-4


def _teacher_forced(lm, pi, pm, ri):
    """Logits [B, R, V] from prefill + one decode per response token (teacher forcing), jitted."""

    def run(params, pi, pm, ri):
        first, cache = lm.prefill(params, pi, pm, ri.shape[1])

        def step(cache, tokens):
            logits, cache = lm.decode(params, tokens, cache)
            return cache, logits

        cache, rest = jax.lax.scan(step, cache, ri[:, :-1].T)
        return jnp.concatenate([first[:, None], jnp.swapaxes(rest, 0, 1)], axis=1), cache

    return jax.jit(run)(lm.params, pi, pm, ri)


def test_prefill_decode_match_logits(checkpoint, batch, ours_logits):
    lm = checkpoint("v1_1")[2]
    pi, pm, ri, rm = batch
    logits, cache = _teacher_forced(lm, pi, pm, ri)
    c = lm.config
    assert len(cache["k"]) == c.num_decoder_layers
    assert cache["k"][0].shape == (pi.shape[0], c.num_heads, 1 + ri.shape[1], c.d_kv)
    assert len(cache["cross_k"]) == c.num_decoder_layers
    assert cache["cross_k"][0].shape == (pi.shape[0], c.num_heads, pi.shape[1], c.d_kv)
    assert int(cache["index"]) == ri.shape[1]
    assert max_abs_diff_real(logits, ours_logits("v1_1"), rm) <= 1e-5


def test_bf16_prefill_decode_stay_close(checkpoint, batch, ours_logits):
    """bf16 activations over fp32 params (the other layout, so both decode through the cache)."""
    lm = from_pretrained(checkpoint("v1_0")[0], compute_dtype=jnp.bfloat16)
    logits, cache = _teacher_forced(lm, *batch[:3])
    assert logits.dtype == jnp.float32 and cache["k"][0].dtype == jnp.bfloat16
    ref = ours_logits("v1_0")[batch[3] == 1]
    assert max_abs_diff_real(logits, ours_logits("v1_0"), batch[3]) <= 0.03 * np.abs(ref).max()


@pytest.fixture(scope="module")
def sharded_v1_1(checkpoint, batch):
    """(lm, logits, hidden) of v1_1 loaded onto a (2, 2, 2) mesh (one row per batch shard) and
    scored by `apply` under jit."""
    lm = from_pretrained(checkpoint("v1_1")[0], mesh=shd.make_mesh((2, 2, 2)))
    logits, hidden = jax.jit(lm.apply)(
        lm.params, *shd.shard_batch(lm.mesh, *map(jnp.asarray, batch))
    )
    return lm, np.asarray(logits), np.asarray(hidden)


def test_sharded_load_matches(sharded_v1_1, batch, ours_logits):
    lm, logits, _ = sharded_v1_1
    q = lm.params["decoder"]["block"][0]["self_attn"]["q"]["kernel"]
    assert q.get_value().sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert (
        lm.params["encoder"]["relative_attention_bias"]["embedding"]
        .get_value()
        .sharding.is_fully_replicated
    )
    assert max_abs_diff_real(logits, ours_logits("v1_1"), batch[3]) <= 1e-5


@torch.no_grad()
def test_hidden_states_are_the_decoder_states_at_each_response_token(
    checkpoint, sharded_v1_1, batch
):
    _, hf_model, lm = checkpoint("v1_1")
    _, _, hidden = sharded_v1_1
    pi, pm, ri, rm = batch
    assert hidden.shape == ri.shape + (lm.config.d_model,)
    for b in range(pi.shape[0]):
        p, r = pi[b, : pm[b].sum()], ri[b, : rm[b].sum()]
        encoded = hf_model.encoder(input_ids=torch.tensor(p)[None]).last_hidden_state
        dec = torch.tensor(np.concatenate([[lm.config.decoder_start_token_id], r]))[None]
        ref = hf_model.decoder(input_ids=dec, encoder_hidden_states=encoded).last_hidden_state[
            0, 1:
        ]
        np.testing.assert_allclose(hidden[b, : len(r)], ref.numpy(), atol=1e-5)


@pytest.mark.parametrize("name", ["v1_0", "v1_1"])
@torch.no_grad()
def test_save_pretrained_round_trip(checkpoint, batch, tmp_path, name):
    _, hf_model, lm = checkpoint(name)
    lm.save_pretrained(str(tmp_path))
    names = set(load_file(os.path.join(tmp_path, "model.safetensors")))
    assert ("lm_head.weight" in names) == (name == "v1_1")
    assert not {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"} & names
    reloaded = T5ForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
    expected, got = hf_model.state_dict(), reloaded.state_dict()
    assert sorted(got) == sorted(expected)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    assert reloaded.config.scale_decoder_outputs == hf_model.config.scale_decoder_outputs
    ref = reference_logits(hf_model, *batch)
    np.testing.assert_array_equal(
        reference_logits(reloaded, *batch)[batch[3] == 1], ref[batch[3] == 1]
    )
    ours = from_pretrained(str(tmp_path))
    assert ours.config == lm.config
    for a, b in zip(jax.tree.leaves(ours.params), jax.tree.leaves(lm.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 16), (64, 256)])
def test_relative_position_bucket_matches_transformers(bidirectional, num_buckets, max_distance):
    rel = np.arange(-3000, 3001)
    ref = T5Attention._relative_position_bucket(
        torch.tensor(rel),
        bidirectional=bidirectional,
        num_buckets=num_buckets,
        max_distance=max_distance,
    )
    ours = relative_position_bucket(
        jnp.asarray(rel),
        bidirectional=bidirectional,
        num_buckets=num_buckets,
        max_distance=max_distance,
    )
    np.testing.assert_array_equal(np.asarray(ours), ref.numpy())


def test_unsupported_config_is_one_line(checkpoint, tmp_path):
    hf = dict(BASE, model_type="t5", feed_forward_proj="gated-foo")
    with pytest.raises(
        ValueError, match=r"^config.json: feed_forward_proj 'gated-foo' is not supported"
    ):
        T5Config.from_hf(hf)
    path, _, _ = checkpoint("v1_0")
    os.symlink(os.path.join(path, "model.safetensors"), tmp_path / "model.safetensors")
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config["feed_forward_proj"] = "swiglu-x"
    with open(tmp_path / "config.json", "w") as f:
        json.dump(config, f)
    with pytest.raises(CheckpointError) as err:
        from_pretrained(str(tmp_path))
    assert "feed_forward_proj 'swiglu-x'" in str(err.value) and "\n" not in str(err.value)


def test_config_from_hub_style_fields():
    """Hub t5-small style: no tie_word_embeddings (means tied + scaled), no num_decoder_layers."""
    hf = {k: v for k, v in BASE.items() if k != "decoder_start_token_id"}
    config = T5Config.from_hf(hf)
    assert config.tie_word_embeddings and config.scale_decoder_outputs
    assert (
        config.num_decoder_layers == 2 and config.decoder_start_token_id == 0
    )  # falls back to pad
    assert T5Config.from_hf(dict(BASE, tie_word_embeddings=False)).scale_decoder_outputs is False


@pytest.mark.parametrize(
    "fields,has_lm_head,tied,scaled",
    [
        (
            dict(tie_word_embeddings=True, scale_decoder_outputs=False),
            True,
            False,
            False,
        ),  # flan, re-saved by HF 5
        (
            dict(tie_word_embeddings=True, scale_decoder_outputs=False),
            False,
            True,
            False,
        ),  # v1.1 written by HF 5
        (dict(tie_word_embeddings=False), True, False, False),  # hub v1.1 / flan
        (dict(), True, False, True),  # t5-small style config whose file also holds lm_head.weight
        (dict(), False, True, True),  # t5-small style
    ],
)
def test_output_layer_follows_the_checkpoint(fields, has_lm_head, tied, scaled):
    hf = reconcile_hf_config(
        dict(BASE, **fields), lambda name: has_lm_head and name == "lm_head.weight"
    )
    config = T5Config.from_hf(hf)
    assert (config.tie_word_embeddings, config.scale_decoder_outputs) == (tied, scaled)
    assert hf["is_encoder_decoder"] is True
