"""Orbax checkpoints: resumable train state, and the params-only hand-off between stages.

A stage's run directory holds (local path or `gs://`):

    <stage>/checkpoints/<step>/state   the whole `TrainState` (params, optimizer state, step, rng)
    <stage>/checkpoints/<step>/meta    JSON: step, data position (epoch, batch index), config hash,
                                       metrics
    <stage>/params/                    params only, read by the next stage

Saves are asynchronous: `save` returns once the arrays are copied off the device, the files are
written in the background, and a step becomes visible only when it is complete (Orbax writes to
`<step>.orbax-checkpoint-tmp-*` and renames, or on GCS writes `commit_success.txt` last). Older
steps are deleted only after a newer one is complete, so a killed run never loses its last
checkpoint.

`restore_latest` restores onto whatever shardings the abstract target carries, so a run saved on
one mesh resumes on another. If the newest step cannot be read it says so in one warning line,
moves it aside to `<step>.corrupt` (nothing is deleted) and resumes from the one before.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import jax
import orbax.checkpoint as ocp
from etils import epath

from plad_jax.data.batching import DataPosition
from plad_jax.errors import CheckpointError

logger = logging.getLogger(__name__)

STATE, META = "state", "meta"


@dataclasses.dataclass
class CheckpointConfig:
    every_steps: int = 500  # also saved at the last step and, on TPU pods, at a preemption notice
    keep: int = 2  # newest complete checkpoints kept on disk
    async_save: bool = True


def abstract_like(tree, shardings=None):
    """`ShapeDtypeStruct`s of `tree` (arrays or structs) with `shardings` (a matching tree) or their
    own.

    The restore target: `restore_latest(manager, abstract_like(state))` with `state` placed on the
    new mesh, or `abstract_like(nnx.eval_shape(...), param_shardings(...))` without materialising.
    """
    if shardings is None:
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree
        )
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def _path(directory) -> epath.Path:
    """`directory` as an absolute `epath.Path` (Orbax refuses relative local paths; `gs://` is
    kept)."""
    text = str(directory)
    return epath.Path(text if "://" in text else os.path.abspath(text))


# -- resumable train state ----------------------------------------------------------------------


def open_manager(directory, cfg: CheckpointConfig) -> ocp.CheckpointManager:
    """An Orbax `CheckpointManager` on `directory` that saves every `cfg.every_steps` and keeps
    `cfg.keep`.

    Unfinished saves left by a killed run are reported, then removed (they were never usable).
    """
    if cfg.every_steps < 1 or cfg.keep < 1:
        raise ValueError(
            f"checkpoint every_steps={cfg.every_steps} and keep={cfg.keep} must both be >= 1"
        )
    directory = _path(directory)
    if directory.exists():
        for tmp in ocp.path.step.all_temporary_paths(directory):
            logger.warning(
                "ignoring unfinished checkpoint %s (a save interrupted before it completed)",
                tmp.get(),
            )
    policies = ocp.checkpoint_managers
    policy = policies.AnySavePolicy(
        [policies.FixedIntervalPolicy(cfg.every_steps), policies.PreemptionCheckpointingPolicy()]
    )
    options = ocp.CheckpointManagerOptions(
        max_to_keep=cfg.keep,
        enable_async_checkpointing=cfg.async_save,
        save_decision_policy=policy,
        cleanup_tmp_directories=True,
    )
    return ocp.CheckpointManager(directory, options=options)


def save(
    manager: ocp.CheckpointManager,
    step: int,
    state,
    position: DataPosition,
    *,
    metrics: dict | None = None,
    config_hash: str | None = None,
    force: bool = False,
) -> bool:
    """Start saving `state` as `step` if the manager's policy says so (always with `force`).

    Returns whether a save started. It finishes in the background; `wait(manager)` before exit.
    """
    meta = {
        "step": int(step),
        "position": dataclasses.asdict(position),
        "config_hash": config_hash,
        "metrics": {k: float(v) for k, v in (metrics or {}).items()},
    }
    args = ocp.args.Composite(
        **{STATE: ocp.args.StandardSave(state), META: ocp.args.JsonSave(meta)}
    )
    return manager.save(int(step), args=args, force=force)


def wait(manager: ocp.CheckpointManager):
    """Block until every pending save is complete on disk."""
    manager.wait_until_finished()


def restore_latest(
    manager: ocp.CheckpointManager, abstract_state, *, config_hash: str | None = None
):
    """`(state, DataPosition)` from the newest readable checkpoint, or None when there is none.

    `abstract_state` (see `abstract_like`) gives the structure and the target shardings, so the
    state lands directly on the mesh of this run, whatever mesh saved it. Newer steps that cannot
    be read are reported and moved aside. Raises `CheckpointError` when checkpoints exist but none
    can be read, or when they were written under another config hash.
    """
    failures = []  # (step, reason), newest first
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            restored = manager.restore(
                step,
                args=ocp.args.Composite(
                    **{
                        STATE: ocp.args.StandardRestore(abstract_state),
                        META: ocp.args.JsonRestore(),
                    }
                ),
            )
            meta = restored[META]
            position = DataPosition(**meta["position"])
        except Exception as e:  # noqa: BLE001 - any unreadable step is skipped the same way
            failures.append((step, _one_line(e)))
            continue
        saved_hash = meta.get("config_hash")
        if config_hash is not None and saved_hash is not None and saved_hash != config_hash:
            raise CheckpointError(
                f"{manager.directory}: checkpoints were written by another config "
                f"(hash {saved_hash}, this run {config_hash}); use a new run directory"
            )
        for bad_step, reason in failures:
            _move_aside(manager, bad_step, reason, step)
        if failures:
            manager.reload()
        return restored[STATE], position
    if failures:
        step, reason = failures[0]
        raise CheckpointError(
            f"{manager.directory}: no checkpoint can be restored (step {step}: {reason}); "
            "if the model or optimizer changed, use a new run directory"
        )
    return None


def _move_aside(manager, step: int, reason: str, resume_step: int):
    """Rename an unreadable step to `<step>.corrupt[-n]` so its number can be saved again."""
    path = epath.Path(manager.directory) / str(step)
    target, n = path.parent / f"{step}.corrupt", 1
    if jax.process_index() == 0:
        while target.exists():
            target, n = path.parent / f"{step}.corrupt-{n}", n + 1
        try:
            path.rename(target)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(
                f"{path}: checkpoint is unreadable ({reason}) and could not be moved aside "
                f"({_one_line(e)}); move or delete it, then restart"
            ) from None
    ocp.multihost.sync_global_processes(f"plad_jax_move_aside_{step}")
    logger.warning(
        "checkpoint step %d in %s is unreadable (%s); moved it to %s and resuming from step %d",
        step,
        manager.directory,
        reason,
        target.name,
        resume_step,
    )


def _one_line(error: BaseException, limit: int = 300) -> str:
    text = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {text[0] if text else ''}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- params-only hand-off -----------------------------------------------------------------------


def save_params(directory, params):
    """Write `params` to `directory` (replacing any previous hand-off there) and wait until
    complete.

    Atomic: Orbax writes `<directory>.orbax-checkpoint-tmp-*` and renames it (on GCS it writes
    `commit_success.txt` last), so a half-written hand-off is never taken for a complete one.
    """
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(_path(directory), params, force=True)
        checkpointer.wait_until_finished()


def load_params(directory, abstract_params):
    """Read a hand-off onto the shardings of `abstract_params` (see `abstract_like`).

    A missing, unfinished or unreadable hand-off raises `CheckpointError` naming the path.
    """
    path = _path(directory)
    if not path.exists():
        raise CheckpointError(
            f"{path}: no params hand-off here; run the stage that writes it first"
        )
    if not ocp.path.step.is_path_finalized(path):
        raise CheckpointError(
            f"{path}: params hand-off is incomplete (its save never finished); "
            "rerun the stage that writes it"
        )
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            return checkpointer.restore(path, abstract_params)
    except Exception as e:  # noqa: BLE001 - corrupt files and mismatched models alike
        raise CheckpointError(
            f"{path}: params hand-off is unreadable or does not match the model "
            f"({_one_line(e)}); rerun the stage that writes it"
        ) from None
