"""The run configuration: one typed tree of frozen dataclasses, presets, `--set` overrides, checks.

    Config
      name, run_dir, seed
      mesh           MeshConfig(data, fsdp, tensor)                     (plad_jax.sharding)
      teacher        ModelConfig(path | init, tokenizer, dtype, compute_dtype, remat, lora)
      student        ModelConfig
      data           DataConfig(task, path, fields, token limits, split seed and sizes, split
                     limits)
      sft_teacher    TrainConfig(epochs, batch_size, lr, ..., select_best=True)
      sft_student    TrainConfig
      sample         SampleConfig(temperature 0.7, top_k, top_p, max_new_tokens, batch_size, stop)
      pairs          PairsConfig(real_ratio, scorer, reward_model)
      distill        DistillConfig(TrainConfig + method, score, beta, alpha, rounds, ...)
      pbkd           PbKDConfig(k samples, KL weight, lambda and its dual ascent, RM, rounds, ...)
      eval           EvalConfig(scorer, reward_model, num_examples, max_new_tokens, stop, ...)

Defaults are the paper's (PLaD, Sec. 5.1): learning rate 1e-4 with a linear schedule, batch 8,
sampling temperature 0.7, beta 1.0, length-normalised sequence scores, LoRA rank 8 / alpha 32 /
dropout 0.1 where LoRA is switched on. `batch_size` is always the global batch (sequences per
optimizer step over all devices), so a run means the same thing on 1 device and on a pod.

A preset is a Python file `configs/<name>.py` with `def config() -> Config`. `load_config` takes a
preset name or a path to a `.py` (same contract) or `.json` file (`to_dict` output, e.g. a run's
`config.json`). `apply_overrides` sets leaves from `a.b=value` strings, parsed against the field's
type; `validate` rejects contradictions up front. `resolve` chains the three, as the CLI does.
What depends on the distillation method (its hyper-parameters, and the settings only some
methods use) is checked by `plad_jax.methods.configure`, which knows the methods; this module
does not import them. Every user-caused problem is a `ConfigError` with a one-sentence message.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.util
import json
import os
import types
import typing
from typing import Any, Literal

from plad_jax.data.tasks import FILE_TASKS, TASKS
from plad_jax.models.layers import REMAT_POLICIES
from plad_jax.pbkd_config import PbKDConfig
from plad_jax.sharding import MeshConfig

# Each choice list lives in one place: tasks next to their loaders, the rest here (distillation
# methods are a registry, `plad_jax.methods`). `Literal[...]` of them is what `--set` and
# `from_dict` check values against.
STAGES = ("sft_teacher", "sft_student", "sample", "distill", "eval")
DTYPES = ("float32", "bfloat16", "float16")
SCORERS = ("rouge", "reward_model", "jax_reward_model", "python")
# Scorers that need `reward_model`: a model directory / hub id, or for `python` a `module:attr`.
MODEL_SCORERS = ("reward_model", "jax_reward_model", "python")
SCORES = ("mean", "sum")
SPAN_REFERENCES = ("target", "prompt")
DEFAULT_REWARD_MODEL = "OpenAssistant/reward-model-deberta-v3-large-v2"  # the paper's judge

Task = Literal[TASKS]
Dtype = Literal[DTYPES]
Remat = Literal[tuple(REMAT_POLICIES)]
Scorer = Literal[SCORERS]
GGUFExport = Literal["", "f32", "f16", "bf16", "q8_0"]
Score = Literal[SCORES]
SpanReference = Literal[SPAN_REFERENCES]


class UserError(ValueError):
    """A problem the user can fix (config, flag, input file); the message is one sentence.

    `plad_jax.launch` turns any `UserError` into one line on stderr and exit code 2. Other modules
    may subclass it for their own user-facing errors."""


class ConfigError(UserError):
    """A bad preset, key, value or combination of values."""


# ----------------------------------------------------------------------------------------------
# The tree


@dataclasses.dataclass(frozen=True)
class LoRASettings:
    """LoRA adapters (paper: rank 8, alpha 32, dropout 0.1). Field for field the same as
    `plad_jax.models.lora.LoRAConfig`: `LoRAConfig(**dataclasses.asdict(settings))`.
    targets: groups (`attention`, `mlp`) or the family's projection names (`q_proj`, `wi_0`,
        ...)."""

    rank: int = 8
    alpha: float = 32.0
    dropout: float = 0.1
    targets: tuple[str, ...] = ("attention", "mlp")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A teacher or student: pretrained weights (`path`) or a fresh model of a given shape (`init`).

    path: local Hugging Face model directory (config.json + safetensors), `gs://` path, hub id, or
        a GGUF file (llama / qwen2; its tokenizer comes from the file's metadata).
    init: instead of `path`, HF config.json fields (`model_type` plus the family's sizes) of a
        model built with random weights, e.g. {"model_type": "llama", "hidden_size": 64, ...};
        `vocab_size` and the special token ids, when left out, are the tokenizer's.
    tokenizer: tokenizer directory or hub id; None = the model's `path`, or for an `init` model
        the data task's own tokenizer (only `demo` has one).
    dtype: parameter storage dtype; compute_dtype: activations/matmuls (None = dtype).
    remat: activation checkpointing per block when this model trains: none (keep every
        activation: fastest, most memory), full (keep each block's input, recompute the block in
        the backward pass), dots (keep the weight projections' outputs too, recompute the rest).
        Values and gradients are the same. On XLA:CPU it saves little so far (README, "Memory of
        a training step").
    lora: None = train all weights; LoRASettings = train adapters only (merged on export).
    layers: keep only these blocks of `path`, in this order (a student cut from its teacher, e.g.
        [0, 5, 10]); T5: the encoder blocks. decoder_layers: T5's decoder blocks. None = all.
    """

    path: str = ""
    init: dict[str, Any] | None = None
    tokenizer: str | None = None
    dtype: Dtype = "float32"
    compute_dtype: Dtype | None = None
    remat: Remat = "none"
    lora: LoRASettings | None = None
    layers: tuple[int, ...] | None = None
    decoder_layers: tuple[int, ...] | None = None

    @property
    def cut(self) -> dict | None:
        """`from_pretrained(layers=...)`: {stack: blocks}, or None for the whole model."""
        given = (("layers", self.layers), ("decoder_layers", self.decoder_layers))
        stacks = {k: list(v) for k, v in given if v is not None}
        return stacks or None

    @property
    def tokenizer_path(self) -> str | None:
        return self.tokenizer or self.path or None

    @property
    def from_scratch(self) -> bool:
        return self.init is not None


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The task, its splits, and how examples become token sequences (`plad_jax.data`).

    task: tldr (hub trl-lib/tldr), hh (hub Anthropic/hh-rlhf, helpful-base), jsonl / csv /
        parquet (a local file or folder), demo (built offline from the Python standard library).
    path: the file, folder, or hub dataset name; "" = the task's default source.
    hub_data_dir: `load_dataset(..., data_dir=)` of a hub source (None = the task's: hh
        helpful-base).
    prompt_field / response_field: the columns (None = the task's layout; prompt / response for the
        file tasks; response_field "" = prompts only).
    Splits: test_size / validation_size are carved from train when the source lacks them (a count,
    or a fraction when < 1); the rest is halved by `split_seed` into D0 (SFT) and D (distillation).
    max_d0 / max_d / max_validation / max_test keep a seeded subset of each split (None = all).
    Prompts longer than max_prompt_tokens lose tokens from the left; responses are cut at
    max_response_tokens.
    """

    task: Task = "tldr"
    path: str = ""
    hub_data_dir: str | None = None
    prompt_field: str | None = None
    response_field: str | None = None
    max_prompt_tokens: int = 512
    max_response_tokens: int = 128
    split_seed: int = 0
    test_size: float = 0.1
    validation_size: float = 0.05
    max_d0: int | None = None
    max_d: int | None = None
    max_validation: int | None = None
    max_test: int | None = None


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training stage: AdamW, linear warmup then linear decay to 0 (`plad_jax.train`).

    batch_size: global sequences per optimizer step, split into `grad_accum` micro-batches.
    max_steps: stop after this many steps even if the epochs are not done (None = run them all).
    checkpoint_every: steps between Orbax checkpoints (and the end of training); keep: how many.
    select_best: evaluate each checkpoint on `validation_examples` validation prompts (win rate
        against the targets, with `eval.scorer`) and hand off the best, not the last.
    """

    epochs: int = 1
    batch_size: int = 8
    grad_accum: int = 1
    learning_rate: float = 1e-4
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 disables clipping
    max_steps: int | None = None
    checkpoint_every: int = 500
    keep: int = 2
    select_best: bool = False
    validation_examples: int = 256
    log_every: int = 10


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    """Sampling the teacher and student responses that make the pairs (paper: temperature 0.7).

    stop: strings that end a response, which is cut before the first one (`plad_jax.sampler`);
    None = the task's own (`hh`: the next "\n\nHuman:" turn; others: none), () = none.
    """

    temperature: float = 0.7  # 0 = greedy
    top_k: int = 0  # 0 = no top-k cut
    top_p: float = 1.0
    max_new_tokens: int = 128
    batch_size: int = 32
    stop: tuple[str, ...] | None = None


