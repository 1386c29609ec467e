"""One process of the multi-host test (`tests/test_multihost.py`), and the training run it compares.

    python -m tests.multihost_worker --process-id I --num-processes 2 --port PORT --model-dir DIR

joins a `jax.distributed` job on 127.0.0.1:PORT (gloo collectives on CPU; the caller sets
XLA_FLAGS=--xla_force_host_platform_device_count=4), then for each mesh runs `sft_run`: 3 SFT
steps of the sharded train step, this process feeding only the batch rows its own devices hold
(and, on the first mesh, the eager `logits` on the whole batch), and `sample_run`: the sampler on
this process's own prompts.
It prints one JSON line: {"process", "devices", "local_devices", "runs": {mesh: sft_run(...)},
"samples": sample_run(...)}. The test calls both in-process on the 1-process 8-device mesh for
the reference.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

ROWS, VOCAB = 8, 64  # global batch: one row per batch shard on (8, 1, 1), two on (2, 2, 2)
PROMPT_LENS, RESPONSE_LENS = (6, 3, 5, 2, 6, 4, 1, 5), (4, 2, 5, 1, 3, 5, 2, 4)
MESHES = ((2, 2, 2), (8, 1, 1))
STEPS = 3
NEW_TOKENS = 5
MANY_SPLIT = (
    5  # generate_many: process 0 gets prompts [0, 5), process 1 [5, 8): uneven batch counts
)


def mesh_name(shape) -> str:
    return "x".join(map(str, shape))


def global_sft_batch(step: int):
    """The whole right-padded `SequenceBatch` of step `step` (every process builds it; each feeds
    only its rows).

    Built here rather than with tests.helpers, which imports torch: the workers stay light.
    """
    from plad_jax.data import SequenceBatch

    rng = np.random.default_rng(step)
    pm = (np.arange(max(PROMPT_LENS))[None] < np.asarray(PROMPT_LENS)[:, None]).astype(np.int32)
    rm = (np.arange(max(RESPONSE_LENS))[None] < np.asarray(RESPONSE_LENS)[:, None]).astype(np.int32)
    return SequenceBatch(
        prompt_ids=rng.integers(3, VOCAB, pm.shape).astype(np.int32) * pm,
        prompt_mask=pm,
        response_ids=rng.integers(3, VOCAB, rm.shape).astype(np.int32) * rm,
        response_mask=rm,
    )


def sft_run(model_dir: str, mesh_shape, steps: int = STEPS, eager_logits: bool = False) -> dict:
    """Losses and grad norms of `steps` SFT steps on `mesh_shape`, each process feeding its own
    rows.

    eager_logits: also the sum of |`LanguageModel.logits`| on the whole first batch after training
    (every process passing the whole batch: the `shard_batch` path).
    """
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from plad_jax import methods
    from plad_jax import sharding as shd
    from plad_jax.models import from_pretrained
    from plad_jax.training.step import (
        OptimizerConfig,
        TrainState,
        check_finite,
        make_optimizer,
        make_train_step,
        reduce_metrics,
        state_shardings,
    )

    mesh = shd.make_mesh(tuple(mesh_shape))
    lm = from_pretrained(model_dir, mesh=mesh)
    loss_fn, frozen_fn = methods.SFT().objective(lm)
    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-2, warmup_steps=1, total_steps=10))
    state = TrainState.create(lm.params, optimizer)
    step = make_train_step(
        loss_fn, optimizer, frozen_fn=frozen_fn, state_shardings=state_shardings(state)
    )
    rows = shd.process_batch_rows(mesh, ROWS)
    out = {"rows": [rows.start, rows.stop], "loss": [], "grad_norm": []}
    for i in range(steps):
        local = jax.tree.map(lambda array: array[rows], global_sft_batch(i))
        state, metrics = step(state, shd.global_batch(mesh, local), {})
        check_finite(metrics, i)
        reduced = reduce_metrics(metrics)
        out["loss"].append(reduced["loss"])
        out["grad_norm"].append(reduced["grad_norm"])
    if not eager_logits:
        return out
    batch = global_sft_batch(0)
    logits = lm.with_params(state.params).logits(*batch.inputs())
    abs_sum = jax.jit(lambda x: abs(x).sum(), out_shardings=NamedSharding(mesh, PartitionSpec()))
    out["logits_abs_sum"] = float(abs_sum(logits))
    return out


def sample_run(model_dir: str, mesh_shape=MESHES[0]) -> dict:
    """The sampler with global arrays: this process passes only its own prompts and gets their
    samples.

    `generate` on this process's rows of the step-0 prompts (greedy; and 2 samples each at
    temperature 1 with the rows' global indices as `sample_ids`), and `generate_many` (batch 2) on
    this process's share of the prompts, an uneven split, so the processes must agree on the
    number of batches. On one process: every prompt, the reference.
    """
    import jax

    from plad_jax import sharding as shd
    from plad_jax.generation import sampler
    from plad_jax.models import from_pretrained

    lm = from_pretrained(model_dir, mesh=shd.make_mesh(tuple(mesh_shape)))
    batch = global_sft_batch(0)
    ids, mask = batch.prompt_ids, batch.prompt_mask
    me, count = jax.process_index(), jax.process_count()
    rows = np.array_split(np.arange(ROWS), count)[me]
    greedy = sampler.generate(lm, ids[rows], mask[rows], max_new_tokens=NEW_TOKENS, temperature=0.0)
    sampled = sampler.generate(
        lm,
        ids[rows],
        mask[rows],
        max_new_tokens=NEW_TOKENS,
        temperature=1.0,
        num_samples=2,
        seed=7,
        sample_ids=rows,
    )
    mine = (
        list(range(ROWS))
        if count == 1
        else [list(range(MANY_SPLIT)), list(range(MANY_SPLIT, ROWS))][me]
    )
    prompts = [ids[i, : PROMPT_LENS[i]].tolist() for i in mine]
    many = sampler.generate_many(
        lm,
        prompts,
        max_new_tokens=NEW_TOKENS,
        batch_size=2,
        temperature=1.0,
        seed=3,
        sample_ids=mine,
        progress=False,
    )
    return {
        "rows": rows.tolist(),
        "greedy": greedy.tokens.tolist(),
        "greedy_logprobs": greedy.logprobs.tolist(),
        "sampled": sampled.tokens.tolist(),
        "many_prompts": mine,
        "many": [s.ids for s in many],
        "many_logprob": [s.logprob for s in many],
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--num-processes", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument(
        "--timeout", type=int, default=60, help="seconds to wait for the other processes"
    )
    args = parser.parse_args()

    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py
    address = f"127.0.0.1:{args.port}"
    jax.distributed.initialize(
        coordinator_address=address,
        coordinator_bind_address=address,
        num_processes=args.num_processes,
        process_id=args.process_id,
        initialization_timeout=args.timeout,
    )
    runs = {
        mesh_name(shape): sft_run(args.model_dir, shape, eager_logits=shape == MESHES[0])
        for shape in MESHES
    }
    samples = sample_run(args.model_dir)
    print(
        json.dumps(
            {
                "process": jax.process_index(),
                "devices": jax.device_count(),
                "local_devices": jax.local_device_count(),
                "runs": runs,
                "samples": samples,
            }
        ),
        flush=True,
    )
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
