"""Training a model in a stage: the method's loss in the jitted step, the resumable loop,
checkpoints, TensorBoard, and best-checkpoint selection on validation."""

from __future__ import annotations

import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp

from plad_jax import data, methods
from plad_jax import sharding as shd
from plad_jax.config import to_dict
from plad_jax.methods import Method
from plad_jax.models import lora
from plad_jax.pipeline.context import Context, config_hash, write_json
from plad_jax.training import checkpointing as ckpt
from plad_jax.training.step import (
    OptimizerConfig,
    TrainState,
    make_optimizer,
    make_train_step,
    state_shardings,
)
from plad_jax.training.trainer import Hook, LossCurve, Trainer

logger = logging.getLogger(__name__)


class BestCheckpoint(Hook):
    """A `Trainer` hook (`on_save`): scores the model at every checkpoint with
    `score_fn(lm) -> float` (higher is better) and keeps the best one as an HF directory.

    `<stage>/selection.json` maps step -> score; `<stage>/params/` holds the best model so far (the
    stage's hand-off: one copy on disk, not a second `best/`). Both survive a restart: a step
    already scored is not scored again, and the directory is replaced only by a complete one
    (written beside it, then renamed)."""

    def __init__(self, stage_dir: str, model_at, score_fn):
        self.record_path = os.path.join(stage_dir, "selection.json")
        self.best_dir = os.path.join(stage_dir, "params")
        legacy = os.path.join(stage_dir, "best")  # where earlier versions kept it
        if os.path.isdir(legacy) and not os.path.exists(self.best_dir) and jax.process_index() == 0:
            os.replace(legacy, self.best_dir)
        self.model_at, self.score_fn = model_at, score_fn
        self.scores = {}
        if os.path.exists(self.record_path):
            with open(self.record_path, encoding="utf-8") as f:
                self.scores = {int(k): v for k, v in json.load(f).items()}

    @property
    def best_step(self) -> int | None:  # ties go to the earlier step
        return max(sorted(self.scores), key=self.scores.get) if self.scores else None

    def on_save(self, step: int, state):
        if step in self.scores:
            return
        lm = self.model_at(state.params)
        score = float(self.score_fn(lm))
        logger.info(
            "step %d: validation score %.4f (best so far %s)",
            step,
            score,
            "none"
            if self.best_step is None
            else f"{self.scores[self.best_step]:.4f} at step {self.best_step}",
        )
        if self.best_step is None or score > self.scores[self.best_step]:
            tmp = self.best_dir + ".tmp"
            lm.save_pretrained(tmp)
            if jax.process_index() == 0:
                shutil.rmtree(self.best_dir, ignore_errors=True)
                os.replace(tmp, self.best_dir)
        self.scores[step] = score
        if jax.process_index() == 0:
            write_json(self.record_path, {str(k): v for k, v in sorted(self.scores.items())})

    def summary(self) -> dict:
        return {
            "best_step": self.best_step,
            "validation_score": self.scores.get(self.best_step),
            "validation_by_step": {str(k): v for k, v in sorted(self.scores.items())},
        }


