"""plad_jax: preference-based distillation of language models in JAX/Flax.

The public API, importable from the package (each name is loaded on first use, so `import plad_jax`
stays light and `python -m plad_jax.launch` sets up JAX before anything heavy is imported):

    models     LanguageModel, from_pretrained, init_model, add_lora, LoRAConfig, merge_lora
    methods    Method, Batches, register, get_method (= methods.get), SequenceBatch, PairBatch
               (the typed batches a method's loss reads: `plad_jax.data.batch`)
    config     Config, load_config, apply_overrides, validate
    sampling   generate_text, generate_many
    pipeline   run (the five stages on a Config and a run directory)
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "LanguageModel": ("plad_jax.models", "LanguageModel"),
    "from_pretrained": ("plad_jax.models", "from_pretrained"),
    "init_model": ("plad_jax.models", "init_model"),
    "add_lora": ("plad_jax.models.lora", "add_lora"),
    "LoRAConfig": ("plad_jax.models.lora", "LoRAConfig"),
    "merge_lora": ("plad_jax.models.lora", "merge_lora"),
    "Method": ("plad_jax.methods", "Method"),
    "Batches": ("plad_jax.methods", "Batches"),
    "register": ("plad_jax.methods", "register"),
    "get_method": ("plad_jax.methods", "get"),
    "SequenceBatch": ("plad_jax.data.batch", "SequenceBatch"),
    "PairBatch": ("plad_jax.data.batch", "PairBatch"),
    "Config": ("plad_jax.config", "Config"),
    "load_config": ("plad_jax.config", "load_config"),
    "apply_overrides": ("plad_jax.config", "apply_overrides"),
    "validate": ("plad_jax.config", "validate"),
    "generate_text": ("plad_jax.generation.sampler", "generate_text"),
    "generate_many": ("plad_jax.generation.sampler", "generate_many"),
    "run": ("plad_jax.pipeline.runner", "run"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'plad_jax' has no attribute {name!r}")
    module, attr = _EXPORTS[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
