"""The five stages of a run, each a function of (context, stage directory) -> summary metrics.

    sft_teacher  base teacher, D0      -> sft_teacher/params/ (HF safetensors), best on validation
    sft_student  base student, D0      -> sft_student/params/
    sample       both SFT models, D    -> sample/pairs-*.parquet (teacher sample preferred)
    distill      SFT student, pairs    -> distill/params/ (the distilled student)
    eval         all three, test split -> eval/metrics.json, report.md, *.png, responses.jsonl

A stage whose `DONE` marker exists is skipped; `DONE` is written last, with the stage's summary.
Inside a stage, training resumes from its Orbax checkpoints (`training.trainer`), so a killed run
restarts where it stopped. Hand-offs between stages are HF directories (`save_pretrained`), which
transformers loads too.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os

import jax

from plad_jax import data, methods
from plad_jax.config import Config, ConfigError
from plad_jax.models import hf
from plad_jax.pipeline import distill, evaluation, inputs, sample, sft
from plad_jax.pipeline.context import Context, write_json

logger = logging.getLogger(__name__)


STAGES = ("sft_teacher", "sft_student", "sample", "distill", "eval")


def run(config: Config, run_dir: str, stages=STAGES, *, on_start=None):
    """Run the selected stages in pipeline order, skipping those already DONE.

    The inputs of the pending stages are checked first (`check_inputs`); `on_start()` runs after
    that check and before any stage (the CLI records config.json there), so input that cannot
    work changes nothing in the run directory."""
    ctx = Context(config, run_dir)
    pending = [
        name for name in STAGES if name in stages and not os.path.exists(ctx.path(name, "DONE"))
    ]
    check_inputs(ctx, pending)
    if on_start is not None:
        on_start()
    for name in STAGES:
        if name not in stages:
            continue
        done = ctx.path(name, "DONE")
        if os.path.exists(done):
            logger.info("stage %s: already done, skipped (%s)", name, done)
            continue
        logger.info("stage %s: start", name)
        os.makedirs(ctx.path(name), exist_ok=True)
        summary = STAGE_FUNCTIONS[name](ctx, ctx.path(name))
        if jax.process_index() == 0:
            write_json(done, summary)
        _barrier(
            f"stage {name} done"
        )  # no process reads a stage's output before every process wrote it
        logger.info("stage %s: done %s", name, json.dumps(summary))


def _barrier(name: str):
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def check_inputs(ctx: Context, pending) -> None:
    """Before any work: every earlier stage, model, tokenizer, scorer and dataset that the pending
    stages read (`plad_jax.pipeline.inputs` derives the list from the config) is done, on this
    machine or reachable. All that is missing goes into one ConfigError line naming the setting that
    reads it and the `--set` that fixes it, so a run without network fails in seconds, not after
    hours of teacher SFT. The check's own log lines (data loaded, ...) appear once it passes: a run
    that cannot start prints its one line and nothing else."""
    with _held_logs():
        _check_inputs(ctx, pending)


@contextlib.contextmanager
def _held_logs(name: str = "plad_jax"):
    """Holds the records of logger `name` and its children; replays them after a clean exit and
    drops them when the block raises."""
    held, log = [], logging.getLogger(name)
    handler = logging.Handler()
    handler.emit = held.append
    propagate, log.propagate = log.propagate, False
    log.addHandler(handler)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.propagate = propagate
    for record in held:
        logging.getLogger(record.name).handle(record)


def _check_inputs(ctx: Context, pending) -> None:
    cfg = ctx.config
    method = ctx.method  # the method and its hyper-parameters: a ConfigError before anything else
    _check_upstream(ctx, pending)
    data_problem, validation = None, True  # without data to look at, select_best is taken to score
    if pending:
        try:  # loads (and caches) the task's data, or says what is wrong
            validation = bool(ctx.splits.validation)
        except data.DataError as e:
            data_problem = e
    needs = inputs.pending_needs(cfg, pending, validation=validation)
    missing, unusable = _unavailable(ctx, needs, pending)
    if not missing and not unusable:
        if data_problem is not None:
            raise data_problem
        check_checkpoints(cfg, pending)
        if "distill" in pending and method.shared_vocabulary:
            methods.check_shared_vocabulary(
                method, cfg, ctx.tokenizer("teacher"), ctx.tokenizer("student")
            )
        return
    parts = [_missing_weights(missing)] if missing else []
    parts += [
        f"{inputs.describe(need, readers)} cannot be loaded ({why}); a python scorer is "
        "module:attr on the Python path"
        for need, readers, why in unusable
    ]
    if data_problem is not None:
        parts.append(f"and the data: {data_problem}")
    raise ConfigError("; ".join(parts))


def _check_upstream(ctx: Context, pending):
    """A pending stage whose earlier stage is neither done nor pending cannot start."""
    if "://" in ctx.run_dir:
        return  # stage markers of a remote run directory are not visible to os.path
    for stage in pending:
        for before in inputs.upstream(ctx.config, stage):
            if before not in pending and not os.path.exists(ctx.path(before, "DONE")):
                marker = ctx.path(before, "DONE")
                raise ConfigError(
                    f"stage {stage} reads the output of stage {before}, which is not "
                    f"done in {ctx.run_dir} ({marker} is missing); add {before} to "
                    "--stages or point --run-dir at the run that has it"
                )


def _unavailable(ctx: Context, needs: dict, pending):
    """([(need, readers)] not found, [(need, readers, why)] that cannot be imported)."""
    missing, unusable = [], []
    for need, readers in needs.items():
        if not need.source or _made_by_pending_stage(ctx, need.source, pending):
            continue
        if need.kind == "python":
            why = inputs.import_problem(need.source)
            if why:
                unusable.append((need, readers, why))
        elif not _found(need):
            missing.append((need, readers))
    return missing, unusable


def _found(need) -> bool:
    return os.path.isdir(need.source) if need.kind == "directory" else hf.is_available(need.source)


def _made_by_pending_stage(ctx: Context, source: str, pending) -> bool:
    """A path inside a pending stage's directory (e.g. PbKD's `distill/reward_model` for eval)."""
    where = os.path.abspath(source)
    return any(where.startswith(os.path.abspath(ctx.path(stage)) + os.sep) for stage in pending)


def _missing_weights(missing) -> str:
    names = ", ".join(inputs.describe(need, readers) for need, readers in missing)
    fix = " ".join(f"--set {need.key}={_local_hint(need.key, need.source)}" for need, _ in missing)
    scorers = sorted({need.via.split("=")[0] for need, _ in missing if need.via})
    extra = "".join(f"; also --set {s}=rouge scores offline" for s in scorers)
    selections = sorted({r for _, rs in missing for r in rs if r.endswith(".select_best")})
    extra += "".join(f"; or --set {r}=false keeps the last checkpoint" for r in selections)
    one = len(missing) == 1
    return (
        f"missing weights: {names} {'is' if one else 'are'} neither a local directory nor "
        f"reachable on the Hugging Face hub; download {'it' if one else 'them'} (config.json, "
        f"safetensors, tokenizer files) and point at the local {'copy' if one else 'copies'}: "
        f"{fix}{extra}"
    )


def check_checkpoints(cfg: Config, pending) -> None:
    """GGUF files readable (with tokenizer metadata unless a tokenizer is given) and `layers`
    within the checkpoint, for each role whose base model a pending stage loads; a
    CheckpointError names the role's key."""
    for role, stage in (("teacher", "sft_teacher"), ("student", "sft_student")):
        model = getattr(cfg, role)
        if stage not in pending or not os.path.exists(model.path):
            continue  # a hub id: checked when it loads
        try:
            hf.check_checkpoint(model.path, layers=model.cut, need_tokenizer=not model.tokenizer)
        except hf.CheckpointError as e:
            raise hf.CheckpointError(f"{role}.path: {e}") from None


def _local_hint(key: str, source: str) -> str:
    return (
        "/models/" + source.rstrip("/").rpartition("/")[2]
        if "/" in source
        else f"/models/{key.split('.')[0]}"
    )


STAGE_FUNCTIONS = {
    "sft_teacher": sft.sft_stage("teacher"),
    "sft_student": sft.sft_stage("student"),
    "sample": sample.sample_stage,
    "distill": distill.distill_stage,
    "eval": evaluation.eval_stage,
}
