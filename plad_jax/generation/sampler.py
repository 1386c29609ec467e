"""KV-cached, jit-compiled sampling for every model family, sharded over the mesh.

The sampler sees a model only through two pure functions of its params (t5x `decoding.py` style):

    prefill(params, prompt_ids [B, P], prompt_mask [B, P], max_new_tokens) -> (logits [B, V], cache)
    decode(params, tokens [B], cache) -> (logits [B, V], cache)

`LanguageModel` provides both for every family; the cache is an opaque pytree to the sampler.

Semantics of `generate` (the contract of DESIGN.md section 3):

- Prompts are `[B, P]` int arrays with a mask (1 = real token), right-padded as everywhere in
  plad_jax (left padding works too: models place tokens by the mask). Every row needs a real token.
- Each prompt row is repeated `num_samples` times; output rows `b * num_samples + s` belong to
  prompt `b`. Output `tokens` is `[B * num_samples, max_new_tokens]`: the new tokens only, the
  first EOS kept, then `pad_token_id`; `mask` is 1 up to and including the first EOS; `logprobs`
  holds each sampled token's log-probability under the sampling distribution, 0 under padding.
- One sampling step turns fp32 logits into a token in this order: divide by `temperature` ->
  keep the `top_k` largest (0 = all) -> keep the nucleus, the smallest prefix of the remaining
  tokens sorted by probability whose mass reaches `top_p` (the most likely token always stays) ->
  renormalise and draw. `logprobs` is `log_softmax` of that filtered, tempered distribution, so
  with no filtering it is `log_softmax(logits / temperature)[token]`.
- `temperature=0` is greedy decoding (`argmax`, first index on ties); `top_k`/`top_p` are then
  ignored and `logprobs` is the model's own `log_softmax(logits)[token]` (temperature 1).
- Randomness is a pure function of `(seed, stream, step)`: a row's key at step `t` is
  `fold_in(fold_in(key(seed), stream), t)`, where the stream of sample `s` of prompt `b` is
  `sample_ids[b] * num_samples + s` (`sample_ids` defaults to the row index `b`). So a row's
  samples do not depend on the padding added to the batch or the prompt, nor on the mesh; with
  stable `sample_ids` not on the batching or the number of hosts either. Same seed, same
  inputs, same model: same output.
- Decoding stops when every row has produced an EOS (any of `lm.eos_token_ids`) or completed a
  stop string (`stop_strings`; its last token kept like an EOS, then `pad_token_id`), or after
  `max_new_tokens` tokens. Stop strings are matched on token ids inside the loop (`stop_hit`);
  `generate_many` then cuts each response to the whole tokens before the string (`cut_at_stop`).

Compilation: prefill (with the first draw) and the decode loop (`lax.while_loop`, loop state a
`DecodeState`, cache donated and updated in place) are two jitted functions. Their shapes are
bucketed so a long job compiles a handful of programs: the prompt length is padded to
`prompt_bucket` (powers of two up to 128, then multiples of 128), the batch to a multiple of the
mesh's batch shards (and to `pad_batch_to` when given); padded rows are dropped from the output.
`max_new_tokens` and the sampling settings are part of the compiled program. (The families'
caches keep values `[B, heads, slots, head_dim]` and keys the same or, for GQA on CPU, `[B,
heads, head_dim, slots]` (`plad_jax.backend`), and a decode step attends over a prefix of whole
blocks that covers the slots written so far while that is at most half the cache: see
`models.layers.cached_attention`.)

Sharding: with `lm.mesh` set, rows are split over the `data` and `fsdp` mesh axes, params stay as
the model's logical rules placed them, and every cache leaf is constrained to have its batch axis
over (`data`, `fsdp`) and, for key/value leaves laid out `[..., seq, heads, head_dim]`,
`[..., heads, seq, head_dim]` or `[..., heads, head_dim, seq]`, its heads axis over `tensor` when
that divides. The sampler finds a leaf's batch and sequence axes by tracing the model's prefill at
two batch sizes and two lengths (shapes only, once per compiled program), so any family's cache
layout works (tuples of per-layer arrays included). On several hosts each process passes its own
prompt rows (a multiple of the batch shards its devices hold, after padding), they become one global
batch (`jax.make_array_from_process_local_data`), each process gets its own rows back, and the hosts
agree on the padded shapes first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from plad_jax import backend
from plad_jax import sharding as shd
from plad_jax.data.batching import bucket_length

logger = logging.getLogger(__name__)

MIN_PROMPT_BUCKET = 16
POW2_PROMPT_BUCKET_UP_TO = 128


class Generation(NamedTuple):
    """Output of `generate`, host NumPy arrays with `B * num_samples` rows grouped by prompt."""

    tokens: np.ndarray  # [rows, max_new_tokens] int32: new tokens, first EOS / stop end, then pad
    mask: np.ndarray  # [rows, max_new_tokens] int32: 1 up to and including the first EOS / stop end
    logprobs: (
        np.ndarray
    )  # [rows, max_new_tokens] float32: log p(token) under the sampling distribution


@dataclasses.dataclass(frozen=True)
class StopLayout:
    """The static shape of a stop-string table: `count` strings, matched over the `window` newest
    tokens; `positions` / `end_lens` columns per string (transformers' `StopStringCriteria`)."""

    count: int
    window: int
    positions: int
    end_lens: int


class StopTable(NamedTuple):
    """The device side of stop strings: one row per token id (the last row for ids past the
    tokenizer's: no match), `[ids + 1, count * (positions + end_lens) + 1]` int32, and each
    string's length `[count]` (characters, or bytes for byte-level vocabularies)."""

    table: Any
    lengths: Any


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Everything about a sampling run that is part of the compiled program."""

    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop: StopLayout | None = None  # the stop-string table's shape (None: no stop strings)

    def __post_init__(self):
        if not (isinstance(self.max_new_tokens, (int, np.integer)) and self.max_new_tokens >= 1):
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r}: must be a positive integer")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature={self.temperature!r}: must be >= 0 (0 = greedy)")
        if not (isinstance(self.top_k, (int, np.integer)) and self.top_k >= 0):
            raise ValueError(f"top_k={self.top_k!r}: must be an integer >= 0 (0 = no top-k filter)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p!r}: must be in (0, 1] (1 = no nucleus filter)")


# -- one sampling step -------------------------------------------------------------------------


def sample_logits(logits, key, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
    """Draw one token per row from `logits` [B, V]; returns (tokens [B] int32, logprobs [B] fp32).

    Order: logits / temperature -> top-k -> top-p (nucleus) -> renormalise -> draw; `logprobs` is
    the log-probability of the drawn token under that final distribution. `temperature=0` is
    greedy (`argmax`) with `logprobs = log_softmax(logits)[token]`. `key` is one PRNG key (split
    per row) or a `[B]` array of keys (one per row). `temperature`, `top_k` and `top_p` are static.
    """
    logits = logits.astype(jnp.float32)
    batch = logits.shape[0]
    if temperature == 0:
        tokens = jnp.argmax(logits, axis=-1)
        logprobs = jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, None], axis=-1)[:, 0]
        return tokens.astype(jnp.int32), logprobs
    keys = key if key.shape == (batch,) else jax.random.split(key, batch)
    candidates, candidate_ids = _filter(logits / temperature, top_k, top_p)
    choice = jax.vmap(jax.random.categorical)(keys, candidates)  # [B], index into candidates
    logprobs = jnp.take_along_axis(jax.nn.log_softmax(candidates), choice[:, None], axis=-1)[:, 0]
    tokens = (
        choice
        if candidate_ids is None
        else jnp.take_along_axis(candidate_ids, choice[:, None], axis=-1)[:, 0]
    )
    return tokens.astype(jnp.int32), logprobs


def _filter(scaled, top_k: int, top_p: float):
    """(candidate logits [B, C], their token ids [B, C] or None for the identity), filtered ones
    -inf.

    Without filters nothing is sorted; with top-k only the k largest are kept (and sorted by
    `lax.top_k`); top-p alone needs one full-vocabulary sort per step.
    """
    vocab = scaled.shape[-1]
    k = top_k if 0 < top_k < vocab else vocab
    if k == vocab and top_p >= 1:
        return scaled, None
    if k < vocab:
        values, ids = jax.lax.top_k(scaled, k)  # [B, k], descending
    else:
        ids = jnp.argsort(-scaled, axis=-1, stable=True).astype(jnp.int32)
        values = jnp.take_along_axis(scaled, ids, axis=-1)
    if top_p < 1:
        probs = jax.nn.softmax(values, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # exactly 0 for the most likely token
        values = jnp.where(mass_before < top_p, values, -jnp.inf)
    return values, ids.astype(jnp.int32)


def row_keys(seed, row_ids, step):
    """The `[B]` PRNG keys of one decoding step: fold_in(fold_in(key(seed), row_id), step)."""
    base = jax.random.key(seed)
    return jax.vmap(lambda r: jax.random.fold_in(jax.random.fold_in(base, r), step))(row_ids)


# -- the model-agnostic decoding loop ----------------------------------------------------------


@struct.dataclass
class DecodeState:
    """The `lax.while_loop` carry. `step` tokens of every row have been written so far."""

    step: jax.Array  # [] int32
    last: jax.Array  # [B] int32, the newest token: the next `decode` input
    done: jax.Array  # [B] bool, the row wrote an EOS or a stop string (padding rows start done)
    tokens: jax.Array  # [B, N] int32, pad after the end
    logprobs: jax.Array  # [B, N] float32, 0 after the end
    seed: jax.Array  # [] uint32
    row_ids: jax.Array  # [B] uint32, the random stream of each row (see `generate`'s sample_ids)
    cache: Any  # the model's cache pytree
    # With stop strings only (None otherwise, so a run without them compiles the same program):
    recent: Any = None  # [B, window] int32, the newest tokens, newest last; -1 = none yet
    stop_end: Any = None  # [B] int32: 1 + the column that completed a stop string (N if none)


def stop_hit(recent, stops: StopTable, layout: StopLayout):
    """[B] bool: the newest of `recent` [B, W] (newest last, -1 = none) completes a stop string.

    transformers' `StopStringCriteria` test, as jnp ops on its table so it runs inside the loop:
    read backwards from the newest token, which must begin with the end of a stop string (its
    `end` overlaps); each earlier token must end where the characters matched so far begin (its
    `positions`), until the matched length reaches the string's (the first token may run past its
    start). So every tokenization of the string is found, including tokens that straddle its ends.
    """
    n, p, e = layout.count, layout.positions, layout.end_lens
    table = jnp.asarray(stops.table)
    none = table.shape[0] - 1  # the all -1 row: matches nothing
    ids = recent[:, ::-1]
    rows = table[jnp.where(ids < 0, none, jnp.minimum(ids, none))]  # [B, W, C]
    b, w = ids.shape
    ends = rows[:, :1, n * p : n * (p + e)].reshape(b, 1, n, e)
    positions = rows[:, 1:, : n * p].reshape(b, w - 1, n, p)
    sizes = jnp.broadcast_to(rows[:, 1:, -1, None, None], (b, w - 1, n, e))
    matched = jnp.cumsum(jnp.concatenate([ends, sizes], axis=1), axis=1)  # [B, W, n, e] characters
    fits = jnp.any(matched[:, :-1, :, :, None] == positions[:, :, :, None, :], axis=-1)
    alive = jnp.cumprod(jnp.concatenate([ends > 0, fits], axis=1).astype(jnp.int32), axis=1) > 0
    reach = jnp.max(jnp.where(alive, matched, 0), axis=1)  # [B, n, e]
    return jnp.any(reach >= jnp.asarray(stops.lengths)[None, :, None], axis=(1, 2))


def _write(
    state: DecodeState, logits, sampling: SamplingConfig, eos_ids, pad_id, cache, stops=None
) -> DecodeState:
    """Draw the token for column `state.step` from `logits` and record it."""
    tokens, logprobs = sample_logits(
        logits,
        row_keys(state.seed, state.row_ids, state.step),
        sampling.temperature,
        sampling.top_k,
        sampling.top_p,
    )
    tokens = jnp.where(state.done, pad_id, tokens)
    logprobs = jnp.where(state.done, 0.0, logprobs)
    hit_eos = (
        jnp.isin(tokens, jnp.asarray(eos_ids, jnp.int32)) if eos_ids else jnp.zeros_like(state.done)
    )
    column = lambda buf, x: jax.lax.dynamic_update_slice_in_dim(
        buf, x[:, None].astype(buf.dtype), state.step, 1
    )
    extra = {}
    if sampling.stop is not None:
        recent = jnp.concatenate([state.recent[:, 1:], tokens[:, None]], axis=1)
        hit = stop_hit(recent, stops, sampling.stop) & ~state.done
        extra = dict(recent=recent, stop_end=jnp.where(hit, state.step + 1, state.stop_end))
        hit_eos = hit_eos | hit  # a stop string ends the row as an EOS would
    return state.replace(
        step=state.step + 1,
        last=tokens,
        done=state.done | hit_eos,
        tokens=column(state.tokens, tokens),
        logprobs=column(state.logprobs, logprobs),
        cache=cache,
        **extra,
    )


def start_state(
    logits,
    cache,
    valid,
    row_ids,
    seed,
    sampling: SamplingConfig,
    eos_ids,
    pad_id,
    stops: StopTable | None = None,
) -> DecodeState:
    """The loop state after prefill: the first token of every row drawn from `logits` [B, V]."""
    rows, n = valid.shape[0], sampling.max_new_tokens
    extra = {}
    if sampling.stop is not None:
        extra = dict(
            recent=jnp.full((rows, sampling.stop.window), -1, jnp.int32),
            stop_end=jnp.full((rows,), n, jnp.int32),
        )
    state = DecodeState(
        step=jnp.zeros((), jnp.int32),
        last=jnp.full((rows,), pad_id, jnp.int32),
        done=~valid.astype(bool),
        tokens=jnp.full((rows, n), pad_id, jnp.int32),
        logprobs=jnp.zeros((rows, n), jnp.float32),
        seed=jnp.asarray(seed, jnp.uint32),
        row_ids=row_ids.astype(jnp.uint32),
        cache=cache,
        **extra,
    )
    return _write(state, logits, sampling, eos_ids, pad_id, cache, stops)


def decode_loop(
    step_fn,
    state: DecodeState,
    sampling: SamplingConfig,
    eos_ids,
    pad_id,
    constrain=lambda s: s,
    stops: StopTable | None = None,
) -> DecodeState:
    """Run `step_fn(tokens [B], cache) -> (logits [B, V], cache)` until every row is done or full.

    `constrain` maps the state to itself with sharding constraints (identity off-mesh); `stops`
    is the stop-string table when `sampling.stop` is set.
    """
    n = state.tokens.shape[1]

    def cond(s):
        return (s.step < n) & ~jnp.all(s.done)

    def body(s):
        logits, cache = step_fn(s.last, s.cache)
        return constrain(_write(s, logits, sampling, eos_ids, pad_id, cache, stops))

    return jax.lax.while_loop(cond, body, state)


def response_mask(tokens, eos_ids) -> np.ndarray:
    """[B, N] int32 (host): 1 up to and including each row's first EOS, all 1 for rows without."""
    tokens = np.asarray(tokens)
    is_eos = np.isin(tokens, np.asarray(eos_ids, np.int32)).astype(np.int32)
    return (np.cumsum(is_eos, axis=1) - is_eos == 0).astype(np.int32)


