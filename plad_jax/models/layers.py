"""Building blocks shared by the model families: parameters with logical axes, norms, attention.

Every parameter is an `nnx.Param` whose `axes` metadata names its logical axes (`embed`, `mlp`,
`heads`, `kv`, `vocab`, `norm`, ...). `plad_jax.sharding` maps those names to mesh axes; a model
never sees the mesh.

Kernels are stored `[in, out]` (HF linear weights are `[out, in]`), with attention projections kept
two-dimensional (`[embed, heads * head_dim]`) so HF import is a transpose and nothing else, and a
tensor-parallel split of the flattened heads axis falls on head boundaries whenever the tensor axis
divides the number of heads.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from plad_jax import backend
from plad_jax.sharding import ACTIVATION_RULES, logical_to_spec

NEG_INF = -0.7 * float(jnp.finfo(jnp.float32).max)

# HF activation names (ACT2FN) -> jax. gelu_new / gelu_pytorch_tanh are the tanh approximation.
ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": jax.nn.gelu,
    "gelu_pytorch_tanh": jax.nn.gelu,
}


# Activation checkpointing of each decoder (and encoder) block in the backward pass (`run_block`):
# "none" keeps every activation a block makes until the backward pass (fastest, most memory);
# "full" keeps only each block's input and recomputes the block's forward from it (least memory);
# "dots" also keeps the outputs of products without batch dimensions (the weight projections) and
# recomputes the rest: attention scores, softmax, norms, activations.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def run_block(block, remat: str, *args, method: str = "__call__"):
    """`block.<method>(*args)`, its activations kept or recomputed as `REMAT_POLICIES[remat]` says.

    Outside a gradient the result is the same program either way; under one, a rematerialised
    block holds only what its policy saves between the forward and the backward pass, so memory
    no longer grows with every activation of every layer (attention scores are [B, H, T, T]).
    The block runs as a pure function of its state (`nnx.split`; blocks change no state).
    """
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat must be one of {', '.join(REMAT_POLICIES)}, got {remat!r}")
    if remat == "none":
        return getattr(block, method)(*args)
    graphdef, state = nnx.split(block)
    pure = lambda state, *a: getattr(nnx.merge(graphdef, state), method)(*a)
    return _ordered_remat(pure, REMAT_POLICIES[remat])(state, *args)


def _ordered_remat(fn, policy):
    """`jax.checkpoint(fn, policy=policy)` whose recomputation waits for the output's cotangent.

    Plain `jax.checkpoint` leaves the recomputed forward depending on the saved residuals only,
    and XLA:CPU schedules it as soon as they exist: every block's recomputation runs early and all
    layers' activations are live together, as without remat. Here the backward pass makes the
    residuals depend on the cotangent first (`after`), so a block is recomputed only when its
    backward is due and one block's activations are live at a time.
    """
    checkpointed = jax.checkpoint(fn, policy=policy)

    @jax.custom_vjp
    def run(*args):
        return checkpointed(*args)

    def forward(*args):
        return jax.vjp(checkpointed, *args)

    def backward(vjp, cotangent):
        return after(vjp, cotangent)(cotangent)

    run.defvjp(forward, backward)
    return run


def after(tree, dependency):
    """`tree` made to depend on `dependency`: every leaf, floats, integers and PRNG keys alike.

    XLA:CPU drops `optimization_barrier`s before scheduling, and does not fold `x * 0.0` or
    `x != x` for floats (neither is exact for inf / NaN), so these are data dependencies that
    order work after `dependency`: a float leaf gets `0 * g` added (g the first element of the
    first float leaf of `dependency`), an integer or boolean leaf, or a key's data, `g != g` (0
    unless g is NaN). Costs one scalar and an add fused into each leaf's consumer. Values are
    unchanged while g is finite; a non-finite g makes float leaves NaN (and may change integers).

    Used twice. `_ordered_remat` ties a block's residuals to its cotangent, so the block is
    recomputed only when its backward is due. `LoRALinear` ties its dropout key to its input, so
    a projection's dropout mask is drawn when the projection runs: a key depends on nothing the
    layers compute, and XLA:CPU otherwise draws every layer's masks ([B, T, features] of u32
    random bits per projection) at the start of the forward pass (and again at the start of the
    backward pass for remat), all live at once: at the bench shape (SmolLM2-135M, batch 4 x 576,
    LoRA dropout 0.1) `remat=full` kept 137 MB of temporaries per layer, 5.7 MB with keys tied.
    """
    floats = [g for g in jax.tree.leaves(dependency) if jnp.issubdtype(g.dtype, jnp.inexact)]
    if not floats:
        return tree
    first = floats[0].ravel()[0]
    return jax.tree.map(lambda x: _tie(x, 0.0 * first, first != first), tree)


def _tie(x, zero, nan):
    """x + zero (floats), x + nan (integers, key data), x ^ nan (booleans); see `after`."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        data = _tie(jax.random.key_data(x), zero, nan)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return x + zero.astype(x.dtype)
    if x.dtype == jnp.bool_:
        return x ^ nan
    if jnp.issubdtype(x.dtype, jnp.integer):
        return x + nan.astype(x.dtype)
    return x


