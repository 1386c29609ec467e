"""Mesh construction, logical-axis rules, and sharded logits equal to single-device logits for
every family on the meshes (8,1,1), (2,2,2), (1,2,4), with one and with two rows per batch shard."""

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from plad_jax import sharding as shd
from plad_jax.models import from_pretrained
from tests.helpers import padded_batch, randomize_weights

MESHES = [(8, 1, 1), (2, 2, 2), (1, 2, 4)]
VOCAB, D, FF, HEADS, KV, HD = 128, 32, 64, 4, 2, 8
FAMILIES = {
    "llama": (
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        dict(
            hidden_size=D,
            intermediate_size=FF,
            num_hidden_layers=2,
            num_attention_heads=HEADS,
            num_key_value_heads=KV,
        ),
    ),
    "t5": (
        transformers.T5Config,
        transformers.T5ForConditionalGeneration,
        dict(
            d_model=D,
            d_kv=HD,
            d_ff=FF,
            num_layers=2,
            num_heads=HEADS,
            feed_forward_proj="gated-gelu",
            relative_attention_num_buckets=8,
            decoder_start_token_id=0,
        ),
    ),
    "gpt_neo": (
        transformers.GPTNeoConfig,
        transformers.GPTNeoForCausalLM,
        dict(
            hidden_size=D,
            num_layers=2,
            num_heads=HEADS,
            attention_types=[[["global", "local"], 1]],
            window_size=4,
            max_position_embeddings=64,
        ),
    ),
}
BATCHES = {  # 8 rows: two rows per batch shard on (2, 2, 2); 4 rows: one row per shard
    8: padded_batch(0, VOCAB, (9, 4, 6, 2, 8, 3, 5, 7), (7, 5, 3, 2, 6, 1, 4, 7)),
    4: padded_batch(1, VOCAB, (9, 4, 6, 2), (7, 5, 3, 2)),
}


def test_eight_fake_devices():
    assert jax.device_count() == 8


@pytest.mark.parametrize(
    "axes,shape", [((-1, 1, 1), (8, 1, 1)), ((2, -1, 2), (2, 2, 2)), ((1, 2, -1), (1, 2, 4))]
)
def test_mesh_auto_fill(axes, shape):
    mesh = shd.make_mesh(axes)
    assert tuple(mesh.shape.values()) == shape and mesh.axis_names == ("data", "fsdp", "tensor")


@pytest.mark.parametrize("axes", [(3, 1, 1), (2, 2, 4), (-1, -1, 1), (3, -1, 1), (0, 8, 1)])
def test_bad_mesh_is_a_clear_error(axes):
    with pytest.raises(ValueError, match=r"mesh \(") as e:
        shd.make_mesh(axes)
    assert "\n" not in str(e.value)


def test_rules_fall_back_to_replication_when_indivisible():
    mesh = shd.make_mesh((1, 2, 4))
    P = jax.sharding.PartitionSpec
    assert shd.logical_to_spec(("embed", "mlp"), (32, 64), mesh) == P("fsdp", "tensor")
    assert shd.logical_to_spec(("vocab", "embed"), (128, 32), mesh) == P("fsdp", "tensor")
    assert shd.logical_to_spec(("embed", "mlp"), (33, 6), mesh) == P(None, None)
    assert shd.logical_to_spec(("norm",), (32,), mesh) == P(None)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> (directory, single-device logits per batch size)."""
    out = {}
    for seed, (name, (config_cls, model_cls, kwargs)) in enumerate(FAMILIES.items()):
        torch.manual_seed(seed)
        model = randomize_weights(model_cls(config_cls(vocab_size=VOCAB, **kwargs)).eval(), seed)
        path = str(tmp_path_factory.mktemp(name))
        model.save_pretrained(path)
        lm = from_pretrained(path)
        out[name] = (path, {n: np.asarray(lm.logits(*b)) for n, b in BATCHES.items()})
    return out


def expected_llama_shards(data, fsdp, tensor):
    """Per-device shard shapes the rules table implies for the LLaMA params, written out by hand."""
    return {
        ("embed_tokens", "embedding"): (VOCAB // fsdp, D // tensor),  # rows over fsdp
        ("lm_head", "kernel"): (D // fsdp, VOCAB // tensor),
        ("layers", 0, "self_attn", "q_proj", "kernel"): (D // fsdp, HEADS * HD // tensor),
        ("layers", 0, "self_attn", "k_proj", "kernel"): (D // fsdp, KV * HD // tensor),
        ("layers", 1, "self_attn", "o_proj", "kernel"): (HEADS * HD // tensor, D // fsdp),
        ("layers", 1, "mlp", "gate_proj", "kernel"): (D // fsdp, FF // tensor),
        ("layers", 1, "mlp", "down_proj", "kernel"): (FF // tensor, D // fsdp),
        ("layers", 0, "input_layernorm", "scale"): (D,),
        ("norm", "scale"): (D,),
    }


@pytest.mark.parametrize("mesh_shape", MESHES)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_sharded_logits_equal_single_device(checkpoints, family, mesh_shape):
    path, single = checkpoints[family]
    mesh = shd.make_mesh(mesh_shape)
    lm = from_pretrained(path, mesh=mesh)
    for n, batch in BATCHES.items():
        np.testing.assert_allclose(
            np.asarray(lm.logits(*batch)), single[n], atol=1e-5, err_msg=f"batch {n}"
        )
    flat = dict(nnx.to_flat_state(lm.params))
    if family == "llama":
        for path_, shape in expected_llama_shards(*mesh_shape).items():
            arr = flat[path_].get_value()
            assert {s.data.shape for s in arr.addressable_shards} == {shape}, path_
    for path_, var in flat.items():  # every parameter sits on the mesh, each device with its shard
        arr = var.get_value()
        assert arr.sharding.mesh.shape == mesh.shape, path_
        assert len(arr.addressable_shards) == 8
        assert arr.addressable_shards[0].data.shape == arr.sharding.shard_shape(arr.shape), path_
