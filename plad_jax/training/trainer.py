"""The one training loop: a steppable `Trainer` with hooks; deterministic data by position, NaN
guard, periodic async checkpoints.

Everything that trains goes through it: SFT and every distillation method (`pipeline.train`),
`pbkd_cheap`, and the two players of PbKD's game (each a `Trainer` the game steps with its own
batches). Hooks (`Hook`) log (`LossCurve`, TensorBoard in the pipeline), select the best
checkpoint on validation (`pipeline.train.BestCheckpoint`) and run after saves.

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

from plad_jax.data.batch import Batch
from plad_jax.training import checkpointing as ckpt
from plad_jax.training.step import NonFiniteLossError, check_finite, reduce_metrics

logger = logging.getLogger(__name__)

BatchFn = Callable[[int, int], Any]  # (epoch, index within epoch) -> batch, the same on every call


class Hook:
    """What a `Trainer` calls besides its step. Override what you need.

    `on_log(step, means)`: every `log_every` steps and at the last, with the metrics averaged over
    the window since the previous call. `on_save(step, state)`: after every checkpoint save, and
    once for the step a run resumes from (so a kill between a save and its hook loses nothing): it
    must be idempotent per step, e.g. record a validation score keyed by step.
    """

    def on_log(self, step: int, means: dict) -> None:
        pass

    def on_save(self, step: int, state) -> None:
        pass


class Trainer:
    """One model's training, a step at a time: `step()` runs the next step and returns its
    metrics (device values; `reduce_metrics` makes floats of them).

    `step_fn(state, batch, frozen) -> (state, metrics)` (see `step.make_train_step`); `batches`: the
    data as a pure function of its position; `frozen`: what the step reads besides the state. With
    a `manager` (see `checkpointing.open_manager`), `restore()` resumes from its newest readable
    checkpoint (state, data position and rng; restored onto the shardings of `state`), and `step()`
    saves on its schedule and always at `total_steps`. The NaN guard: a step whose loss or
    gradient is not finite raises `NonFiniteLossError` naming the step, its batch and the last
    good checkpoint; it is checked before every save (a checkpoint never holds a state that follows
    a NaN step) and between saves after the next step is dispatched, so the host never idles the
    device. `progress`: a label for a tqdm bar on process 0 (shown on a terminal only).

    A player of a larger loop (PbKD's game) passes its own `batch` and `frozen` (and, for a player
    with two programs, `step_fn`) to `step`; that loop owns the step numbering, the checkpoint and
    the NaN check of such steps (`step.check_finite`).
    """

    def __init__(
        self,
        step_fn,
        state,
        batches: BatchFn | None = None,
        frozen=None,
        *,
        total_steps: int = 0,
        steps_per_epoch: int = 1,
        manager: ocp.CheckpointManager | None = None,
        config_hash: str | None = None,
        log_every: int = 0,
        hooks=(),
        progress: str | None = None,
    ):
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch={steps_per_epoch} must be >= 1")
        self.step_fn, self.state, self.batches, self.frozen = step_fn, state, batches, frozen
        self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch
        self.manager, self.config_hash = manager, config_hash
        self.log_every, self.hooks, self.progress = log_every, list(hooks), progress
        # The step count on the host: reading `state.step` would wait for the device every step.
        self.count = int(state.step)
        self.position = ckpt.DataPosition(
            self.count // steps_per_epoch, self.count % steps_per_epoch
        )
        self.unchecked = None  # (step, position of its batch, metrics) of a step not yet checked
        self._window, self._speed, self._bar = _MetricWindow(), None, None

    @property
    def done(self) -> bool:
        return self.count >= self.total_steps

    def restore(self) -> bool:
        """Resume from the manager's newest readable checkpoint, if there is one."""
        if self.manager is None:
            return False
        restored = ckpt.restore_latest(
            self.manager, ckpt.abstract_like(self.state), config_hash=self.config_hash
        )
        if restored is None:
            return False
        self.state, self.position = restored
        step = self.count = int(self.state.step)
        logger.info(
            "resumed from step %d (epoch %d, batch %d) in %s",
            step,
            self.position.epoch,
            self.position.index,
            self.manager.directory,
        )
        for hook in self.hooks:
            hook.on_save(step, self.state)
        return True

    def step(self, batch=None, frozen=None, step_fn=None) -> dict:
        """Run the next step (on `batch`, else `batches` at the current position) and return its
        metrics."""
        if self._speed is None:
            self._start()
        step = self.count = self.count + 1
        given = batch is not None
        if not given:
            batch = self.batches(self.position.epoch, self.position.index)
        self.state, metrics = (step_fn or self.step_fn)(
            self.state, batch, self.frozen if frozen is None else frozen
        )
        if self.log_every:  # what the log reports: tokens/s and metric means over its window
            self._speed.add(batch)
            self._window.add(metrics)
        self.check()  # the previous step, while this one runs
        self.unchecked = None if given else (step, self.position, metrics)
        self.position = self.position.advance(self.steps_per_epoch)
        self._bar.update(1)
        if self.manager is not None and (
            step == self.total_steps or self.manager.should_save(step)
        ):
            self.check()
            ckpt.save(
                self.manager,
                step,
                self.state,
                self.position,
                metrics=_finite_metrics(metrics),
                config_hash=self.config_hash,
                force=True,
            )
            for hook in self.hooks:
                hook.on_save(step, self.state)
        if self.log_every and (step % self.log_every == 0 or step == self.total_steps):
            self.check()
            means = self._window.mean()
            _log(step, means, self._speed.report(step))
            for hook in self.hooks:
                hook.on_log(step, means)
            self._window = _MetricWindow()
        return metrics

    def run(self):
        """Restore, then step to `total_steps`; returns the final state. Pending saves are waited
        for before returning or raising."""
        try:
            self.restore()
            while not self.done:
                self.step()
            self.check()
        finally:
            self.close()
        return self.state

    def check(self):
        """Raise `NonFiniteLossError` if the last unchecked step was not finite."""
        if self.unchecked is not None:
            unchecked, self.unchecked = self.unchecked, None
            _check(unchecked, self.manager)

    def close(self):
        if self._bar is not None:
            self._bar.close()
        if self.manager is not None:
            ckpt.wait(self.manager)

    def _start(self):
        step = self.count
        self._speed = _Speed(step, self.total_steps)
        self._bar = tqdm(
            total=self.total_steps,
            initial=step,
            unit="step",
            desc=self.progress,
            disable=True if self.progress is None or jax.process_index() != 0 else None,
        )


