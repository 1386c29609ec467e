"""Plumbing shared by the decoder-only families (LLaMA-class, GPT-Neo).

Scoring runs prompt and response as one sequence, `[prompt (right-padded) | response
(right-padded)]`, so padding can sit in the middle. Positions count real tokens only
(`cumsum(mask) - 1`) and padded keys are masked, so padding never changes a real position.

The KV cache is a dict with one layout for every decoder-only family:

    k         L-tuples of [B, KV, S, Dh]  S = prompt length + max_new_tokens; slot j holds input
              column j;
              [B, KV, Dh, S] (slots minor) when query heads share key heads (GQA, MQA) and the
              backend chooses it (CPU), see `layers.keys_slots_minor`
    v         L-tuples of [B, KV, S, Dh]
              (one array per layer, not one stacked array: inside the sampler's decode loop each
              layer's buffer is then updated in place; stacking copied the whole cache every step;
              heads before slots: both products of a decode step read each (row, head)'s cache in
              place, with no transpose of it per step, and while the written slots fit in half the
              cache only a prefix of whole blocks covering them, see `layers.cached_attention`)
    key_mask  [B, S] bool        the slot holds a real token
    key_pos   [B, S] int32       the slot's position (what windows and position embeddings see)
    next_pos  [B] int32          position of the next token fed to `decode`
    index     [] int32           slot the next token fed to `decode` is written to
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from plad_jax.models.layers import (
    cache_keys,
    cache_values,
    cached_attention,
    last_real_index,
    positions_from_mask,
    write_slot,
)


def visible_keys(q_pos, k_pos, k_mask, window=None):
    """[B, 1, T, S] bool: real keys, not in the query's future, less than `window` positions back.

    q_pos: [B, T]; k_pos, k_mask: [B, S]. Windows are measured in positions, not columns, so a key
    is visible iff 0 <= q_pos - k_pos < window (HF's sliding-window masks on unpadded input).
    """
    delta = q_pos[:, :, None] - k_pos[:, None, :]
    ok = (delta >= 0) & k_mask[:, None, :].astype(bool)
    if window is not None:
        ok &= delta < window
    return ok[:, None]


def causal_visible(positions, mask, window=None):
    """`visible_keys` of a sequence against itself, also causal in columns. [B, 1, T, T]."""
    t = positions.shape[1]
    return visible_keys(positions, positions, mask, window) & jnp.tril(jnp.ones((t, t), bool))


def join_prompt_response(prompt_ids, prompt_mask, response_ids, response_mask):
    """(ids, mask, positions), each [B, P + R]: the one sequence a decoder-only model scores."""
    ids = jnp.concatenate([prompt_ids, response_ids], axis=1)
    mask = jnp.concatenate([prompt_mask, response_mask], axis=1)
    return ids, mask, positions_from_mask(mask)


def split_response(hidden, prompt_mask, response_len):
    """From hidden states [B, P + R, D] of the joined sequence: (predictors, response_hidden).

    predictors[b, t] is the state whose logits predict response token t: the last real prompt
    token for t = 0, else response token t - 1. response_hidden[b, t] is the state at token t.
    """
    p = prompt_mask.shape[1]
    t = jnp.arange(response_len)[None, :]
    source = jnp.where(t == 0, last_real_index(prompt_mask)[:, None], p + t - 1)  # [B, R]
    return jnp.take_along_axis(hidden, source[..., None], axis=1), hidden[:, p:]


def last_prompt_state(hidden, prompt_mask):
    """[B, D]: the state at each row's last real prompt token (it predicts the first new token)."""
    return jnp.take_along_axis(hidden, last_real_index(prompt_mask)[:, None, None], axis=1)[:, 0]


def init_cache(kvs, prompt_mask, positions, max_new_tokens, keys_slots_minor: bool):
    """The cache after the prompt. kvs: per layer (k, v), each [B, P, KV, Dh]; keys_slots_minor:
    the key layout (`layers.keys_slots_minor` of the model's heads)."""
    room = lambda x, axis: jnp.pad(
        x, [(0, max_new_tokens if a == axis else 0) for a in range(x.ndim)]
    )
    return {
        "k": tuple(
            room(cache_keys(k, keys_slots_minor), 3 if keys_slots_minor else 2) for k, _ in kvs
        ),
        "v": tuple(room(cache_values(v), 2) for _, v in kvs),  # [B, KV, P + max_new_tokens, Dh]
        "key_mask": jnp.pad(prompt_mask.astype(bool), ((0, 0), (0, max_new_tokens))),
        "key_pos": jnp.pad(positions, ((0, 0), (0, max_new_tokens))),
        "next_pos": jnp.sum(prompt_mask.astype(jnp.int32), axis=1),
        "index": jnp.asarray(prompt_mask.shape[1], jnp.int32),
    }


@dataclasses.dataclass(frozen=True)
class CacheStep:
    """One `decode` step's view of the cache: the new token's position and the updated key masks."""

    positions: jax.Array  # [B, 1]
    key_mask: jax.Array  # [B, S], the new slot marked real
    key_pos: jax.Array  # [B, S], the new slot holding `positions`
    index: jax.Array  # [], the new slot

    @classmethod
    def open(cls, cache) -> CacheStep:
        positions = cache["next_pos"][:, None]
        index = cache["index"]
        key_mask = jax.lax.dynamic_update_slice_in_dim(
            cache["key_mask"], jnp.ones_like(positions, dtype=bool), index, 1
        )
        key_pos = jax.lax.dynamic_update_slice_in_dim(cache["key_pos"], positions, index, 1)
        return cls(positions, key_mask, key_pos, index)

    def layer(self, cache, i):
        """Layer i's cache: its k, v (the cache's layouts) and this step's key masks and slot."""
        return {
            "k": cache["k"][i],
            "v": cache["v"][i],
            "index": self.index,
            "key_mask": self.key_mask,
            "key_pos": self.key_pos,
        }

    def close(self, cache, kvs):
        """The cache after the step, from every layer's (keys, values) returned by `write_kv`."""
        return {
            "k": tuple(k for k, _ in kvs),
            "v": tuple(v for _, v in kvs),
            "key_mask": self.key_mask,
            "key_pos": self.key_pos,
            "next_pos": cache["next_pos"] + 1,
            "index": self.index + 1,
        }


def write_kv(layer_cache, k, v, keys_slots_minor: bool):
    """Write the new token's k, v ([B, 1, KV, Dh]) into the layer's slot; (keys, values) in the
    cache's layout."""
    return write_slot(
        layer_cache["k"], layer_cache["v"], k, v, layer_cache["index"], keys_slots_minor
    )


def attend_cache(q, layer_cache, keys, values, visible, *, scale):
    """The new token's attention over the slots written so far (the new one included)."""
    return cached_attention(q, keys, values, layer_cache["index"] + 1, visible, scale=scale)
