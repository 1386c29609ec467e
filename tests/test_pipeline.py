"""The five stages end to end on the demo task at toy scale, through the CLI, and the resume skip."""

import json
import os
import subprocess
import sys
import time

import numpy as np
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


class ScriptedForEveryPrompt:
    """A model that writes `script` then EOS whatever the prompt (`tests.test_sampler.StubLM`'s
    table); greedy, each token's log-prob is that of logit 2 against 0 for the rest."""

    def __init__(self, script, vocab):
        from tests.test_sampler import scripted
        self.stub = scripted([script], vocab, high=2.0)
        self.params, self.mesh = self.stub.params, None
        self.eos_token_ids, self.pad_token_id = self.stub.eos_token_ids, self.stub.pad_token_id

    def prefill(self, params, prompt_ids, prompt_mask, max_new_tokens):
        return self.stub.prefill(params, prompt_ids * 0, prompt_mask, max_new_tokens)

    def decode(self, params, tokens, cache):
        return self.stub.decode(params, tokens, cache)


def hh_sample_rows(tmp_path, *overrides):
    """The sample stage's stored pairs on HH transcripts, with a teacher and a student that both run
    on into an invented next Human turn (in two different tokenizations of it)."""
    from plad_jax import config as config_mod, pairs, stages
    from tests.test_sampler import STOP_SCRIPTS, byte_bpe_tokenizer, spell

    tmp_path.mkdir(exist_ok=True)
    path = tmp_path / "hh.jsonl"
    turns = [f"\n\nHuman: question {i}?\n\nAssistant: answer {i}." for i in range(12)]
    path.write_text("".join(json.dumps({"chosen": t}) + "\n" for t in turns))
    config = config_mod.apply_overrides(config_mod.Config(), [
        "data.task=hh", f"data.path={path}", "data.test_size=2", "data.validation_size=2",
        "sample.max_new_tokens=16", "sample.batch_size=4", "sample.temperature=0", *overrides])
    ctx = stages.Context(config, str(tmp_path / "run"))
    tok = byte_bpe_tokenizer()
    ctx._tokenizers = {"teacher": tok, "student": tok}
    models = {role: ScriptedForEveryPrompt(spell(tok, STOP_SCRIPTS[i]), len(tok))
              for i, role in enumerate(("teacher", "student"))}
    ctx.stage_model = lambda stage, role: models[role]
    stages.sample_stage(ctx, str(tmp_path / "run" / "sample"))
    return tok, pairs.read_pairs(str(tmp_path / "run" / "sample"))


def test_hh_samples_stop_before_the_next_human_turn(tmp_path):
    """By the hh task's default stop string, no stored response (its text, its token ids, its
    log-prob) keeps anything from "\n\nHuman:" on."""
    tok, rows = hh_sample_rows(tmp_path)
    token_logp = 2.0 - np.log(np.exp(2.0) + len(tok) - 1)
    assert len(rows) == 4
    for row in rows:
        assert (row["teacher"], row["student"]) == ("Sure.", "A small")
        for side in ("teacher", "student"):
            ids = row[f"{side}_ids"]
            assert tok.decode(ids, skip_special_tokens=True) == row[side]
            # the log-probs of those ids, and of nothing after them
            assert row[f"{side}_logp"] == pytest.approx(len(ids) * token_logp, rel=1e-5)
    assert [len(rows[0]["teacher_ids"]), len(rows[0]["student_ids"])] == [3, 2]
    tok, unstopped = hh_sample_rows(tmp_path / "off", "sample.stop=")  # no stop strings: run on
    assert all("\n\nHuman:" in r["teacher"] and "\n\nHuman:" in r["student"] for r in unstopped)