def train_model(
    ctx: Context,
    lm,
    stage_dir: str,
    train_cfg,
    method: Method,
    batch_fn,
    num_examples: int,
    *,
    teacher=None,
    reference=None,
    tag: str = "",
    select=None,
):
    """Train `lm` with `method`'s loss on `batch_fn(rows) -> batch`; returns (trained lm, summary).

    select: optional `score_fn(lm) -> float`; the model is then scored at every checkpoint, the best
    one (not the last) is written to `<stage>/params/`, and None is returned in place of the
    model."""
    steps_per_epoch = max(num_examples // train_cfg.batch_size, 1)
    total = steps_per_epoch * train_cfg.epochs
    if train_cfg.max_steps:
        total = min(total, train_cfg.max_steps)
    optimizer = make_optimizer(
        OptimizerConfig(
            learning_rate=train_cfg.learning_rate,
            warmup_steps=train_cfg.warmup_steps,
            total_steps=total,
            weight_decay=train_cfg.weight_decay,
            max_grad_norm=train_cfg.max_grad_norm,
        )
    )
    frozen, trainable, combine = {}, lm.params, methods.full_params
    if isinstance(lm, lora.LoRAModel):  # adapters train, base weights ride along frozen
        trainable, frozen[lora.FROZEN_KEY] = lora.split_trainable(lm.params)
        trainable, combine = jax.tree.map(jnp.copy, trainable), lora.objective_combine
    loss_fn, frozen_fn = method.objective(lm, teacher=teacher, combine=combine)
    if "teacher" in method.frozen_models:
        frozen["teacher"] = teacher.params
    if reference is not None:
        frozen["reference"] = reference
    state = TrainState.create(trainable, optimizer, seed=ctx.config.seed)
    step = make_train_step(
        loss_fn,
        optimizer,
        grad_accum=train_cfg.grad_accum,
        frozen_fn=frozen_fn,
        state_shardings=state_shardings(state),
    )
    seed = ctx.config.seed

    def batches(epoch: int, index: int):
        rows = data.epoch_rows(
            num_examples, train_cfg.batch_size, seed=seed, epoch=epoch, index=index
        )
        batch = batch_fn(rows)
        return shd.place_batch(ctx.mesh, batch)

    to_full = (
        (lambda p: lora.combine(p, frozen[lora.FROZEN_KEY]))
        if lora.FROZEN_KEY in frozen
        else (lambda p: p)
    )
    selector = (
        BestCheckpoint(stage_dir, lambda p: lm.with_params(to_full(p)), select) if select else None
    )
    curve = LossCurve(os.path.join(stage_dir, f"curve{tag}.json"))
    board = TensorBoard(ctx.path("tb", os.path.basename(stage_dir) + tag))
    manager = ckpt.open_manager(
        os.path.join(stage_dir, f"checkpoints{tag}"),
        ckpt.CheckpointConfig(every_steps=train_cfg.checkpoint_every, keep=train_cfg.keep),
    )
    state = Trainer(
        step,
        state,
        batches,
        frozen,
        total_steps=total,
        steps_per_epoch=steps_per_epoch,
        manager=manager,
        config_hash=config_hash(to_dict(train_cfg), method.name, method.hparams_dict(), tag),
        log_every=train_cfg.log_every,
        hooks=[curve, board] + ([selector] if selector else []),
        progress=os.path.basename(stage_dir) + tag,
    ).run()
    manager.close()
    board.close(selector.scores if selector is not None else {})
    summary = {"steps": total, "final_loss": curve.final_loss}
    if selector is not None:
        return None, {**summary, **selector.summary()}
    return lm.with_params(to_full(state.params)), summary


class TensorBoard(Hook):
    """A `Trainer` hook: the logged means as `train/<name>` scalars in `<run>/tb/<stage>`, and the
    validation scores at the end; written on process 0 only."""

    def __init__(self, directory: str):
        self.writer = None
        if jax.process_index() == 0:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(directory, flush_secs=30)

    def on_log(self, step: int, means: dict):
        if self.writer is not None:
            for name, value in means.items():
                self.writer.add_scalar(f"train/{name}", value, step)

    def close(self, validation_scores: dict):
        if self.writer is not None:
            for step, score in sorted(validation_scores.items()):
                self.writer.add_scalar("validation/score", score, step)
            self.writer.close()


def sft_batches(encoded: data.EncodedExamples, batch_size: int):
    """`SequenceBatch`es of (prompt, response) rows of one encoding."""
    return parts_batches({"response": encoded}, batch_size)


def parts_batches(parts: dict, batch_size: int):
    """Batches of the same rows of several encodings (`data.join_parts`: the field named by each
    part's key holds its responses, the prompts are the first part's)."""

    def batch_fn(rows):
        return data.join_parts(
            {name: data.make_batch(enc, rows, num_rows=batch_size) for name, enc in parts.items()}
        )

    return batch_fn
