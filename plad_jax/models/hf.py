"""Hugging Face checkpoints <-> `LanguageModel`, both directions, safetensors only.

`from_pretrained` reads `config.json`, builds the family's model abstractly (no random init), and
reads each tensor from `model.safetensors` or the shards named by `model.safetensors.index.json`.
With a mesh, each device's shard is read straight from the memory-mapped file into its sharding;
no device or host ever holds a whole unsharded copy. Pickle checkpoints are refused.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from plad_jax import sharding as shd
from plad_jax.errors import CheckpointError  # noqa: F401 (re-exported)
from plad_jax.models import language_model
from plad_jax.models.io import gguf as gguf_io
from plad_jax.models.io.safetensors import SafetensorsError, SafetensorsFile, write_safetensors
from plad_jax.models.language_model import LanguageModel

# HF model_type -> (module, config class, model class). Families are imported on first use.
FAMILIES = {
    "llama": ("plad_jax.models.llama", "LlamaConfig", "LlamaModel"),
    "mistral": ("plad_jax.models.llama", "LlamaConfig", "LlamaModel"),
    "qwen2": ("plad_jax.models.llama", "LlamaConfig", "LlamaModel"),
    "t5": ("plad_jax.models.t5", "T5Config", "T5Model"),
    "gpt_neo": ("plad_jax.models.gpt_neo", "GPTNeoConfig", "GPTNeoModel"),
}
PICKLE_FILES = (
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "tf_model.h5",
    "flax_model.msgpack",
)
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


NO_TOKENIZER = (
    "the GGUF file has no tokenizer metadata; pass a tokenizer (a model's tokenizer "
    "directory) as well"
)


def family(model_type: str):
    """(module, config class, model class) for an HF `model_type`."""
    if model_type not in FAMILIES:
        raise CheckpointError(
            f"unsupported model_type '{model_type}' (supported: {', '.join(sorted(FAMILIES))})"
        )
    module_name, config_cls, model_cls = FAMILIES[model_type]
    module = importlib.import_module(module_name)
    return module, getattr(module, config_cls), getattr(module, model_cls)


def resolve_model_dir(path_or_id: str) -> str:
    """A local directory, or a hub id downloaded (config + safetensors only) when online."""
    if os.path.isdir(path_or_id):
        return path_or_id
    if (
        os.path.exists(path_or_id)
        or path_or_id.startswith((".", "/", "~"))
        or path_or_id.count("/") != 1
    ):
        raise CheckpointError(f"{path_or_id}: no such model directory")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(path_or_id, allow_patterns=["config.json", "*.safetensors", INDEX])
    except Exception as e:  # offline, unknown repo, gated: all end the same way for the user
        raise CheckpointError(
            f"{path_or_id}: not a local directory and could not be fetched from the hub "
            f"({type(e).__name__}); pass a local directory with config.json and safetensors"
        ) from None


def is_available(path_or_id: str) -> bool:
    """True for a local directory or GGUF file, or a hub id whose config.json is cached or can be
    fetched now (only that small file: a cheap check before a run commits to hours of work)."""
    if os.path.isdir(path_or_id) or gguf_io.is_gguf(path_or_id):
        return True
    if (
        os.path.exists(path_or_id)
        or path_or_id.startswith((".", "/", "~"))
        or path_or_id.count("/") != 1
    ):
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
        raise CheckpointError(
            f"{model_dir}: no config.json, so this is not a Hugging Face model directory"
        )
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
                    f"{os.path.join(model_dir, pickles[0])}: pickle checkpoints are refused (they "
                    "can run code); convert once with transformers: "
                    "AutoModel.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)"
                )
            raise CheckpointError(f"{model_dir}: no {SINGLE} or {INDEX}")
        self._open: dict[str, SafetensorsFile] = {}

    def file_of(self, name: str) -> str:
        return (
            self.single
            if self.where is None
            else self.where.get(name, os.path.join("<index>", INDEX))
        )

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
        raise CheckpointError(
            f"{handle.path}: tensor '{spec.hf_name}' has shape {handle.shape(spec.hf_name)}, "
            f"the model config implies {expected}"
        )

    def read(index):
        index = tuple(index) + (slice(None),) * (len(shape) - len(tuple(index)))
        if spec.transpose:
            return handle.read(spec.hf_name, index[::-1]).T.astype(dtype)
        return handle.read(spec.hf_name, index).astype(dtype)

    if sharding is None:
        return jnp.asarray(read(()))
    return jax.make_array_from_callback(tuple(shape), sharding, read)


class GGUFWeights:
    """`WeightFiles` for one `.gguf` file: the same questions, answered by `gguf_io.GGUFFile`."""

    def __init__(self, path: str):
        try:
            self.file = gguf_io.open_file(path)
        except gguf_io.GGUFError as e:
            raise CheckpointError(str(e)) from None

    def file_of(self, name: str) -> str:
        return self.file.path

    def has(self, name: str) -> bool:
        return self.handle(name) is not None

    def handle(self, name: str):
        return self.file if name in self.file else None


def open_checkpoint(path_or_id: str):
    """(HF config fields, weight files) of a model directory, hub id or GGUF file."""
    try:
        gguf_path = gguf_io.find_gguf(path_or_id) if os.path.exists(path_or_id) else None
    except gguf_io.GGUFError as e:
        raise CheckpointError(str(e)) from None
    if gguf_path is not None:
        files = GGUFWeights(gguf_path)
        try:
            return files.file.hf_config(), files
        except (gguf_io.GGUFError, TypeError, ValueError, KeyError) as e:
            raise CheckpointError(
                f"{gguf_path}: incomplete GGUF metadata ({type(e).__name__}: {e})"
            ) from None
    model_dir = resolve_model_dir(path_or_id)
    return read_hf_config(model_dir), WeightFiles(model_dir)


def load_tokenizer(source: str):
    """The transformers tokenizer of a model directory, tokenizer directory, hub id, or GGUF file
    (built from the file's tokenizer metadata, as transformers' GGUF loader does)."""
    from transformers import AutoTokenizer

    try:
        gguf_path = gguf_io.find_gguf(source) if os.path.exists(source) else None
    except gguf_io.GGUFError as e:
        raise CheckpointError(str(e)) from None
    if gguf_path is None:
        return AutoTokenizer.from_pretrained(source)
    if not GGUFWeights(gguf_path).file.has_tokenizer:
        raise CheckpointError(f"{gguf_path}: {NO_TOKENIZER}")
    # a copy: the caller may set attributes on its tokenizer; the cached one stays as read
    return copy.deepcopy(_gguf_tokenizer(*gguf_io.file_key(gguf_path)))


@functools.lru_cache(maxsize=4)
def _gguf_tokenizer(path: str, size: int, mtime_ns: int):
    """A GGUF file's tokenizer, built once per process while the file is unchanged (transformers
    rebuilds the vocabulary and merges from the metadata: tens of seconds for SmolLM2's)."""
    from transformers import AutoTokenizer

    del size, mtime_ns  # the cache key only
    folder, name = os.path.split(path)
    return AutoTokenizer.from_pretrained(folder or ".", gguf_file=name)