# -- stop strings -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class StopStrings:
    """Stop strings bound to a tokenizer: the device table of `stop_hit` (None when the tokenizer's
    tokens do not concatenate to its text, e.g. word-level: then only the text cut applies)."""

    strings: tuple[str, ...]
    tokenizer: Any
    layout: StopLayout | None
    table: np.ndarray | None
    lengths: np.ndarray | None


def stop_strings(tokenizer, strings: Sequence[str]) -> StopStrings | None:
    """`strings` ready for `generate` / `generate_many` with `tokenizer`'s vocabulary (None: none).

    The table is transformers' `StopStringCriteria`'s: for each token id, where it can sit inside
    each string, how much of each string's end it can begin with, and its length; the library
    cleans the vocabulary (byte-level, byte-fallback and SentencePiece tokens) and caches the work.
    """
    strings = tuple(strings)
    if not strings:
        return None
    if not all(isinstance(x, str) and x for x in strings):
        raise ValueError(f"stop strings must be non-empty strings, got {strings!r}")
    from transformers import StopStringCriteria

    try:
        criteria = StopStringCriteria(tokenizer, list(strings))
    except ValueError as e:  # the vocabulary cannot be read as text pieces
        logger.warning(
            "stop strings %r: %s's tokens are not text pieces (%s); responses are cut "
            "after sampling, rows do not stop early",
            strings,
            type(tokenizer).__name__,
            e,
        )
        return StopStrings(strings, tokenizer, None, None, None)
    table = criteria.embedding_vec.numpy().astype(np.int32)
    layout = StopLayout(
        len(strings),
        int(criteria.maximum_token_len),
        int(criteria.max_valid_positions),
        int(criteria.max_valid_end_lens),
    )
    lengths = criteria.target_lens.numpy().astype(np.int32)
    return StopStrings(strings, tokenizer, layout, table, lengths)