@dataclasses.dataclass(frozen=True)
class PairsConfig:
    """Pseudo-preference pairs (teacher sample > student sample) and optional real relabelling.

    real_ratio: share of pairs that `scorer` relabels (swapped when it prefers the student's
        response); 0 = pure PLaD pseudo-preferences.
    """

    real_ratio: float = 0.0
    scorer: Scorer = "reward_model"
    reward_model: str = DEFAULT_REWARD_MODEL
    batch_size: int = 32


@dataclasses.dataclass(frozen=True)
class DistillConfig(TrainConfig):
    """Distilling the student, with the training fields of `TrainConfig` plus the method.

    method: a registered method name (`plad_jax.methods.names()`) or `module:Class` of your own
    `plad_jax.methods.Method` subclass. rounds: iterative PLaD (resample the student, distil
    again; methods that train on pairs). export_gguf: also write the distilled student as
    `distill/student-<dtype>.gguf` (f32, f16, bf16, q8_0; llama / qwen2), tokenizer included;
    "" = safetensors only.

    The method's hyper-parameters (`METHOD_KNOBS` keep their keys here; each method reads those
    it has and refuses one set away from its default that it does not have): score: sequence
    log-prob as token `mean` or `sum`. beta: PLaD margin (rank) / margin scale (margin); DPO and
    SLiC beta. alpha: weight of the CE regulariser on the preferred response. kd_temperature: KD
    softmax temperature. label_smoothing: DPO. span_max_n / span_reference: PLaD margin score over
    1..N-gram spans against the target (or the prompt). hparams: any other hyper-parameter of the
    method by name (`--set distill.hparams.anchor=0.5`), type-checked against its dataclass. PbKD
    reads the `pbkd` section instead.
    """

    method: str = "plad_rank"
    score: Score = "mean"
    beta: float = 1.0
    alpha: float = 0.0
    rounds: int = 1
    kd_temperature: float = 1.0
    label_smoothing: float = 0.0
    span_max_n: int = 4
    span_reference: SpanReference = "target"
    export_gguf: GGUFExport = ""
    hparams: dict[str, Any] = dataclasses.field(default_factory=dict)


