"""The `Method` base class, the registry of methods by name, and the up-front configuration check.

A distillation method is one class. What the rest of plad_jax needs to know about it is declared
on the class, so the pipeline, the config and the CLI never compare method names:

    batches          `Batches`: what its training batches hold (targets, teacher or student samples,
                     a mix of both, preference pairs, a reference text), built by the pipeline
                     as a `SequenceBatch` or, with pairs, a `PairBatch` (`plad_jax.data.batch`)
    HParams          its hyper-parameters, a frozen dataclass whose `validate()` raises one-line
                     errors; `section` names a config section that holds them whole (PbKD: `pbkd`)
    frozen_models    which frozen models its step reads: "teacher" (the SFT teacher's params in
                     `frozen["teacher"]`), "reference" (a copy of the initial student)
    shared_vocabulary  whether it compares teacher and student token distributions
    iterative        whether `distill.rounds > 1` (resample the student, distil again) applies
    relabels         whether `pairs.real_ratio` (scorer-relabelled pairs) applies
    own_loop         whether it trains itself (`train_own`, PbKD's game) instead of the shared loop

and it implements `frozen(frozen, batch) -> outputs` (models run outside the gradient; the step
puts the outputs in `batch.frozen_outputs`) and `loss(params, frozen, batch, rng) -> (loss,
metrics)`, or `train_own`. `objective(student, ...)`
binds it to models for `train.make_train_step`.

`resolve("plad_rank")` finds a registered class; `resolve("my_module:MyMethod")` imports one
from outside the package. `configure(config)` resolves `distill.method`, builds its
hyper-parameters from the config (type-checked, `validate()`d) and checks the run's settings
against its declarations: the check that runs before any work.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import typing
from typing import Any, ClassVar

from plad_jax.config import METHOD_KNOBS, Config, ConfigError, DistillConfig, check_value

_REGISTRY: dict[str, type[Method]] = {}


@dataclasses.dataclass(frozen=True)
class Batches:
    """What a method's training batches hold; the pipeline builds them from the pair rows, every
    text re-tokenized by the student, as the typed batches of `plad_jax.data.batch` (each field's
    shape and padding documented there):

        prompt_ids, prompt_mask [B, P]              always
        response_ids, response_mask [B, R]          `responses`: one row per pair row and source;
                                                    several sources are concatenated (a mix)
        chosen_ids, chosen_mask, rejected_ids,      `pairs`: y+ and y-; the batch is then a
          rejected_mask                             `PairBatch`, else a `SequenceBatch`
        reference_ids, reference_mask [B, F]        `reference`: `Method.reference_text(row)`

    responses: sources among "target" (the human reference of D), "teacher" and "student" (the
    sampled responses)."""

    responses: tuple[str, ...] = ()
    pairs: bool = False
    reference: bool = False

    SOURCES: ClassVar[tuple[str, ...]] = ("target", "teacher", "student")

    def problem(self) -> str | None:
        """Why the pipeline cannot build these batches, or None."""
        unknown = [s for s in self.responses if s not in self.SOURCES]
        if unknown:
            return f"response sources {unknown} are not among {', '.join(self.SOURCES)}"
        if len(self.responses) > 1 and (self.pairs or self.reference):
            return "a mix of response sources has more rows than its pairs or reference"
        if not (self.responses or self.pairs):
            return "they hold no responses and no pairs"
        return None


@dataclasses.dataclass(frozen=True)
class Setting:
    """What a method that trains itself (`Method.own_loop`) gets besides its models and pairs.

    train: the distillation TrainConfig (batch size, epochs / max_steps, learning rate, ...).
    workdir: a local directory for its checkpoints, curves and anything it saves.
    tokenizer: the student's; every text it trains on is (re-)tokenized with it.
    max_prompt_tokens, max_response_tokens: the encoding limits (`data.encode_texts`).
    scorer: labels fresh pairs (`plad_jax.scoring.rewards` interface); None: pseudo-labels.
    seed: data order, sampling and initialisation.
    """

    train: Any
    workdir: str
    tokenizer: Any
    max_prompt_tokens: int
    max_response_tokens: int
    scorer: Any = None
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class NoHParams:
    """A method without hyper-parameters."""

    def validate(self) -> None:
        pass


def full_params(params, frozen):
    """`combine` for full fine-tuning: the trainable params are the student."""
    return params


class Method:
    """Base class of every distillation method; see the module docstring for what a subclass
    declares. An instance carries its hyper-parameters (`self.hp`) and, once `objective()` bound
    it, the models (`self.student`, `self.teacher`) and `self.combine`."""

    name: ClassVar[str] = ""
    HParams: ClassVar[type] = NoHParams
    section: ClassVar[str | None] = None
    batches: ClassVar[Batches] = Batches()
    frozen_models: ClassVar[tuple[str, ...]] = ()
    shared_vocabulary: ClassVar[bool] = False
    iterative: ClassVar[bool] = False
    relabels: ClassVar[bool] = False
    own_loop: ClassVar[bool] = False
    reads_pairs_scorer: ClassVar[bool] = (
        False  # labels fresh pairs with `pairs.scorer` while it trains
    )

    def __init__(self, hp=None, *, name: str | None = None):
        self.hp = self.HParams() if hp is None else hp
        self.name = name or type(self).name
        self.student = self.teacher = None
        self.combine = full_params

    # -- what a subclass implements ---------------------------------------------------------------
    def validate(self) -> None:
        """Raise ValueError / ConfigError (one sentence naming the key) for unusable
        hyper-parameters."""
        check = getattr(self.hp, "validate", None)
        if check is not None:
            check()

    def frozen(self, frozen, batch):
        """What frozen models compute for a batch, outside the gradient (`TeacherLogits`,
        `ReferenceLogprobs`, or a dataclass of the method's own); the step puts it in
        `batch.frozen_outputs`. Only called when `frozen_models` is not empty."""
        return None

    def loss(self, params, frozen, batch, rng):
        """(scalar loss, metrics as (sum, count) pairs) of the trainable `params`."""
        raise NotImplementedError(f"{type(self).__name__} defines no loss")

    def reference_text(self, row: dict) -> str:
        """The `reference_*` text of a pair row (`batches.reference`)."""
        raise NotImplementedError(
            f"{type(self).__name__} declares a reference but no reference_text"
        )

    def train_own(self, student, rows, setting: Setting, *, teacher=None):
        """`own_loop` methods: train `student` on the pair rows; (student, summary)."""
        raise NotImplementedError(f"{type(self).__name__} declares own_loop but no train_own")

    # -- binding to models ------------------------------------------------------------------------
    def objective(self, student, *, teacher=None, combine=full_params):
        """(loss_fn, frozen_fn) for `train.make_train_step`; frozen_fn is None without frozen
        models."""
        if "teacher" in self.frozen_models and teacher is None:
            raise ValueError(f"method '{self.name}' needs a teacher with the student's vocabulary")
        if (
            self.shared_vocabulary
            and teacher is not None
            and teacher.vocab_size != student.vocab_size
        ):
            raise ValueError(
                f"method '{self.name}' compares token distributions: teacher vocabulary "
                f"{teacher.vocab_size} != student vocabulary {student.vocab_size}"
            )
        self.student, self.teacher, self.combine = student, teacher, combine
        return self.loss, (self.frozen if self.frozen_models else None)

    def student_params(self, params, frozen):
        """The student's full params from the trainable ones (LoRA: base + adapters)."""
        return self.combine(params, frozen)

    def hparams_dict(self) -> dict:
        return dataclasses.asdict(self.hp)


# -- the registry ----------------------------------------------------------------------------------


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make `cls` reachable as `distill.method=<cls.name>`."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no `name` to register under")
    _REGISTRY[cls.name] = cls
    return cls