def cut_at_stop(stop: StopStrings, ids: Sequence[int]) -> list[int]:
    """The longest prefix of `ids` whose text (skipping special tokens) ends before the first stop
    string: so the kept text is exactly the decoded ids, and nothing from the stop string on
    survives. When a stop string begins inside a token, that token goes too. `ids` itself when
    its text holds none of the strings (rows that never stopped, or stopped by EOS)."""
    decode = lambda x: stop.tokenizer.decode(x, skip_special_tokens=True)  # noqa: E731
    text = decode(ids)
    starts = [i for i in (text.find(x) for x in stop.strings) if i >= 0]
    if not starts:
        return list(ids)
    head = text[: min(starts)]
    k = len(ids) - 1  # the stop string is usually in the last few tokens: walk back from the end
    while k > 0 and not head.startswith(decode(ids[:k])):
        k -= 1
    return list(ids[:k])


# -- binding a model into jitted programs ------------------------------------------------------


class _StaticModel:
    """A model as a static jit argument: its pure functions and facts, never its params.

    Two `LanguageModel`s with the same family, config, graph and dtypes on the same mesh share
    compiled programs. Any other object with the same interface (a stub, a model from another
    stack) is keyed by identity and kept alive by the jit cache.
    """

    def __init__(self, lm):
        self.eos_ids = tuple(int(e) for e in lm.eos_token_ids)
        self.pad_id = int(lm.pad_token_id)
        self.mesh = getattr(lm, "mesh", None)
        key = None
        if hasattr(lm, "graphdef") and hasattr(lm, "with_params"):
            key = (
                type(lm),
                getattr(lm, "model_type", None),
                getattr(lm, "config", None),
                lm.graphdef,
                str(getattr(lm, "compute_dtype", "")),
                self.mesh,
                self.eos_ids,
                self.pad_id,
            )
            try:
                hash(key)
            except TypeError:
                key = None
        self.fns = lm.with_params(None) if key is not None else lm  # no arrays kept alive
        self.key = (key if key is not None else ("identity", lm), _backend_key())

    def __hash__(self):
        return hash(self.key)

    def __eq__(self, other):
        return isinstance(other, _StaticModel) and self.key == other.key


