"""What the pending stages of a run read from outside their own stage directory, derived from the
config, so that the check before any work (`plad_jax.pipeline.runner.check_inputs`) covers every
model, tokenizer, scorer and earlier stage that any of them will load.

Some settings pull a reader into a stage that does not own it: `sft_teacher.select_best` scores
each checkpoint with `eval.scorer` (so `eval.reward_model` is read while the teacher trains), a
`distill.method` that compares token distributions reads the teacher's tokenizer and SFT weights,
and PbKD relabels its fresh pairs with `pairs.scorer`. A missing input then fails in seconds,
naming the setting that needs it, not after the first stage has trained for hours.
"""

from __future__ import annotations

import dataclasses
import importlib

from plad_jax import methods
from plad_jax.config import Config

# How a scorer's `reward_model` is found: an HF model (directory or hub id), a plad_jax reward
# model saved by `plad_jax.scoring.reward_model.save` (a directory), or `module:attr`. rouge reads
# nothing.
SCORER_SOURCES = {"reward_model": "hf", "jax_reward_model": "directory", "python": "python"}


@dataclasses.dataclass(frozen=True)
class Need:
    """One input: the config key that names it, its value, how it is found (`hf`: a local
    directory or hub id; `directory`; `python`: module:attr), the setting that makes a stage read
    it (`eval.scorer=reward_model`, or "" when the stage reads it in any case) and the reader."""

    key: str
    source: str
    kind: str
    via: str
    reader: str


def stage_needs(config: Config, stage: str, *, validation: bool = True) -> list[Need]:
    """What `stage` loads from outside the run directory. validation: whether the data has a
    validation split (without one `select_best` scores nothing)."""
    if stage in ("sft_teacher", "sft_student"):
        role = stage.removeprefix("sft_")
        needs = _model(config, role, stage, weights=True)
        if getattr(config, stage).select_best and validation:
            needs += _scorer(config, "eval", f"{stage}.select_best")
        return needs
    roles = _roles(config, stage)
    needs = [n for role in roles for n in _model(config, role, stage, weights=False)]
    if stage == "eval":
        needs += _scorer(config, "eval", "eval")
    fresh_pairs = stage == "distill" and _method(config).reads_pairs_scorer
    if config.pairs.real_ratio > 0 and (stage == "sample" or fresh_pairs):
        needs += _scorer(config, "pairs", stage)  # relabels pairs; PbKD labels its fresh ones too
    return needs


def upstream(config: Config, stage: str) -> tuple[str, ...]:
    """The earlier stages whose outputs `stage` reads from the run directory."""
    if stage == "sample":
        return ("sft_teacher", "sft_student")
    if stage == "distill":
        method = _method(config)
        reads_teacher = method.shared_vocabulary or "teacher" in method.frozen_models
        teacher = ("sft_teacher",) if reads_teacher else ()
        return (*teacher, "sft_student", "sample")
    if stage == "eval":
        return ("sft_teacher", "sft_student", "sample", "distill")
    return ()


def pending_needs(config: Config, pending, *, validation: bool = True) -> dict[Need, list[str]]:
    """Every input of the pending stages (readers merged: key, source, kind, via) -> readers."""
    merged: dict[Need, list[str]] = {}
    for stage in pending:
        for need in stage_needs(config, stage, validation=validation):
            readers = merged.setdefault(dataclasses.replace(need, reader=""), [])
            if need.reader not in readers:
                readers.append(need.reader)
    return merged


def describe(need: Need, readers) -> str:
    """`eval.reward_model 'org/rm' (eval.scorer=reward_model, read by sft_teacher.select_best)`."""
    via = f"{need.via}, " if need.via else ""
    return f"{need.key} '{need.source}' ({via}read by {', '.join(readers)})"


def import_problem(spec: str) -> str | None:
    """Why the `module:attr` of a python scorer cannot be loaded, or None. Imports the module (as
    the scorer will) but does not call the factory, which may load a model."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        return "it is not module:attr"
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - whatever the module raises, the run cannot use it
        return f"{type(e).__name__}: {' '.join(str(e).split())}"
    return None if hasattr(module, attr) else f"module {module_name} has no attribute {attr!r}"


def _model(config: Config, role: str, stage: str, *, weights: bool) -> list[Need]:
    """The role's starting weights (its SFT stage only) and its tokenizer (every stage that
    encodes text for it); a tokenizer left unset is read from `path`."""
    m = getattr(config, role)
    read = [(f"{role}.path", m.path)] if weights else []
    read.append((f"{role}.tokenizer", m.tokenizer) if m.tokenizer else (f"{role}.path", m.path))
    return [Need(key, source, "hf", "", stage) for key, source in dict.fromkeys(read) if source]


def _roles(config: Config, stage: str) -> tuple[str, ...]:
    """Whose tokenizer a later stage encodes with."""
    if stage == "distill" and not _method(config).shared_vocabulary:
        return ("student",)
    return ("teacher", "student")


def _scorer(config: Config, section: str, reader: str) -> list[Need]:
    cfg = getattr(config, section)
    kind = SCORER_SOURCES.get(cfg.scorer)
    if kind is None:
        return []
    via = f"{section}.scorer={cfg.scorer}"
    return [Need(f"{section}.reward_model", cfg.reward_model, kind, via, reader)]


def _method(config: Config) -> type[methods.Method]:
    """The class of `distill.method`: its declarations say what the distill stage reads."""
    return methods.resolve(config.distill.method)
