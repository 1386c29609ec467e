"""Per-backend choices: settings whose best value differs between XLA:CPU, XLA:GPU and XLA:TPU.

`choices()` gives the `BackendChoices` of the running backend (`jax.default_backend()`), with any
overrides applied. The CPU defaults are the settings plad_jax was tuned and tested with on CPU, so
nothing numeric or structural changes there; the GPU and TPU defaults follow from how those
compilers run the same programs (each field's reasoning below) and are what
`python bench/accelerator.py` measures on a device. Every choice can be overridden, globally
(`configure`), for a block (`override`), or per call where a function takes it as an argument
(`train.make_train_step(donate=...)`, `layers.keys_slots_minor(..., minor=...)`).

Choices are read when a program is traced. The sampler keys its compiled programs on
`choices()`, so an override takes effect on its next call; other jitted code that captured an
older choice keeps it until it is retraced (`jax.clear_caches()`).
"""

from __future__ import annotations

import contextlib
import dataclasses

import jax


@dataclasses.dataclass(frozen=True)
class BackendChoices:
    """The settings that depend on the backend.

    gqa_keys_slots_minor: the KV cache keeps GQA/MQA keys `[B, KV, Dh, S]` (True) or `[B, KV, S,
        Dh]` like the values (False); MHA keys are always slots-major. XLA:CPU runs a decode
        step's small (query group x keys) product fastest with the slots minor (measured, see
        `layers.keys_slots_minor`); that gain is about how XLA:CPU's loops stream a matrix. GPU
        and TPU matrix units take either operand layout without a copy, while writing one new
        slot into a slots-minor buffer is a strided store of Dh scattered elements per head
        instead of one contiguous Dh row; so GPU and TPU keep the keys slots-major, the layout
        of the values and of HF's cache. (Reasoned, not yet measured: `bench/accelerator.py`
        times batch 64 under the CPU choices beside the defaults to check it.)
    cache_prefix_switch: decode attention picks a cache prefix of whole blocks with `lax.switch`
        (static shapes per branch) so early steps skip empty slots. XLA:CPU gains from it
        (measured, see `layers.cached_attention`). XLA:GPU runs a conditional by copying the
        branch index to the host and waiting for it (outside CUDA-graph conditionals): one
        synchronisation per layer per decode step, which stalls the kernel stream for longer than
        reading the empty slots takes at these cache sizes; off on GPU. On TPU the conditional
        runs on the core without a host round trip, and decode is bound by HBM reads: on.
    parity_precision: matmul precision for checks against a reference (`parity_precision()`).
        XLA:GPU multiplies fp32 in TF32 and XLA:TPU in bf16 passes by default, well above a
        1e-4 tolerance; "highest" there. XLA:CPU multiplies fp32 exactly already: None (no change).
    donate: donate the train state to the train step and the cache to the decode loop, so both
        are updated in place (no second copy of the params, moments or cache in device memory).
        Every backend supports donation; True everywhere, overridable to keep inputs alive.
    """

    gqa_keys_slots_minor: bool = True
    cache_prefix_switch: bool = True
    parity_precision: str | None = None
    donate: bool = True


DEFAULTS = {
    "cpu": BackendChoices(
        gqa_keys_slots_minor=True, cache_prefix_switch=True, parity_precision=None
    ),
    "gpu": BackendChoices(
        gqa_keys_slots_minor=False, cache_prefix_switch=False, parity_precision="highest"
    ),
    "tpu": BackendChoices(
        gqa_keys_slots_minor=False, cache_prefix_switch=True, parity_precision="highest"
    ),
}
ALIASES = {"cuda": "gpu", "rocm": "gpu"}
_overrides: dict = {}


def defaults(backend: str | None = None) -> BackendChoices:
    """The defaults for `backend` (default: `jax.default_backend()`); unknown backends get CPU's."""
    name = backend or jax.default_backend()
    return DEFAULTS.get(ALIASES.get(name, name), DEFAULTS["cpu"])


def choices(backend: str | None = None) -> BackendChoices:
    """The backend's defaults with the current overrides applied."""
    return dataclasses.replace(defaults(backend), **_overrides)


def configure(**overrides) -> None:
    """Override choices for the rest of the process (`configure()` with no argument resets)."""
    fields = {f.name for f in dataclasses.fields(BackendChoices)}
    unknown = set(overrides) - fields
    if unknown:
        raise ValueError(f"unknown backend choice(s) {sorted(unknown)}; known: {sorted(fields)}")
    _overrides.clear()
    _overrides.update(overrides)


@contextlib.contextmanager
def override(**overrides):
    """Override choices inside a `with` block (on top of `configure`), restored on exit."""
    saved = dict(_overrides)
    try:
        configure(**{**saved, **overrides})
        yield choices()
    finally:
        configure(**saved)


def parity_precision():
    """A context in which matmuls run at the backend's `parity_precision` (no-op when None)."""
    precision = choices().parity_precision
    return (
        contextlib.nullcontext() if precision is None else jax.default_matmul_precision(precision)
    )
