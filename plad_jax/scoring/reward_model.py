"""A JAX reward model: any `LanguageModel` backbone plus a scalar head on the last real response
token.

    r(x, y) = bounded_reward(w . h_last + b, r_max) = r_max * tanh((w . h_last + b) / r_max)

`h_last` is the backbone's final hidden state at the last real token of the response (right-padded,
so padding never changes a reward): for decoder-only families the state at that token, for T5 the
decoder state whose input is that token; either way it has read the prompt and the whole response.
The backbone is usually the SFT student itself (then the reward model shares its tokenizer and
reads the student's samples without re-tokenizing), or any checkpoint of a supported family.

Params are one pytree `{"backbone": nnx.State, "head": {"w": [D], "b": []}}`, trained like any
model here (`bt_loss_fn` with `train.make_train_step`). On disk (`save` / `load`): the backbone as
a Hugging Face directory (`save_pretrained`, config.json + safetensors) and the head beside it in
`reward_head.safetensors` (`head.w`, `head.b`, `r_max`), and optionally its tokenizer; no pickle
anywhere. `as_scorer` wraps it as a `JaxRewardModel` for evaluation and pair
relabelling; `load_scorer(path)` does both from a saved directory.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from plad_jax import data
from plad_jax import sharding as shd
from plad_jax.losses import _masked_sum_count
from plad_jax.losses.pbkd import bounded_reward, bradley_terry_nll
from plad_jax.models import LanguageModel, from_pretrained
from plad_jax.models.hf import CheckpointError
from plad_jax.models.io.safetensors import SafetensorsFile, write_safetensors

F32 = jnp.float32
HEAD_FILE = "reward_head.safetensors"


@dataclasses.dataclass(frozen=True)
class RewardModel:
    """A backbone `LanguageModel` (its params included), a head `{"w": [D], "b": []}` and the
    bound."""

    backbone: LanguageModel
    head: dict
    r_max: float = 5.0

    @property
    def params(self) -> dict:
        return {"backbone": self.backbone.params, "head": self.head}

    def with_params(self, params) -> RewardModel:
        return RewardModel(
            self.backbone.with_params(params["backbone"]), params["head"], self.r_max
        )

    def apply(self, params, prompt_ids, prompt_mask, response_ids, response_mask) -> jax.Array:
        """[B] bounded rewards of right-padded (prompt, response) batches ([B, P], [B, R] int)."""
        _, hidden = self.backbone.apply(
            params["backbone"], prompt_ids, prompt_mask, response_ids, response_mask
        )
        return self.head_rewards(params["head"], hidden, response_mask)

    def head_rewards(self, head, hidden, response_mask) -> jax.Array:
        """[B] rewards from response hidden states [B, R, D] (the last real token's state)."""
        real = response_mask.astype(bool)
        last = jnp.max(jnp.where(real, jnp.arange(real.shape[1]), 0), axis=1)  # [B]
        h = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0].astype(F32)  # [B, D]
        raw = jnp.dot(h, head["w"].astype(F32), precision=jax.lax.Precision.HIGHEST) + head[
            "b"
        ].astype(F32)
        return bounded_reward(raw, self.r_max)


def hidden_size(lm: LanguageModel) -> int:
    """Width D of the backbone's hidden states (traced on shapes only, so any family works)."""
    one = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    _, hidden = jax.eval_shape(lm.apply, lm.params, one, one, one, one)
    return int(hidden.shape[-1])


def _place(tree, mesh):
    """Head leaves replicated on the backbone's mesh (or left where they are without one)."""
    return tree if mesh is None else jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def from_backbone(
    lm: LanguageModel, *, r_max: float = 5.0, seed: int = 0, head_std: float = 0.0
) -> RewardModel:
    """A reward model on `lm` (its params are copied, so training it never touches `lm`).

    The head starts at `w ~ N(0, head_std^2)` (0 by default: every reward 0, a neutral start, BT
    NLL = log 2) and `b = 0`.
    """
    width = hidden_size(lm)
    w = head_std * jax.random.normal(jax.random.key(seed), (width,), F32)
    head = _place({"w": w, "b": jnp.zeros((), F32)}, lm.mesh)
    return RewardModel(lm.with_params(jax.tree.map(jnp.copy, lm.params)), head, float(r_max))


