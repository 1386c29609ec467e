"""Train state, optimizer and the jitted, sharded train-step factory.

A loss function has the signature

    loss_fn(params, frozen, batch, rng) -> (loss, metrics)

where `params` are the trainable leaves (the whole model, or only LoRA adapters), `frozen` is any
pytree the loss reads but never differentiates (LoRA base weights, a teacher, a reference model),
`batch` is a pytree of arrays with a leading batch axis (a `plad_jax.data` batch: `SequenceBatch`,
`PairBatch`, ...), and `metrics` maps names to `(sum, count)` pairs with `metrics["loss"]` the pair
whose ratio is the loss. Models that the loss only reads through their outputs (teacher logits for
KD, reference log-probs for DPO) are better run by a `frozen_fn(frozen, batch) -> outputs` that the
step calls before, and outside, `value_and_grad`; the step puts its outputs (under stop_gradient)
in the batch's `frozen_outputs` (`batch.replace(frozen_outputs=...)`), so they are split into
micro-batches with the rows they belong to.

Gradient accumulation splits the batch into `grad_accum` micro-batches and sums gradients
weighted by each micro-batch's count, so the update equals the one-big-batch update exactly (a
token mean stays a token mean over the whole batch). A step whose loss or gradient is not finite
leaves the state untouched and reports `finite = 0`; `check_finite` turns that into an error.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from plad_jax import backend
from plad_jax.errors import NonFiniteLossError  # noqa: F401 (re-exported)


@dataclasses.dataclass
class OptimizerConfig:
    """AdamW with linear warmup then linear decay to zero (the paper's 1e-4 linear schedule)."""

    learning_rate: float = 1e-4
    warmup_steps: int = 0
    total_steps: int = 1000
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 1.0  # 0 disables clipping
    grad_accum: int = 1


def learning_rate_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    """0 -> learning_rate over warmup_steps, then linearly to 0 at total_steps."""
    warmup = max(cfg.warmup_steps, 0)
    decay = max(cfg.total_steps - warmup, 1)
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, cfg.learning_rate, max(warmup, 1)),
            optax.linear_schedule(cfg.learning_rate, 0.0, decay),
        ],
        boundaries=[warmup],
    )


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    parts = [optax.clip_by_global_norm(cfg.max_grad_norm)] if cfg.max_grad_norm > 0 else []
    parts.append(
        optax.adamw(
            learning_rate_schedule(cfg),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
        )
    )
    return optax.chain(*parts)


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar
    params: object  # trainable pytree
    opt_state: object
    rng: jax.Array  # base key; step k uses fold_in(rng, k)

    @classmethod
    def create(cls, params, optimizer: optax.GradientTransformation, seed: int = 0) -> TrainState:
        """Optimizer moments take their param's sharding; counters and rng are replicated beside
        them."""
        step, rng = jnp.zeros((), jnp.int32), jax.random.key_data(jax.random.key(seed))
        sharding = getattr(jax.tree.leaves(params)[0], "sharding", None)
        if not isinstance(sharding, NamedSharding):
            return cls(step=step, params=params, opt_state=jax.jit(optimizer.init)(params), rng=rng)
        replicated = NamedSharding(sharding.mesh, PartitionSpec())
        opt_shardings = optax.tree_map_params(
            optimizer,
            lambda _, s: s,
            jax.eval_shape(optimizer.init, params),
            jax.tree.map(lambda x: x.sharding, params),
            transform_non_params=lambda _: replicated,
        )
        opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(params)
        return cls(
            step=jax.device_put(step, replicated),
            params=params,
            opt_state=opt_state,
            rng=jax.device_put(rng, replicated),
        )


def check_finite(metrics, step: int):
    """Raise `NonFiniteLossError` (one line) if the step reported a non-finite loss or gradient."""
    if not bool(metrics["finite"]):
        raise NonFiniteLossError(
            f"step {step}: loss or gradient is NaN/Inf; training stopped, "
            "the last saved checkpoint is intact (lower the learning rate or check the data)"
        )


def _split_micro(batch, n):
    def split(x):
        if x.shape[0] % n:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by grad_accum={n}")
        return x.reshape((n, x.shape[0] // n) + x.shape[1:])

    return jax.tree.map(split, batch)


def _accumulate(loss_fn, params, frozen, batch, rng, grad_accum):
    """Gradient of the batch loss, and summed metrics, over `grad_accum` micro-batches."""

    def weighted(p, micro, key):
        loss, metrics = loss_fn(p, frozen, micro, key)
        count = jax.lax.stop_gradient(metrics["loss"][1])
        return loss * count, metrics

    grad_fn = jax.value_and_grad(weighted, has_aux=True)
    if grad_accum == 1:
        (_, metrics), grads = grad_fn(params, batch, rng)
    else:

        def body(carry, xs):
            micro, i = xs
            (_, m), g = grad_fn(params, micro, jax.random.fold_in(rng, i))
            return jax.tree.map(jnp.add, carry, (g, m)), None

        micro = _split_micro(batch, grad_accum)
        zeros = jax.eval_shape(lambda: grad_fn(params, jax.tree.map(lambda x: x[0], micro), rng))
        init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (zeros[1], zeros[0][1]))
        (grads, metrics), _ = jax.lax.scan(body, init, (micro, jnp.arange(grad_accum)))
    total = jnp.maximum(metrics["loss"][1], 1.0)
    return jax.tree.map(lambda g: g / total, grads), metrics


def make_train_step(
    loss_fn,
    optimizer: optax.GradientTransformation,
    *,
    grad_accum: int = 1,
    frozen_fn=None,
    state_shardings=None,
    donate: bool | None = None,
):
    """A jitted `step(state, batch, frozen) -> (state, metrics)`.

    `state_shardings` (see `state_shardings(state)`) pins the new state to the layout of the old
    one, so every step runs the same executable and parameters never drift to another layout.
    Batch and frozen inputs keep the shardings they arrive with. The state is donated, so
    parameters and optimizer moments are updated in place (`donate`; None: the backend's choice,
    `backend.choices().donate`, True on every backend).
    """
    donate = backend.choices().donate if donate is None else donate

    def step(state: TrainState, batch, frozen):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        if frozen_fn is not None:
            batch = batch.replace(frozen_outputs=jax.lax.stop_gradient(frozen_fn(frozen, batch)))
        grads, metrics = _accumulate(loss_fn, state.params, frozen, batch, rng, grad_accum)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        loss_sum, _ = metrics["loss"]
        finite = jnp.isfinite(loss_sum) & jnp.isfinite(optax.global_norm(grads))
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, state)
        if state_shardings is not None:
            new = jax.lax.with_sharding_constraint(new, state_shardings)
        metrics = {**metrics, "grad_norm": optax.global_norm(grads), "finite": finite}
        return new, metrics

    return jax.jit(step, donate_argnums=(0,) if donate else ())


def state_shardings(state: TrainState):
    """The sharding of every leaf of a placed state (to pin a step's in/out layouts)."""
    return jax.tree.map(lambda x: x.sharding, state)


def reduce_metrics(metrics) -> dict[str, float]:
    """(sum, count) pairs -> floats (sum / count); scalars pass through."""
    out = {}
    for name, value in metrics.items():
        if isinstance(value, tuple):
            out[name] = float(value[0]) / max(float(value[1]), 1.0)
        else:
            out[name] = float(value)
    return out
