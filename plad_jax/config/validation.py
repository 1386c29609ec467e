"""`validate`: contradictions in a config refused up front, each a one-line `ConfigError`; and
`parse_stages` for `--stages`."""

from __future__ import annotations

import difflib

from plad_jax.config.overrides import check_value
from plad_jax.config.schema import (
    MODEL_SCORERS,
    STAGES,
    Config,
    DataConfig,
    DistillConfig,
    EvalConfig,
    ModelConfig,
    PairsConfig,
    SampleConfig,
    TrainConfig,
)
from plad_jax.data.tasks import FILE_TASKS
from plad_jax.errors import ConfigError
from plad_jax.sharding import MeshConfig

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
    _need(
        e.calibration_samples == 0 or e.calibration_samples >= 2,
        "eval.calibration_samples must be 0 (off) or >= 2 samples per prompt, got "
        f"{e.calibration_samples}",
    )
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
