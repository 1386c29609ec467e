"""HF import/export: round trip through transformers, sharded index files, and bad input."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
import transformers

from plad_jax.models import CheckpointError, from_pretrained
from plad_jax.models.io.safetensors import SafetensorsFile, write_safetensors
from tests.helpers import (
    PROMPT_LENS,
    RESPONSE_LENS,
    max_abs_diff_real,
    padded_batch,
    reference_logits,
)

VOCAB = 64


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    path = str(tmp_path_factory.mktemp("llama"))
    model.save_pretrained(path)
    return path


def copy_dir(src, tmp_path, name="model"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return str(dst)


def test_round_trip_through_transformers(llama_dir, tmp_path):
    lm = from_pretrained(llama_dir)
    lm.save_pretrained(str(tmp_path / "out"))
    original = transformers.AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    a, b = original.state_dict(), reloaded.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    batch = padded_batch(0, VOCAB, PROMPT_LENS, RESPONSE_LENS)
    ref = reference_logits(reloaded, *batch)
    assert max_abs_diff_real(lm.logits(*batch), ref, batch[3]) <= 1e-4
    again = from_pretrained(str(tmp_path / "out"))
    np.testing.assert_array_equal(np.asarray(again.logits(*batch)), np.asarray(lm.logits(*batch)))


def test_sharded_index_both_directions(llama_dir, tmp_path):
    lm = from_pretrained(llama_dir)
    out = str(tmp_path / "sharded")
    lm.save_pretrained(out, max_shard_bytes=8 * 1024)
    files = sorted(os.listdir(out))
    assert (
        "model.safetensors.index.json" in files
        and sum(f.endswith(".safetensors") for f in files) > 2
    )
    batch = padded_batch(0, VOCAB, PROMPT_LENS, RESPONSE_LENS)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert (
        max_abs_diff_real(lm.logits(*batch), reference_logits(reloaded, *batch), batch[3]) <= 1e-4
    )
    np.testing.assert_array_equal(
        np.asarray(from_pretrained(out).logits(*batch)), np.asarray(lm.logits(*batch))
    )


def test_safetensors_reader_matches_reference_library(tmp_path):
    from safetensors.numpy import load_file

    rng = np.random.default_rng(0)
    tensors = {
        "a": rng.normal(size=(3, 5)).astype(np.float32),
        "b": rng.integers(0, 9, (7,)).astype(np.int64),
    }
    write_safetensors(str(tmp_path / "x.safetensors"), tensors)
    loaded = load_file(str(tmp_path / "x.safetensors"))
    f = SafetensorsFile(str(tmp_path / "x.safetensors"))
    for k, v in tensors.items():
        np.testing.assert_array_equal(loaded[k], v)
        np.testing.assert_array_equal(f.read(k), v)
    np.testing.assert_array_equal(f.read("a", (slice(1, 3), slice(0, 2))), tensors["a"][1:3, 0:2])


def one_line(excinfo):
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_folder_without_config(tmp_path):
    with pytest.raises(CheckpointError) as e:
        from_pretrained(str(tmp_path))
    assert "config.json" in one_line(e) and str(tmp_path) in one_line(e)


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError) as e:
        from_pretrained(str(tmp_path / "nope"))
    assert "nope" in one_line(e)


def test_unsupported_model_type(llama_dir, tmp_path):
    path = copy_dir(llama_dir, tmp_path)
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg["model_type"] = "bert"
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(CheckpointError) as e:
        from_pretrained(path)
    assert "bert" in one_line(e) and "llama" in one_line(e)


def rewrite_weights(path, edit):
    f = SafetensorsFile(os.path.join(path, "model.safetensors"))
    tensors = {k: f.read(k) for k in f.keys()}
    edit(tensors)
    write_safetensors(os.path.join(path, "model.safetensors"), tensors)


def test_missing_tensor(llama_dir, tmp_path):
    path = copy_dir(llama_dir, tmp_path)
    rewrite_weights(path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError) as e:
        from_pretrained(path)
    assert "model.layers.1.mlp.up_proj.weight" in one_line(e) and "model.safetensors" in one_line(e)


def test_shape_mismatch(llama_dir, tmp_path):
    path = copy_dir(llama_dir, tmp_path)
    rewrite_weights(path, lambda t: t.update({"model.norm.weight": np.ones(17, np.float32)}))
    with pytest.raises(CheckpointError) as e:
        from_pretrained(path)
    assert "model.norm.weight" in one_line(e) and "(17,)" in one_line(e)


def test_pickle_only_checkpoint_is_refused(llama_dir, tmp_path):
    path = copy_dir(llama_dir, tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    os.remove(os.path.join(path, "model.safetensors"))
    torch.save(model.state_dict(), os.path.join(path, "pytorch_model.bin"))
    with pytest.raises(CheckpointError) as e:
        from_pretrained(path)
    assert "pytorch_model.bin" in one_line(e) and "safe_serialization" in one_line(e)


def test_corrupt_safetensors(llama_dir, tmp_path):
    path = copy_dir(llama_dir, tmp_path)
    weights = os.path.join(path, "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    with pytest.raises(CheckpointError) as e:
        from_pretrained(path)
    assert "model.safetensors" in one_line(e) and "truncated" in one_line(e)


def test_init_model_from_config_fields_round_trips_through_transformers(tmp_path):
    from plad_jax import sharding as shd
    from plad_jax.models import init_model

    fields = {
        "model_type": "llama",
        "vocab_size": VOCAB,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "tie_word_embeddings": True,
        "eos_token_id": 2,
    }
    lm = init_model(fields, seed=3)
    again = init_model(fields, seed=3, mesh=shd.make_mesh((1, 2, 4)))
    batch = padded_batch(0, VOCAB, PROMPT_LENS, RESPONSE_LENS)
    np.testing.assert_allclose(
        np.asarray(again.logits(*batch)), np.asarray(lm.logits(*batch)), atol=1e-6
    )
    lm.save_pretrained(str(tmp_path / "fresh"))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "fresh")).eval()
    assert (
        max_abs_diff_real(lm.logits(*batch), reference_logits(reloaded, *batch), batch[3]) <= 1e-4
    )