def _cache_specs(prefill, params, cache, mesh):
    """PartitionSpecs for the cache leaves: batch axis over (data, fsdp), heads over tensor.

    A leaf's batch axis is the one whose size changes with the batch, its sequence axis one that
    changes with the prompt length or max_new_tokens (found by shape-only traces of `prefill`).
    """
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)

    def probe(rows, length, new):
        ids = jax.ShapeDtypeStruct((rows, length), jnp.int32)
        return jax.eval_shape(lambda p, i, m: prefill(p, i, m, new)[1], abstract, ids, ids)

    base, wider, longer = probe(1, 3, 2), probe(2, 3, 2), probe(1, 5, 4)
    batch_shards = math.prod(mesh.shape[a] for a in shd.BATCH_AXES)
    tensor = mesh.shape["tensor"]

    def spec(leaf, b, w, longer):
        axes = [None] * leaf.ndim
        batch = [i for i in range(leaf.ndim) if b.shape[i] != w.shape[i]]
        seq = [i for i in range(leaf.ndim) if b.shape[i] != longer.shape[i] and i not in batch]
        if batch and batch_shards > 1 and leaf.shape[batch[0]] % batch_shards == 0:
            axes[batch[0]] = shd.BATCH_AXES
        # Keys/values are [..., seq, heads, head_dim], [..., heads, seq, head_dim] or [..., heads,
        # head_dim, seq].
        if seq and leaf.ndim >= 4 and seq[-1] >= leaf.ndim - 3 and tensor > 1:
            heads = leaf.ndim - 2 if seq[-1] == leaf.ndim - 3 else leaf.ndim - 3
            if heads not in batch + seq and leaf.shape[heads] % tensor == 0:
                axes[heads] = "tensor"
        return P(*axes)

    return jax.tree.map(spec, cache, base, wider, longer)


