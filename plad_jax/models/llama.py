"""LLaMA-class decoder: RoPE (default, linear, LLaMA-3 scaling), RMSNorm, SwiGLU, MHA/GQA/MQA.

Covers HF `model_type` llama (LLaMA-1/2/3), mistral (sliding window) and qwen2 (q/k/v bias,
optional sliding window). Prompt and response are one sequence; positions count real tokens only
(`cumsum(mask) - 1`), and padded keys are masked, so padding never changes a real position.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
from flax import nnx

from plad_jax.models.causal import (
    CacheStep,
    attend_cache,
    causal_visible,
    init_cache,
    join_prompt_response,
    last_prompt_state,
    split_response,
    visible_keys,
    write_kv,
)
from plad_jax.models.layers import (
    ACTIVATIONS,
    Embed,
    Linear,
    RMSNorm,
    attention,
    keys_slots_minor,
    positions_from_mask,
    run_block,
    token_ids,
)
from plad_jax.models.spec import WeightSpec

ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple = ()  # sorted (key, value) pairs of HF rope parameters, hashable for jit
    attention_bias: bool = False  # bias on q/k/v (LLaMA `attention_bias`, always on for Qwen2)
    o_proj_bias: bool = False  # LLaMA's `attention_bias` also covers o_proj; Qwen2's does not
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    layer_windows: tuple = ()  # per layer: None (full causal) or sliding window length
    eos_token_id: tuple = ()
    pad_token_id: int | None = None
    bos_token_id: int | None = None

    @classmethod
    def from_hf(cls, hf: dict) -> LlamaConfig:
        heads = hf["num_attention_heads"]
        layers = hf["num_hidden_layers"]
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise ValueError(
                f"config.json: rope_type '{rope_type}' is not supported (supported: "
                f"{', '.join(ROPE_TYPES)})"
            )
        act = hf.get("hidden_act", "silu")
        if act not in ACTIVATIONS:
            raise ValueError(
                f"config.json: hidden_act '{act}' is not supported (supported: "
                f"{', '.join(ACTIVATIONS)})"
            )
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=tuple(sorted((k, v) for k, v in rope.items() if k != "type")),
            attention_bias=bool(hf.get("attention_bias", hf.get("model_type") == "qwen2")),
            o_proj_bias=bool(hf.get("attention_bias", False)) and hf.get("model_type") == "llama",
            mlp_bias=bool(hf.get("mlp_bias", False)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            hidden_act=act,
            layer_windows=_layer_windows(hf, layers),
            eos_token_id=token_ids(hf.get("eos_token_id")),
            pad_token_id=hf.get("pad_token_id"),
            bos_token_id=hf.get("bos_token_id"),
        )


def _layer_windows(hf: dict, num_layers: int) -> tuple:
    """Sliding-window length per layer (None = full attention), as HF's mask functions apply it."""
    window = hf.get("sliding_window")
    if hf.get("model_type") == "qwen2" and not hf.get("use_sliding_window", False):
        window = None
    types = hf.get("layer_types")
    if types is None:
        if hf.get("model_type") == "qwen2":
            start = hf.get("max_window_layers", num_layers)
            types = [
                "sliding_attention" if window and i >= start else "full_attention"
                for i in range(num_layers)
            ]
        else:
            types = ["sliding_attention" if window else "full_attention"] * num_layers
    return tuple(window if t == "sliding_attention" and window else None for t in types)


# Cut students (`hf.cut_layers`): the block stacks, the HF name prefix of their blocks.
LAYER_STACKS = {"layers": r"model\.layers\."}


def layer_counts(hf: dict) -> dict:
    return {"layers": hf["num_hidden_layers"]}


def cut_hf_config(hf: dict, stacks: dict) -> dict:
    """config.json of a model with only `stacks["layers"]` blocks, each keeping its window."""
    keep = stacks["layers"]
    windows = _layer_windows(hf, hf["num_hidden_layers"])
    cut = dict(hf, num_hidden_layers=len(keep))
    if any(w is not None for w in windows):
        cut["layer_types"] = ["sliding_attention" if windows[i] else "full_attention" for i in keep]
        cut.pop("max_window_layers", None)
    else:
        cut.pop("layer_types", None)
    return cut