def read_config(path_or_id: str) -> dict:
    """The HF config fields of a checkpoint (config.json, or a GGUF file's metadata); cheap."""
    return open_checkpoint(path_or_id)[0]


def check_checkpoint(path_or_id: str, *, layers=None, need_tokenizer: bool = False) -> None:
    """CheckpointError, before any work, if the checkpoint cannot be loaded as asked: a GGUF file
    unreadable, of an architecture or quant type we lack, or without the tokenizer metadata that
    `need_tokenizer` asks for; `layers` out of range. Reads headers only."""
    hf_config, files = open_checkpoint(path_or_id)
    module, config_cls, _ = family(hf_config.get("model_type"))
    if isinstance(files, GGUFWeights):
        _check_gguf_tensors(files, config_cls, module, hf_config)
        if need_tokenizer and not files.file.has_tokenizer:
            raise CheckpointError(f"{files.file.path}: {NO_TOKENIZER}")
    if layers is not None:
        cut_layers(module, hf_config, layers)


def cut_layers(module, hf_config: dict, layers, where: str = "layers"):
    """(hf_config of the cut model, rename: cut model's HF tensor name -> the checkpoint's).

    layers: a list of block indices (decoder-only), or {stack: list} for a family with several
    stacks (T5: encoder, decoder); the kept blocks come in the order given, everything outside the
    blocks (embeddings, final norms, head) is kept as is."""
    stacks = dict(layers) if isinstance(layers, dict) else {"layers": list(layers)}
    stacks = {getattr(module, "LAYER_ALIASES", {}).get(k, k): v for k, v in stacks.items()}
    known = getattr(module, "LAYER_STACKS", {})
    counts = module.layer_counts(hf_config) if known else {}
    for stack, keep in stacks.items():
        if stack not in known:
            names = ", ".join(known) or "none"
            raise CheckpointError(
                f"{where}: '{stack}' is not a layer stack of "
                f"{hf_config.get('model_type')} (stacks: {names})"
            )
        bad = [i for i in keep if not isinstance(i, int) or not 0 <= i < counts[stack]]
        if bad or not keep:
            raise CheckpointError(
                f"{where}: entry {bad[0] if bad else '[]'} is out of range; the "
                f"checkpoint's {stack} has {counts[stack]} blocks "
                f"(0..{counts[stack] - 1})"
            )
    prefixes = {stack: re.compile(rf"^({known[stack]})(\d+)(\..*)$") for stack in stacks}

    def rename(name: str) -> str:
        if any(s in name for s in getattr(module, "SHARED_IN_FIRST_BLOCK", ())):
            return name
        for stack, pattern in prefixes.items():
            m = pattern.match(name)
            if m:
                return f"{m[1]}{stacks[stack][int(m[2])]}{m[3]}"
        return name

    return module.cut_hf_config(hf_config, stacks), rename