# -- Bradley-Terry training ------------------------------------------------------------------------


def pair_rewards(rm: RewardModel, params, batch: data.PairBatch) -> tuple[jax.Array, jax.Array]:
    """([B], [B]) rewards of the chosen and rejected responses, in one 2B forward."""
    r = max(batch.chosen_ids.shape[1], batch.rejected_ids.shape[1])
    pad = lambda x: jnp.pad(x, ((0, 0), (0, r - x.shape[1])))
    both = rm.apply(
        params,
        jnp.concatenate([batch.prompt_ids] * 2),
        jnp.concatenate([batch.prompt_mask] * 2),
        jnp.concatenate([pad(batch.chosen_ids), pad(batch.rejected_ids)]),
        jnp.concatenate([pad(batch.chosen_mask), pad(batch.rejected_mask)]),
    )
    b = batch.chosen_ids.shape[0]
    return both[:b], both[b:]


def real_pairs(batch: data.Batch) -> jax.Array:
    """[B] bool: rows with a real prompt (filler rows of a padded batch have none)."""
    return jnp.any(batch.prompt_mask.astype(bool), axis=1)


def bt_loss_fn(rm: RewardModel, c: float = 0.0):
    """`loss_fn(params, frozen, batch, rng)` for `train.make_train_step`: Bradley-Terry NLL of
    (chosen preferred over rejected) + `c * mean(r^2)` on a `PairBatch`.
    Metrics: `loss`, `nll` (the BT NLL alone), `accuracy`, `margin`."""

    def loss_fn(params, frozen, batch, rng):
        del frozen, rng
        r_pos, r_neg = pair_rewards(rm, params, batch)
        mask = real_pairs(batch)
        nll, metrics = bradley_terry_nll(r_pos, r_neg, mask)
        metrics = {**metrics, "nll": metrics["loss"]}
        if c <= 0:
            return nll, metrics
        sq_pos, n = _masked_sum_count(jnp.square(r_pos), mask)
        sq_neg, _ = _masked_sum_count(jnp.square(r_neg), mask)
        loss = nll + c * (sq_pos + sq_neg) / jnp.maximum(2 * n, 1.0)
        return loss, {**metrics, "loss": (jax.lax.stop_gradient(loss) * n, n)}

    return loss_fn


# -- disk ------------------------------------------------------------------------------------------


def save(rm: RewardModel, path: str, tokenizer=None):
    """Write the backbone as an HF directory at `path`, the head as `path/reward_head.safetensors`,
    and the tokenizer beside them when given (then `load_scorer(path)` needs nothing else)."""
    rm.backbone.save_pretrained(path)
    if jax.process_index() != 0:
        return
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    tensors = {
        "head.w": np.asarray(rm.head["w"], np.float32),
        "head.b": np.asarray(rm.head["b"], np.float32),
        "r_max": np.asarray(rm.r_max, np.float32),
    }
    write_safetensors(os.path.join(path, HEAD_FILE), tensors)


def load(path: str, *, dtype=jnp.float32, compute_dtype=None, mesh=None) -> RewardModel:
    """Read what `save` wrote; a directory without the head file is named in a `CheckpointError`."""
    head_path = os.path.join(path, HEAD_FILE)
    if not os.path.exists(head_path):
        raise CheckpointError(
            f"{path}: no {HEAD_FILE} here, so it is not a saved plad_jax reward model "
            f"(plad_jax.scoring.reward_model.save writes one)"
        )
    backbone = from_pretrained(path, dtype=dtype, compute_dtype=compute_dtype, mesh=mesh)
    f = SafetensorsFile(head_path)
    head = _place(
        {"w": jnp.asarray(f.read("head.w"), F32), "b": jnp.asarray(f.read("head.b"), F32)}, mesh
    )
    return RewardModel(backbone, head, float(f.read("r_max")))


