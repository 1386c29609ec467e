"""Checkpoints: bitwise round trips, restore onto another mesh, corrupt and partial steps, NaN stop,
params hand-off, and a SIGKILLed training run that resumes to the uninterrupted run's exact
params."""

import logging
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from jax.sharding import SingleDeviceSharding

from plad_jax import sharding as shd
from plad_jax.models import CheckpointError, from_pretrained
from plad_jax.training import checkpointing as ckpt
from plad_jax.training.step import (
    NonFiniteLossError,
    OptimizerConfig,
    TrainState,
    make_optimizer,
    make_train_step,
)
from plad_jax.training.trainer import train_loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTIMIZER = make_optimizer(OptimizerConfig(learning_rate=1e-2, warmup_steps=2, total_steps=20))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    path = str(tmp_path_factory.mktemp("llama"))
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


def llama_state(model_dir, mesh, seed=0, step=0):
    """A TrainState on `mesh` whose optimizer moments, step and rng all hold distinct, non-default
    values."""
    state = TrainState.create(from_pretrained(model_dir, mesh=mesh).params, OPTIMIZER, seed=seed)
    rng = np.random.default_rng(seed + 1)
    leaves, treedef = jax.tree.flatten(state.opt_state)
    noisy = [
        jax.device_put(
            rng.standard_normal(x.shape).astype(x.dtype)
            if jnp.issubdtype(x.dtype, jnp.floating)
            else np.asarray(x) + 5,
            x.sharding,
        )
        for x in leaves
    ]
    return state.replace(
        opt_state=jax.tree.unflatten(treedef, noisy),
        step=jax.device_put(jnp.int32(step), state.step.sharding),
    )