def from_pretrained(
    path_or_id: str,
    *,
    dtype=jnp.float32,
    mesh=None,
    compute_dtype=None,
    layers=None,
    remat: str = "none",
) -> LanguageModel:
    """Load a Hugging Face model directory (or hub id, when online) or a GGUF file (or a directory
    holding one) as a `LanguageModel`.

    dtype: storage dtype of the params; compute_dtype: activation/matmul dtype (default: dtype).
    remat: what each block keeps for the backward pass (`LanguageModel`, `layers.REMAT_POLICIES`).
    mesh: place every parameter on it, sharded by `plad_jax.sharding` rules, shard by shard.
    layers: keep only these blocks of the checkpoint, in this order (`cut_layers`): a student cut
    from its teacher.
    """
    hf_config, files = open_checkpoint(path_or_id)
    gguf = isinstance(files, GGUFWeights)
    where = files.file_of("config") if gguf else f"{path_or_id}/config.json"
    model_type = hf_config.get("model_type")
    module, config_cls, model_cls = family(model_type)
    if hasattr(
        module, "reconcile_hf_config"
    ):  # config.json alone is ambiguous for this family (T5 lm_head)
        hf_config = module.reconcile_hf_config(hf_config, files.has)
    if gguf:
        _check_gguf_tensors(files, config_cls, module, hf_config)
    rename = None
    if layers is not None:
        hf_config, rename = cut_layers(module, hf_config, layers)
    try:
        config = config_cls.from_hf(hf_config)
    except KeyError as e:
        raise CheckpointError(f"{where}: missing field {e} for model_type '{model_type}'") from None
    except ValueError as e:
        raise CheckpointError(f"{path_or_id}/{e}") from None
    abstract = nnx.eval_shape(lambda: model_cls(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    shardings = shd.param_shardings(state, mesh) if mesh is not None else None
    variables = dict(nnx.to_flat_state(state))
    target_shardings = dict(nnx.to_flat_state(shardings)) if shardings is not None else {}
    for spec in module.weight_specs(config):
        var = variables.pop(spec.path)
        sharding = target_shardings.get(spec.path)
        sharding = sharding.get_value() if isinstance(sharding, nnx.Variable) else sharding
        if rename is not None:
            spec = dataclasses.replace(spec, hf_name=rename(spec.hf_name))
        var.set_value(_read_param(files, spec, var.shape, dtype, sharding))
    if variables:  # a family whose weight table misses a parameter is a bug, not a user error
        raise AssertionError(f"{model_type}: parameters without an HF tensor: {sorted(variables)}")
    return LanguageModel(
        model_type,
        config,
        graphdef,
        state,
        hf_config,
        compute_dtype=compute_dtype or dtype,
        mesh=mesh,
        remat=remat,
    )


def _check_gguf_tensors(files: GGUFWeights, config_cls, module, hf_config: dict):
    """Every tensor in the GGUF file has a place in the model its metadata describes."""
    try:
        names = [spec.hf_name for spec in module.weight_specs(config_cls.from_hf(hf_config))]
        files.file.check_tensors(names)
    except (gguf_io.GGUFError, ValueError, KeyError) as e:
        message = str(e) if isinstance(e, gguf_io.GGUFError) else f"{files.file.path}: {e}"
        raise CheckpointError(message) from None


def init_model(
    hf_config: dict,
    *,
    seed: int = 0,
    dtype=jnp.float32,
    mesh=None,
    compute_dtype=None,
    remat: str = "none",
) -> LanguageModel:
    """A freshly initialised model of the architecture described by HF config.json fields.

    Parameters are created inside one jit whose outputs are laid out by the sharding rules, so a
    large model is born sharded. `save_pretrained` then writes a directory transformers loads.
    """
    model_type = hf_config.get("model_type")
    _, config_cls, model_cls = family(model_type)
    try:
        config = config_cls.from_hf(hf_config)
    except KeyError as e:
        raise CheckpointError(
            f"model init: missing field {e} for model_type '{model_type}'"
        ) from None
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: model_cls(config, rngs=nnx.Rngs(seed))))
    shardings = shd.param_shardings(abstract, mesh) if mesh is not None else None

    def create():
        state = nnx.state(model_cls(config, rngs=nnx.Rngs(seed)))
        return jax.tree.map(lambda x: x.astype(dtype), state)

    params = jax.jit(create, out_shardings=shardings)()
    return LanguageModel(
        model_type,
        config,
        graphdef,
        params,
        dict(hf_config),
        compute_dtype=compute_dtype or dtype,
        mesh=mesh,
        remat=remat,
    )


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
    hf_config["dtype"] = (
        "bfloat16" if any(d.name == "bfloat16" for d in dtypes) else next(iter(dtypes)).name
    )
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


def save_gguf(lm: LanguageModel, path: str, dtype: str = "f16", tokenizer=None):
    """Write `lm` as one GGUF file (llama.cpp's format); see `gguf_io.write_gguf`."""
    module, _, _ = family(lm.model_type)
    flat = dict(nnx.to_flat_state(lm.params))
    tensors = {}
    for spec in module.weight_specs(lm.config):
        arr = _to_host(flat[spec.path].get_value()).astype(np.float32)
        tensors[spec.hf_name] = arr.T if spec.transpose else arr
    if jax.process_index() != 0:
        return
    try:
        gguf_io.write_gguf(lm, tensors, path, dtype, tokenizer)
    except gguf_io.GGUFError as e:
        raise CheckpointError(str(e)) from None


language_model.register_writer("safetensors", save_pretrained)
language_model.register_writer("gguf", save_gguf)