# DistillConfig fields that are hyper-parameters of some methods (`plad_jax.methods.configure`).
METHOD_KNOBS = (
    "score",
    "beta",
    "alpha",
    "kd_temperature",
    "label_smoothing",
    "span_max_n",
    "span_reference",
)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Win rates vs references and teacher-vs-student, ROUGE, lengths, on the test split.

    num_examples: test prompts to evaluate (None = all). temperature: 0 = greedy decoding. stop:
    as `SampleConfig.stop` (also for `select_best`'s validation samples).
    scorer `python` (also for `pairs`): reward_model is `module:attr`, a Scorer class or factory
    (`plad_jax.rewards.python_scorer`), for programmatic rewards such as bench/extraction.py's.
    """

    scorer: Scorer = "reward_model"
    reward_model: str = DEFAULT_REWARD_MODEL
    num_examples: int | None = None
    max_new_tokens: int = 128
    temperature: float = 0.0
    batch_size: int = 32
    stop: tuple[str, ...] | None = None


@dataclasses.dataclass(frozen=True)
class Config:
    """A whole run. run_dir "" = runs/<name> (relative to the working directory, or gs://...)."""

    name: str = "plad"
    run_dir: str = ""
    seed: int = 0
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    teacher: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    student: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    sft_teacher: TrainConfig = dataclasses.field(
        default_factory=lambda: TrainConfig(select_best=True)
    )
    sft_student: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    sample: SampleConfig = dataclasses.field(default_factory=SampleConfig)
    pairs: PairsConfig = dataclasses.field(default_factory=PairsConfig)
    distill: DistillConfig = dataclasses.field(default_factory=DistillConfig)
    pbkd: PbKDConfig = dataclasses.field(default_factory=PbKDConfig)  # read by PbKD methods only
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)

    def resolved_run_dir(self) -> str:
        return self.run_dir or os.path.join("runs", self.name)


# ----------------------------------------------------------------------------------------------
# Types: describe, parse a `--set` string, check a JSON value


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _optional_inner(hint):
    """X for Optional[X] / X | None, else None."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(hint)) == 2:
            return args[0]
    return None


def _sequence_item(hint):
    """The item type of tuple[X, ...] / list[X], else None."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return args[0]
    if origin is list and len(args) == 1:
        return args[0]
    return None


def describe(hint) -> str:
    """The type as a user reads it in an error message."""
    if (inner := _optional_inner(hint)) is not None:
        return f"{describe(inner)} or none"
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(str(c) for c in typing.get_args(hint))
    if (item := _sequence_item(hint)) is not None:
        return (
            "a comma-separated list (or JSON list) of "
            f"{describe(item).removeprefix('a ').removeprefix('an ')}s"
        )
    if dataclasses.is_dataclass(hint):
        return f"a {hint.__name__} (JSON object)"
    if hint is dict or typing.get_origin(hint) is dict:
        return "a JSON object"
    return {
        int: "an integer",
        float: "a number",
        bool: "a boolean (true/false/1/0)",
        str: "a string",
    }.get(hint, str(hint))


class _BadValue(Exception):
    """Internal: the value does not fit the type; turned into a ConfigError naming the key."""


_TRUE, _FALSE = ("true", "1"), ("false", "0")


def parse_value(raw: str, hint, key: str):
    """A `--set` string as a value of type `hint`; ConfigError naming key, type and value if not."""
    try:
        return _parse(raw, hint, key)
    except _BadValue:
        raise ConfigError(f"{key} expects {describe(hint)}, got {raw!r}") from None


def _parse(raw: str, hint, key: str):
    text = raw.strip()
    if (inner := _optional_inner(hint)) is not None:
        return None if text.lower() in ("none", "null") else _parse(raw, inner, key)
    if typing.get_origin(hint) is Literal:
        for choice in typing.get_args(hint):
            if text == str(choice):
                return choice
        raise _BadValue
    if (item := _sequence_item(hint)) is not None:
        if text.startswith("["):
            return _check(_json(text), hint, key)
        values = [_parse(part.strip(), item, key) for part in text.split(",") if part.strip()]
        return tuple(values) if typing.get_origin(hint) is tuple else values
    if dataclasses.is_dataclass(hint) or hint is dict or typing.get_origin(hint) is dict:
        return _check(_json(text), hint, key)
    if hint is bool:
        if text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
        raise _BadValue
    if hint is int:
        try:
            return int(text)
        except ValueError:
            raise _BadValue from None
    if hint is float:
        try:
            return float(text)
        except ValueError:
            raise _BadValue from None
    if hint is str:
        return raw
    raise TypeError(f"{key}: unsupported field type {hint}")  # a bug in the tree, not user input


def _json(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise _BadValue from None


def check_value(value, hint, key: str):
    """A JSON-decoded (or Python) value checked against `hint`, normalised (lists -> tuples,
    ints -> floats, dicts -> dataclasses); ConfigError naming key, type and value if it does not
    fit."""
    try:
        return _check(value, hint, key)
    except _BadValue:
        raise ConfigError(f"{key} expects {describe(hint)}, got {value!r}") from None


def _check(value, hint, key: str):
    if (inner := _optional_inner(hint)) is not None:
        return None if value is None else _check(value, inner, key)
    if typing.get_origin(hint) is Literal:
        if value in typing.get_args(hint) and not isinstance(value, bool):
            return value
        raise _BadValue
    if (item := _sequence_item(hint)) is not None:
        if not isinstance(value, (list, tuple)):
            raise _BadValue
        values = [_check(v, item, key) for v in value]
        return tuple(values) if typing.get_origin(hint) is tuple else values
    if dataclasses.is_dataclass(hint):
        if dataclasses.is_dataclass(value) and isinstance(value, hint):
            value = to_dict(value)
        if not isinstance(value, dict):
            raise _BadValue
        return _from_dict(hint, value, f"{key}." if key else "")
    if hint is dict or typing.get_origin(hint) is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise _BadValue
        return dict(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _BadValue
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _BadValue
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _BadValue
    if hint is str:
        if isinstance(value, str):
            return value
        raise _BadValue
    raise TypeError(f"{key}: unsupported field type {hint}")


# ----------------------------------------------------------------------------------------------
# Dicts (JSON) <-> Config


def to_dict(obj) -> Any:
    """The tree as plain JSON-able values: dataclasses -> dicts, tuples -> lists."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def from_dict(data: dict, cls=Config):
    """A `cls` from `to_dict` output; missing keys take their defaults, unknown keys are errors."""
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a JSON object, got {type(data).__name__}")
    return _from_dict(cls, data, "")


def _from_dict(cls, data: dict, prefix: str):
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in names:
            raise ConfigError(_unknown_key_message(key))
        values[name] = check_value(value, hints[name], key)
    return cls(**values)


def leaf_keys(cls=Config, prefix: str = "") -> list[str]:
    """Every dotted key `--set` accepts (sections included), e.g. 'distill.method',
    'student.lora'."""
    keys = []
    for f in dataclasses.fields(cls):
        key, hint = f"{prefix}{f.name}", _hints(cls)[f.name]
        keys.append(key)
        inner = _optional_inner(hint) or hint
        if dataclasses.is_dataclass(inner):
            keys.extend(leaf_keys(inner, key + "."))
    return keys


def _unknown_key_message(key: str) -> str:
    """'unknown config key ...' with the closest valid keys (difflib), or the section's keys."""
    valid = leaf_keys()
    section, _, leaf = key.rpartition(".")
    if section and section not in valid:  # the section itself is misspelt: match whole keys
        close = difflib.get_close_matches(key, valid, n=1, cutoff=0.75)
        section, siblings = "", [k for k in valid if "." not in k]
    else:
        siblings = [k.rpartition(".")[2] for k in valid if k.rpartition(".")[0] == section]
        close = [
            f"{section}.{c}" if section else c
            for c in difflib.get_close_matches(leaf, siblings, n=2, cutoff=0.6)
        ]
    if close:
        return f"unknown config key '{key}'; did you mean {' or '.join(close)}?"
    where = f"under '{section}'" if section else "at the top level"
    return f"unknown config key '{key}'; valid keys {where}: {', '.join(siblings)}"


# ----------------------------------------------------------------------------------------------
# Overrides


def apply_overrides(config: Config, overrides) -> Config:
    """`config` with each `a.b=value` applied in order, values parsed against the field types.

    Lists: `a,b` or JSON `["a", "b"]`; Optional: `none`/`null`; a whole section: JSON object.
    A dict field (`teacher.init`) takes a JSON object, or `teacher.init.key=value` sets one key
    (value read as JSON when it parses, else as a string). An Optional section that is None
    (`student.lora`) starts from its defaults when one of its fields is set.
    """
    for item in overrides:
        key, sep, raw = str(item).partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value, e.g. distill.beta=0.5")
        config = _set(config, key.split("."), raw, key, "")
    return config


def _set(obj, parts: list[str], raw: str, full_key: str, prefix: str):
    name, rest = parts[0], parts[1:]
    key = prefix + name
    fields = {f.name for f in dataclasses.fields(obj)}
    if name not in fields:
        raise ConfigError(_unknown_key_message(full_key))
    hint = _hints(type(obj))[name]
    if not rest:
        return dataclasses.replace(obj, **{name: parse_value(raw, hint, key)})
    inner = _optional_inner(hint) or hint
    child = getattr(obj, name)
    if dataclasses.is_dataclass(inner):
        child = inner() if child is None else child
        return dataclasses.replace(obj, **{name: _set(child, rest, raw, full_key, key + ".")})
    if inner is dict or typing.get_origin(inner) is dict:
        return dataclasses.replace(obj, **{name: _set_in_dict(dict(child or {}), rest, raw)})
    raise ConfigError(f"unknown config key '{full_key}': {key} is {describe(hint)}, not a section")


def _set_in_dict(d: dict, parts: list[str], raw: str) -> dict:
    head, rest = parts[0], parts[1:]
    if rest:
        sub = d.get(head)
        d[head] = _set_in_dict(dict(sub) if isinstance(sub, dict) else {}, rest, raw)
    else:
        try:
            d[head] = json.loads(raw)
        except json.JSONDecodeError:
            d[head] = raw
    return d


# ----------------------------------------------------------------------------------------------
# Validation


def _need(ok: bool, message: str):
    if not ok:
        raise ConfigError(message)


def validate(config: Config) -> Config:
    """`config` if it is consistent; else ConfigError with the first problem, in one sentence."""
    if not isinstance(config, Config):
        raise ConfigError(f"a config must be a plad_jax.config.Config, got {type(config).__name__}")
    config = check_value(config, Config, "")  # every leaf has its declared type
    _need(
        bool(config.name) and "/" not in config.name and config.name not in (".", ".."),
        f"name must be a non-empty directory name without '/', got {config.name!r}",
    )
    _validate_mesh(config.mesh)
    for role in ("teacher", "student"):
        _validate_model(getattr(config, role), role, config.data.task)
    _validate_data(config.data)
    for section in ("sft_teacher", "sft_student", "distill"):
        _validate_train(getattr(config, section), section)
    _validate_sample(config.sample)
    _validate_pairs(config.pairs)
    _validate_distill(config.distill)
    _validate_eval(config.eval)
    return config


def _validate_mesh(mesh: MeshConfig):
    sizes = (mesh.data, mesh.fsdp, mesh.tensor)
    _need(
        sizes.count(-1) <= 1,
        f"mesh {sizes}: at most one of mesh.data/fsdp/tensor may be -1 (fill with what is left)",
    )
    _need(all(s >= 1 or s == -1 for s in sizes), f"mesh {sizes}: axis sizes must be positive or -1")


def _validate_model(m: ModelConfig, role: str, task: str):
    _need(
        not (m.path and m.init is not None),
        f"{role}.path and {role}.init are both set; keep path to load weights or init to build "
        f"from scratch (--set {role}.init=none or --set {role}.path=)",
    )
    _need(
        bool(m.path) or m.init is not None,
        f"{role} has no weights: set {role}.path to a Hugging Face model directory or hub id "
        f"(or {role}.init to build one from scratch)",
    )
    if m.init is not None:
        from plad_jax.models.hf import FAMILIES

        model_type = m.init.get("model_type")
        _need(
            model_type in FAMILIES,
            f"{role}.init.model_type must be one of {', '.join(sorted(FAMILIES))}, "
            f"got {model_type!r}",
        )
        _need(
            bool(m.tokenizer) or task == "demo",
            f"{role}.init builds a model from scratch, so set {role}.tokenizer (a tokenizer "
            "directory or hub id); only data.task=demo brings its own tokenizer",
        )
    _need(
        not ((m.layers is not None or m.decoder_layers is not None) and m.init is not None),
        f"{role}.layers cuts blocks out of a checkpoint, so it needs {role}.path, not {role}.init",
    )
    for key, blocks in (("layers", m.layers), ("decoder_layers", m.decoder_layers)):
        _need(
            blocks is None or (len(blocks) > 0 and all(b >= 0 for b in blocks)),
            f"{role}.{key} must be a non-empty list of block indices >= 0, got {blocks}",
        )
    if m.lora is not None:
        lora = m.lora
        _need(lora.rank >= 1, f"{role}.lora.rank must be >= 1, got {lora.rank}")
        _need(lora.alpha > 0, f"{role}.lora.alpha must be positive, got {lora.alpha}")
        _need(0 <= lora.dropout < 1, f"{role}.lora.dropout must be in [0, 1), got {lora.dropout}")
        _need(
            bool(lora.targets) and all(lora.targets),
            f"{role}.lora.targets must name at least one group (attention, mlp) or projection",
        )


def _validate_data(d: DataConfig):
    if d.task in FILE_TASKS:
        _need(
            bool(d.path),
            f"data.task={d.task} reads a local file: set data.path to a .{d.task} file or a "
            "folder of them",
        )
    _need(
        d.max_prompt_tokens >= 1, f"data.max_prompt_tokens must be >= 1, got {d.max_prompt_tokens}"
    )
    _need(
        d.max_response_tokens >= 1,
        f"data.max_response_tokens must be >= 1, got {d.max_response_tokens}",
    )
    for name in ("test_size", "validation_size"):
        size = getattr(d, name)
        _need(
            size >= 0 and (size < 1 or float(size).is_integer()),
            f"data.{name} must be a count (0, 1, 2, ...) or a fraction in (0, 1), got {size}",
        )
    for name in ("max_d0", "max_d", "max_validation", "max_test"):
        limit = getattr(d, name)
        _need(limit is None or limit >= 1, f"data.{name} must be >= 1 or none, got {limit}")


def _validate_train(t: TrainConfig, section: str):
    _need(
        t.epochs >= 1,
        f"{section}.epochs must be >= 1, got {t.epochs} (to skip the stage, leave it out of "
        "--stages)",
    )
    _need(t.batch_size >= 1, f"{section}.batch_size must be >= 1, got {t.batch_size}")
    _need(t.grad_accum >= 1, f"{section}.grad_accum must be >= 1, got {t.grad_accum}")
    _need(
        t.batch_size % t.grad_accum == 0,
        f"{section}.batch_size ({t.batch_size}) must be a multiple of {section}.grad_accum "
        f"({t.grad_accum})",
    )
    _need(t.learning_rate > 0, f"{section}.learning_rate must be positive, got {t.learning_rate}")
    _need(t.warmup_steps >= 0, f"{section}.warmup_steps must be >= 0, got {t.warmup_steps}")
    _need(t.weight_decay >= 0, f"{section}.weight_decay must be >= 0, got {t.weight_decay}")
    _need(
        t.max_grad_norm >= 0,
        f"{section}.max_grad_norm must be >= 0 (0 disables clipping), got {t.max_grad_norm}",
    )
    _need(
        t.max_steps is None or t.max_steps >= 1,
        f"{section}.max_steps must be >= 1 or none, got {t.max_steps}",
    )
    _need(
        t.checkpoint_every >= 1,
        f"{section}.checkpoint_every must be >= 1, got {t.checkpoint_every}",
    )
    _need(t.keep >= 1, f"{section}.keep must be >= 1, got {t.keep}")
    _need(t.log_every >= 1, f"{section}.log_every must be >= 1, got {t.log_every}")
    if t.select_best:
        _need(
            t.validation_examples >= 1,
            f"{section}.validation_examples must be >= 1 when {section}.select_best is true, got "
            f"{t.validation_examples}",
        )


def _validate_sample(s: SampleConfig):
    _need(s.temperature >= 0, f"sample.temperature must be >= 0 (0 = greedy), got {s.temperature}")
    _need(s.top_k >= 0, f"sample.top_k must be >= 0 (0 = off), got {s.top_k}")
    _need(0 < s.top_p <= 1, f"sample.top_p must be in (0, 1], got {s.top_p}")
    _need(s.max_new_tokens >= 1, f"sample.max_new_tokens must be >= 1, got {s.max_new_tokens}")
    _need(s.batch_size >= 1, f"sample.batch_size must be >= 1, got {s.batch_size}")
    _validate_stop(s.stop, "sample")


def _validate_stop(stop, section: str):
    _need(
        stop is None or all(stop),
        f"{section}.stop must not hold an empty string (none = the task's default, an empty "
        f"list = no stop strings), got {list(stop or ())!r}",
    )


def _validate_pairs(p: PairsConfig):
    _need(0 <= p.real_ratio <= 1, f"pairs.real_ratio must be in [0, 1], got {p.real_ratio}")
    _need(p.batch_size >= 1, f"pairs.batch_size must be >= 1, got {p.batch_size}")
    if p.real_ratio > 0:
        if p.scorer in MODEL_SCORERS:
            _need(
                bool(p.reward_model),
                f"pairs.scorer={p.scorer} needs pairs.reward_model (a model directory or hub id)",
            )


def _validate_distill(d: DistillConfig):
    _need(
        bool(d.method.strip()),
        "distill.method must name a method (a registered name or module:Class)",
    )
    _need(d.rounds >= 1, f"distill.rounds must be >= 1, got {d.rounds}")


def _validate_eval(e: EvalConfig):
    if e.scorer in MODEL_SCORERS:
        _need(
            bool(e.reward_model),
            f"eval.scorer={e.scorer} needs eval.reward_model (a model directory or hub id)",
        )
    _need(
        e.num_examples is None or e.num_examples >= 1,
        f"eval.num_examples must be >= 1 or none, got {e.num_examples}",
    )
    _need(e.max_new_tokens >= 1, f"eval.max_new_tokens must be >= 1, got {e.max_new_tokens}")
    _need(e.temperature >= 0, f"eval.temperature must be >= 0 (0 = greedy), got {e.temperature}")
    _need(e.batch_size >= 1, f"eval.batch_size must be >= 1, got {e.batch_size}")
    _validate_stop(e.stop, "eval")


def parse_stages(text: str | None) -> tuple[str, ...]:
    """'sample,distill' -> ('sample', 'distill') in pipeline order; None or '' -> all stages."""
    if not text or not text.strip():
        return STAGES
    names = [s.strip() for s in text.split(",") if s.strip()]
    for name in names:
        if name not in STAGES:
            close = difflib.get_close_matches(name, STAGES, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise ConfigError(f"unknown stage '{name}'; {hint}stages are {', '.join(STAGES)}")
    return tuple(s for s in STAGES if s in names)


# ----------------------------------------------------------------------------------------------
# Presets and config files


def presets_dir() -> str:
    """The presets: the repository's top-level `configs/` in a source checkout (editable install),
    else the `plad_jax/configs/` that `pip install .` writes (setup.py maps one to the other)."""
    package = os.path.dirname(os.path.abspath(__file__))
    checkout = os.path.join(os.path.dirname(package), "configs")
    if os.path.isfile(os.path.join(checkout, "__init__.py")):
        return checkout
    return os.path.join(package, "configs")


def preset_names() -> list[str]:
    try:
        files = os.listdir(presets_dir())
    except OSError:
        return []
    return sorted(f[:-3] for f in files if f.endswith(".py") and not f.startswith("_"))


def load_config(spec: str) -> Config:
    """A preset name (`configs/<name>.py`) or a path to a `.py` file with `config()` or a `.json`
    file."""
    if spec.endswith((".json", ".py")) or os.sep in spec or "/" in spec or "://" in spec:
        return _load_file(spec)
    if not spec.isidentifier() or spec not in preset_names():
        names = preset_names()
        close = difflib.get_close_matches(spec, names, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise ConfigError(
            f"unknown preset '{spec}'; {hint}presets: {', '.join(names)} (or pass a .py/.json path)"
        )
    return _call_config(_import_preset(spec), f"preset {spec}")


def _import_preset(name: str):
    """plad_jax.configs.<name> when that package is this checkout's presets (installed or
    editable), else the preset file itself (a bare checkout on PYTHONPATH)."""
    ours = os.path.realpath(presets_dir())
    try:
        package = importlib.import_module("plad_jax.configs")
        paths = [os.path.realpath(p) for p in getattr(package, "__path__", [])]
    except ImportError:
        paths = []
    if ours in paths:
        return importlib.import_module(f"plad_jax.configs.{name}")
    return _exec_file(os.path.join(ours, f"{name}.py"), f"plad_jax_preset_{name}")


def _load_file(path: str) -> Config:
    if path.endswith(".json"):
        try:
            from etils import epath  # local paths and gs://

            text = epath.Path(path).read_text()
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(
                f"config file {path} is not valid JSON (line {e.lineno}: {e.msg})"
            ) from None
        return from_dict(data)
    if path.endswith(".py"):
        if not os.path.isfile(path):
            raise ConfigError(f"config file {path} does not exist")
        stem = os.path.splitext(os.path.basename(path))[0]
        return _call_config(_exec_file(path, f"plad_jax_user_config_{stem}"), path)
    raise ConfigError(
        f"config {path} must be a preset name, a .py file with config(), or a .json file"
    )


def _exec_file(path: str, module_name: str):
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - the user's file: one line, not a traceback into ours
        raise ConfigError(f"{path} failed to load: {type(e).__name__}: {e}") from None
    return module


def _call_config(module, what: str) -> Config:
    make = getattr(module, "config", None)
    if not callable(make):
        raise ConfigError(f"{what} defines no config() function returning a plad_jax.config.Config")
    try:
        config = make()
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's code, reported in one line
        raise ConfigError(f"{what}: config() failed: {type(e).__name__}: {e}") from None
    if not isinstance(config, Config):
        raise ConfigError(
            f"{what}: config() returned {type(config).__name__}, not a plad_jax.config.Config"
        )
    return config


def resolve(spec: str = "demo", overrides=(), *, run_dir: str | None = None) -> Config:
    """Preset or file, then overrides, then `--run-dir`, then checks; run_dir filled in and every
    local path absolute (`absolute_paths`)."""
    config = apply_overrides(load_config(spec), overrides)
    if run_dir:
        config = dataclasses.replace(config, run_dir=run_dir)
    config = validate(config)
    return absolute_paths(dataclasses.replace(config, run_dir=config.resolved_run_dir()))


# Fields that may name a local file or directory (else a hub id, `gs://` path or `module:attr`).
PATH_FIELDS = (
    "data.path",
    "teacher.path",
    "teacher.tokenizer",
    "student.path",
    "student.tokenizer",
    "pairs.reward_model",
    "eval.reward_model",
    "pbkd.rm_init",
)


def absolute_paths(config: Config, cwd: str | None = None) -> Config:
    """`config` with run_dir and every path field that exists locally made absolute against `cwd`
    (default: the working directory), so that nothing later depends on where the run was started
    (Orbax, for one, refuses relative paths). Hub ids and `gs://` paths are left as they are."""
    cwd = cwd or os.getcwd()
    config = dataclasses.replace(config, run_dir=_absolute(config.run_dir, cwd, always=True))
    for key in PATH_FIELDS:
        section, name = key.split(".")
        part = getattr(config, section)
        value = getattr(part, name)
        if value:
            part = dataclasses.replace(part, **{name: _absolute(value, cwd, always=False)})
            config = dataclasses.replace(config, **{section: part})
    return config


def _absolute(path: str, cwd: str, *, always: bool) -> str:
    if not path or "://" in path:
        return path
    local = os.path.join(cwd, os.path.expanduser(path))
    if always or os.path.exists(local) or path.startswith((".", "~")):
        return os.path.normpath(local)
    return path


def changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two `to_dict` trees."""
    keys = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            keys.extend(changed_keys(a, b, f"{prefix}{k}."))
        elif a != b:
            keys.append(prefix + k)
    return keys
