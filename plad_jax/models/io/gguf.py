"""GGUF (llama.cpp's format) -> HF-named tensors and config, read with the `gguf` package.

`GGUFFile` answers the questions `hf.from_pretrained` asks of a safetensors checkpoint (which
tensors exist, their HF shape, a region of one) for a `.gguf` file, so both formats share one
loader. Tensors are memory-mapped by `gguf.GGUFReader` and dequantized row by row with
`gguf.quants.dequantize`: a device's shard of a weight dequantizes only the rows it holds.

llama.cpp renames tensors (`blk.3.attn_q.weight` for `model.layers.3.self_attn.q_proj.weight`),
stores 2-D weights with their HF shape reversed (ne[0] is the row length) and, for the `llama`
architecture only, reorders the rows of Q and K within each head from HF's rotate-half layout to
its interleaved one (`convert_hf_to_gguf.py`, `LlamaModel.permute`). Reading a row of HF's Q
therefore reads the GGUF row that permutation put it at.
"""

from __future__ import annotations

import functools
import os
import re

import numpy as np

from plad_jax.errors import GGUFError  # noqa: F401 (re-exported)

# ggml types we dequantize (numpy, `gguf.quants`); anything else is refused by name.
READ_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
# GGUF architecture -> HF model_type (the families whose tensor names are mapped below).
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}
PERMUTED_ARCHS = ("llama",)  # llama.cpp reorders Q/K rows for these only (Qwen2 keeps HF order)

# HF name pattern -> GGUF name (one regex substitution each, block index kept).
_NAMES = [
    (r"^model\.embed_tokens\.weight$", "token_embd.weight"),
    (r"^model\.norm\.weight$", "output_norm.weight"),
    (r"^lm_head\.weight$", "output.weight"),
    (r"^model\.layers\.(\d+)\.input_layernorm\.weight$", r"blk.\1.attn_norm.weight"),
    (r"^model\.layers\.(\d+)\.post_attention_layernorm\.weight$", r"blk.\1.ffn_norm.weight"),
    (r"^model\.layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)$", r"blk.\1.attn_q.\2"),
    (r"^model\.layers\.(\d+)\.self_attn\.k_proj\.(weight|bias)$", r"blk.\1.attn_k.\2"),
    (r"^model\.layers\.(\d+)\.self_attn\.v_proj\.(weight|bias)$", r"blk.\1.attn_v.\2"),
    (r"^model\.layers\.(\d+)\.self_attn\.o_proj\.(weight|bias)$", r"blk.\1.attn_output.\2"),
    (r"^model\.layers\.(\d+)\.mlp\.gate_proj\.weight$", r"blk.\1.ffn_gate.weight"),
    (r"^model\.layers\.(\d+)\.mlp\.up_proj\.weight$", r"blk.\1.ffn_up.weight"),
    (r"^model\.layers\.(\d+)\.mlp\.down_proj\.weight$", r"blk.\1.ffn_down.weight"),
]


def gguf_name(hf_name: str) -> str:
    """llama.cpp's name for an HF tensor name (llama / qwen2 layout)."""
    for pattern, replacement in _NAMES:
        if re.match(pattern, hf_name):
            return re.sub(pattern, replacement, hf_name)
    raise GGUFError(f"no GGUF name for tensor '{hf_name}'")


def is_gguf(path: str) -> bool:
    return path.endswith(".gguf") and os.path.isfile(path)


def find_gguf(path: str) -> str | None:
    """`path` if it is a .gguf file, the one .gguf in a directory without config.json, else None."""
    if is_gguf(path):
        return path
    if not os.path.isdir(path) or os.path.isfile(os.path.join(path, "config.json")):
        return None
    found = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
    if len(found) > 1:
        raise GGUFError(
            f"{path}: holds {len(found)} .gguf files ({', '.join(found)}); pass one file"
        )
    return os.path.join(path, found[0]) if found else None


