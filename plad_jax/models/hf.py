"""Hugging Face checkpoints <-> `LanguageModel`, both directions, safetensors only.

`from_pretrained` reads `config.json`, builds the family's model abstractly (no random init), and
reads each tensor from `model.safetensors` or the shards named by `model.safetensors.index.json`.
With a mesh, each device's shard is read straight from the memory-mapped file into its sharding;
no device or host ever holds a whole unsharded copy. Pickle checkpoints are refused.
"""

from __future__ import annotations

import importlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from plad_jax import sharding as shd
from plad_jax.models.language_model import LanguageModel
from plad_jax.models.safetensors_io import SafetensorsError, SafetensorsFile, write_safetensors

# HF model_type -> (module, config class, model class). Families are imported on first use.
FAMILIES = {
    "llama": ("plad_jax.models.llama", "LlamaConfig", "LlamaModel"),
    "mistral": ("plad_jax.models.llama", "LlamaConfig", "LlamaModel"),
    "qwen2": ("plad_jax.models.llama", "LlamaConfig", "LlamaModel"),
    "t5": ("plad_jax.models.t5", "T5Config", "T5Model"),
    "gpt_neo": ("plad_jax.models.gpt_neo", "GPTNeoConfig", "GPTNeoModel"),
}
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack")
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class CheckpointError(ValueError):
    """A model directory or checkpoint that cannot be loaded; the message is one line."""


def family(model_type: str):
    """(module, config class, model class) for an HF `model_type`."""
    if model_type not in FAMILIES:
        raise CheckpointError(f"unsupported model_type '{model_type}' (supported: {', '.join(sorted(FAMILIES))})")
    module_name, config_cls, model_cls = FAMILIES[model_type]
    module = importlib.import_module(module_name)
    return module, getattr(module, config_cls), getattr(module, model_cls)


def resolve_model_dir(path_or_id: str) -> str:
    """A local directory, or a hub id downloaded (config + safetensors only) when online."""
    if os.path.isdir(path_or_id):
        return path_or_id
    if os.path.exists(path_or_id) or path_or_id.startswith((".", "/", "~")) or path_or_id.count("/") != 1:
        raise CheckpointError(f"{path_or_id}: no such model directory")
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(path_or_id, allow_patterns=["config.json", "*.safetensors", INDEX])
    except Exception as e:  # offline, unknown repo, gated: all end the same way for the user
        raise CheckpointError(f"{path_or_id}: not a local directory and could not be fetched from the hub "
                              f"({type(e).__name__}); pass a local directory with config.json and safetensors") from None


def is_available(path_or_id: str) -> bool:
    """True for a local directory, or a hub id whose config.json is cached or can be fetched now
    (only that small file: a cheap check before a run commits to hours of work)."""
    if os.path.isdir(path_or_id):
        return True
    if os.path.exists(path_or_id) or path_or_id.startswith((".", "/", "~")) or path_or_id.count("/") != 1:
        return False
    try:
        from huggingface_hub import hf_hub_download
        hf_hub_download(path_or_id, "config.json")
        return True
    except Exception:  # noqa: BLE001 - offline, unknown, gated: not available, whatever the cause
        return False


def read_hf_config(model_dir: str) -> dict:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{model_dir}: no config.json, so this is not a Hugging Face model directory")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


class WeightFiles:
    """Which safetensors file holds each tensor (single file or sharded index)."""

    def __init__(self, model_dir: str):
        index, single = os.path.join(model_dir, INDEX), os.path.join(model_dir, SINGLE)
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            self.where = {name: os.path.join(model_dir, fn) for name, fn in weight_map.items()}
        elif os.path.isfile(single):
            self.where = None
            self.single = single
        else:
            pickles = [p for p in PICKLE_FILES if os.path.exists(os.path.join(model_dir, p))]
            if pickles:
                raise CheckpointError(
                    f"{os.path.join(model_dir, pickles[0])}: pickle checkpoints are refused (they can run code); "
                    "convert once with transformers: AutoModel.from_pretrained(dir).save_pretrained(dir, "
                    "safe_serialization=True)")
            raise CheckpointError(f"{model_dir}: no {SINGLE} or {INDEX}")
        self._open: dict[str, SafetensorsFile] = {}

    def file_of(self, name: str) -> str:
        return self.single if self.where is None else self.where.get(name, os.path.join("<index>", INDEX))

    def has(self, name: str) -> bool:
        return self.handle(name) is not None

    def handle(self, name: str) -> SafetensorsFile | None:
        path = self.file_of(name)
        if not os.path.isfile(path):
            return None
        if path not in self._open:
            try:
                self._open[path] = SafetensorsFile(path)
            except SafetensorsError as e:
                raise CheckpointError(str(e)) from None
        f = self._open[path]
        return f if name in f else None


def _read_param(files: WeightFiles, spec, shape, dtype, sharding):
    """One parameter, read tensor by tensor (and shard by shard when `sharding` is given)."""
    handle = files.handle(spec.hf_name)
    if handle is None:
        raise CheckpointError(f"{files.file_of(spec.hf_name)}: tensor '{spec.hf_name}' is missing")
    expected = tuple(reversed(shape)) if spec.transpose else tuple(shape)
    if handle.shape(spec.hf_name) != expected:
        raise CheckpointError(f"{handle.path}: tensor '{spec.hf_name}' has shape {handle.shape(spec.hf_name)}, "
                              f"config.json implies {expected}")

    def read(index):
        index = tuple(index) + (slice(None),) * (len(shape) - len(tuple(index)))
        if spec.transpose:
            return handle.read(spec.hf_name, index[::-1]).T.astype(dtype)
        return handle.read(spec.hf_name, index).astype(dtype)

    if sharding is None:
        return jnp.asarray(read(()))
    return jax.make_array_from_callback(tuple(shape), sharding, read)