def _constrainer(model: _StaticModel, params, cache):
    """state -> state with the loop state's sharding constraints (identity without a mesh)."""
    mesh = model.mesh
    if mesh is None:
        return lambda s: s
    cache_specs = _cache_specs(model.fns.prefill, params, cache, mesh)
    batch_shards = math.prod(mesh.shape[a] for a in shd.BATCH_AXES)

    def constrain(s: DecodeState) -> DecodeState:
        put = lambda x, spec: jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
        rows = P(shd.BATCH_AXES) if s.done.shape[0] % batch_shards == 0 else P()
        matrix = P(*rows, None)
        extra = (
            {}
            if s.recent is None
            else dict(recent=put(s.recent, matrix), stop_end=put(s.stop_end, rows))
        )
        return s.replace(
            last=put(s.last, rows),
            done=put(s.done, rows),
            row_ids=put(s.row_ids, rows),
            tokens=put(s.tokens, matrix),
            logprobs=put(s.logprobs, matrix),
            cache=jax.tree.map(put, s.cache, cache_specs),
            **extra,
        )

    return constrain


def _prefill_program(
    model: _StaticModel,
    sampling: SamplingConfig,
    params,
    prompt_ids,
    prompt_mask,
    valid,
    row_ids,
    seed,
    stops,
):
    logits, cache = model.fns.prefill(params, prompt_ids, prompt_mask, sampling.max_new_tokens)
    constrain = _constrainer(model, params, cache)
    return constrain(
        start_state(
            logits, cache, valid, row_ids, seed, sampling, model.eos_ids, model.pad_id, stops
        )
    )


def _decode_program(
    model: _StaticModel, sampling: SamplingConfig, params, state: DecodeState, stops
):
    constrain = _constrainer(model, params, state.cache)
    # The whole state is returned so that every donated buffer (the cache above all) aliases an
    # output and the loop runs in place in it.
    return decode_loop(
        lambda tokens, cache: model.fns.decode(params, tokens, cache),
        state,
        sampling,
        model.eos_ids,
        model.pad_id,
        constrain,
        stops,
    )


_prefill_jit = jax.jit(_prefill_program, static_argnums=(0, 1))
_decode_jit = jax.jit(_decode_program, static_argnums=(0, 1), donate_argnums=(3,))


# -- per-backend choices (plad_jax.backend) -----------------------------------------------------

_decode_jit_kept = jax.jit(_decode_program, static_argnums=(0, 1))


def _backend_key() -> backend.BackendChoices:
    """The backend choices traced into a program (cache key layout, prefix switch): part of its
    static key, so an override compiles new programs instead of reusing ones traced without it."""
    return backend.choices()


