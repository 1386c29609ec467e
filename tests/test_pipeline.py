"""The README's demo command, word for word from a fresh directory, at toy scale: the five stages end to
end through the CLI with the default (relative) run directory, and the resume skip."""

import json
import os
import stat
import subprocess
import sys
import time

import pytest

TOY = ["--set", "sft_teacher.max_steps=3", "--set", "sft_student.max_steps=3", "--set", "distill.max_steps=3",
       "--set", "data.max_d=32", "--set", "eval.num_examples=8", "--set", "sft_teacher.validation_examples=8",
       "--set", "sample.max_new_tokens=8", "--set", "eval.max_new_tokens=8"]


def readme_demo_command() -> list[str]:
    """The README's main command, word for word (the first line that runs the demo preset)."""
    readme = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
    with open(readme, encoding="utf-8") as f:
        line = next(line for line in f if "python -m plad_jax.launch --config demo" in line)
    words = line.split("#")[0].split()
    start = words.index("python")
    return words[start:words.index("demo", start) + 1]


def launch(cwd, *extra, timeout=600):
    """`python -m plad_jax.launch ...` as typed in a shell in `cwd` (the package found by its install,
    not by the working directory)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "PYTHONPATH": ""}
    command = readme_demo_command()
    assert command[:2] == ["python", "-m"], command
    cmd = [sys.executable, *command[1:], *TOY, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


@pytest.mark.slow
def test_readme_demo_command_from_a_fresh_directory_runs_every_stage_then_skips_them(tmp_path):
    out = launch(tmp_path)  # the default run directory: runs/demo, relative to the working directory
    run = tmp_path / "runs" / "demo"
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"run directory {run}" in out.stderr
    for stage in ("sft_teacher", "sft_student", "sample", "distill", "eval"):
        assert os.path.exists(run / stage / "DONE"), stage
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert set(metrics["models"]) == {"teacher", "initial student", "distilled student"}
    assert (run / "eval" / "report.md").exists()
    assert json.loads((run / "config.json").read_text())["distill"]["method"] == "plad_rank"
    assert not list(tmp_path.rglob("*orbax-checkpoint-tmp*"))
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (run / "config.json", run / "eval" / "metrics.json")}
    assert modes["config.json"] == modes["metrics.json"], modes
    start = time.perf_counter()
    again = launch(tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stderr.count("already done, skipped") == 5
    assert time.perf_counter() - start < 60