def host(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def assert_trees_equal(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(host(got), host(want)):
        assert a.dtype == b.dtype and np.array_equal(a, b)


def test_round_trip_is_bitwise_and_survives_donation(model_dir, tmp_path):
    mesh = shd.make_mesh((8, 1, 1))
    state = llama_state(model_dir, mesh, seed=3, step=7)
    want = host(state)
    manager = ckpt.open_manager(tmp_path, ckpt.CheckpointConfig(every_steps=1))
    assert ckpt.save(manager, 7, state, ckpt.DataPosition(2, 5), metrics={"loss": np.float32(1.5)})
    # The save finishes in the background while the next step donates (overwrites) the state.
    bump = jax.jit(lambda s: jax.tree.map(lambda x: x + 1, s), donate_argnums=0)
    state = bump(state)
    ckpt.wait(manager)
    manager.close()

    manager = ckpt.open_manager(tmp_path, ckpt.CheckpointConfig(every_steps=1))
    restored, position = ckpt.restore_latest(manager, ckpt.abstract_like(state))
    assert isinstance(restored, TrainState) and position == ckpt.DataPosition(2, 5)
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for a, b in zip(host(restored), want):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    assert int(restored.step) == 7


def test_empty_directory_restores_nothing(tmp_path):
    manager = ckpt.open_manager(tmp_path / "ckpt", ckpt.CheckpointConfig())
    assert ckpt.restore_latest(manager, {"w": jax.ShapeDtypeStruct((2,), jnp.float32)}) is None


@pytest.mark.parametrize("target", [(1, 2, 4), "single"])
def test_restore_onto_another_mesh(model_dir, tmp_path, target):
    state = llama_state(model_dir, shd.make_mesh((8, 1, 1)), seed=1, step=4)
    manager = ckpt.open_manager(tmp_path, ckpt.CheckpointConfig(every_steps=1))
    ckpt.save(manager, 4, state, ckpt.DataPosition(0, 4))
    ckpt.wait(manager)

    if target == "single":
        device = SingleDeviceSharding(jax.devices()[3])
        abstract = ckpt.abstract_like(state, jax.tree.map(lambda _: device, state))
    else:
        abstract = ckpt.abstract_like(llama_state(model_dir, shd.make_mesh(target)))
    restored, _ = ckpt.restore_latest(
        ckpt.open_manager(tmp_path, ckpt.CheckpointConfig()), abstract
    )
    assert_trees_equal(restored, state)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(abstract)):
        assert got.sharding == want.sharding
    if target != "single":  # the new layout really differs: q_proj is split over fsdp and tensor
        q = restored.params["layers"][0]["self_attn"]["q_proj"]["kernel"].get_value()
        assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
        assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (16, 8)


def toy_state(value):
    return TrainState.create({"w": jnp.full((4,), value, jnp.float32)}, optax.sgd(0.1), seed=0)


def save_two_steps(directory):
    """Steps 3 and 6 with different states; returns the state saved at step 3."""
    manager = ckpt.open_manager(directory, ckpt.CheckpointConfig(every_steps=3, keep=2))
    for step in (3, 6):
        ckpt.save(manager, step, toy_state(float(step)), ckpt.DataPosition(0, step))
    manager.close()
    return toy_state(3.0)


def truncate_state_manifest(step_dir):
    (step_dir / "state" / "manifest.ocdbt").write_bytes(b"")


def garbage_meta(step_dir):
    (step_dir / "meta" / "metadata").write_text("{not json")


@pytest.mark.parametrize("corrupt", [truncate_state_manifest, garbage_meta])
def test_corrupt_latest_is_reported_and_previous_used(tmp_path, caplog, corrupt):
    want = save_two_steps(tmp_path)
    corrupt(tmp_path / "6")
    (tmp_path / "9.orbax-checkpoint-tmp" / "state").mkdir(parents=True)  # a save killed half-way

    with caplog.at_level(logging.WARNING, logger="plad_jax.training.checkpointing"):
        manager = ckpt.open_manager(tmp_path, ckpt.CheckpointConfig(every_steps=3, keep=2))
        assert manager.all_steps() == [3, 6]  # the unfinished step 9 is not a checkpoint
        restored, position = ckpt.restore_latest(manager, ckpt.abstract_like(toy_state(0.0)))
    assert_trees_equal(restored, want)
    assert position == ckpt.DataPosition(0, 3)
    messages = [r.getMessage() for r in caplog.records]
    assert any("unfinished checkpoint" in m and "9.orbax-checkpoint-tmp" in m for m in messages), (
        messages
    )
    moved = [m for m in messages if m.startswith("checkpoint step 6 ")]
    assert len(moved) == 1 and "\n" not in moved[0] and "resuming from step 3" in moved[0], messages
    # Nothing is deleted: the unreadable step is kept aside, and its number can be saved again.
    assert (tmp_path / "6.corrupt").exists()
    ckpt.save(manager, 6, toy_state(6.5), ckpt.DataPosition(0, 6), force=True)
    ckpt.wait(manager)
    manager.close()
    assert ckpt.open_manager(
        tmp_path, ckpt.CheckpointConfig(every_steps=3, keep=2)
    ).all_steps() == [3, 6]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["3", "6", "6.corrupt"]


def test_no_readable_checkpoint_is_one_line_error_and_nothing_moves(tmp_path):
    manager = ckpt.open_manager(tmp_path, ckpt.CheckpointConfig(every_steps=3))
    ckpt.save(manager, 3, toy_state(3.0), ckpt.DataPosition(0, 3))
    ckpt.wait(manager)
    truncate_state_manifest(tmp_path / "3")
    with pytest.raises(CheckpointError) as error:
        ckpt.restore_latest(manager, ckpt.abstract_like(toy_state(0.0)))
    assert "\n" not in str(error.value)
    assert str(tmp_path) in str(error.value) and "step 3" in str(error.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["3"]


def test_checkpoint_of_another_config_is_refused(tmp_path):
    manager = ckpt.open_manager(tmp_path, ckpt.CheckpointConfig(every_steps=3))
    ckpt.save(manager, 3, toy_state(3.0), ckpt.DataPosition(0, 3), config_hash="aaa")
    ckpt.wait(manager)
    with pytest.raises(CheckpointError, match="another config"):
        ckpt.restore_latest(manager, ckpt.abstract_like(toy_state(0.0)), config_hash="bbb")


# -- the loop: resume, NaN stop -----------------------------------------------------------------


def toy_loss(params, frozen, batch, rng):
    noise = jax.random.normal(rng, (4,)) * 0.01  # the step rng must be restored too
    loss = jnp.sum((params["w"] - batch["target"] + noise) ** 2)
    return loss, {"loss": (loss, jnp.float32(1.0))}


TOY_OPTIMIZER = optax.adam(0.1)
TOY_STEP = make_train_step(
    toy_loss, TOY_OPTIMIZER
)  # one jitted step for every toy test: compiled once


def toy_problem(nan_step=None, steps_per_epoch=4):
    """(step_fn, state, batches) of a quadratic fit whose batch for step k (1-based) is NaN when k
    == nan_step."""

    def batches(epoch, index):
        step = epoch * steps_per_epoch + index + 1
        target = np.sin(np.arange(4) + 10 * epoch + index).astype(np.float32)
        return {"target": jnp.asarray(target * (np.nan if step == nan_step else 1.0))}

    return TOY_STEP, TrainState.create({"w": jnp.zeros(4)}, TOY_OPTIMIZER, seed=5), batches


def test_loop_resumed_in_process_equals_uninterrupted(tmp_path):
    step_fn, state, batches = toy_problem()
    cfg = ckpt.CheckpointConfig(every_steps=3, keep=2)
    straight = train_loop(
        step_fn,
        state,
        batches,
        total_steps=10,
        steps_per_epoch=4,
        manager=ckpt.open_manager(tmp_path / "a", cfg),
    )

    step_fn, state, batches = toy_problem()
    train_loop(
        step_fn,
        state,
        batches,
        total_steps=7,
        steps_per_epoch=4,
        manager=ckpt.open_manager(tmp_path / "b", cfg),
    )
    logged = []
    step_fn, state, batches = toy_problem()
    resumed = train_loop(
        step_fn,
        state,
        batches,
        total_steps=10,
        steps_per_epoch=4,
        log_every=1,
        on_metrics=lambda step, m: logged.append(step),
        manager=ckpt.open_manager(tmp_path / "b", cfg),
    )
    assert logged == [8, 9, 10]  # started from the checkpoint at step 7, not from scratch
    assert_trees_equal(resumed, straight)
    _, position = ckpt.restore_latest(
        ckpt.open_manager(tmp_path / "b", cfg), ckpt.abstract_like(resumed)
    )
    assert position == ckpt.DataPosition(2, 2)


@pytest.mark.parametrize(
    "nan_step", [5, 6]
)  # 6 is itself a save step: the NaN state must not be saved
def test_nan_stops_with_clear_error_and_last_good_checkpoint(tmp_path, nan_step):
    step_fn, state, batches = toy_problem(nan_step=nan_step)
    reference = state
    for index in range(4):  # the state after step 4, computed without the loop
        reference, _ = step_fn(reference, batches(index // 4, index % 4), None)
    reference = host(reference)

    step_fn, state, batches = toy_problem(nan_step=nan_step)
    manager = ckpt.open_manager(tmp_path, ckpt.CheckpointConfig(every_steps=2, keep=3))
    with pytest.raises(NonFiniteLossError) as error:
        train_loop(step_fn, state, batches, total_steps=10, steps_per_epoch=4, manager=manager)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(
        f"step {nan_step} (epoch 1, batch {nan_step - 5}): loss or gradient is NaN/Inf"
    )
    assert f"the last good checkpoint is step 4 in {tmp_path}" in message

    manager = ckpt.open_manager(tmp_path, ckpt.CheckpointConfig(every_steps=2, keep=3))
    assert manager.all_steps() == [2, 4]
    restored, position = ckpt.restore_latest(manager, ckpt.abstract_like(toy_problem()[1]))
    assert position == ckpt.DataPosition(1, 0)
    for a, b in zip(host(restored), reference):
        assert np.array_equal(a, b)


# -- params hand-off ----------------------------------------------------------------------------


def test_params_hand_off_round_trip_onto_another_mesh(model_dir, tmp_path):
    params = from_pretrained(model_dir, mesh=shd.make_mesh((8, 1, 1))).params
    ckpt.save_params(tmp_path / "params", params)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params"]

    target = from_pretrained(model_dir, mesh=shd.make_mesh((1, 2, 4))).params
    loaded = ckpt.load_params(tmp_path / "params", ckpt.abstract_like(target))
    assert_trees_equal(loaded, params)
    for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(target)):
        assert got.sharding == want.sharding
    ckpt.save_params(tmp_path / "params", target)  # a rerun of the stage replaces its hand-off


def test_interrupted_hand_off_never_looks_complete(tmp_path, monkeypatch):
    from orbax.checkpoint._src.path import atomicity  # the step that makes a save visible

    async def killed(*args, **kwargs):
        raise RuntimeError("killed before the save was finalized")

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", killed)
    with pytest.raises(Exception, match="killed before"):
        ckpt.save_params(tmp_path / "params", {"w": jnp.ones(3)})
    assert not (tmp_path / "params").exists()
    abstract = {"w": jax.ShapeDtypeStruct((3,), jnp.float32)}
    with pytest.raises(CheckpointError, match="no params hand-off here"):
        ckpt.load_params(tmp_path / "params", abstract)
    monkeypatch.undo()  # the rerun stage writes its hand-off over the leftovers
    ckpt.save_params(tmp_path / "params", {"w": jnp.ones(3)})
    np.testing.assert_array_equal(ckpt.load_params(tmp_path / "params", abstract)["w"], np.ones(3))


def test_corrupt_hand_off_is_one_line_error(tmp_path):
    path = tmp_path / "params"
    ckpt.save_params(path, {"w": jnp.arange(6.0), "b": jnp.ones(2)})
    (path / "manifest.ocdbt").write_bytes(b"garbage")
    abstract = {
        "w": jax.ShapeDtypeStruct((6,), jnp.float32),
        "b": jax.ShapeDtypeStruct((2,), jnp.float32),
    }
    with pytest.raises(CheckpointError) as error:
        ckpt.load_params(path, abstract)
    assert "\n" not in str(error.value) and str(error.value).startswith(
        f"{path}: params hand-off is unreadable"
    )


# -- preemption: SIGKILL mid-run, restart, same params bit for bit ------------------------------


def run_script(model_dir, run_dir, env, *extra):
    return subprocess.Popen(
        [
            sys.executable,
            os.path.join(REPO, "tests", "resumable_train.py"),
            model_dir,
            str(run_dir),
            *extra,
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(process, timeout=240):
    try:
        out, _ = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, out[-3000:]
    return out


def final_params(run_dir):
    with np.load(run_dir / "final.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.mark.slow
def test_sigkill_mid_run_then_restart_equals_uninterrupted(model_dir, tmp_path):
    env = {
        **os.environ,
        "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
        # Later runs reuse the first run's compiled step: same executable, and ~10 s faster each.
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }
    env.pop("XLA_FLAGS", None)  # the script sets its own 8 fake devices
    straight_dir, killed_dir = tmp_path / "straight", tmp_path / "killed"
    finish(run_script(model_dir, straight_dir, env))

    process = run_script(model_dir, killed_dir, env, "--pause-at", "7")
    try:
        lines = []
        for line in process.stdout:  # step 7 done; step 6's async save may still be in flight
            lines.append(line)
            if line.strip() == "paused":
                break
        assert lines and lines[-1].strip() == "paused", "".join(lines)[-3000:]
        # Only look: a manager opened here would clean up the running save's temporary directory.
        step_6 = (
            killed_dir / "checkpoints" / "6"
        )  # appears, by atomic rename, once the save is complete
        deadline = time.time() + 60
        while not step_6.exists() and time.time() < deadline:
            time.sleep(0.2)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    assert not (killed_dir / "final.npz").exists()
    manager = ckpt.open_manager(killed_dir / "checkpoints", ckpt.CheckpointConfig())
    assert manager.all_steps() == [3, 6]  # the last complete checkpoint survived the kill

    out = finish(run_script(model_dir, killed_dir, env))
    assert "resumed from step 6 (epoch 1, batch 1)" in out, out[-3000:]
    assert "step 6 loss" not in out and "step 7 loss" in out and "step 12 loss" in out
    want, got = final_params(straight_dir), final_params(killed_dir)
    assert sorted(got) == sorted(want) and len(want) > 10
    for name in want:
        assert np.array_equal(got[name], want[name]), name