def names(where=None) -> tuple[str, ...]:
    """Registered method names (those whose class passes `where`), in registration order."""
    return tuple(n for n, c in _REGISTRY.items() if where is None or where(c))


def resolve(spec: str) -> type[Method]:
    """The Method class of a registered name or of `module:Class`; ConfigError (one line) if
    none."""
    if spec in _REGISTRY:
        return _REGISTRY[spec]
    if ":" not in spec:
        close = difflib.get_close_matches(spec, list(_REGISTRY), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise ConfigError(
            f"unknown distill.method '{spec}'; {hint}choose from {', '.join(_REGISTRY)}, "
            "or give module:Class of your own Method subclass"
        )
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - the user's module: one line, not a traceback into ours
        raise ConfigError(
            f"distill.method={spec}: cannot import {module_name} "
            f"({type(e).__name__}: {' '.join(str(e).split())})"
        ) from None
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise ConfigError(
            f"distill.method={spec}: {module_name}.{attr} is not a subclass of "
            "plad_jax.methods.Method"
        )
    return cls


def get(spec: str, **hparams) -> Method:
    """A validated Method instance with the given hyper-parameters (programmatic use, tests)."""
    cls = resolve(spec)
    method = cls(cls.HParams(**hparams), name=spec)
    _validated(method)
    return method


# -- the up-front check ----------------------------------------------------------------------------


def configure(config: Config) -> Method:
    """The run's Method: `distill.method` resolved, its hyper-parameters taken from the config and
    checked, and the settings that only some methods use checked against its declarations. Every
    problem is one ConfigError line, raised before any work."""
    spec = config.distill.method
    cls = resolve(spec)
    if not cls.own_loop and (problem := cls.batches.problem()):
        raise ConfigError(f"distill.method={spec}: its batches cannot be built: {problem}")
    method = cls(_hparams(cls, config), name=spec)
    _validated(method)
    _check_settings(method, config)
    return method


def _validated(method: Method):
    try:
        method.validate()
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(" ".join(str(e).split())) from None


def knob_keys(cls: type[Method]) -> list[str]:
    """The config keys of a method's hyper-parameters."""
    if cls.section:
        return [f"{cls.section}.*"]
    return [_key(f.name) for f in dataclasses.fields(cls.HParams)]


def _key(knob: str) -> str:
    return f"distill.{knob}" if knob in METHOD_KNOBS else f"distill.hparams.{knob}"


def _hparams(cls: type[Method], config: Config):
    """The method's HParams: `distill.<knob>` for the shared knob names, `distill.hparams.<knob>`
    for the rest, each type-checked against the dataclass; a knob set away from its default that
    the method does not have is refused. A method with a `section` takes that section whole."""
    hints = {} if cls.section else _knob_types(cls.HParams)
    values = {**_shared_knobs(cls, config, hints), **_own_knobs(cls, config, hints)}
    if cls.section:
        return getattr(config, cls.section)
    try:
        return cls.HParams(**values)
    except TypeError as e:  # a knob without a default that the config does not set
        raise ConfigError(
            f"distill.method={config.distill.method}: {' '.join(str(e).split())}; set its "
            "hyper-parameters with --set distill.hparams.<name>=value"
        ) from None


def _knob_types(hparams: type) -> dict[str, Any]:
    """{field name: type} of a hyper-parameter dataclass (its fields only, not class variables)."""
    hints = typing.get_type_hints(hparams)
    return {f.name: hints[f.name] for f in dataclasses.fields(hparams)}


def _shared_knobs(cls: type[Method], config: Config, hints: dict) -> dict[str, Any]:
    """The `distill.<knob>` values of the knobs the method has; the others must be at default."""
    d, default, values = config.distill, DistillConfig(), {}
    for knob in METHOD_KNOBS:
        if knob in hints:
            values[knob] = check_value(getattr(d, knob), hints[knob], f"distill.{knob}")
        elif getattr(d, knob) != getattr(default, knob):
            raise ConfigError(_foreign(cls, d.method, f"distill.{knob}={getattr(d, knob)}"))
    return values


def _own_knobs(cls: type[Method], config: Config, hints: dict) -> dict[str, Any]:
    """The `distill.hparams` entries, each a knob of the method, type-checked."""
    values = {}
    for knob, value in config.distill.hparams.items():
        if knob in METHOD_KNOBS:
            raise ConfigError(f"distill.hparams.{knob}: set distill.{knob} instead")
        if knob not in hints:
            close = difflib.get_close_matches(knob, sorted(hints), n=1)
            hint = f"; did you mean distill.hparams.{close[0]}?" if close else ""
            raise ConfigError(
                _foreign(cls, config.distill.method, f"distill.hparams.{knob}") + hint
            )
        values[knob] = check_value(value, hints[knob], f"distill.hparams.{knob}")
    return values


def _foreign(cls: type[Method], spec: str, setting: str) -> str:
    keys = ", ".join(knob_keys(cls)) or "none"
    return (
        f"{setting} is not a hyper-parameter of distill.method={spec} (its hyper-parameters: "
        f"{keys}); remove it or choose a method that has it"
    )


def _check_settings(method: Method, config: Config):
    """distill.rounds and pairs.real_ratio against what the method does with pairs."""
    cls, d, p = type(method), config.distill, config.pairs
    if d.rounds > 1 and not cls.iterative:
        raise ConfigError(
            f"distill.rounds={d.rounds} (iterative distillation) resamples the student's "
            f"side of the pairs, so it needs a pair method "
            f"({', '.join(names(lambda c: c.iterative))}), not {method.name}"
        )
    if p.real_ratio > 0 and not cls.relabels:
        users = ", ".join(names(lambda c: c.relabels))
        raise ConfigError(
            f"pairs.real_ratio={p.real_ratio} relabels preference pairs, which "
            f"distill.method={method.name} does not use (methods that do: {users})"
        )


def check_shared_vocabulary(
    method: Method, config: Config, teacher_tokenizer, student_tokenizer
) -> None:
    """At load time: a method comparing teacher and student token distributions needs one
    vocabulary. Tokenizers are anything with `get_vocab() -> {token: id}` (transformers')."""
    if not method.shared_vocabulary:
        return
    teacher_vocab, student_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if teacher_vocab != student_vocab:
        text_level = ", ".join(names(lambda c: not c.shared_vocabulary))
        raise ConfigError(
            f"distill.method={method.name} compares teacher and student token distributions, but "
            f"their tokenizers differ ({config.teacher.tokenizer_path or 'teacher'}: "
            f"{len(teacher_vocab)} tokens, {config.student.tokenizer_path or 'student'}: "
            f"{len(student_vocab)} tokens); use one tokenizer family or a text-level method "
            f"({text_level})"
        )