def token_ids(x) -> tuple[int, ...]:
    """A config.json token id field (None, an int or a list) as a tuple of ints."""
    if x is None:
        return ()
    return tuple(int(i) for i in x) if isinstance(x, (list, tuple)) else (int(x),)


def param(rngs: nnx.Rngs, shape, axes, init="normal", std=0.02) -> nnx.Param:
    """A parameter of `shape` with logical `axes`; `init` is 'normal', 'ones' or 'zeros'."""
    if init == "ones":
        value = jnp.ones(shape, jnp.float32)
    elif init == "zeros":
        value = jnp.zeros(shape, jnp.float32)
    else:
        value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
    return nnx.Param(value, axes=tuple(axes))


def constrain(x, axes):
    """Pin an activation's layout by logical axis names when a mesh is active, else return x.

    `LanguageModel` activates its mesh (as an abstract mesh) around every model call, so models
    name axes and never see the mesh. `axes` has one name (or None) per dimension of x.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(
        x, logical_to_spec(axes, x.shape, mesh, ACTIVATION_RULES)
    )


def activation_axes(x, feature_axis=None):
    """(batch, None..., feature_axis): the layout of a [B, ..., F] activation."""
    return ("batch",) + (None,) * (x.ndim - 2) + (feature_axis,)


class Linear(nnx.Module):
    """y = x @ kernel (+ bias); kernel `[in, out]` with logical axes `axes`."""

    def __init__(self, d_in, d_out, axes, *, rngs, bias=False):
        self.kernel = param(rngs, (d_in, d_out), axes)
        self.bias = param(rngs, (d_out,), axes[1:], init="zeros") if bias else None
        self.out_axis = axes[1]

    def __call__(self, x):
        axes = activation_axes(x, self.out_axis)
        y = constrain(x @ self.kernel[...].astype(x.dtype), axes)
        if self.bias is not None:
            y = constrain(y + self.bias[...].astype(x.dtype), axes)
        return y

    def logits(self, x):
        """fp32 output-layer logits x @ kernel (an untied lm_head)."""
        y = jnp.einsum(
            "...d,dv->...v", x, self.kernel[...].astype(x.dtype), preferred_element_type=jnp.float32
        )
        return constrain(y, activation_axes(y, "vocab"))


class Embed(nnx.Module):
    """Token (or position) embedding table `[num, features]`, rows on logical axis `vocab`."""

    def __init__(self, num, features, *, rngs, axes=("vocab", "embed"), std=0.02):
        self.embedding = param(rngs, (num, features), axes, std=std)

    def __call__(self, ids, dtype):
        out = jnp.take(self.embedding[...], ids, axis=0).astype(dtype)
        return constrain(out, activation_axes(out))

    def attend(self, x):
        """Project hidden states onto the table (tied output layer), fp32 logits.

        The table is first laid out like an lm_head (rows over `tensor`, features whole): with its
        rows on fsdp, the product would put the vocabulary on the axis the batch already uses.
        """
        table = constrain(self.embedding[...].astype(x.dtype), ("vocab", None))
        y = jnp.einsum("...d,vd->...v", x, table, preferred_element_type=jnp.float32)
        return constrain(y, activation_axes(y, "vocab"))


class RMSNorm(nnx.Module):
    """x / rms(x) * scale, computed in fp32 (LLaMA, T5 layer norm without mean or bias)."""

    def __init__(self, features, *, rngs, eps=1e-6):
        self.scale = param(rngs, (features,), ("norm",), init="ones")
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...]).astype(x.dtype)


class LayerNorm(nnx.Module):
    """Standard LayerNorm with scale and bias, in fp32 (GPT-Neo)."""

    def __init__(self, features, *, rngs, eps=1e-5):
        self.scale = param(rngs, (features,), ("norm",), init="ones")
        self.bias = param(rngs, (features,), ("norm",), init="zeros")
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...] + self.bias[...]).astype(x.dtype)


def attention(q, k, v, mask, *, scale, bias=None):
    """Softmax attention with grouped key/value heads, scores and softmax in fp32.

    q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, kv_heads, head_dim] with
    heads % kv_heads == 0 (MHA, GQA and MQA alike); mask: bool, broadcastable to
    [batch, heads, q_len, kv_len], True = may attend; bias: optional additive, broadcastable to the
    same shape. A query with no visible key (a padding row) gets a finite uniform average, never
    NaN. Returns [batch, q_len, heads, head_dim].
    """
    b, t, h, d = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, h // kv_heads, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    scores = scores.reshape(b, h, t, k.shape[1])
    if bias is not None:
        scores = scores + bias.astype(jnp.float32)
    scores = jnp.where(mask, scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    probs = probs.reshape(b, kv_heads, h // kv_heads, t, k.shape[1])
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, d)


CACHE_BLOCK = 64  # decode attention reads a cache prefix of whole blocks of this many slots


def cached_attention(q, keys, values, length, mask, *, scale, bias=None, block=None):
    """`attention` of new tokens against a KV cache, values laid out `[batch, kv_heads, slots,
    head_dim]` and keys as `cache_keys` lays them out, reading only a prefix that covers the first
    `length` slots.

    q: [batch, q_len, heads, head_dim]; length: traced int32 scalar, every slot at or past it is
    invisible (its `mask` is False), so leaving it out changes nothing (None: read every slot,
    e.g. cross-attention over an encoder's cached keys); mask / bias: broadcastable to
    [batch, heads, q_len, slots] as in `attention`. Returns [batch, q_len, heads, head_dim].

    The prefix is `length` rounded up to whole `block`s (default `CACHE_BLOCK`) while that is at
    most half the cache, else the whole cache: `lax.switch` picks among branches of static shapes,
    so early decode steps of a long generation do not pay for the empty slots, and only the
    attention (not the layer around it) is compiled once per branch. Past half the cache the whole
    buffer is read: XLA:CPU copies a sliced operand before the product, and for a long prefix that
    copy costs more than reading the empty tail (LLaMA bench, batch 16, 512 new tokens: 19.5 ms per
    token with prefixes up to half the cache, 20.1 with prefixes all the way, 21.7 with none).
    The switch is a per-backend choice (`backend.BackendChoices.cache_prefix_switch`): without
    it every step reads the whole cache.
    """
    minor = keys_slots_minor(q.shape[2], keys.shape[1])
    slots, block = keys.shape[3 if minor else 2], block or CACHE_BLOCK
    if length is None or not backend.choices().cache_prefix_switch:
        return attend_heads_major(q, keys, values, mask, bias, scale)
    ends = sorted({block * (i + 1) for i in range(slots // 2 // block)} | {slots})
    cut = lambda x, n: x if x is None or x.shape[-1] == 1 else x[..., :n]
    branches = [
        lambda q, k, v, m, b, n=n: attend_heads_major(
            q, k[..., :n] if minor else k[:, :, :n], v[:, :, :n], cut(m, n), cut(b, n), scale
        )
        for n in ends
    ]
    if len(branches) == 1:
        return branches[0](q, keys, values, mask, bias)
    which = jnp.clip((jnp.asarray(length, jnp.int32) - 1) // block, 0, len(branches) - 1)
    return jax.lax.switch(which, branches, q, keys, values, mask, bias)


def attend_heads_major(q, k, v, mask, bias, scale):
    """`attention` over a cache (keys as `cache_keys`, values [batch, kv_heads, slots, head_dim]):
    both products are batched over (batch, kv_heads), a group's query heads and positions folded
    into one axis, with the cache read in place (no transpose of it)."""
    b, t, h, d = q.shape
    kv_heads = k.shape[1]
    g, s = h // kv_heads, v.shape[2]
    q = jnp.transpose(q.reshape(b, t, kv_heads, g, d), (0, 2, 3, 1, 4)).reshape(
        b, kv_heads, g * t, d
    )
    product = "bkqd,bkds->bkqs" if keys_slots_minor(h, kv_heads) else "bkqd,bksd->bkqs"
    scores = jnp.einsum(product, q, k.astype(q.dtype), preferred_element_type=jnp.float32) * scale
    scores = scores.reshape(b, h, t, s)
    if bias is not None:
        scores = scores + bias.astype(jnp.float32)
    scores = jnp.where(mask, scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype).reshape(b, kv_heads, g * t, s)
    out = jnp.einsum("bkqs,bksd->bkqd", probs, v.astype(q.dtype))
    return jnp.transpose(out.reshape(b, kv_heads, g, t, d), (0, 3, 1, 2, 4)).reshape(b, t, h, d)


def keys_slots_minor(heads: int, kv_heads: int, minor: bool | None = None) -> bool:
    """The cache's key layout: `[B, KV, Dh, S]` (slots minor) when several query heads share a key
    head (GQA, MQA), else `[B, KV, S, Dh]` like the values (MHA).

    A decode step's scores are (the group's query rows) x (keys). With two or more query rows per
    key head the product streams the cache best with the slots minor; with one it is a
    matrix-vector product that reads rows of keys best. Measured on XLA:CPU, batch 16, the attention
    alone in a jitted loop of 12 layers: LLaMA bench shapes (GQA 8/4), 256 slots, 7.3 ms (slots
    minor) vs 9.2 ms per step; T5 bench shapes (MHA), 129 slots, 4.6 ms (slots major) vs 5.6. End to
    end (`python -m bench.sampler`): the LLaMA's 512-token decode 28.7 -> 21.7 ms per token. t5x and
    MaxText likewise make the cache layout a choice. For GQA/MQA the layout is a per-backend choice
    (`backend.BackendChoices.gqa_keys_slots_minor`, slots minor on CPU), or `minor` when given.
    """
    if heads <= kv_heads:
        return False
    return backend.choices().gqa_keys_slots_minor if minor is None else minor


def cache_keys(k, slots_minor: bool):
    """Keys [B, T, KV, Dh] in the cache's layout (`keys_slots_minor`): [B, KV, Dh, T] or [B, KV, T,
    Dh]."""
    return jnp.transpose(k, (0, 2, 3, 1)) if slots_minor else jnp.swapaxes(k, 1, 2)


def cache_values(v):
    """Values [B, T, KV, Dh] in the cache's layout, [B, KV, T, Dh]."""
    return jnp.swapaxes(v, 1, 2)


def write_slot(keys, values, k, v, index, slots_minor: bool):
    """The cache's `keys` (layout per `slots_minor`) and `values` [B, KV, S, Dh] with the new
    tokens' k, v ([B, T, KV, Dh]) written into slots index .. index + T - 1."""
    keys = jax.lax.dynamic_update_slice_in_dim(
        keys, cache_keys(k, slots_minor).astype(keys.dtype), index, 3 if slots_minor else 2
    )
    values = jax.lax.dynamic_update_slice_in_dim(
        values, cache_values(v).astype(values.dtype), index, 2
    )
    return keys, values


def positions_from_mask(mask):
    """Position of each token counting only real tokens: cumsum(mask) - 1, clipped at 0. [B, T]."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


def last_real_index(mask):
    """Index of the last real token of each row (0 for an empty row). [B]."""
    idx = jnp.arange(mask.shape[-1], dtype=jnp.int32)
    return jnp.max(jnp.where(mask.astype(bool), idx, 0), axis=-1)