def rope_frequencies(config: LlamaConfig) -> jnp.ndarray:
    """Inverse frequencies [head_dim // 2] after the configured RoPE scaling."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    rope = dict(config.rope_scaling)
    kind = rope.get("rope_type", "default")
    if kind == "linear":
        return inv_freq / rope["factor"]
    if kind == "llama3":
        factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        old_len = rope["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return jnp.where(medium, smoothed, scaled)
    return inv_freq


def apply_rope(x, positions, inv_freq):
    """Rotate-half RoPE (HF layout). x: [B, T, H, D]; positions: [B, T]."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    cos = jnp.concatenate([jnp.cos(angles)] * 2, axis=-1)[:, :, None, :]
    sin = jnp.concatenate([jnp.sin(angles)] * 2, axis=-1)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, config: LlamaConfig, window, *, rngs):
        d, h, kv, hd = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        self.q_proj = Linear(d, h * hd, ("embed", "heads"), rngs=rngs, bias=config.attention_bias)
        self.k_proj = Linear(d, kv * hd, ("embed", "kv"), rngs=rngs, bias=config.attention_bias)
        self.v_proj = Linear(d, kv * hd, ("embed", "kv"), rngs=rngs, bias=config.attention_bias)
        self.o_proj = Linear(h * hd, d, ("heads", "embed"), rngs=rngs, bias=config.o_proj_bias)
        self.shape = (h, kv, hd)
        self.window = window

    def project(self, x, positions, inv_freq):
        h, kv, hd = self.shape
        b, t, _ = x.shape
        q = apply_rope(self.q_proj(x).reshape(b, t, h, hd), positions, inv_freq)
        k = apply_rope(self.k_proj(x).reshape(b, t, kv, hd), positions, inv_freq)
        return q, k, self.v_proj(x).reshape(b, t, kv, hd)

    def __call__(self, x, positions, mask, inv_freq):
        q, k, v = self.project(x, positions, inv_freq)
        out = attention(
            q, k, v, causal_visible(positions, mask, self.window), scale=self.shape[2] ** -0.5
        )
        return self.o_proj(out.reshape(x.shape[0], x.shape[1], -1)), (k, v)

    def decode(self, x, positions, cache, inv_freq):
        """One new token per row against the cache. x: [B, 1, D]; positions: [B, 1]."""
        q, k, v = self.project(x, positions, inv_freq)
        minor = keys_slots_minor(*self.shape[:2])  # the backend's choice, read at trace time
        keys, values = write_kv(cache, k, v, minor)
        vis = visible_keys(positions, cache["key_pos"], cache["key_mask"], self.window)
        out = attend_cache(q, cache, keys, values, vis, scale=self.shape[2] ** -0.5)
        return self.o_proj(out.reshape(x.shape[0], 1, -1)), (keys, values)


class MLP(nnx.Module):
    def __init__(self, config: LlamaConfig, *, rngs):
        d, f, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = Linear(d, f, ("embed", "mlp"), rngs=rngs, bias=bias)
        self.up_proj = Linear(d, f, ("embed", "mlp"), rngs=rngs, bias=bias)
        self.down_proj = Linear(f, d, ("mlp", "embed"), rngs=rngs, bias=bias)
        self.act = ACTIVATIONS[config.hidden_act]

    def __call__(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
    def __init__(self, config: LlamaConfig, window, *, rngs):
        self.input_layernorm = RMSNorm(config.hidden_size, rngs=rngs, eps=config.rms_norm_eps)
        self.self_attn = Attention(config, window, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(
            config.hidden_size, rngs=rngs, eps=config.rms_norm_eps
        )
        self.mlp = MLP(config, rngs=rngs)

    def __call__(self, x, positions, mask, inv_freq, cache=None):
        if cache is None:
            attn, kv = self.self_attn(self.input_layernorm(x), positions, mask, inv_freq)
        else:
            attn, kv = self.self_attn.decode(self.input_layernorm(x), positions, cache, inv_freq)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x)), kv


