"""GPT-Neo decoder (HF `model_type` gpt_neo): learned absolute positions, alternating global and
local (sliding-window) attention, LayerNorm with bias, GELU MLP, output layer tied to `wte`.

Two GPT-Neo quirks, both as in HF: attention scores are not scaled by 1/sqrt(head_dim), and they
are computed in fp32. A local layer lets a query see keys 0 <= q_pos - k_pos < window_size back
(HF builds it as `tril(ones) xor tril(ones, -window_size)`). As in every decoder-only family here,
positions count real tokens only (`cumsum(mask) - 1`), so padding never changes a real position
and windows are measured in positions, not columns.
"""

from __future__ import annotations

import dataclasses

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
    LayerNorm,
    Linear,
    attention,
    positions_from_mask,
    run_block,
    token_ids,
)
from plad_jax.models.spec import WeightSpec

ATTENTION_TYPES = ("global", "local")


@dataclasses.dataclass(frozen=True)
class GPTNeoConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    window_size: int = 256
    attention_layers: tuple = ()  # per layer: None (global, full causal) or the local window length
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    tie_word_embeddings: bool = True
    eos_token_id: tuple = ()
    pad_token_id: int | None = None
    bos_token_id: int | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf(cls, hf: dict) -> GPTNeoConfig:
        hidden = hf["hidden_size"]
        layers = hf["num_layers"] if "num_layers" in hf else hf["num_hidden_layers"]
        heads = hf["num_heads"] if "num_heads" in hf else hf["num_attention_heads"]
        if hidden % heads:
            raise ValueError(
                f"config.json: hidden_size {hidden} is not divisible by num_heads {heads}"
            )
        act = hf.get("activation_function", "gelu_new")
        if act not in ACTIVATIONS:
            raise ValueError(
                f"config.json: activation_function '{act}' is not supported "
                f"(supported: {', '.join(ACTIVATIONS)})"
            )
        window = hf.get("window_size", 256)
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hidden,
            num_layers=layers,
            num_heads=heads,
            intermediate_size=hf.get("intermediate_size") or 4 * hidden,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            window_size=window,
            attention_layers=_attention_layers(hf.get("attention_types"), layers, window),
            activation_function=act,
            layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
            eos_token_id=token_ids(hf.get("eos_token_id", 50256)),
            pad_token_id=hf.get("pad_token_id"),
            bos_token_id=hf.get("bos_token_id", 50256),
        )


# Cut students (`hf.cut_layers`): the block stacks, the HF name prefix of their blocks.
LAYER_STACKS = {"layers": r"transformer\.h\."}


def layer_counts(hf: dict) -> dict:
    return {"layers": hf["num_layers"] if "num_layers" in hf else hf["num_hidden_layers"]}


def cut_hf_config(hf: dict, stacks: dict) -> dict:
    """config.json of a model with only `stacks["layers"]` blocks, each keeping its kind."""
    keep, layers = stacks["layers"], layer_counts(hf)["layers"]
    windows = _attention_layers(hf.get("attention_types"), layers, hf.get("window_size", 256))
    derived = ("num_layers", "num_hidden_layers", "attention_layers")
    cut = {k: v for k, v in hf.items() if k not in derived}
    cut["num_layers"] = len(keep)
    cut["attention_types"] = [[["local" if windows[i] else "global"], 1] for i in keep]
    return cut


def _attention_layers(attention_types, num_layers: int, window: int) -> tuple:
    """Expand HF `attention_types` ([[["global", "local"], 12]]) into a window per layer."""
    if attention_types is None:  # HF's default
        attention_types = [[["global", "local"], 12]]
    kinds = [kind for pattern, repeat in attention_types for _ in range(repeat) for kind in pattern]
    unknown = sorted(set(kinds) - set(ATTENTION_TYPES))
    if unknown:
        raise ValueError(
            f"config.json: attention_types names {unknown}; only 'global' and 'local' exist"
        )
    if len(kinds) != num_layers:
        raise ValueError(
            f"config.json: attention_types expands to {len(kinds)} layers but num_layers is "
            f"{num_layers}"
        )
    return tuple(window if kind == "local" else None for kind in kinds)


class Attention(nnx.Module):
    def __init__(self, config: GPTNeoConfig, window, *, rngs):
        d = config.hidden_size
        self.q_proj = Linear(d, d, ("embed", "heads"), rngs=rngs)
        self.k_proj = Linear(d, d, ("embed", "heads"), rngs=rngs)
        self.v_proj = Linear(d, d, ("embed", "heads"), rngs=rngs)
        self.out_proj = Linear(d, d, ("heads", "embed"), rngs=rngs, bias=True)
        self.shape = (config.num_heads, config.head_dim)
        self.window = window

    def project(self, x):
        b, t, _ = x.shape
        return tuple(
            proj(x).reshape(b, t, *self.shape) for proj in (self.q_proj, self.k_proj, self.v_proj)
        )

    def __call__(self, x, positions, mask):
        q, k, v = self.project(x)
        out = attention(q, k, v, causal_visible(positions, mask, self.window), scale=1.0)
        return self.out_proj(out.reshape(x.shape[0], x.shape[1], -1)), (k, v)

    def decode(self, x, positions, cache):
        """One new token per row against the cache. x: [B, 1, D]; positions: [B, 1]."""
        q, k, v = self.project(x)
        keys, values = write_kv(cache, k, v, keys_slots_minor=False)  # MHA
        vis = visible_keys(positions, cache["key_pos"], cache["key_mask"], self.window)
        out = attend_cache(q, cache, keys, values, vis, scale=1.0)
        return self.out_proj(out.reshape(x.shape[0], 1, -1)), (keys, values)


