"""A resumable training loop: deterministic data by position, NaN guard, periodic async checkpoints.

Determinism is what makes a resumed run equal an uninterrupted one bit for bit: the batch for a
step is `batches(epoch, index)`, a pure function of the data position saved with the checkpoint,
and the step's randomness is `fold_in(state.rng, state.step)` (see `train.make_train_step`), so
nothing depends on how many times the process started.

A step whose loss or gradient is not finite stops the run with `NonFiniteLossError`. Finiteness is
checked before every save, so a checkpoint never holds a state that follows a NaN step. Between
saves the check of step k runs after step k+1 is dispatched, so the host never idles the device.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from plad_jax.training import checkpointing as ckpt
from plad_jax.training.step import NonFiniteLossError, check_finite, reduce_metrics

logger = logging.getLogger(__name__)

BatchFn = Callable[[int, int], Any]  # (epoch, index within epoch) -> batch, the same on every call


def train_loop(
    step_fn,
    state,
    batches: BatchFn,
    frozen=None,
    *,
    total_steps: int,
    steps_per_epoch: int,
    manager: ocp.CheckpointManager | None = None,
    log_every: int = 0,
    on_metrics: Callable[[int, dict], None] | None = None,
    config_hash: str | None = None,
    on_checkpoint: Callable[[int, Any], None] | None = None,
    progress: str | None = None,
):
    """Train `state` to `total_steps` with `step_fn(state, batch, frozen) -> (state, metrics)`.

    With a `manager` (see `checkpointing.open_manager`), first resume from its newest readable
    checkpoint (state, data position and rng; restored onto the shardings of `state`), then save
    on its schedule and always at `total_steps`, and wait for pending saves before returning or
    raising. Every `log_every` steps `on_metrics(step, means over the window)` is called and a line
    is logged. `on_checkpoint(step, state)` runs after every save, and once more for the step a
    run resumes from (so a kill between a save and its callback loses nothing): it must be
    idempotent per step, e.g. record a validation score keyed by step. `progress`: a label for a
    tqdm bar on process 0 (shown on a terminal only). Returns the final state.
    """
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch={steps_per_epoch} must be >= 1")
    step = int(state.step)
    position = ckpt.DataPosition(step // steps_per_epoch, step % steps_per_epoch)
    if manager is not None:
        restored = ckpt.restore_latest(manager, ckpt.abstract_like(state), config_hash=config_hash)
        if restored is not None:
            state, position = restored
            logger.info(
                "resumed from step %d (epoch %d, batch %d) in %s",
                int(state.step),
                position.epoch,
                position.index,
                manager.directory,
            )
            if on_checkpoint is not None:
                on_checkpoint(int(state.step), state)
    window, speed = _MetricWindow(), _Speed(int(state.step), total_steps)
    bar = tqdm(
        total=total_steps,
        initial=int(state.step),
        unit="step",
        desc=progress,
        disable=True if progress is None or jax.process_index() != 0 else None,
    )
    unchecked = None  # (step, position of its batch, metrics) of the last step not yet checked
    try:
        for step in range(int(state.step) + 1, total_steps + 1):
            batch = batches(position.epoch, position.index)
            state, metrics = step_fn(state, batch, frozen)
            speed.add(batch)
            if unchecked is not None:  # the previous step, while this one runs
                _check(unchecked, manager)
            unchecked = (step, position, metrics)
            position = position.advance(steps_per_epoch)
            window.add(metrics)
            bar.update(1)
            if manager is not None and (step == total_steps or manager.should_save(step)):
                _check(unchecked, manager)
                unchecked = None
                ckpt.save(
                    manager,
                    step,
                    state,
                    position,
                    metrics=_finite_metrics(metrics),
                    config_hash=config_hash,
                    force=True,
                )
                if on_checkpoint is not None:
                    on_checkpoint(step, state)
            if log_every and (step % log_every == 0 or step == total_steps):
                _check(unchecked, manager)
                unchecked = None
                _log(step, window.mean(), on_metrics, speed.report(step))
                window = _MetricWindow()
        _check(unchecked, manager)
    finally:
        bar.close()
        if manager is not None:
            ckpt.wait(manager)
    return state


class LossCurve:
    """A stage's `(step, loss)` log points in `<stage>/curve<tag>.json`, rewritten as they come, so
    a resumed run keeps the steps from before the restart (points the resumed run logs again replace
    the old ones) and a stage whose steps all finished before a crash still knows its final loss."""

    def __init__(self, path: str):
        self.path = path
        self.points: list[tuple[int, float]] = []
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                self.points = [(int(step), float(loss)) for step, loss in json.load(f)]

    def add(self, step: int, loss: float, *, save: bool = True):
        self.points = [p for p in self.points if p[0] < step] + [(int(step), float(loss))]
        if save:
            self.save()

    def save(self):
        if jax.process_index() == 0 and self.points:
            _write_json(self.path, self.points)

    @property
    def final_loss(self) -> float | None:
        return self.points[-1][1] if self.points else None


def _write_json(path: str, obj):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def _check(unchecked, manager):
    """Raise `NonFiniteLossError` naming the step, its batch and the last good checkpoint."""
    if unchecked is None:
        return
    step, position, metrics = unchecked
    try:
        check_finite(metrics, step)
    except NonFiniteLossError:
        where = "no checkpoint was saved"
        if manager is not None:
            ckpt.wait(manager)
            latest = manager.latest_step()
            where = (
                f"no checkpoint was saved in {manager.directory}"
                if latest is None
                else f"the last good checkpoint is step {latest} in {manager.directory}"
            )
        raise NonFiniteLossError(
            f"step {step} (epoch {position.epoch}, batch {position.index}): loss or gradient is "
            f"NaN/Inf; training stopped, {where} (lower the learning rate or check the data)"
        ) from None


def _finite_metrics(metrics) -> dict[str, float]:
    return {k: v for k, v in reduce_metrics(metrics).items() if k != "finite"}


def _log(step: int, means: dict, on_metrics, speed: str = ""):
    logger.info(
        "step %d: %s%s", step, " ".join(f"{k}={v:.6g}" for k, v in sorted(means.items())), speed
    )
    if on_metrics is not None:
        on_metrics(step, means)


class _Speed:
    """Steps/s, tokens/s (the batch's non-padding tokens: the sum of its `*mask` arrays, counted on
    the device) and the ETA over each log window; the first window includes compilation and says
    so."""

    def __init__(self, step: int, total_steps: int):
        self.step, self.total = step, total_steps
        self.started, self.tokens, self.first = time.perf_counter(), 0, True

    def add(self, batch):
        if isinstance(batch, dict):
            for key, value in batch.items():
                if str(key).endswith("mask"):
                    self.tokens = self.tokens + jnp.sum(value, dtype=jnp.int32)

    def report(self, step: int) -> str:
        now = time.perf_counter()
        elapsed, steps = max(now - self.started, 1e-9), step - self.step
        text = (
            f" | {steps / elapsed:.3g} step/s, {int(self.tokens) / elapsed:.0f} tok/s"
            f"{' (incl. compile)' if self.first else ''}, ETA "
            f"{_duration((self.total - step) * elapsed / steps)}"
        )
        self.step, self.started, self.tokens, self.first = step, now, 0, False
        return text


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class _MetricWindow:
    """Metrics summed over steps on the device: `(sum, count)` pairs add up, scalars are
    averaged."""

    def __init__(self):
        self.total, self.steps = None, 0

    def add(self, metrics):
        metrics = {k: v for k, v in metrics.items() if k != "finite"}
        self.total = metrics if self.total is None else jax.tree.map(jnp.add, self.total, metrics)
        self.steps += 1

    def mean(self) -> dict[str, float]:
        out = reduce_metrics(self.total or {})
        for name, value in (self.total or {}).items():
            if not isinstance(value, tuple):
                out[name] /= self.steps
        return out
