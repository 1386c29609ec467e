"""Mesh construction, logical-axis rules, and sharded logits equal to single-device logits."""

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from plad_jax import sharding as shd
from plad_jax.models import from_pretrained
from tests.helpers import padded_batch

MESHES = [(8, 1, 1), (2, 2, 2), (1, 2, 4)]
VOCAB, D, FF, HEADS, KV, HD = 128, 32, 64, 4, 2, 8


def test_eight_fake_devices():
    assert jax.device_count() == 8


@pytest.mark.parametrize("axes,shape", [((-1, 1, 1), (8, 1, 1)), ((2, -1, 2), (2, 2, 2)), ((1, 2, -1), (1, 2, 4))])
def test_mesh_auto_fill(axes, shape):
    mesh = shd.make_mesh(axes)
    assert tuple(mesh.shape.values()) == shape and mesh.axis_names == ("data", "fsdp", "tensor")


@pytest.mark.parametrize("axes", [(3, 1, 1), (2, 2, 4), (-1, -1, 1), (3, -1, 1), (0, 8, 1)])
def test_bad_mesh_is_a_clear_error(axes):
    with pytest.raises(ValueError, match=r"mesh \("):
        shd.make_mesh(axes)


def test_rules_fall_back_to_replication_when_indivisible():
    mesh = shd.make_mesh((1, 2, 4))
    assert shd.logical_to_spec(("embed", "mlp"), (32, 64), mesh) == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert shd.logical_to_spec(("embed", "mlp"), (33, 6), mesh) == jax.sharding.PartitionSpec(None, None)
    assert shd.logical_to_spec(("norm",), (32,), mesh) == jax.sharding.PartitionSpec(None)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=D, intermediate_size=FF, num_hidden_layers=2,
                                      num_attention_heads=HEADS, num_key_value_heads=KV)
    path = str(tmp_path_factory.mktemp("llama"))
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path, np.asarray(from_pretrained(path).logits(*BATCH))


BATCH = padded_batch(0, VOCAB, (9, 4, 6, 2, 8, 3, 5, 7), (7, 5, 3, 2, 6, 1, 4, 7))


def expected_shards(data, fsdp, tensor):
    """Per-device shard shapes the rules table implies, written out by hand."""
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
def test_sharded_logits_equal_single_device(llama, mesh_shape):
    path, single = llama
    mesh = shd.make_mesh(mesh_shape)
    lm = from_pretrained(path, mesh=mesh)
    out = lm.logits(*BATCH)
    np.testing.assert_allclose(np.asarray(out), single, atol=1e-5)
    flat = dict(nnx.to_flat_state(lm.params))
    for path_, shape in expected_shards(*mesh_shape).items():
        arr = flat[path_].get_value()
        assert arr.sharding.mesh.shape == mesh.shape
        assert {s.data.shape for s in arr.addressable_shards} == {shape}, path_
    for path_, var in flat.items():  # every parameter: shard = global / mesh axes of its spec
        arr = var.get_value()
        assert arr.addressable_shards[0].data.shape == arr.sharding.shard_shape(arr.shape), path_
