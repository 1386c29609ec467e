"""Every user-facing error of plad_jax, in one place that imports nothing.

`python -m plad_jax.launch` turns each of these into one line on stderr and exit code 2 (a
`NonFiniteLossError`, which names the last good checkpoint, into exit code 1). The modules that
raise them re-export their own, so `plad_jax.data.DataError` is `plad_jax.errors.DataError`.
"""

from __future__ import annotations


class UserError(ValueError):
    """A problem the user can fix (config, flag, input file); the message is one sentence.

    `plad_jax.launch` turns any `UserError` into one line on stderr and exit code 2. Other modules
    may subclass it for their own user-facing errors."""


class ConfigError(UserError):
    """A bad preset, key, value or combination of values."""


class RewardModelError(UserError):
    """A reward model that cannot be loaded or used (missing, offline, no safetensors); one line."""


class DataError(ValueError):
    """Data that cannot be used (missing file, missing field, empty split, unknown task); one
    line."""


class PairsError(DataError):
    """Pair shards that are missing, unreadable or malformed; the message names the file."""


class CheckpointError(ValueError):
    """A model directory or checkpoint that cannot be loaded; the message is one line."""


class SafetensorsError(ValueError):
    """A safetensors file that cannot be read as one."""


class GGUFError(ValueError):
    """A GGUF file that cannot be read as a model we support; the message is one line."""


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or Inf loss or gradient."""