# -- as a scorer -----------------------------------------------------------------------------------

RewardFn = Callable[[Sequence[str], Sequence[str]], "np.ndarray"]


class JaxRewardModel:
    """Any `reward_fn(prompts, responses) -> [B] scores` (a jitted JAX model behind a tokenizer,
    say), called in batches of `batch_size`; the last batch may be smaller (pad inside `reward_fn`
    if it needs static shapes)."""

    reference_based = False

    def __init__(self, reward_fn: RewardFn, batch_size: int = 32, name: str = "jax_reward_model"):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.reward_fn = reward_fn
        self.batch_size = batch_size
        self.name = name

    def score(self, prompts, responses, references=None) -> np.ndarray:
        del references
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        chunks = []
        for start in range(0, len(prompts), self.batch_size):
            batch_p = list(prompts[start : start + self.batch_size])
            batch_r = list(responses[start : start + self.batch_size])
            scores = np.asarray(self.reward_fn(batch_p, batch_r), np.float64).reshape(-1)
            if scores.shape != (len(batch_p),):
                raise ValueError(
                    f"{self.name} returned {scores.shape[0]} scores for {len(batch_p)} responses"
                )
            chunks.append(scores)
        return np.concatenate(chunks) if chunks else np.zeros(0, np.float64)


def as_scorer(
    rm: RewardModel,
    tokenizer,
    *,
    max_prompt_tokens: int,
    max_response_tokens: int,
    batch_size: int = 32,
    name: str = "jax_reward_model",
):
    """The reward model behind `plad_jax.scoring.rewards`' scorer interface (texts in, [N] scores
    out).

    Texts are encoded like training data (`data.encode_texts`: prompt cut from the left, response
    + EOS cut to `max_response_tokens`), batches are filled to `batch_size` rows with bucketed
    lengths so a long scoring run compiles a handful of programs. Returns a
    `JaxRewardModel`.
    """
    mesh = rm.backbone.mesh
    out = None if mesh is None else NamedSharding(mesh, PartitionSpec())
    score = jax.jit(lambda p, *batch: rm.apply(p, *batch), out_shardings=out)
    params = rm.params

    def reward_fn(prompts, responses):
        encoded = data.encode_texts(
            tokenizer, prompts, responses, max_prompt_tokens, max_response_tokens
        )
        batch = data.make_batch(
            encoded, range(len(prompts)), num_rows=batch_size, pad_id=rm.backbone.pad_token_id
        )
        arrays = shd.shard_batch(mesh, *batch.inputs())
        return np.asarray(score(params, *arrays))[: len(prompts)]

    return JaxRewardModel(reward_fn, batch_size=batch_size, name=name)


def load_scorer(
    path: str,
    tokenizer=None,
    *,
    max_prompt_tokens: int = 512,
    max_response_tokens: int = 128,
    batch_size: int = 32,
    mesh=None,
):
    """`as_scorer(load(path))`: a saved reward model as a `plad_jax.scoring.rewards` scorer.

    tokenizer: the one its backbone reads; None loads the tokenizer saved beside it (`save(...,
    tokenizer=...)`, which `pbkd_loop.run_pbkd` does for its final reward model).
    """
    if tokenizer is None:
        if not os.path.exists(os.path.join(path, "tokenizer_config.json")):
            raise CheckpointError(
                f"{path}: no tokenizer saved beside this reward model; pass the tokenizer its "
                f"backbone reads"
            )
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
    return as_scorer(
        load(path, mesh=mesh),
        tokenizer,
        max_prompt_tokens=max_prompt_tokens,
        max_response_tokens=max_response_tokens,
        batch_size=batch_size,
        name=f"jax_reward_model:{path}",
    )