class LlamaModel(nnx.Module):
    """Decoder-only LM. `score` for training/scoring; `prefill` + `decode` for the sampler."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed_tokens = Embed(config.vocab_size, config.hidden_size, rngs=rngs)
        self.layers = nnx.List([Block(config, w, rngs=rngs) for w in _windows(config)])
        self.norm = RMSNorm(config.hidden_size, rngs=rngs, eps=config.rms_norm_eps)
        if not config.tie_word_embeddings:
            self.lm_head = Linear(
                config.hidden_size, config.vocab_size, ("embed", "vocab"), rngs=rngs
            )

    def output_logits(self, h):
        """fp32 next-token logits [..., V] from final-layer states [..., D]."""
        return (
            self.embed_tokens.attend(h)
            if self.config.tie_word_embeddings
            else self.lm_head.logits(h)
        )

    def _trunk(self, ids, positions, mask, dtype, remat="none"):
        x = self.embed_tokens(ids, dtype)
        inv_freq = rope_frequencies(self.config)
        kvs = []
        for layer in self.layers:
            x, kv = run_block(layer, remat, x, positions, mask, inv_freq)
            kvs.append(kv)
        return self.norm(x), kvs

    def score_hidden(
        self, prompt_ids, prompt_mask, response_ids, response_mask, dtype=jnp.float32, remat="none"
    ):
        """(predictors, response hidden states), each [B, R, D]: `output_logits(predictors)` are
        `score`'s logits. remat: a `layers.REMAT_POLICIES` name, per decoder block."""
        ids, mask, positions = join_prompt_response(
            prompt_ids, prompt_mask, response_ids, response_mask
        )
        hidden, _ = self._trunk(ids, positions, mask, dtype, remat)
        return split_response(hidden, prompt_mask, response_ids.shape[1])

    def score(
        self, prompt_ids, prompt_mask, response_ids, response_mask, dtype=jnp.float32, remat="none"
    ):
        """Logits [B, R, V] (fp32) for each response token, and response hidden states [B, R, D].

        Row b, column t holds the next-token logits for response_ids[b, t] given the prompt and
        response_ids[b, :t]; hidden[b, t] is the final-layer state at response_ids[b, t].
        """
        predictors, response_hidden = self.score_hidden(
            prompt_ids, prompt_mask, response_ids, response_mask, dtype, remat
        )
        return self.output_logits(predictors), response_hidden

    def prefill(self, prompt_ids, prompt_mask, max_new_tokens, dtype=jnp.float32):
        """Run the prompt, return next-token logits [B, V] and a cache with room for the rest."""
        positions = positions_from_mask(prompt_mask)
        hidden, kvs = self._trunk(prompt_ids, positions, prompt_mask, dtype)
        logits = self.output_logits(last_prompt_state(hidden, prompt_mask))
        minor = keys_slots_minor(self.config.num_heads, self.config.num_kv_heads)
        return logits, init_cache(kvs, prompt_mask, positions, max_new_tokens, minor)

    def decode(self, tokens, cache, dtype=jnp.float32):
        """Feed one token per row ([B]); return its next-token logits [B, V] and the new cache."""
        step = CacheStep.open(cache)
        x = self.embed_tokens(tokens[:, None], dtype)
        inv_freq = rope_frequencies(self.config)
        kvs = []
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, step.positions, None, inv_freq, cache=step.layer(cache, i))
            kvs.append(kv)
        return self.output_logits(self.norm(x)[:, 0]), step.close(cache, kvs)


def _windows(config):
    return config.layer_windows or (None,) * config.num_layers


def weight_specs(config: LlamaConfig) -> list[WeightSpec]:
    """HF tensor name -> our parameter path; linear kernels are stored transposed."""
    specs = [
        WeightSpec("model.embed_tokens.weight", ("embed_tokens", "embedding")),
        WeightSpec("model.norm.weight", ("norm", "scale")),
    ]
    if not config.tie_word_embeddings:
        specs.append(WeightSpec("lm_head.weight", ("lm_head", "kernel"), transpose=True))
    for i in range(config.num_layers):
        hf, ours = f"model.layers.{i}", ("layers", i)
        specs += [
            WeightSpec(f"{hf}.input_layernorm.weight", ours + ("input_layernorm", "scale")),
            WeightSpec(
                f"{hf}.post_attention_layernorm.weight",
                ours + ("post_attention_layernorm", "scale"),
            ),
        ]
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            specs.append(
                WeightSpec(
                    f"{hf}.self_attn.{name}.weight",
                    ours + ("self_attn", name, "kernel"),
                    transpose=True,
                )
            )
            if config.o_proj_bias if name == "o_proj" else config.attention_bias:
                specs.append(
                    WeightSpec(f"{hf}.self_attn.{name}.bias", ours + ("self_attn", name, "bias"))
                )
        for name in ("gate_proj", "up_proj", "down_proj"):
            specs.append(
                WeightSpec(
                    f"{hf}.mlp.{name}.weight", ours + ("mlp", name, "kernel"), transpose=True
                )
            )
            if config.mlp_bias:
                specs.append(WeightSpec(f"{hf}.mlp.{name}.bias", ours + ("mlp", name, "bias")))
    return specs