class MLP(nnx.Module):
    def __init__(self, config: GPTNeoConfig, *, rngs):
        d, f = config.hidden_size, config.intermediate_size
        self.c_fc = Linear(d, f, ("embed", "mlp"), rngs=rngs, bias=True)
        self.c_proj = Linear(f, d, ("mlp", "embed"), rngs=rngs, bias=True)
        self.act = ACTIVATIONS[config.activation_function]

    def __call__(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class Block(nnx.Module):
    def __init__(self, config: GPTNeoConfig, window, *, rngs):
        eps = config.layer_norm_epsilon
        self.ln_1 = LayerNorm(config.hidden_size, rngs=rngs, eps=eps)
        self.attn = Attention(config, window, rngs=rngs)
        self.ln_2 = LayerNorm(config.hidden_size, rngs=rngs, eps=eps)
        self.mlp = MLP(config, rngs=rngs)

    def __call__(self, x, positions, mask, cache=None):
        if cache is None:
            attn, kv = self.attn(self.ln_1(x), positions, mask)
        else:
            attn, kv = self.attn.decode(self.ln_1(x), positions, cache)
        x = x + attn
        return x + self.mlp(self.ln_2(x)), kv


class GPTNeoModel(nnx.Module):
    """Decoder-only LM. `score` for training/scoring; `prefill` + `decode` for the sampler."""

    def __init__(self, config: GPTNeoConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.wte = Embed(config.vocab_size, config.hidden_size, rngs=rngs)
        self.wpe = Embed(
            config.max_position_embeddings, config.hidden_size, rngs=rngs, axes=("positions", None)
        )
        self.h = nnx.List([Block(config, w, rngs=rngs) for w in _windows(config)])
        self.ln_f = LayerNorm(config.hidden_size, rngs=rngs, eps=config.layer_norm_epsilon)
        if not config.tie_word_embeddings:
            self.lm_head = Linear(
                config.hidden_size, config.vocab_size, ("embed", "vocab"), rngs=rngs
            )

    def output_logits(self, h):
        """fp32 next-token logits [..., V] from final-layer states [..., D]."""
        if self.config.tie_word_embeddings:
            return self.wte.attend(h)
        return self.lm_head.logits(h)

    def _embed(self, ids, positions, dtype):
        return self.wte(ids, dtype) + self.wpe(positions, dtype)

    def _trunk(self, ids, positions, mask, dtype, remat="none"):
        x = self._embed(ids, positions, dtype)
        kvs = []
        for block in self.h:
            x, kv = run_block(block, remat, x, positions, mask)
            kvs.append(kv)
        return self.ln_f(x), kvs

    def score_hidden(
        self, prompt_ids, prompt_mask, response_ids, response_mask, dtype=jnp.float32, remat="none"
    ):
        """(predictors, response hidden states), each [B, R, D]: `output_logits(predictors)` are
        `score`'s logits. remat: a `layers.REMAT_POLICIES` name, per block."""
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
        return logits, init_cache(
            kvs, prompt_mask, positions, max_new_tokens, keys_slots_minor=False
        )  # MHA

    def decode(self, tokens, cache, dtype=jnp.float32):
        """Feed one token per row ([B]); return its next-token logits [B, V] and the new cache."""
        step = CacheStep.open(cache)
        x = self._embed(tokens[:, None], step.positions, dtype)
        kvs = []
        for i, block in enumerate(self.h):
            x, kv = block(x, step.positions, None, cache=step.layer(cache, i))
            kvs.append(kv)
        return self.output_logits(self.ln_f(x)[:, 0]), step.close(cache, kvs)


def _windows(config):
    return config.attention_layers or (None,) * config.num_layers


def weight_specs(config: GPTNeoConfig) -> list[WeightSpec]:
    """HF tensor name -> our parameter path; linear kernels (torch nn.Linear) are stored
    transposed."""
    specs = [
        WeightSpec("transformer.wte.weight", ("wte", "embedding")),
        WeightSpec("transformer.wpe.weight", ("wpe", "embedding")),
        WeightSpec("transformer.ln_f.weight", ("ln_f", "scale")),
        WeightSpec("transformer.ln_f.bias", ("ln_f", "bias")),
    ]
    if not config.tie_word_embeddings:
        specs.append(WeightSpec("lm_head.weight", ("lm_head", "kernel"), transpose=True))
    for i in range(config.num_layers):
        hf, ours = f"transformer.h.{i}", ("h", i)
        for norm in ("ln_1", "ln_2"):
            specs += [
                WeightSpec(f"{hf}.{norm}.weight", ours + (norm, "scale")),
                WeightSpec(f"{hf}.{norm}.bias", ours + (norm, "bias")),
            ]
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            specs.append(
                WeightSpec(
                    f"{hf}.attn.attention.{name}.weight",
                    ours + ("attn", name, "kernel"),
                    transpose=True,
                )
            )
        specs.append(
            WeightSpec(f"{hf}.attn.attention.out_proj.bias", ours + ("attn", "out_proj", "bias"))
        )
        for name in ("c_fc", "c_proj"):
            specs += [
                WeightSpec(
                    f"{hf}.mlp.{name}.weight", ours + ("mlp", name, "kernel"), transpose=True
                ),
                WeightSpec(f"{hf}.mlp.{name}.bias", ours + ("mlp", name, "bias")),
            ]
    return specs
