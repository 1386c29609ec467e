"""`bench/accelerator.py --dry-run`: every part of the device bench runs on CPU at toy sizes and
reports `ok`, so the one command a lent accelerator runs cannot rot. Also the wheel helper's list
of what the device image lacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bench import accelerator, device_wheels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_dry_run_runs_every_part_ok(tmp_path):
    env = {
        k: v for k, v in os.environ.items() if k != "XLA_FLAGS"
    }  # not conftest's 8 devices: as a user runs it
    proc = subprocess.run(
        [sys.executable, "bench/accelerator.py", "--dry-run", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    report = json.loads((tmp_path / "accelerator.json").read_text())
    failed = {
        n: p.get("log_tail", "")[-800:] for n, p in report["parts"].items() if p["status"] != "ok"
    }
    assert proc.returncode == 0 and not failed, (proc.stdout[-2000:], failed)
    assert list(report["parts"]) == list(accelerator.PARTS)
    parts = {n: p["results"] for n, p in report["parts"].items()}
    for family in ("llama_gqa", "t5_v1_1", "gpt_neo"):
        assert (
            parts["correctness"][family]["pass"]
            and parts["correctness"][family]["fp32_max_abs"] <= 1e-4
        )
    assert parts["correctness"]["llama_gqa"]["sharded_greedy_equal"]  # 8 CPU devices in the dry run
    assert parts["train_jax"]["sft"]["tok_s"] > 0 and parts["train_torch"]["sft_eager"]["tok_s"] > 0
    for part in ("sampler_jax", "sampler_torch"):
        assert {"batch_4", "batch_8"} <= set(parts[part]) and parts[part]["batch_4"][
            "decode_ms_per_step"
        ] > 0
    assert (
        parts["distill_jax"]["plad_rank"]["tok_s"] > 0 and parts["distill_jax"]["kd"]["tok_s"] > 0
    )
    assert parts["demo"]["stages_done"] == sorted(
        ["sft_teacher", "sft_student", "sample", "distill", "eval"]
    )
    lines = proc.stdout.strip().splitlines()
    assert lines[-1].startswith("| demo |") and any(
        line.startswith("| correctness |") for line in lines
    )
    # three files: the device tool brings back at most 8 from $OUT
    assert sorted(os.listdir(tmp_path)) == ["accelerator.json", "accelerator.log", "table.md"]


def test_wheel_helper_lists_what_the_image_lacks():
    need = device_wheels.missing(device_wheels.image_packages("/nonexistent"))  # built-in list
    assert {"rouge-score", "tensorboardx", "datasets"} <= set(need)
    assert not {"jax", "flax", "transformers", "torch", "numpy"} & set(need)
