"""The tree is formatted and linted as ruff.toml says: `ruff format --check` and `ruff check`
(ruff is pinned in setup.py's test extra, so CI and a developer see the same verdict)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "command", [["format", "--check", "--diff"], ["check"]], ids=["format", "lint"]
)
def test_ruff_is_clean(command):
    out = subprocess.run(
        [sys.executable, "-m", "ruff", *command, "."], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
