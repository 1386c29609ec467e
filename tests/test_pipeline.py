"""The README's demo command, word for word from a fresh directory, at toy scale: the five stages
end to end through the CLI with the default (relative) run directory, and the resume skip."""

import json
import os
import stat
import subprocess
import sys
import time

import numpy as np
import pytest

TOY = [
    "--set",
    "sft_teacher.max_steps=3",
    "--set",
    "sft_student.max_steps=3",
    "--set",
    "distill.max_steps=3",
    "--set",
    "data.max_d=32",
    "--set",
    "eval.num_examples=8",
    "--set",
    "sft_teacher.validation_examples=8",
    "--set",
    "sample.max_new_tokens=8",
    "--set",
    "eval.max_new_tokens=8",
]


def readme_demo_command() -> list[str]:
    """The README's main command, word for word (the first line that runs the demo preset)."""
    readme = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
    with open(readme, encoding="utf-8") as f:
        line = next(line for line in f if "python -m plad_jax.launch --config demo" in line)
    words = line.split("#")[0].split()
    start = words.index("python")
    return words[start : words.index("demo", start) + 1]


def launch(cwd, *extra, timeout=600):
    """`python -m plad_jax.launch ...` as typed in a shell in `cwd` (the package found by its
    install, not by the working directory)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "PYTHONPATH": ""}
    command = readme_demo_command()
    assert command[:2] == ["python", "-m"], command
    cmd = [sys.executable, *command[1:], *TOY, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


@pytest.mark.slow
def test_readme_demo_command_from_a_fresh_directory_runs_every_stage_then_skips_them(tmp_path):
    out = launch(
        tmp_path
    )  # the default run directory: runs/demo, relative to the working directory
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
    modes = {
        p.name: stat.S_IMODE(p.stat().st_mode)
        for p in (run / "config.json", run / "eval" / "metrics.json")
    }
    assert modes["config.json"] == modes["metrics.json"], modes
    start = time.perf_counter()
    again = launch(tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stderr.count("already done, skipped") == 5
    assert time.perf_counter() - start < 60


# ------------------------------------------------------------------------------------------------
# Bad inputs through the CLI: one line on stderr, exit 2, the run directory untouched. The
# processes start together (each spends seconds importing JAX) and the tests read their results.

ROW = b'{"prompt": "q", "response": "a"}\n'  # 33 bytes
BAD_INPUTS = {  # name -> (data file name and bytes | None, extra arguments)
    "jsonl_not_utf8": (
        ("latin1.jsonl", ROW + b'{"prompt": "caf\xe9", "response": "b"}\n'),
        ["--set", "data.task=jsonl"],
    ),
    "csv_not_utf8": (
        ("latin1.csv", b"prompt,response\nq,a\ncaf\xe9,b\n"),
        ["--set", "data.task=csv"],
    ),
    "jsonl_cut_string": (("cut.jsonl", ROW + ROW[:-3] + b"}\n"), ["--set", "data.task=jsonl"]),
    # The teacher's best-checkpoint selection scores with eval.scorer: its reward model is read
    # while sft_teacher trains, though eval is not among the stages.
    "select_best_reward_model": (
        None,
        [
            "--stages",
            "sft_teacher,sft_student,sample",
            "--set",
            "eval.scorer=reward_model",
            "--set",
            "eval.reward_model=nobody/no-such-reward-model",
        ],
    ),
    "sample_without_sft": (None, ["--stages", "sample"]),
}


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    """name -> (CompletedProcess, run directory, its files' mtimes before) of each case above."""
    from tests import tiny_run

    root = tmp_path_factory.mktemp("bad-inputs")
    tokenizer = str(root / "tokenizer")
    tiny_run.word_tokenizer().save_pretrained(tokenizer)  # demo's models, on a file's text
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "",
        "PLAD_JAX_DISTRIBUTED": "0",
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(root / "hf-home"),
    }
    procs, runs = {}, {}
    for name, (data_file, extra) in BAD_INPUTS.items():
        run_dir = root / name / "run"
        if data_file is not None:
            (root / name).mkdir()
            (root / name / data_file[0]).write_bytes(data_file[1])
            run_dir.mkdir()  # a run directory with a file: a failed start leaves it as it was
            (run_dir / "notes.txt").write_text("mine")
            extra = [
                *extra,
                "--set",
                f"data.path={root / name / data_file[0]}",
                "--set",
                f"teacher.tokenizer={tokenizer}",
                "--set",
                f"student.tokenizer={tokenizer}",
            ]
        before = _mtimes(run_dir)
        cmd = [
            sys.executable,
            "-m",
            "plad_jax.launch",
            "--config",
            "demo",
            "--run-dir",
            str(run_dir),
            *TOY,
            *extra,
        ]
        procs[name] = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        runs[name] = (run_dir, before)
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        results[name] = (done, *runs[name])
    return results