def from_pretrained(path_or_id: str, *, dtype=jnp.float32, mesh=None, compute_dtype=None,
                    remat: str = "none") -> LanguageModel:
    """Load a Hugging Face model directory (or hub id, when online) as a `LanguageModel`.

    dtype: storage dtype of the params; compute_dtype: activation/matmul dtype (default: dtype).
    remat: what each block keeps for the backward pass (`LanguageModel`, `layers.REMAT_POLICIES`).
    mesh: place every parameter on it, sharded by `plad_jax.sharding` rules, shard by shard.
    """
    model_dir = resolve_model_dir(path_or_id)
    hf_config = read_hf_config(model_dir)
    model_type = hf_config.get("model_type")
    module, config_cls, model_cls = family(model_type)
    files = WeightFiles(model_dir)
    if hasattr(module, "reconcile_hf_config"):  # config.json alone is ambiguous for this family (T5 lm_head)
        hf_config = module.reconcile_hf_config(hf_config, files.has)
    try:
        config = config_cls.from_hf(hf_config)
    except KeyError as e:
        raise CheckpointError(f"{model_dir}/config.json: missing field {e} for model_type '{model_type}'") from None
    except ValueError as e:
        raise CheckpointError(f"{model_dir}/{e}") from None
    abstract = nnx.eval_shape(lambda: model_cls(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    shardings = shd.param_shardings(state, mesh) if mesh is not None else None
    variables = dict(nnx.to_flat_state(state))
    target_shardings = dict(nnx.to_flat_state(shardings)) if shardings is not None else {}
    for spec in module.weight_specs(config):
        var = variables.pop(spec.path)
        sharding = target_shardings.get(spec.path)
        sharding = sharding.get_value() if isinstance(sharding, nnx.Variable) else sharding
        var.set_value(_read_param(files, spec, var.shape, dtype, sharding))
    if variables:  # a family whose weight table misses a parameter is a bug, not a user error
        raise AssertionError(f"{model_type}: parameters without an HF tensor: {sorted(variables)}")
    return LanguageModel(model_type, config, graphdef, state, hf_config,
                         compute_dtype=compute_dtype or dtype, mesh=mesh, remat=remat)


def init_model(hf_config: dict, *, seed: int = 0, dtype=jnp.float32, mesh=None, compute_dtype=None,
               remat: str = "none") -> LanguageModel:
    """A freshly initialised model of the architecture described by HF config.json fields.

    Parameters are created inside one jit whose outputs are laid out by the sharding rules, so a
    large model is born sharded. `save_pretrained` then writes a directory transformers loads.
    """
    model_type = hf_config.get("model_type")
    _, config_cls, model_cls = family(model_type)
    try:
        config = config_cls.from_hf(hf_config)
    except KeyError as e:
        raise CheckpointError(f"model init: missing field {e} for model_type '{model_type}'") from None
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: model_cls(config, rngs=nnx.Rngs(seed))))
    shardings = shd.param_shardings(abstract, mesh) if mesh is not None else None

    def create():
        state = nnx.state(model_cls(config, rngs=nnx.Rngs(seed)))
        return jax.tree.map(lambda x: x.astype(dtype), state)

    params = jax.jit(create, out_shardings=shardings)()
    return LanguageModel(model_type, config, graphdef, params, dict(hf_config),
                         compute_dtype=compute_dtype or dtype, mesh=mesh, remat=remat)


def _to_host(x) -> np.ndarray:
    if not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)


def save_pretrained(lm: LanguageModel, path: str, *, max_shard_bytes: int = 5 * 1024**3):
    """Write config.json and safetensors (sharded with an index past `max_shard_bytes`)."""
    module, _, _ = family(lm.model_type)
    flat = dict(nnx.to_flat_state(lm.params))
    tensors = {}
    for spec in module.weight_specs(lm.config):
        arr = _to_host(flat[spec.path].get_value())
        tensors[spec.hf_name] = np.ascontiguousarray(arr.T if spec.transpose else arr)
    if jax.process_index() != 0:
        return
    os.makedirs(path, exist_ok=True)
    dtypes = {a.dtype for a in tensors.values()}
    hf_config = dict(lm.hf_config)
    hf_config["dtype"] = "bfloat16" if any(d.name == "bfloat16" for d in dtypes) else next(iter(dtypes)).name
    hf_config.pop("torch_dtype", None)
    shards, current, size = [], {}, 0
    for name in sorted(tensors):
        nbytes = tensors[name].nbytes
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensors[name]
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        write_safetensors(os.path.join(path, SINGLE), shards[0])
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fn = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(os.path.join(path, fn), shard)
            weight_map.update({name: fn for name in shard})
        total = sum(a.nbytes for a in tensors.values())
        with open(os.path.join(path, INDEX), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf_config, f, indent=2, sort_keys=True)
