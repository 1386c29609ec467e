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

from plad_jax.config.overrides import (
    apply_overrides,
    check_value,
    describe,
    from_dict,
    leaf_keys,
    parse_value,
    to_dict,
)
from plad_jax.config.presets import (
    PATH_FIELDS,
    absolute_paths,
    changed_keys,
    load_config,
    preset_names,
    presets_dir,
    resolve,
)
from plad_jax.config.schema import (
    DEFAULT_REWARD_MODEL,
    DTYPES,
    METHOD_KNOBS,
    MODEL_SCORERS,
    SCORERS,
    SCORES,
    SPAN_REFERENCES,
    STAGES,
    Config,
    DataConfig,
    DistillConfig,
    Dtype,
    EvalConfig,
    GGUFExport,
    LoRASettings,
    ModelConfig,
    PairsConfig,
    Remat,
    SampleConfig,
    Score,
    Scorer,
    SpanReference,
    Task,
    TrainConfig,
)
from plad_jax.config.validation import (
    parse_stages,
    validate,
)
from plad_jax.errors import ConfigError, UserError

__all__ = [
    "Config",
    "ConfigError",
    "DEFAULT_REWARD_MODEL",
    "DTYPES",
    "DataConfig",
    "DistillConfig",
    "Dtype",
    "EvalConfig",
    "GGUFExport",
    "LoRASettings",
    "METHOD_KNOBS",
    "MODEL_SCORERS",
    "ModelConfig",
    "PATH_FIELDS",
    "PairsConfig",
    "Remat",
    "SCORERS",
    "SCORES",
    "SPAN_REFERENCES",
    "STAGES",
    "SampleConfig",
    "Score",
    "Scorer",
    "SpanReference",
    "Task",
    "TrainConfig",
    "UserError",
    "absolute_paths",
    "apply_overrides",
    "changed_keys",
    "check_value",
    "describe",
    "from_dict",
    "leaf_keys",
    "load_config",
    "parse_stages",
    "parse_value",
    "preset_names",
    "presets_dir",
    "resolve",
    "to_dict",
    "validate",
]