def _mtimes(run_dir) -> dict | None:
    if not os.path.exists(run_dir):
        return None
    paths = [os.path.join(r, f) for r, _, files in os.walk(run_dir) for f in files]
    return {p: os.path.getmtime(p) for p in paths}


@pytest.mark.parametrize(
    "name,needles",
    [
        (
            "jsonl_not_utf8",
            [
                "latin1.jsonl: row 2: byte 0xe9 is not UTF-8",
                "line 2 column 16 (byte offset 48 in the file)",
            ],
        ),
        (
            "csv_not_utf8",
            [
                "latin1.csv: row 2: byte 0xe9 is not UTF-8",
                "line 3 column 4 (byte offset 23 in the file)",
            ],
        ),
        (
            "jsonl_cut_string",
            [
                "cut.jsonl: row 2: not valid JSON: Unterminated string starting at: "
                "line 2 column 29 (char 28 of the line, byte offset 61 in the file)"
            ],
        ),
        (
            "select_best_reward_model",
            [
                "eval.reward_model 'nobody/no-such-reward-model'",
                "eval.scorer=reward_model",
                "sft_teacher.select_best",
                "--set eval.reward_model=",
            ],
        ),
        (
            "sample_without_sft",
            ["stage sample reads the output of stage sft_teacher", "add sft_teacher to --stages"],
        ),
    ],
)
def test_bad_input_is_one_line_exit_2_and_the_run_directory_untouched(bad_inputs, name, needles):
    result, run_dir, before = bad_inputs[name]
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith("plad_jax.launch: error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert _mtimes(run_dir) == before  # nothing written, rewritten or deleted (and no config.json)


def test_the_input_checks_log_lines_are_printed_once_it_passes_and_dropped_when_it_fails(caplog):
    import logging

    from plad_jax.pipeline import runner

    log = logging.getLogger("plad_jax.data.demo")
    with caplog.at_level(logging.INFO, logger="plad_jax"):
        with pytest.raises(ValueError), runner._held_logs():
            log.info("data loaded, then a missing reward model")
            raise ValueError("missing")
        assert caplog.records == []
        with runner._held_logs():
            log.info("data loaded")
            assert caplog.records == []  # held while the check runs
        assert [r.getMessage() for r in caplog.records] == ["data loaded"]


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
    from plad_jax import config as config_mod
    from plad_jax.data import pairs
    from plad_jax.pipeline import context, sample
    from tests.test_sampler import STOP_SCRIPTS, byte_bpe_tokenizer, spell

    tmp_path.mkdir(exist_ok=True)
    path = tmp_path / "hh.jsonl"
    turns = [f"\n\nHuman: question {i}?\n\nAssistant: answer {i}." for i in range(12)]
    path.write_text("".join(json.dumps({"chosen": t}) + "\n" for t in turns))
    config = config_mod.apply_overrides(
        config_mod.Config(),
        [
            "data.task=hh",
            f"data.path={path}",
            "data.test_size=2",
            "data.validation_size=2",
            "sample.max_new_tokens=16",
            "sample.batch_size=4",
            "sample.temperature=0",
            *overrides,
        ],
    )
    ctx = context.Context(config, str(tmp_path / "run"))
    tok = byte_bpe_tokenizer()
    ctx._tokenizers = {"teacher": tok, "student": tok}
    models = {
        role: ScriptedForEveryPrompt(spell(tok, STOP_SCRIPTS[i]), len(tok))
        for i, role in enumerate(("teacher", "student"))
    }
    ctx.stage_model = lambda stage, role: models[role]
    sample.sample_stage(ctx, str(tmp_path / "run" / "sample"))
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
