"""`LanguageModel`: the one interface the rest of plad_jax sees a model through.

It holds a family's NNX graph definition and its params (an `nnx.State` whose leaves carry logical
axis names) and exposes pure functions of `params` for training and sampling:

    apply(params, prompt_ids, prompt_mask, response_ids, response_mask, *, rng=None)
        -> (logits, hidden)
    token_logprobs(params, <same four arrays>, *, rng=None) -> (log-probs [B, R], hits, hidden)
    prefill(params, prompt_ids, prompt_mask, max_new_tokens) -> (next_logits [B, V], cache)
    decode(params, tokens [B], cache) -> (next_logits [B, V], cache)

plus the eager conveniences `logits(...)` (jitted, on the model's own params) and
`save_pretrained(path)`. `remat` (a `layers.REMAT_POLICIES` name) sets what each block keeps for
the backward pass of `apply` and `token_logprobs`; it changes memory and time, never values.

To bring another model stack, implement a family module with the same
`score` / `prefill` / `decode` methods and a weight table (see README, "Bring your own model").
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import use_abstract_mesh

from plad_jax import losses
from plad_jax import sharding as shd
from plad_jax.models.layers import REMAT_POLICIES

# Writers for `save_pretrained` / `save_gguf`, registered by `plad_jax.models.hf` (the I/O layer
# above this one; `plad_jax.models` imports it first), so this module never imports it back.
_WRITERS: dict = {}


def register_writer(kind: str, write) -> None:
    """`write(lm, path, **kwargs)` for `kind` ("safetensors" or "gguf")."""
    _WRITERS[kind] = write


def _writer(kind: str):
    return _WRITERS[kind]


def cast_floats(tree, dtype):
    """Cast floating leaves of `tree` to `dtype` (bf16 compute over fp32 master params)."""
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
    )


class LanguageModel:
    """A causal or encoder-decoder LM with HF import/export. See the module docstring."""

    def __init__(
        self,
        model_type: str,
        config,
        graphdef,
        params,
        hf_config: dict,
        *,
        compute_dtype=jnp.float32,
        mesh=None,
        remat: str = "none",
    ):
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {', '.join(REMAT_POLICIES)}, got {remat!r}")
        self.model_type = model_type
        self.config = config
        self.graphdef = graphdef
        self.params = params
        self.hf_config = dict(hf_config)
        self.compute_dtype = jnp.dtype(compute_dtype)
        self.mesh = mesh
        self.remat = remat
        self._logits_jit = jax.jit(lambda p, *batch: self.apply(p, *batch)[0])

    # -- facts the sampler and the pipeline need ------------------------------------------------
    @property
    def is_encoder_decoder(self) -> bool:
        return self.hf_config.get("is_encoder_decoder", False)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return tuple(self.config.eos_token_id)

    @property
    def pad_token_id(self) -> int:
        pad = self.config.pad_token_id
        return 0 if pad is None else int(pad)

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def max_positions(self) -> int | None:
        """Most real tokens (prompt + response) a sequence may have: the size of a learned position
        table (GPT-Neo); None where positions are computed (RoPE, T5's relative buckets)."""
        limit = getattr(self.config, "max_position_embeddings", None)
        return None if limit is None else int(limit)

    def check_length(self, tokens_per_row, what: str = "sequence"):
        """One clear error if a row of `tokens_per_row` real tokens exceeds `max_positions`."""
        longest = int(max(tokens_per_row, default=0))
        if self.max_positions is not None and longest > self.max_positions:
            raise ValueError(
                f"{what} of {longest} tokens exceeds the {self.max_positions} positions of this "
                f"{self.model_type} model (max_position_embeddings); shorten it"
            )

    def num_params(self) -> int:
        return sum(x.size for x in jax.tree.leaves(self.params))

    def with_params(self, params) -> LanguageModel:
        """The same model with other params (e.g. after training)."""
        return LanguageModel(
            self.model_type,
            self.config,
            self.graphdef,
            params,
            self.hf_config,
            compute_dtype=self.compute_dtype,
            mesh=self.mesh,
            remat=self.remat,
        )

    def with_remat(self, remat: str) -> LanguageModel:
        """The same model and params, its blocks rematerialised as `remat` says."""
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {', '.join(REMAT_POLICIES)}, got {remat!r}")
        model = self.with_params(self.params)
        model.remat = remat
        return model

    # -- pure functions of params (jit/grad them freely) ---------------------------------------
    def _module(self, params, rng=None):
        """The family module on `params`, cast to the compute dtype. `rng` is for subclasses whose
        layers draw train-time randomness (LoRA dropout, `models.lora`); a plain model ignores
        it."""
        return nnx.merge(self.graphdef, cast_floats(params, self.compute_dtype))

    def _call(self, method: str, params, *args, rng=None, **kwargs):
        """Run a module method on `params`, with the model's mesh active for activation layouts."""
        call = lambda module: getattr(module, method)(*args, dtype=self.compute_dtype, **kwargs)
        return self._run(call, params, rng)

    def _run(self, fn, params, rng=None):
        """`fn(module)` on the family module of `params`, with the model's mesh active."""
        module = self._module(params, rng)
        context = (
            contextlib.nullcontext()
            if self.mesh is None
            else use_abstract_mesh(self.mesh.abstract_mesh)
        )
        with context:
            return fn(module)

    def apply(self, params, prompt_ids, prompt_mask, response_ids, response_mask, *, rng=None):
        """(logits [B, R, V] fp32, response hidden states [B, R, D]); see `logits`.

        rng: a PRNG key for train-time randomness (LoRA dropout); None (scoring, evaluation) is
        deterministic. Models without stochastic layers ignore it.
        """
        return self._call(
            "score",
            params,
            prompt_ids,
            prompt_mask,
            response_ids,
            response_mask,
            rng=rng,
            remat=self.remat,
        )

    def token_logprobs(
        self, params, prompt_ids, prompt_mask, response_ids, response_mask, *, rng=None
    ):
        """(log q(response_ids) [B, R] fp32, argmax == response_ids [B, R] bool, response hidden
        states [B, R, D]): `losses.token_logprobs` of `apply`'s logits, computed from the hidden
        states a chunk of positions at a time (`losses.chunked_token_logprobs`), so neither the
        forward nor the backward pass holds a whole [B, R, V] array. Values at padded positions
        are meaningless (mask them)."""
        chunk = losses.logit_chunk(response_ids.shape[0], self.vocab_size)

        def run(module):
            predictors, hidden = module.score_hidden(
                prompt_ids,
                prompt_mask,
                response_ids,
                response_mask,
                dtype=self.compute_dtype,
                remat=self.remat,
            )
            logps, hits = losses.chunked_token_logprobs(
                module.output_logits, predictors, response_ids, chunk
            )
            return logps, hits, hidden

        return self._run(run, params, rng)

    def prefill(self, params, prompt_ids, prompt_mask, max_new_tokens: int):
        """Encode the prompt; next-token logits [B, V] and a cache for `max_new_tokens` more."""
        return self._call("prefill", params, prompt_ids, prompt_mask, max_new_tokens)

    def decode(self, params, tokens, cache):
        """Feed one token per row; its next-token logits [B, V] and the updated cache."""
        return self._call("decode", params, tokens, cache)

    # -- eager conveniences ---------------------------------------------------------------------
    def logits(self, prompt_ids, prompt_mask, response_ids, response_mask) -> jax.Array:
        """Next-token logits [B, R, V] (fp32) for every response position.

        All four arrays are right-padded int arrays ([B, P] and [B, R]), mask 1 = real token. Row b,
        column t is the distribution for response_ids[b, t] given the prompt and
        response_ids[b, :t]. Padding never changes a real position's value.
        """
        self.check_length(
            np.sum(prompt_mask, axis=1) + np.sum(response_mask, axis=1), "prompt + response"
        )
        batch = [
            jnp.asarray(a, jnp.int32)
            for a in (prompt_ids, prompt_mask, response_ids, response_mask)
        ]
        batch = shd.shard_batch(self.mesh, *batch)
        return self._logits_jit(self.params, *batch)

    def save_pretrained(self, path: str, *, max_shard_bytes: int = 5 * 1024**3):
        """Write `config.json` + safetensors that `transformers` loads with equal logits."""
        _writer("safetensors")(self, path, max_shard_bytes=max_shard_bytes)

    def save_gguf(self, path: str, dtype: str = "f16", tokenizer=None):
        """Write one GGUF file (llama / qwen2) for llama.cpp, Ollama and transformers' GGUF loader.

        dtype: f32, f16, bf16 or q8_0 for the 2-D weights (norms and biases stay f32, as llama.cpp
        writes them); tokenizer: a transformers fast BPE tokenizer whose vocabulary goes into the
        file's metadata, so the file alone is a complete model."""
        _writer("gguf")(self, path, dtype, tokenizer)

    def __repr__(self):
        return (
            f"LanguageModel({self.model_type}, params={self.num_params():,}, "
            f"compute_dtype={self.compute_dtype.name}, remat={self.remat}, "
            f"mesh={None if self.mesh is None else dict(self.mesh.shape)})"
        )