def _decode_fn():
    """The decode loop, donating its state (the cache) when `backend.choices().donate`."""
    return _decode_jit if backend.choices().donate else _decode_jit_kept


# -- shapes, hosts and the public entry points -------------------------------------------------


def prompt_bucket(n: int) -> int:
    """Padded prompt length: powers of two from 16 up to 128, then multiples of 128."""
    return bucket_length(n, POW2_PROMPT_BUCKET_UP_TO, minimum=MIN_PROMPT_BUCKET)


def _agree_max(*values: int) -> tuple[int, ...]:
    """Element-wise max over all processes (identity on one host): padded shapes must agree."""
    if jax.process_count() == 1:
        return values
    from jax.experimental import multihost_utils

    gathered = multihost_utils.process_allgather(np.asarray(values, np.int64))
    return tuple(int(v) for v in np.max(gathered.reshape(-1, len(values)), axis=0))


def _local_batch_shards(mesh) -> int:
    """How many of the data*fsdp batch shards this process's devices hold (all of them on one
    host)."""
    fsdp, me = mesh.shape["fsdp"], jax.process_index()
    return len(
        {
            d * fsdp + f
            for (d, f, _), device in np.ndenumerate(mesh.devices)
            if device.process_index == me
        }
    )


def _to_device(mesh, *arrays):
    """This process's rows -> global arrays batch-sharded over (data, fsdp), or plain device
    arrays."""
    if mesh is None:
        return tuple(jnp.asarray(a) for a in arrays)
    split = math.prod(mesh.shape[a] for a in shd.BATCH_AXES)
    local = _local_batch_shards(mesh)
    return tuple(
        jax.make_array_from_process_local_data(
            shd.batch_sharding(mesh, a.ndim), a, (a.shape[0] // local * split,) + a.shape[1:]
        )
        for a in arrays
    )


def _to_host(mesh, x) -> np.ndarray:
    """This process's rows of a batch-sharded array."""
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.global_array_to_host_local_array(x, mesh, P(shd.BATCH_AXES)))


def _pad_rows(prompt_ids, prompt_mask, rows: int, pad_id: int):
    """Append rows up to `rows`: one pad token each (valid=0) so every row stays well defined."""
    extra = rows - prompt_ids.shape[0]
    ids = np.full((extra, prompt_ids.shape[1]), pad_id, np.int32)
    mask = np.zeros_like(ids)
    mask[:, 0] = 1
    valid = np.arange(rows) < prompt_ids.shape[0]
    return np.concatenate([prompt_ids, ids]), np.concatenate([prompt_mask, mask]), valid


