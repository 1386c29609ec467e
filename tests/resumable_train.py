"""A tiny sharded SFT run through `train_loop`, for the preemption test (run as a subprocess).

    python tests/resumable_train.py MODEL_DIR RUN_DIR [--pause-at N]

Trains 12 steps (5 batches per epoch) on a (2, 2, 2) mesh of fake CPU devices, checkpointing every
3 steps into RUN_DIR/checkpoints. Prints `step N` after each step; with --pause-at N it prints
`paused` after step N and sleeps, for the test to kill it. At the end it writes the params to
RUN_DIR/final.npz (flat, by key path).
"""

import argparse
import logging
import os
import sys
import time

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import numpy as np

jax.config.update("jax_default_matmul_precision", "highest")

from plad_jax import methods
from plad_jax import sharding as shd
from plad_jax.data import SequenceBatch
from plad_jax.models import from_pretrained
from plad_jax.training import checkpointing as ckpt
from plad_jax.training.step import (
    OptimizerConfig,
    TrainState,
    make_optimizer,
    make_train_step,
    state_shardings,
)
from plad_jax.training.trainer import train_loop

TOTAL_STEPS, EVERY, STEPS_PER_EPOCH, BATCH, VOCAB = 12, 3, 5, 8, 64


def batch_at(mesh, epoch: int, index: int):
    """A fixed random SFT batch for each (epoch, index)."""
    rng = np.random.default_rng(1000 * epoch + index)
    lens_p, lens_r = rng.integers(1, 7, BATCH), rng.integers(1, 6, BATCH)
    pm = (np.arange(6)[None] < lens_p[:, None]).astype(np.int32)
    rm = (np.arange(5)[None] < lens_r[:, None]).astype(np.int32)
    pi, ri = (
        rng.integers(3, VOCAB, pm.shape).astype(np.int32) * pm,
        rng.integers(3, VOCAB, rm.shape).astype(np.int32) * rm,
    )
    batch = SequenceBatch(prompt_ids=pi, prompt_mask=pm, response_ids=ri, response_mask=rm)
    return shd.place_batch(mesh, batch)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("run_dir")
    parser.add_argument("--pause-at", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(
        stream=sys.stdout, level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("plad_jax").setLevel(logging.INFO)

    mesh = shd.make_mesh((2, 2, 2))
    lm = from_pretrained(args.model_dir, mesh=mesh)
    optimizer = make_optimizer(
        OptimizerConfig(learning_rate=1e-2, warmup_steps=2, total_steps=TOTAL_STEPS)
    )
    loss_fn, frozen_fn = methods.SFT().objective(lm)
    state = TrainState.create(lm.params, optimizer, seed=0)
    step_fn = make_train_step(
        loss_fn, optimizer, frozen_fn=frozen_fn, state_shardings=state_shardings(state)
    )

    def on_metrics(step, metrics):
        print(f"step {step} loss {metrics['loss']:.6f}", flush=True)
        if step == args.pause_at:
            print("paused", flush=True)
            time.sleep(600)

    manager = ckpt.open_manager(
        os.path.join(args.run_dir, "checkpoints"), ckpt.CheckpointConfig(every_steps=EVERY)
    )
    state = train_loop(
        step_fn,
        state,
        lambda e, i: batch_at(mesh, e, i),
        {},
        total_steps=TOTAL_STEPS,
        steps_per_epoch=STEPS_PER_EPOCH,
        manager=manager,
        log_every=1,
        on_metrics=on_metrics,
    )
    manager.close()
    leaves = jax.tree_util.tree_flatten_with_path(state.params)[0]
    np.savez(
        os.path.join(args.run_dir, "final.npz"),
        **{jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves},
    )
    print("done", flush=True)


if __name__ == "__main__":
    main()
