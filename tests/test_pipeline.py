"""The five stages end to end on the demo task at toy scale, through the CLI, and the resume skip."""

import json
import os
import subprocess
import sys
import time

import pytest

TOY = ["--set", "sft_teacher.max_steps=3", "--set", "sft_student.max_steps=3", "--set", "distill.max_steps=3",
       "--set", "data.max_d=32", "--set", "eval.num_examples=8", "--set", "sft_teacher.validation_examples=8",
       "--set", "sample.max_new_tokens=8", "--set", "eval.max_new_tokens=8"]


def launch(run_dir, *extra, timeout=600):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    cmd = [sys.executable, "-m", "plad_jax.launch", "--config", "demo", "--run-dir", str(run_dir), *TOY, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.slow
def test_demo_pipeline_runs_every_stage_then_skips_them(tmp_path):
    out = launch(tmp_path / "run")
    assert out.returncode == 0, out.stderr[-2000:]
    for stage in ("sft_teacher", "sft_student", "sample", "distill", "eval"):
        assert os.path.exists(tmp_path / "run" / stage / "DONE"), stage
    metrics = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    assert set(metrics["models"]) == {"teacher", "initial student", "distilled student"}
    assert (tmp_path / "run" / "eval" / "report.md").exists()
    assert json.loads((tmp_path / "run" / "config.json").read_text())["distill"]["method"] == "plad_rank"
    start = time.perf_counter()
    again = launch(tmp_path / "run")
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stderr.count("already done, skipped") == 5
    assert time.perf_counter() - start < 60
