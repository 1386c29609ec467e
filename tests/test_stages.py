"""The pipeline on the `tiny` preset with local HF checkpoints and a TL;DR-format file: every
distillation method, best-checkpoint selection, resume after an interruption, tokenizers that
differ, the paper preset with local weights and without them, bad input that loses nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from plad_jax import config as config_mod
from plad_jax import launch, methods
from plad_jax.pipeline import context, train
from tests import tiny_run

pytestmark = pytest.mark.slow

PRE_DISTILL = "sft_teacher,sft_student,sample"


def main(run_dir, *sets, stages_=None, config="tiny"):
    argv = ["--config", config, "--run-dir", str(run_dir)]
    for item in sets:
        argv += ["--set", item]
    if stages_:
        argv += ["--stages", stages_]
    return launch.main(argv)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return tiny_run.build(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="module")
def prepared(paths, tmp_path_factory):
    """A run directory whose first three stages are done (the start of every distill test)."""
    run_dir = tmp_path_factory.mktemp("prepared") / "run"
    assert main(run_dir, *tiny_run.tiny_overrides(paths), stages_=PRE_DISTILL) == 0
    return run_dir


def fork(prepared, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(prepared, run_dir)
    return run_dir


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def test_first_stages_write_their_outputs_and_select_the_best_teacher_checkpoint(prepared):
    for stage in PRE_DISTILL.split(","):
        assert os.path.exists(prepared / stage / "DONE"), stage
    teacher = read_json(prepared / "sft_teacher" / "DONE")
    scores = {int(k): v for k, v in teacher["validation_by_step"].items()}
    assert sorted(scores) == [1, 2]  # checkpoint_every=1, max_steps=2: every checkpoint was scored
    assert teacher["best_step"] == max(sorted(scores), key=scores.get)
    assert read_json(prepared / "sft_teacher" / "selection.json") == teacher["validation_by_step"]
    assert os.path.exists(prepared / "sft_teacher" / "params" / "config.json")
    assert not os.path.exists(
        prepared / "sft_teacher" / "best"
    )  # the best checkpoint is kept once, as params
    assert os.listdir(prepared / "tb" / "sft_teacher") and os.listdir(
        prepared / "tb" / "sft_student"
    )
    pairs = read_json(prepared / "sample" / "DONE")
    assert pairs["pairs"] == 8


@pytest.mark.parametrize("method", methods.names())
def test_every_method_runs_distill_and_eval(prepared, tmp_path, paths, method):
    run_dir = fork(prepared, tmp_path)
    assert (
        main(
            run_dir,
            *tiny_run.tiny_overrides(paths),
            f"distill.method={method}",
            stages_="distill,eval",
        )
        == 0
    )
    assert read_json(run_dir / "distill" / "DONE")["method"] == method
    metrics = read_json(run_dir / "eval" / "metrics.json")
    assert set(metrics["models"]) == {"teacher", "initial student", "distilled student"}
    assert os.path.exists(run_dir / "eval" / "report.md")
    with open(
        run_dir / "eval" / "responses.jsonl", encoding="utf-8"
    ) as f:  # per-prompt texts of every model
        rows = [json.loads(line) for line in f]
    assert len(rows) == metrics["n"] and set(rows[0]) == {"prompt", "reference", *metrics["models"]}


def test_context_loglikelihood_is_each_rows_mean_token_logprob(paths, tmp_path):
    """`Context.loglikelihood` (chunked log-probs, batches of 3 with a filler row, rows of
    different lengths) equals log_softmax of each row's own eager logits at its response tokens,
    averaged over them."""
    import jax
    import numpy as np

    config = config_mod.apply_overrides(
        config_mod.load_config("tiny"), [*tiny_run.tiny_overrides(paths), "eval.batch_size=3"]
    )
    ctx = context.Context(config, str(tmp_path / "run"))
    lm = ctx.base_model("student")
    examples = ctx.splits.test[:5]
    prompts = [e.prompt for e in examples]
    texts = [" ".join(e.response.split()[: i + 1]) for i, e in enumerate(examples)]  # 1..5 words
    got = ctx.loglikelihood(lm, "student", prompts, texts)
    encoded = ctx.encode("student", prompts, texts)
    assert len({len(r) for r in encoded.responses}) > 1  # padding is exercised
    for i in range(len(prompts)):
        p, r = (np.array([x[i]], np.int32) for x in (encoded.prompts, encoded.responses))
        logits = np.asarray(lm.logits(p, np.ones_like(p), r, np.ones_like(r)))[0]
        want = np.asarray(jax.nn.log_softmax(logits))[np.arange(r.shape[1]), r[0]].mean()
        assert got[i] == pytest.approx(float(want), abs=1e-5)


def test_eval_measures_calibration_when_asked(prepared, tmp_path, paths):
    """`eval.calibration_samples=3`: each model's calibration (scoring.calibration) in
    metrics.json and report.md; the metrics the run had before are unchanged."""
    run_dir = fork(prepared, tmp_path)
    overrides = tiny_run.tiny_overrides(paths)
    assert main(run_dir, *overrides, "eval.calibration_samples=3", stages_="distill,eval") == 0
    metrics = read_json(run_dir / "eval" / "metrics.json")
    calibration = metrics.pop("calibration")
    assert calibration["k"] == 3 and set(calibration["models"]) == set(metrics["models"])
    for c in calibration["models"].values():
        assert c["prompts"] == metrics["n"] and 0 <= c["spearman_prompts"] <= metrics["n"]
        assert c["spearman"] is None or -1 <= c["spearman"] <= 1
        assert 0 <= c["best_of_k"] <= 1 and 0 <= c["random_of_k"] <= 1
        assert c["best_of_k_gain"] == pytest.approx(c["best_of_k"] - c["random_of_k"])
    assert "## Calibration" in (run_dir / "eval" / "report.md").read_text()
    plain = fork(run_dir, tmp_path / "plain")  # the same distilled student, eval again without
    shutil.rmtree(plain / "eval")
    assert main(plain, *overrides, stages_="eval") == 0
    assert read_json(plain / "eval" / "metrics.json") == metrics


@pytest.mark.parametrize(
    "extra",
    [("distill.rounds=2",), ("pairs.real_ratio=0.5", "pairs.scorer=rouge")],
    ids=["iterative", "real_pairs"],
)
def test_iterative_plad_and_real_preference_relabelling(paths, tmp_path, extra):
    run_dir = tmp_path / "run"
    assert main(run_dir, *tiny_run.tiny_overrides(paths), *extra) == 0
    done = read_json(run_dir / "distill" / "DONE")
    if "distill.rounds=2" in extra:
        assert done["rounds"] == 2 and os.path.isdir(run_dir / "distill" / "checkpoints-round1")
    else:
        assert read_json(run_dir / "sample" / "DONE")["scored"] == 4  # half of the 8 pairs


def test_interrupted_distill_resumes_to_the_same_metrics(prepared, tmp_path, paths, monkeypatch):
    sets = (
        *tiny_run.tiny_overrides(paths),
        "distill.epochs=3",
        "distill.max_steps=6",
        "distill.checkpoint_every=2",
        "distill.log_every=1",
    )
    straight = fork(prepared, tmp_path / "a")
    assert main(straight, *sets, stages_="distill,eval") == 0

    interrupted = fork(prepared, tmp_path / "b")
    monkeypatch.chdir(
        tmp_path / "b"
    )  # the interrupted run and its resume use a relative run directory
    real_step_factory = train.make_train_step

    def step_factory(*args, **kwargs):  # a train step that is "killed" during step 5
        step, calls = real_step_factory(*args, **kwargs), [0]

        def killed_at_five(*a):
            calls[0] += 1
            if calls[0] == 5:
                raise KeyboardInterrupt
            return step(*a)

        return killed_at_five

    monkeypatch.setattr(train, "make_train_step", step_factory)
    assert main("run", *sets, stages_="distill,eval") == 130
    assert not os.path.exists(interrupted / "distill" / "DONE")
    monkeypatch.setattr(train, "make_train_step", real_step_factory)
    assert main("run", *sets, stages_="distill,eval") == 0
    assert read_json(interrupted / "distill" / "DONE") == read_json(straight / "distill" / "DONE")
    assert read_json(interrupted / "distill" / "DONE")["steps"] == 6
    # the whole loss curve, steps before the interruption included
    assert read_json(interrupted / "distill" / "curve.json") == read_json(
        straight / "distill" / "curve.json"
    )
    assert [step for step, _ in read_json(interrupted / "distill" / "curve.json")] == [
        1,
        2,
        3,
        4,
        5,
        6,
    ]
    assert read_json(interrupted / "eval" / "metrics.json") == read_json(
        straight / "eval" / "metrics.json"
    )


def test_a_stage_whose_steps_all_finished_before_a_crash_keeps_its_final_loss(
    prepared, tmp_path, paths
):
    run_dir = fork(prepared, tmp_path)
    sets = (*tiny_run.tiny_overrides(paths), "distill.max_steps=2")
    assert main(run_dir, *sets, stages_="distill") == 0
    finished = read_json(run_dir / "distill" / "DONE")
    os.unlink(run_dir / "distill" / "DONE")  # as if killed after the last checkpoint, before DONE
    assert main(run_dir, *sets, stages_="distill") == 0
    assert read_json(run_dir / "distill" / "DONE") == finished
    assert finished["final_loss"] is not None


def test_teacher_and_student_with_different_tokenizers(paths, tmp_path, capsys):
    other = tiny_run.word_tokenizer("llama", extra_words=("zebra", "quartz", "violin"))
    student = tiny_run.save_llama(
        tmp_path / "student-other-vocab", other, hidden=16, layers=1, seed=3
    )
    sets = (*tiny_run.tiny_overrides(paths), f"student.path={student}")
    run_dir = tmp_path / "run"
    assert main(run_dir, *sets) == 0  # pairs carry text; the student re-tokenizes it
    assert read_json(run_dir / "eval" / "metrics.json")["models"]
    before = sorted(os.listdir(run_dir))
    shutil.rmtree(run_dir / "distill")
    shutil.rmtree(run_dir / "eval")
    capsys.readouterr()
    assert main(run_dir, *sets, "distill.method=kd") == 2  # token-level KD needs one vocabulary
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tokenizers differ" in err[0] and "distill.method=kd" in err[0]
    for stage in PRE_DISTILL.split(","):  # what was done stays done
        assert os.path.exists(run_dir / stage / "DONE")
    assert set(before) - set(os.listdir(run_dir)) == {"distill", "eval"}


@pytest.mark.parametrize(
    "sets,expected",
    [
        (
            ["data.task=jsonl", "data.prompt_field=question", "data.response_field=answer"],
            "question",
        ),
        (["data.path={empty}"], "empty"),
        (["distill.methd=dpo"], "did you mean distill.method"),
        (["distill.beta=high"], "distill.beta expects a number"),
    ],
    ids=["missing_field", "empty_dataset", "unknown_key", "wrong_type"],
)
def test_bad_input_is_one_line_and_loses_nothing(prepared, tmp_path, paths, capsys, sets, expected):
    run_dir = fork(prepared, tmp_path)
    (tmp_path / "empty.jsonl").write_text("")
    before = {
        p: os.path.getmtime(os.path.join(root, p))
        for root, _, files in os.walk(run_dir)
        for p in files
    }
    sets = [s.format(empty=tmp_path / "empty.jsonl") for s in sets]
    assert main(run_dir, *tiny_run.tiny_overrides(paths), *sets) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    after = {
        p: os.path.getmtime(os.path.join(root, p))
        for root, _, files in os.walk(run_dir)
        for p in files
    }
    assert {k: v for k, v in after.items() if k in before} == before  # nothing rewritten or deleted
    for stage in PRE_DISTILL.split(","):
        assert os.path.exists(run_dir / stage / "DONE")


def test_lengths_past_a_position_table_are_one_error_before_any_work(tmp_path):
    """GPT-Neo has max_position_embeddings learned positions: a run whose prompts + responses can
    be longer is refused when the model is loaded, naming the settings."""
    import torch
    import transformers

    torch.manual_seed(0)
    transformers.GPTNeoForCausalLM(
        transformers.GPTNeoConfig(
            vocab_size=64,
            hidden_size=16,
            num_heads=2,
            num_layers=1,
            attention_types=[[["global"], 1]],
            max_position_embeddings=48,
        )
    ).save_pretrained(tmp_path / "neo")
    config = config_mod.apply_overrides(
        config_mod.load_config("tiny"),
        [
            f"student.path={tmp_path / 'neo'}",
            "data.max_prompt_tokens=24",
            "data.max_response_tokens=16",
            "sample.max_new_tokens=16",
            "eval.max_new_tokens=32",
        ],
    )
    ctx = context.Context(config, str(tmp_path / "run"))
    with pytest.raises(
        ValueError,
        match="student: data.max_prompt_tokens 24 \\+ the longest response .* = 56 tokens "
        "exceeds the model's 48 positions",
    ):
        ctx.base_model("student")
    ok = context.Context(
        config_mod.apply_overrides(config, ["eval.max_new_tokens=24"]), str(tmp_path / "run")
    )
    assert ok.base_model("student").max_positions == 48  # 24 + 24 fits


def test_prompts_over_the_limit_are_cut_and_counted(prepared):
    log = read_json(prepared / "sft_teacher" / "DONE")
    assert log["prompts_cut"] > 0  # TL;DR prompts here are 25-35 tokens, the limit 24


# -- the paper preset, through the command line ----------------------------------------------------


def cli(*args, env_extra=None, timeout=900):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "plad_jax.launch", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def test_tldr_t5_without_weights_names_them_and_the_fix(tmp_path):
    out = cli(
        "--config",
        "tldr_t5",
        "--run-dir",
        str(tmp_path / "run"),
        env_extra={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")},
        timeout=300,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    for piece in (
        "google/t5-v1_1-xxl",
        "google/t5-v1_1-large",
        "--set teacher.path=",
        "--set student.path=",
        "--set data.path=",
    ):
        assert piece in lines[0]


def test_tldr_t5_runs_every_stage_on_local_t5_checkpoints(tmp_path):
    t5 = tiny_run.build(tmp_path / "models", family="t5")
    small = {
        "data.test_size": 4,
        "data.validation_size": 4,
        "data.max_d0": 8,
        "data.max_d": 8,
        "data.max_validation": 4,
        "data.max_test": 4,
        "data.max_response_tokens": 8,
        "eval.scorer": "rouge",
        "eval.num_examples": 4,
        "eval.max_new_tokens": 6,
        "sample.max_new_tokens": 6,
        "sft_teacher.validation_examples": 4,
    }
    for section in ("sft_teacher", "sft_student", "distill"):
        small.update(
            {
                f"{section}.max_steps": 2,
                f"{section}.batch_size": 8,
                f"{section}.checkpoint_every": 1,
            }
        )
    sets = [x for item in tiny_run.tiny_overrides(t5, **small) for x in ("--set", item)]
    out = cli("--config", "tldr_t5", "--run-dir", str(tmp_path / "run"), *sets)
    assert out.returncode == 0, out.stderr[-3000:]
    config = read_json(tmp_path / "run" / "config.json")
    assert config["teacher"]["lora"]["rank"] == 8 and config["teacher"]["dtype"] == "bfloat16"
    metrics = read_json(tmp_path / "run" / "eval" / "metrics.json")
    assert set(metrics["models"]) == {"teacher", "initial student", "distilled student"}
    merged = tmp_path / "run" / "distill" / "params"
    assert os.path.exists(merged / "config.json")  # LoRA merged into a plain HF checkpoint


# -- several processes -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [{}, {"distill.method": "pbkd_online", "distill.batch_size": 8}],
    ids=["plad_rank", "pbkd_online"],
)
def test_two_processes_give_the_metrics_of_one(paths, tmp_path, extra):
    """2 processes x 4 CPU devices (jax.distributed over gloo on localhost) vs 1 process x 8
    devices."""
    import socket

    sets = [x for item in tiny_run.tiny_overrides(paths, **extra) for x in ("--set", item)]
    args = lambda run: ["-m", "plad_jax.launch", "--config", "tiny", "--run-dir", str(run), *sets]
    base = {**os.environ, "JAX_PLATFORMS": "cpu"}
    one = subprocess.run(
        [sys.executable, *args(tmp_path / "one")],
        capture_output=True,
        text=True,
        timeout=900,
        env={**base, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
    )
    assert one.returncode == 0, one.stderr[-3000:]

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        subprocess.Popen(
            [sys.executable, *args(tmp_path / "two")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={
                **base,
                "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
                "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                "JAX_NUM_PROCESSES": "2",
                "JAX_PROCESS_ID": str(i),
                "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
            },
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert sorted(os.listdir(tmp_path / "two" / "sample")) == [
        "DONE",
        "pairs-00000.parquet",
        "pairs-00001.parquet",
    ]
    for stage in ("sft_teacher", "sft_student", "sample", "distill"):
        a, b = (
            read_json(tmp_path / "one" / stage / "DONE"),
            read_json(tmp_path / "two" / stage / "DONE"),
        )
        assert a.keys() == b.keys(), stage
        if "final_loss" in a:
            assert b["final_loss"] == pytest.approx(a["final_loss"], rel=1e-5), stage
    assert read_json(tmp_path / "two" / "eval" / "metrics.json") == read_json(
        tmp_path / "one" / "eval" / "metrics.json"
    )


def test_eval_on_the_validation_split(prepared, tmp_path, paths):
    """`eval.split=validation`: the models are evaluated on the validation prompts (for choosing
    hyper-parameters without touching test), and metrics.json and report.md say which split."""
    run_dir = fork(prepared, tmp_path)
    overrides = tiny_run.tiny_overrides(paths)
    assert main(run_dir, *overrides, "eval.split=validation", stages_="distill,eval") == 0
    metrics = read_json(run_dir / "eval" / "metrics.json")
    assert metrics["split"] == "validation"
    rows = [json.loads(line) for line in (run_dir / "eval" / "responses.jsonl").open()]
    config = config_mod.resolve("tiny", overrides, run_dir=str(run_dir))
    splits = context.Context(config, str(run_dir)).splits
    validation = [e.prompt for e in splits.validation[: len(rows)]]
    assert [r["prompt"] for r in rows] == validation and metrics["n"] == len(rows)
    assert not set(validation) & {e.prompt for e in splits.test}
    assert f"{metrics['n']} validation prompts" in (run_dir / "eval" / "report.md").read_text()