def generate(
    lm,
    prompt_ids,
    prompt_mask,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    num_samples: int = 1,
    seed: int = 0,
    pad_batch_to: int | None = None,
    sample_ids=None,
    stop: StopStrings | None = None,
) -> Generation:
    """Sample `num_samples` continuations of every prompt row; see the module docstring.

    prompt_ids, prompt_mask: `[B, P]` host int arrays (this process's rows on several hosts).
    pad_batch_to: pad the `B * num_samples` rows up to this many, so that smaller batches reuse
    the compiled program of the full one (the text helper passes its batch size).
    sample_ids: `[B]` non-negative ints, one per prompt row (default `0..B-1`): sample `s` of
    prompt `b` draws from random stream `sample_ids[b] * num_samples + s`. Giving every prompt a
    stable id (its index in the dataset) makes its samples independent of how prompts are
    batched, padded or spread over hosts.
    stop: stop strings (`stop_strings`): a row that completes one is finished as by an EOS (its
    mask ends with the token that completed it, then padding). Token-level only: cutting the
    string itself off the text is `generate_many`'s / `cut_at_stop`'s.
    """
    layout = stop.layout if stop is not None else None
    sampling = SamplingConfig(
        int(max_new_tokens), float(temperature), int(top_k), float(top_p), layout
    )
    if not (isinstance(num_samples, (int, np.integer)) and num_samples >= 1):
        raise ValueError(f"num_samples={num_samples!r}: must be a positive integer")
    ids, mask = np.asarray(prompt_ids, np.int32), np.asarray(prompt_mask, np.int32)
    if ids.ndim != 2 or ids.shape != mask.shape:
        raise ValueError(
            f"prompt_ids {ids.shape} and prompt_mask {mask.shape} must both be [batch, length]"
        )
    empty = np.flatnonzero(mask.sum(axis=1) == 0)
    if empty.size:
        raise ValueError(
            f"prompt row {int(empty[0])} has no real token (mask all 0); every prompt needs one"
        )
    if hasattr(
        lm, "check_length"
    ):  # a model with a position table: prompt + new tokens must fit it
        lm.check_length(
            mask.sum(axis=1) + sampling.max_new_tokens,
            f"prompt + max_new_tokens={sampling.max_new_tokens}",
        )
    used = (
        int(np.max(np.nonzero(mask.any(axis=0))[0], initial=-1)) + 1
    )  # columns past this are padding
    ids, mask = ids[:, :used], mask[:, :used]
    ids, mask = np.repeat(ids, num_samples, axis=0), np.repeat(mask, num_samples, axis=0)
    sample_ids = (
        np.arange(len(prompt_ids)) if sample_ids is None else np.asarray(sample_ids, np.int64)
    )
    if sample_ids.shape != (len(prompt_ids),) or (sample_ids < 0).any():
        raise ValueError(
            f"sample_ids must be [batch] non-negative ints, got shape {sample_ids.shape}"
        )
    streams = (
        (sample_ids[:, None] * num_samples + np.arange(num_samples)).reshape(-1) % 2**32
    ).astype(np.uint32)

    model = _StaticModel(lm)
    rows = max(ids.shape[0], pad_batch_to or 0, 1)
    rows, length = _agree_max(rows, prompt_bucket(max(used, 1)))
    if model.mesh is not None:  # this process's rows must split evenly over its batch shards
        local = _local_batch_shards(model.mesh)
        rows = -(-rows // local) * local
    ids = np.pad(ids, ((0, 0), (0, length - ids.shape[1])), constant_values=model.pad_id)
    mask = np.pad(mask, ((0, 0), (0, length - mask.shape[1])))
    kept = ids.shape[0]
    ids, mask, valid = _pad_rows(ids, mask, rows, model.pad_id)
    streams = np.pad(streams, (0, rows - kept))
    ids, mask, valid, streams = _to_device(model.mesh, ids, mask, valid, streams)

    stops = StopTable(stop.table, stop.lengths) if layout is not None else None
    seed = np.uint32(seed % 2**32)
    state = _prefill_jit(model, sampling, lm.params, ids, mask, valid, streams, seed, stops)
    state = _decode_fn()(model, sampling, lm.params, state, stops)
    tokens, logprobs = (_to_host(model.mesh, x)[:kept] for x in (state.tokens, state.logprobs))
    mask = response_mask(tokens, model.eos_ids)
    if state.stop_end is not None:  # pad may equal an EOS id: the row's end is the stop's column
        mask *= np.arange(tokens.shape[1])[None] < _to_host(model.mesh, state.stop_end)[:kept, None]
    return Generation(tokens.astype(np.int32), mask, logprobs.astype(np.float32))


@dataclasses.dataclass
class Sampled:
    """One response per row of `generate_many`: its new token ids without EOS and padding, and the
    sum of their log-probs under the sampling distribution (EOS included). With stop strings, the
    ids end before the first one (`cut_at_stop`) and the sum covers those ids only."""

    ids: list[int]
    logprob: float


def generate_many(
    lm,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    batch_size: int = 16,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    num_samples: int = 1,
    seed: int = 0,
    sample_ids: Sequence[int] | None = None,
    progress: bool = True,
    desc: str = "generate",
    stop: StopStrings | None = None,
) -> list[Sampled]:
    """Any number of tokenized prompts, batched: `num_samples` responses per prompt, grouped by
    prompt (`Sampled` `i * num_samples + s` for prompt `i`).

    Prompts are sorted by length (longest first) and run `batch_size` at a time, every batch padded
    to `batch_size` rows so a job compiles one shape per prompt-length bucket. Prompt `i` samples
    from its own random stream, `sample_ids[i]` (default `i`; see `generate`): pass each prompt's
    index in the dataset and its samples are the same whatever the batch size or the number of
    hosts. Logs tokens/s; shows a progress bar on process 0. On
    several hosts each process passes its own prompts (any number) and gets its own responses;
    the processes agree on the number of batches, so all run the same collectives. `stop`: rows
    end at a stop string inside the loop, and each response is cut before it (`cut_at_stop`).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be positive")
    prompts = [list(p) for p in prompts]
    sample_ids = list(range(len(prompts))) if sample_ids is None else [int(i) for i in sample_ids]
    if len(sample_ids) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(sample_ids)} sample_ids")
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    (num_batches,) = _agree_max(-(-len(prompts) // batch_size))
    eos = {int(e) for e in lm.eos_token_ids}
    out: list[Sampled | None] = [None] * (len(prompts) * num_samples)

    from tqdm.auto import tqdm

    # On a terminal only (disable=None): a log file gets the one tokens/s line below, not bar
    # redraws.
    bar = tqdm(
        total=len(prompts),
        unit="prompt",
        desc=desc,
        disable=True if not progress or jax.process_index() != 0 else None,
    )
    speed = _SamplingSpeed()
    for j in range(num_batches):
        chunk = order[j * batch_size : (j + 1) * batch_size]
        width = max([len(prompts[i]) for i in chunk] + [1])
        ids = np.full((len(chunk), width), int(lm.pad_token_id), np.int32)
        mask = np.zeros_like(ids)
        for r, i in enumerate(chunk):
            ids[r, : len(prompts[i])], mask[r, : len(prompts[i])] = prompts[i], 1
        with speed.batch() as count:
            gen = generate(
                lm,
                ids,
                mask,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                num_samples=num_samples,
                seed=seed,
                pad_batch_to=batch_size * num_samples,
                sample_ids=[sample_ids[i] for i in chunk],
                stop=stop,
            )
            count(int(gen.mask.sum()))
        for r in range(gen.tokens.shape[0]):
            row = chunk[r // num_samples] * num_samples + r % num_samples
            out[row] = _sampled(gen, r, eos, stop)
        bar.update(len(chunk))
        bar.set_postfix(tokens_per_s=f"{speed.tokens_per_s():.0f}")
    bar.close()
    logger.info(
        "%s: %d responses for %d prompts, %s", desc, len(out), len(prompts), speed.summary()
    )
    return out


class _SamplingSpeed:
    """Tokens/s of `generate_many` without compilation: a batch during which the sampler's jitted
    programs compiled (their cache grew) is timed apart, so the rate is that of compiled code and
    the compile time is reported on its own."""

    def __init__(self):
        self.tokens = self.warm_tokens = 0
        self.seconds = self.warm_seconds = 0.0

    @staticmethod
    def _compiled() -> int:
        return sum(f._cache_size() for f in (_prefill_jit, _decode_jit, _decode_jit_kept))

    @contextlib.contextmanager
    def batch(self):
        before, started, counted = self._compiled(), time.perf_counter(), []
        yield counted.append
        took, tokens = time.perf_counter() - started, sum(counted)
        self.tokens, self.seconds = self.tokens + tokens, self.seconds + took
        if self._compiled() == before:
            self.warm_tokens, self.warm_seconds = (
                self.warm_tokens + tokens,
                self.warm_seconds + took,
            )

    def tokens_per_s(self) -> float:
        if self.warm_seconds > 0:
            return self.warm_tokens / self.warm_seconds
        return self.tokens / max(self.seconds, 1e-9)

    def summary(self) -> str:
        cold = self.seconds - self.warm_seconds
        text = f"{self.tokens} new tokens in {self.seconds:.1f}s"
        if self.warm_seconds <= 0:
            return f"{text} ({self.tokens_per_s():.1f} tokens/s, every batch compiling)"
        if cold > 0:
            return (
                f"{text} ({self.tokens_per_s():.1f} tokens/s compiled; {cold:.1f}s in batches "
                "that compiled)"
            )
        return f"{text} ({self.tokens_per_s():.1f} tokens/s)"


def _sampled(gen: Generation, r: int, eos: set[int], stop: StopStrings | None) -> Sampled:
    """Row `r` of a generation as a response: ids without EOS or padding, cut before a stop."""
    real = gen.mask[r] > 0
    ids = [int(t) for t in gen.tokens[r][real] if int(t) not in eos]
    if stop is None:
        return Sampled(ids, float(gen.logprobs[r][real].sum()))
    cut, logprobs = cut_at_stop(stop, ids), gen.logprobs[r][real]
    return Sampled(cut, float((logprobs if len(cut) == len(ids) else logprobs[: len(cut)]).sum()))


def generate_text(
    lm,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int = 16,
    max_prompt_tokens: int = 512,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    num_samples: int = 1,
    seed: int = 0,
    truncation_side: str = "left",
    progress: bool = True,
    stop: Sequence[str] = (),
) -> list[str]:
    """Strings in, strings out: `num_samples` responses per prompt, grouped by prompt.

    Prompts are tokenized with the tokenizer's special tokens and cut to `max_prompt_tokens`
    (`truncation_side="left"` keeps the end, where instructions usually sit); `generate_many` runs
    them; responses are decoded up to (without) the first EOS, skipping special tokens, and end
    before the first of the `stop` strings (see `stop_strings`). Returns
    `len(prompts) * num_samples` strings, response `i * num_samples + s` for prompt `i`.
    """
    if truncation_side not in ("left", "right"):
        raise ValueError(f"truncation_side={truncation_side!r}: must be 'left' or 'right'")
    if max_prompt_tokens < 1:
        raise ValueError(f"max_prompt_tokens={max_prompt_tokens} must be positive")
    prompts = list(prompts)
    encoded = tokenizer(prompts, add_special_tokens=True)["input_ids"] if prompts else []
    encoded = [
        e[-max_prompt_tokens:] if truncation_side == "left" else e[:max_prompt_tokens]
        for e in encoded
    ]
    sampled = generate_many(
        lm,
        encoded,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        num_samples=num_samples,
        seed=seed,
        progress=progress,
        stop=stop_strings(tokenizer, stop),
    )
    return [tokenizer.decode(s.ids, skip_special_tokens=True) for s in sampled]
