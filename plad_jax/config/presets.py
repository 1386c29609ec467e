"""Presets (`configs/<name>.py`, installed as `plad_jax.configs`) and config files (`.py`, `.json`),
`resolve` (load, override, validate: what the CLI does), and paths made absolute."""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.util
import json
import os

from plad_jax.config.overrides import apply_overrides, from_dict
from plad_jax.config.schema import Config
from plad_jax.config.validation import validate
from plad_jax.errors import ConfigError

# ----------------------------------------------------------------------------------------------
# Presets and config files


def presets_dir() -> str:
    """The presets: the repository's top-level `configs/` in a source checkout (editable install),
    else the `plad_jax/configs/` that `pip install .` writes (setup.py maps one to the other)."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # plad_jax/
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
