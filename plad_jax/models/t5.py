"""T5 encoder-decoder: v1.0 (relu, tied, scaled output), v1.1 / flan (gated-gelu, untied).

HF `model_type` t5. The prompt is the encoder input; the decoder input is the response shifted right
behind `decoder_start_token_id`. As in t5x and HF: attention is not scaled by 1/sqrt(d); the layer
norm is an RMS norm without mean or bias; each stack has one relative-position bias table (HF keeps
it in block 0) shared by all its self-attention layers, bidirectional buckets in the encoder and
causal buckets in the decoder; cross-attention has no position bias. Inputs are right-padded and
padded keys are masked, so positions are plain column indices and padding never changes a real
position.

Two HF config facts decide the output layer (transformers >= 5 keeps them apart):
`scale_decoder_outputs` (v1.0: multiply by d_model**-0.5 before the vocabulary projection; older
configs say this with `tie_word_embeddings`) and whether a separate `lm_head.weight` exists (v1.1
and flan checkpoints carry one; transformers 5 writes none for a tied model, whatever the version).

Decode cache (a dict of arrays, static shapes):

    k, v              L-tuples of [B, H, S, Dh]  decoder self-attention, S = 1 + max_new_tokens;
                                                 slot j holds decoder input j (slot 0: the start
                                                 token)
    cross_k, cross_v  L-tuples of [B, H, P, Dh]  encoder keys/values of every decoder layer,
                                                 computed once
    cross_mask        [B, P] bool       real prompt tokens
    index             [] int32          slot the next token fed to `decode` is written to

Heads before slots, as in the decoder-only cache (`causal.py`; T5 is MHA, so keys are slots-major
like values, `layers.keys_slots_minor`): decode attention reads each (row, head)'s cache in place,
and only the slots written so far (`layers.cached_attention`).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax.numpy as jnp
from flax import nnx

from plad_jax.models.layers import (
    ACTIVATIONS,
    Embed,
    Linear,
    RMSNorm,
    attention,
    cache_keys,
    cache_values,
    cached_attention,
    run_block,
    token_ids,
    write_slot,
)
from plad_jax.models.spec import WeightSpec


@dataclasses.dataclass(frozen=True)
class T5Config:
    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_decoder_layers: int
    num_heads: int
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"  # "relu" (v1.0), "gated-gelu" (v1.1, flan), "[gated-]ACT"
    tie_word_embeddings: bool = True  # no lm_head: project onto the shared embedding
    scale_decoder_outputs: bool = True  # multiply the decoder output by d_model**-0.5 (v1.0)
    eos_token_id: tuple = ()
    pad_token_id: int | None = 0
    decoder_start_token_id: int = 0

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        """The ACT2FN name HF uses for `feed_forward_proj` ('gated-gelu' means tanh gelu_new)."""
        if self.feed_forward_proj == "gated-gelu":
            return "gelu_new"
        return self.feed_forward_proj.split("-")[-1]

    @classmethod
    def from_hf(cls, hf: dict) -> T5Config:
        proj = hf.get("feed_forward_proj", "relu")
        parts = proj.split("-")
        if (
            len(parts) > 2
            or (len(parts) == 2 and parts[0] != "gated")
            or parts[-1] not in ACTIVATIONS
        ):
            raise ValueError(
                f"config.json: feed_forward_proj '{proj}' is not supported "
                f"(supported: ACT or gated-ACT with ACT one of {', '.join(ACTIVATIONS)})"
            )
        start = hf.get("decoder_start_token_id")
        start = hf.get("pad_token_id") if start is None else start
        if start is None:
            raise ValueError(
                "config.json: decoder_start_token_id (and pad_token_id) missing; T5 needs the "
                "decoder start token, usually 0"
            )
        tied = hf.get("tie_word_embeddings", True) is not False
        return cls(
            vocab_size=hf["vocab_size"],
            d_model=hf["d_model"],
            d_kv=hf["d_kv"],
            d_ff=hf["d_ff"],
            num_layers=hf["num_layers"],
            num_decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"],
            num_heads=hf["num_heads"],
            relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
            relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
            layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-6),
            feed_forward_proj=proj,
            tie_word_embeddings=tied,
            scale_decoder_outputs=bool(hf.get("scale_decoder_outputs", tied)),
            eos_token_id=token_ids(hf.get("eos_token_id", 1)),
            pad_token_id=hf.get("pad_token_id", 0),
            decoder_start_token_id=int(start),
        )


def reconcile_hf_config(hf: dict, has_tensor) -> dict:
    """config.json made unambiguous with the checkpoint's tensor names (called by
    `hf.from_pretrained`).

    transformers 5 writes `tie_word_embeddings: true` for every T5 and keeps v1.0 output scaling in
    `scale_decoder_outputs`; hub v1.1/flan configs say `tie_word_embeddings: false` and carry
    `lm_head.weight`. Pin the scaling first (older configs mean it by `tie_word_embeddings`), then
    untie exactly when the checkpoint has its own `lm_head.weight`, as transformers 5 does when
    loading.
    """
    hf = dict(hf)
    scaled = hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True) is not False)
    hf["scale_decoder_outputs"] = bool(scaled)
    hf["tie_word_embeddings"] = not has_tensor("lm_head.weight")
    hf["is_encoder_decoder"] = True
    return hf


# Cut students (`hf.cut_layers`): the block stacks, the HF name prefix of their blocks; each stack's
# relative-position table lives in its block 0 and is shared, so it stays whatever blocks are kept.
LAYER_STACKS = {"encoder": r"encoder\.block\.", "decoder": r"decoder\.block\."}
SHARED_IN_FIRST_BLOCK = ("relative_attention_bias",)
LAYER_ALIASES = {"layers": "encoder", "decoder_layers": "decoder"}  # the config fields' names


def layer_counts(hf: dict) -> dict:
    encoder = hf["num_layers"]
    return {"encoder": encoder, "decoder": hf.get("num_decoder_layers") or encoder}


def cut_hf_config(hf: dict, stacks: dict) -> dict:
    """config.json of a model with only the kept encoder / decoder blocks."""
    counts = layer_counts(hf)
    return dict(
        hf,
        num_layers=len(stacks.get("encoder", range(counts["encoder"]))),
        num_decoder_layers=len(stacks.get("decoder", range(counts["decoder"]))),
    )


def relative_position_bucket(relative_position, *, bidirectional, num_buckets, max_distance):
    """HF / Mesh-TF bucket of `key_position - query_position` (int array, any shape).

    Half the buckets (per direction when bidirectional) are exact small distances, the rest grow
    logarithmically up to `max_distance`; the float32 log matches torch's bucket for bucket.
    """
    buckets = 0
    if bidirectional:
        num_buckets //= 2
        buckets = (relative_position > 0).astype(jnp.int32) * num_buckets
        distance = jnp.abs(relative_position)
    else:
        distance = -jnp.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    ratio = jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact) / math.log(
        max_distance / max_exact
    )
    large = jnp.minimum(
        max_exact + (ratio * (num_buckets - max_exact)).astype(jnp.int32), num_buckets - 1
    )
    return buckets + jnp.where(distance < max_exact, distance, large)


class Attention(nnx.Module):
    """Unscaled multi-head attention; keys/values come from the caller (self, cached or encoder)."""

    def __init__(self, config: T5Config, *, rngs):
        d, inner = config.d_model, config.num_heads * config.d_kv
        self.q = Linear(d, inner, ("embed", "heads"), rngs=rngs)
        self.k = Linear(d, inner, ("embed", "heads"), rngs=rngs)
        self.v = Linear(d, inner, ("embed", "heads"), rngs=rngs)
        self.o = Linear(inner, d, ("heads", "embed"), rngs=rngs)
        self.shape = (config.num_heads, config.d_kv)

    def _split(self, y):
        return y.reshape(y.shape[0], y.shape[1], *self.shape)  # [B, T, H, Dh]

    def key_values(self, x):
        return self._split(self.k(x)), self._split(self.v(x))

    def __call__(self, x, keys, values, mask, bias=None):
        out = attention(
            self._split(self.q(x)),
            keys.astype(x.dtype),
            values.astype(x.dtype),
            mask,
            scale=1.0,
            bias=bias,
        )
        return self.o(out.reshape(x.shape[0], x.shape[1], -1))

    def cached(self, x, keys, values, length, mask, bias=None):
        """Attention over cached keys/values [B, H, S, Dh], their first `length` slots (None:
        all)."""
        out = cached_attention(
            self._split(self.q(x)), keys, values, length, mask, scale=1.0, bias=bias
        )
        return self.o(out.reshape(x.shape[0], x.shape[1], -1))


class MLP(nnx.Module):
    """wo(act(wi x)) (v1.0) or wo(act(wi_0 x) * wi_1 x) (gated, v1.1)."""

    def __init__(self, config: T5Config, *, rngs):
        d, f = config.d_model, config.d_ff
        if config.is_gated:
            self.wi_0 = Linear(d, f, ("embed", "mlp"), rngs=rngs)
            self.wi_1 = Linear(d, f, ("embed", "mlp"), rngs=rngs)
        else:
            self.wi = Linear(d, f, ("embed", "mlp"), rngs=rngs)
        self.wo = Linear(f, d, ("mlp", "embed"), rngs=rngs)
        self.gated = config.is_gated
        self.act = ACTIVATIONS[config.activation]

    def __call__(self, x):
        if self.gated:
            return self.wo(self.act(self.wi_0(x)) * self.wi_1(x))
        return self.wo(self.act(self.wi(x)))


class Block(nnx.Module):
    """Pre-norm residual block: self-attention, cross-attention (decoder only), feed-forward."""

    def __init__(self, config: T5Config, *, cross: bool, rngs):
        eps = config.layer_norm_epsilon
        self.self_attn_norm = RMSNorm(config.d_model, rngs=rngs, eps=eps)
        self.self_attn = Attention(config, rngs=rngs)
        if cross:
            self.cross_attn_norm = RMSNorm(config.d_model, rngs=rngs, eps=eps)
            self.cross_attn = Attention(config, rngs=rngs)
        self.mlp_norm = RMSNorm(config.d_model, rngs=rngs, eps=eps)
        self.mlp = MLP(config, rngs=rngs)

    def __call__(self, x, mask, bias, cache=None, cross=None):
        """x: [B, T, D]. cache: None, or (k, v, index): decode, this step's keys are written into
        the cached k, v (the cache's layout) at slot `index`. cross: None, or the encoder's (keys,
        values, mask), [B, P, H, Dh] (or in the cache's layout when decoding). Returns (x, (keys,
        values))."""
        h = self.self_attn_norm(x)
        keys, values = self.self_attn.key_values(h)
        if cache is None:
            x = x + self.self_attn(h, keys, values, mask, bias)
        else:
            k_cache, v_cache, index = cache
            keys, values = write_slot(
                k_cache, v_cache, keys, values, index, slots_minor=False
            )  # MHA
            x = x + self.self_attn.cached(h, keys, values, index + x.shape[1], mask, bias)
        if cross is not None:
            cross_k, cross_v, cross_mask = cross
            attend = (
                self.cross_attn
                if cache is None
                else functools.partial(self.cross_attn.cached, length=None)
            )
            x = x + attend(self.cross_attn_norm(x), cross_k, cross_v, mask=cross_mask)
        return x + self.mlp(self.mlp_norm(x)), (keys, values)

    def teacher_forced(self, x, encoded, mask, bias, cross_mask):
        """A decoder block over a whole response, its cross-attention keys made from `encoded`
        here (so a rematerialised block recomputes them too); returns x."""
        cross_k, cross_v = self.cross_attn.key_values(encoded)
        return self(x, mask, bias, cross=(cross_k, cross_v, cross_mask))[0]


class Stack(nnx.Module):
    """Encoder (bidirectional) or decoder (causal, with cross-attention) stack and its bias
    table."""

    def __init__(self, config: T5Config, num_layers: int, *, decoder: bool, rngs):
        self.relative_attention_bias = Embed(
            config.relative_attention_num_buckets,
            config.num_heads,
            rngs=rngs,
            axes=("relpos", "relpos_heads"),
        )
        self.block = nnx.List([Block(config, cross=decoder, rngs=rngs) for _ in range(num_layers)])
        self.final_layer_norm = RMSNorm(config.d_model, rngs=rngs, eps=config.layer_norm_epsilon)
        self.bidirectional = not decoder
        self.buckets = (
            config.relative_attention_num_buckets,
            config.relative_attention_max_distance,
        )

    def position_bias(self, relative_position, dtype):
        """[1, H, Tq, Tk] additive bias for relative positions [Tq, Tk] (key minus query)."""
        num_buckets, max_distance = self.buckets
        buckets = relative_position_bucket(
            relative_position,
            bidirectional=self.bidirectional,
            num_buckets=num_buckets,
            max_distance=max_distance,
        )
        values = jnp.take(
            self.relative_attention_bias.embedding[...], buckets, axis=0
        )  # [Tq, Tk, H]
        return jnp.transpose(values, (2, 0, 1))[None].astype(dtype)


class T5Model(nnx.Module):
    """Encoder-decoder LM. `score` for training/scoring; `prefill` + `decode` for the sampler."""

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        self.config = config
        self.shared = Embed(config.vocab_size, config.d_model, rngs=rngs)
        self.encoder = Stack(config, config.num_layers, decoder=False, rngs=rngs)
        self.decoder = Stack(config, config.num_decoder_layers, decoder=True, rngs=rngs)
        if not config.tie_word_embeddings:
            self.lm_head = Linear(config.d_model, config.vocab_size, ("embed", "vocab"), rngs=rngs)

    def output_logits(self, h):
        """fp32 logits from final decoder states (after the final layer norm)."""
        if self.config.scale_decoder_outputs:
            h = h * (self.config.d_model**-0.5)
        if self.config.tie_word_embeddings:
            return self.shared.attend(h)
        return self.lm_head.logits(h)

    def encode(self, prompt_ids, prompt_mask, dtype=jnp.float32, remat="none"):
        """Final encoder states [B, P, D]; padded prompt keys are masked."""
        p = prompt_ids.shape[1]
        x = self.shared(prompt_ids, dtype)
        bias = self.encoder.position_bias(jnp.arange(p)[None, :] - jnp.arange(p)[:, None], dtype)
        mask = prompt_mask.astype(bool)[:, None, None, :]  # [B, 1, 1, P]
        for block in self.encoder.block:
            x, _ = run_block(block, remat, x, mask, bias)
        return self.encoder.final_layer_norm(x)

    def score_hidden(
        self, prompt_ids, prompt_mask, response_ids, response_mask, dtype=jnp.float32, remat="none"
    ):
        """(predictors, response hidden states), each [B, R, D]: `output_logits(predictors)` are
        `score`'s logits. remat: a `layers.REMAT_POLICIES` name, per encoder and decoder block."""
        encoded = self.encode(prompt_ids, prompt_mask, dtype, remat)
        b, r = response_ids.shape
        start = jnp.full((b, 1), self.config.decoder_start_token_id, response_ids.dtype)
        dec_ids = jnp.concatenate([start, response_ids], axis=1)  # [B, R + 1]
        dec_mask = jnp.concatenate([jnp.ones((b, 1), bool), response_mask.astype(bool)], axis=1)
        causal = jnp.tril(jnp.ones((r + 1, r + 1), bool))
        mask = causal[None, None] & dec_mask[:, None, None, :]  # [B, 1, R + 1, R + 1]
        positions = jnp.arange(r + 1)
        bias = self.decoder.position_bias(positions[None, :] - positions[:, None], dtype)
        cross_mask = prompt_mask.astype(bool)[:, None, None, :]
        x = self.shared(dec_ids, dtype)
        for block in self.decoder.block:
            x = run_block(block, remat, x, encoded, mask, bias, cross_mask, method="teacher_forced")
        hidden = self.decoder.final_layer_norm(x)
        return hidden[:, :-1], hidden[:, 1:]

    def score(
        self, prompt_ids, prompt_mask, response_ids, response_mask, dtype=jnp.float32, remat="none"
    ):
        """Logits [B, R, V] (fp32) for each response token, and response hidden states [B, R, D].

        Row b, column t holds the next-token logits for response_ids[b, t] given the prompt and
        response_ids[b, :t]; hidden[b, t] is the final decoder state (after the final layer norm)
        at the decoder position whose input is response_ids[b, t].
        """
        predictors, response_hidden = self.score_hidden(
            prompt_ids, prompt_mask, response_ids, response_mask, dtype, remat
        )
        return self.output_logits(predictors), response_hidden

    def prefill(self, prompt_ids, prompt_mask, max_new_tokens, dtype=jnp.float32):
        """Encode the prompt, feed the start token; next-token logits [B, V] and the cache.

        The cache holds the encoder keys/values of every decoder layer and room for the start token
        plus `max_new_tokens` decoder inputs.
        """
        encoded = self.encode(prompt_ids, prompt_mask, dtype)
        cross = [block.cross_attn.key_values(encoded) for block in self.decoder.block]
        b, c = prompt_ids.shape[0], self.config
        shape = (b, c.num_heads, 1 + max_new_tokens, c.d_kv)  # per layer: a tuple, updated in place
        cache = {
            "k": tuple(jnp.zeros(shape, dtype) for _ in cross),
            "v": tuple(jnp.zeros(shape, dtype) for _ in cross),
            "cross_k": tuple(cache_keys(k, slots_minor=False) for k, _ in cross),
            "cross_v": tuple(cache_values(v) for _, v in cross),
            "cross_mask": prompt_mask.astype(bool),
            "index": jnp.asarray(0, jnp.int32),
        }
        return self.decode(jnp.full((b,), c.decoder_start_token_id, jnp.int32), cache, dtype)

    def decode(self, tokens, cache, dtype=jnp.float32):
        """Feed one token per row ([B]); return its next-token logits [B, V] and the new cache."""
        index = cache["index"]
        slots = jnp.arange(cache["v"][0].shape[2])
        mask = (slots <= index)[None, None, None, :]  # [1, 1, 1, S]: written slots only
        bias = self.decoder.position_bias((slots - index)[None, :], dtype)  # [1, H, 1, S]
        cross_mask = cache["cross_mask"][:, None, None, :]
        x = self.shared(tokens[:, None], dtype)
        new_k, new_v = [], []
        for i, block in enumerate(self.decoder.block):
            x, (k, v) = block(
                x,
                mask,
                bias,
                cache=(cache["k"][i], cache["v"][i], index),
                cross=(cache["cross_k"][i], cache["cross_v"][i], cross_mask),
            )
            new_k.append(k)
            new_v.append(v)
        logits = self.output_logits(self.decoder.final_layer_norm(x)[:, 0])
        cache = dict(cache, k=tuple(new_k), v=tuple(new_v), index=index + 1)
        return logits, cache