def _open_reader(path: str):
    import gguf

    try:
        return gguf.GGUFReader(path, "r")
    except (ValueError, IndexError, KeyError, OSError, UnicodeDecodeError, TypeError) as e:
        problem = "truncated or corrupt" if os.path.getsize(path) else "empty"
        raise GGUFError(f"{path}: {problem} GGUF file ({type(e).__name__}: {e})") from None


def file_key(path: str) -> tuple:
    """(real path, size, modification time): a file rewritten in place gets a new key."""
    stat = os.stat(path)
    return os.path.realpath(path), stat.st_size, stat.st_mtime_ns


def open_file(path: str) -> GGUFFile:
    """The `GGUFFile` of `path`, parsed once per process while the file is unchanged.

    Parsing the metadata is the slow part (SmolLM2's 49k-token vocabulary and merges: seconds),
    and a pipeline run opens the same file for every stage and role (config, checks, weights,
    tokenizer). The reader only memory-maps the file and is never written to, so sharing it is
    safe."""
    return _open_cached(*file_key(path))


@functools.lru_cache(maxsize=8)
def _open_cached(path: str, size: int, mtime_ns: int) -> GGUFFile:
    del size, mtime_ns  # the cache key only
    return GGUFFile(path)


def _qk_order(rows: int, heads: int) -> np.ndarray:
    """HF row stored at each GGUF row of a Q or K weight that llama.cpp permuted (per head: HF row
    (i, j), i one of the two rotary halves and j < head_dim/2, is stored at (j, i))."""
    return np.arange(rows).reshape(heads, 2, rows // heads // 2).swapaxes(1, 2).reshape(-1)


def _inverse_qk_rows(rows: int, heads: int) -> np.ndarray:
    """GGUF row of each HF row (the inverse of `_qk_order`)."""
    return np.argsort(_qk_order(rows, heads))


def _f32(value) -> float:
    """A float32 metadata value as the decimal it was written from (1e-05, not 9.99999974e-06)."""
    return float(str(np.float32(value)))


class GGUFFile:
    """Read-only view of one `.gguf` file under HF tensor names (see the module docstring)."""

    def __init__(self, path: str):
        self.path = path
        self.reader = _open_reader(path)
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.architecture = self.field("general.architecture")
        if self.architecture not in ARCHITECTURES:
            raise GGUFError(
                f"{path}: GGUF architecture '{self.architecture}' is not supported "
                f"(supported: {', '.join(ARCHITECTURES)})"
            )
        self._check_types()

    def _check_types(self):
        for t in self.tensors.values():
            if t.tensor_type.name not in READ_TYPES:
                kind = t.tensor_type.name
                raise GGUFError(
                    f"{self.path}: tensor '{t.name}' is stored as {kind}, "
                    f"which plad_jax does not read (readable: {', '.join(READ_TYPES)})"
                )

    def field(self, key: str, default=None):
        """A metadata value (scalar, string or list), or `default` when the key is absent."""
        f = self.reader.fields.get(key)
        return default if f is None else f.contents()

    def arch_field(self, key: str, default=None):
        return self.field(f"{self.architecture}.{key}", default)

    @property
    def has_tokenizer(self) -> bool:
        return "tokenizer.ggml.tokens" in self.reader.fields

    # -- the safetensors-like interface `hf.from_pretrained` reads through ------------------------
    def __contains__(self, hf_name: str) -> bool:
        return gguf_name(hf_name) in self.tensors

    def shape(self, hf_name: str) -> tuple:
        """The tensor's HF shape (GGUF stores ne, the reverse)."""
        return tuple(int(n) for n in reversed(self.tensors[gguf_name(hf_name)].shape))

    def read(self, hf_name: str, index=()) -> np.ndarray:
        """`tensor[index]` in HF layout as float32: only the rows in `index` are dequantized."""
        from gguf.quants import dequantize

        tensor = self.tensors[gguf_name(hf_name)]
        shape = self.shape(hf_name)
        index = tuple(index) + (slice(None),) * (len(shape) - len(tuple(index)))
        if len(shape) == 1:
            values = dequantize(tensor.data, tensor.tensor_type).reshape(shape)
            return values[index].astype(np.float32)
        rows = np.arange(shape[0])[index[0]]
        heads = self._qk_heads(hf_name)
        if heads:
            rows = _inverse_qk_rows(shape[0], heads)[rows]
        data = np.asarray(tensor.data).reshape(shape[0], -1)
        values = dequantize(data[rows], tensor.tensor_type).reshape(len(rows), shape[1])
        return np.ascontiguousarray(values[:, index[1]], dtype=np.float32)

    def _qk_heads(self, hf_name: str) -> int:
        """Heads llama.cpp permuted this tensor's rows by (0 = not permuted)."""
        if self.architecture not in PERMUTED_ARCHS:
            return 0
        if re.search(r"\.q_proj\.(weight|bias)$", hf_name):
            return int(self.arch_field("attention.head_count"))
        if re.search(r"\.k_proj\.(weight|bias)$", hf_name):
            heads = self.arch_field("attention.head_count")
            return int(self.arch_field("attention.head_count_kv", heads))
        return 0

    # -- config ---------------------------------------------------------------------------------
    def hf_config(self) -> dict:
        """HF config.json fields of this model, from the GGUF metadata and tensor shapes."""
        arch, get = self.architecture, self.arch_field
        heads = int(get("attention.head_count"))
        hidden = int(get("embedding_length"))
        vocab = int(self.tensors["token_embd.weight"].shape[1])
        config = {
            "model_type": ARCHITECTURES[arch],
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": int(get("feed_forward_length")),
            "num_hidden_layers": int(get("block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(get("attention.head_count_kv", heads)),
            "head_dim": int(get("attention.key_length", hidden // heads)),
            "rms_norm_eps": _f32(get("attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": _f32(get("rope.freq_base", 10000.0)),
                **self._rope_scaling(),
            },
            "max_position_embeddings": int(get("context_length", 2048)),
            "tie_word_embeddings": "output.weight" not in self.tensors,
            "hidden_act": "silu",
        }
        for key in ("bos", "eos", "padding"):
            token = self.field(f"tokenizer.ggml.{key}_token_id")
            if token is not None:
                config[f"{'pad' if key == 'padding' else key}_token_id"] = int(token)
        return config

    def _rope_scaling(self) -> dict:
        kind = self.arch_field("rope.scaling.type", "none")
        if kind in ("none", None):
            if "rope_freqs.weight" in self.tensors:
                raise GGUFError(
                    f"{self.path}: RoPE frequency factors (rope_freqs.weight, "
                    "LLaMA-3.1 scaling) are not supported in GGUF; load the "
                    "safetensors checkpoint"
                )
            return {}
        if kind != "linear":
            raise GGUFError(
                f"{self.path}: rope scaling '{kind}' is not supported (supported: none, linear)"
            )
        return {"rope_type": "linear", "factor": _f32(self.arch_field("rope.scaling.factor"))}

    def check_tensors(self, hf_names) -> None:
        """Every tensor of the file is one the model reads (else it is a layout we lack)."""
        wanted = {gguf_name(n) for n in hf_names}
        extra = sorted(set(self.tensors) - wanted)
        if extra:
            raise GGUFError(
                f"{self.path}: tensor '{extra[0]}' has no place in a "
                f"{self.architecture} model ({len(extra)} such tensors)"
            )


# -- export ---------------------------------------------------------------------------------
# dtype name -> (ggml type of 2-D weights, llama.cpp file type); 1-D tensors (norms, biases): F32.
WRITE_TYPES = {
    "f32": ("F32", "ALL_F32"),
    "f16": ("F16", "MOSTLY_F16"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
}


def _permute_qk(weights: np.ndarray, heads: int) -> np.ndarray:
    """HF rows -> llama.cpp's interleaved rotary rows (what `GGUFFile.read` undoes)."""
    return weights[_qk_order(weights.shape[0], heads)]


def _exportable(lm) -> str:
    """The GGUF architecture of `lm`; one clear error for what llama.cpp's layout cannot say."""
    c = lm.config
    if lm.model_type not in ARCHITECTURES:
        raise GGUFError(
            f"GGUF export supports {', '.join(ARCHITECTURES)} models, not {lm.model_type}"
        )
    checks = (
        ("mlp_bias", c.mlp_bias),
        ("sliding windows", any(c.layer_windows)),
        ("o_proj bias", c.o_proj_bias),
        (f"hidden_act {c.hidden_act}", c.hidden_act != "silu"),
        ("llama3 rope scaling", dict(c.rope_scaling).get("rope_type") == "llama3"),
        ("attention_bias", c.attention_bias and lm.model_type == "llama"),
    )
    unsaid = [name for name, bad in checks if bad]
    if unsaid:
        raise GGUFError(
            f"GGUF export: this {lm.model_type} model has {', '.join(unsaid)}, "
            f"which the {lm.model_type} GGUF layout cannot express"
        )
    return lm.model_type


def _write_config(writer, lm):
    c = lm.config
    writer.add_block_count(c.num_layers)
    writer.add_context_length(int(lm.hf_config.get("max_position_embeddings") or 2048))
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_heads)
    writer.add_head_count_kv(c.num_kv_heads)
    writer.add_key_length(c.head_dim)
    writer.add_value_length(c.head_dim)
    writer.add_rope_dimension_count(c.head_dim)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    rope = dict(c.rope_scaling)
    if rope.get("rope_type") == "linear":
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))


def _tokenizer_metadata(writer, tokenizer):
    """A transformers fast BPE tokenizer as llama.cpp's tokenizer keys (`gpt2` when byte-level,
    else `llama`), which transformers' and llama.cpp's GGUF loaders both rebuild."""
    import json

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE":
        raise GGUFError(
            f"GGUF export: a {spec['model']['type']} tokenizer cannot be written (BPE only)"
        )
    vocab = tokenizer.get_vocab()
    tokens = [None] * len(vocab)
    for token, index in vocab.items():
        if index >= len(tokens):
            raise GGUFError("GGUF export: the tokenizer's ids are not 0..n-1")
        tokens[index] = token
    byte_level = "ByteLevel" in json.dumps([spec.get("pre_tokenizer"), spec.get("decoder")])
    special = set(tokenizer.all_special_ids)
    writer.add_tokenizer_model("gpt2" if byte_level else "llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in special else 1 for i in range(len(tokens))])
    writer.add_token_scores([-float(i) for i in range(len(tokens))])
    merges = spec["model"]["merges"]
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    for key in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{key}_token_id", None)
        if token_id is not None:
            getattr(writer, f"add_{key}_token_id")(int(token_id))
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


def write_gguf(lm, tensors: dict, path: str, dtype: str, tokenizer=None):
    """Write `tensors` (HF name -> host array) of `lm` as one GGUF file, atomically."""
    import gguf
    from gguf.quants import quantize

    if dtype not in WRITE_TYPES:
        raise GGUFError(
            f"GGUF export dtype '{dtype}' is not supported (supported: {', '.join(WRITE_TYPES)})"
        )
    arch = _exportable(lm)
    weight_type, file_type = (
        getattr(gguf.GGMLQuantizationType, WRITE_TYPES[dtype][0]),
        getattr(gguf.LlamaFileType, WRITE_TYPES[dtype][1]),
    )
    tmp = path + ".tmp"
    writer = gguf.GGUFWriter(tmp, arch)
    _write_config(writer, lm)
    writer.add_file_type(file_type)
    if tokenizer is not None:
        _tokenizer_metadata(writer, tokenizer)
    heads = {"q_proj": lm.config.num_heads, "k_proj": lm.config.num_kv_heads}
    for name in sorted(tensors):
        arr = np.asarray(tensors[name], dtype=np.float32)
        proj = name.split(".")[-2]
        if arch in PERMUTED_ARCHS and proj in heads:
            arr = _permute_qk(arr, heads[proj])
        qtype = weight_type if arr.ndim == 2 else gguf.GGMLQuantizationType.F32
        data = quantize(arr, qtype)
        raw_dtype = qtype if data.dtype == np.uint8 else None  # quantized blocks, as bytes
        writer.add_tensor(gguf_name(name), data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, path)