class _Callbacks(Hook):
    """`train_loop`'s `on_metrics` / `on_checkpoint` callables as a hook."""

    def __init__(self, on_metrics, on_checkpoint):
        self.on_metrics, self.on_checkpoint = on_metrics, on_checkpoint

    def on_log(self, step, means):
        if self.on_metrics is not None:
            self.on_metrics(step, means)

    def on_save(self, step, state):
        if self.on_checkpoint is not None:
            self.on_checkpoint(step, state)


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
    hooks=(),
):
    """`Trainer(...).run()` with callables for hooks: train `state` to `total_steps`, resuming
    from `manager`'s newest checkpoint; `on_metrics(step, means)` every `log_every` steps,
    `on_checkpoint(step, state)` after every save (see `Hook`). Returns the final state."""
    callbacks = [_Callbacks(on_metrics, on_checkpoint)] if on_metrics or on_checkpoint else []
    return Trainer(
        step_fn,
        state,
        batches,
        frozen,
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
        manager=manager,
        config_hash=config_hash,
        log_every=log_every,
        hooks=[*callbacks, *hooks],
        progress=progress,
    ).run()


class LossCurve(Hook):
    """A stage's `(step, loss)` log points in `<stage>/curve<tag>.json` (as a hook: the window's
    mean loss at every log step), rewritten as they come, so
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

    def on_log(self, step: int, means: dict):
        self.add(step, means["loss"])

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


def _log(step: int, means: dict, speed: str = ""):
    logger.info(
        "step %d: %s%s", step, " ".join(f"{k}={v:.6g}" for k, v in sorted(means.items())), speed
    )


class _Speed:
    """Steps/s, tokens/s (the batch's non-padding tokens: `Batch.num_tokens`, the sum of its masks,
    counted on the device) and the ETA over each log window; the first window includes compilation
    and says so."""

    def __init__(self, step: int, total_steps: int):
        self.step, self.total = step, total_steps
        self.started, self.tokens, self.first = time.perf_counter(), 0, True

    def add(self, batch):
        if isinstance(batch, Batch):
            self.tokens = self.tokens + batch.num_tokens()

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