def weight_specs(config: T5Config) -> list[WeightSpec]:
    """HF tensor name -> our parameter path; linear kernels are stored transposed.

    `encoder.embed_tokens.weight` / `decoder.embed_tokens.weight` are aliases of `shared.weight` in
    HF: not read, not written (transformers 5 ties them on load).
    """
    specs = [WeightSpec("shared.weight", ("shared", "embedding"))]
    if not config.tie_word_embeddings:
        specs.append(WeightSpec("lm_head.weight", ("lm_head", "kernel"), transpose=True))
    mlp = ("wi_0", "wi_1", "wo") if config.is_gated else ("wi", "wo")
    for stack, layers in (("encoder", config.num_layers), ("decoder", config.num_decoder_layers)):
        specs += [
            WeightSpec(f"{stack}.final_layer_norm.weight", (stack, "final_layer_norm", "scale")),
            WeightSpec(
                f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                (stack, "relative_attention_bias", "embedding"),
            ),
        ]
        for i in range(layers):
            hf, ours = f"{stack}.block.{i}.layer", (stack, "block", i)
            sublayers = [("SelfAttention", "self_attn")]
            if stack == "decoder":
                sublayers.append(("EncDecAttention", "cross_attn"))
            for n, (hf_name, name) in enumerate(sublayers):
                specs.append(
                    WeightSpec(f"{hf}.{n}.layer_norm.weight", ours + (f"{name}_norm", "scale"))
                )
                specs += [
                    WeightSpec(
                        f"{hf}.{n}.{hf_name}.{p}.weight", ours + (name, p, "kernel"), transpose=True
                    )
                    for p in ("q", "k", "v", "o")
                ]
            n = len(sublayers)
            specs.append(WeightSpec(f"{hf}.{n}.layer_norm.weight", ours + ("mlp_norm", "scale")))
            specs += [
                WeightSpec(
                    f"{hf}.{n}.DenseReluDense.{p}.weight",
                    ours + ("mlp", p, "kernel"),
                    transpose=True,
                )
                for p in mlp
            ]
    return specs
