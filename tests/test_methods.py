"""The method registry: nothing outside `plad_jax/methods/` decides by a method's name, and a
method defined outside the package (the README's example, exactly) runs through every stage, its
own hyper-parameter checked like any other key."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys

import pytest

from plad_jax import launch, methods
from tests import tiny_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "plad_jax")


# -- no name comparisons outside the methods package -----------------------------------------------


def name_decisions(source: str, where: str = "<source>") -> list[str]:
    """Places in `source` that decide by a registered method name: a comparison (==, !=, in, not
    in, is) with one, a `match` case on one, or a tuple / list / set literal holding one."""
    known = set(methods.names())

    def is_name(node) -> bool:
        return (
            isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in known
        )

    found = []
    for node in ast.walk(ast.parse(source, where)):
        if isinstance(node, ast.Compare) and any(map(is_name, [node.left, *node.comparators])):
            found.append(f"{where}:{node.lineno} compares with a method name")
        elif isinstance(node, (ast.Tuple, ast.List, ast.Set)) and any(map(is_name, node.elts)):
            found.append(f"{where}:{node.lineno} lists method names")
        elif isinstance(node, ast.MatchValue) and is_name(node.value):
            found.append(f"{where}:{node.lineno} matches a method name")
    return found


def test_the_scan_finds_each_kind_of_name_decision():
    snippets = [
        'm == "dpo"',
        '"kd" != m',
        'm in ("sft", "seqkd")',
        'm not in ["minillm"]',
        'x = {"plad_rank"}',
        'match m:\n    case "pbkd_mm":\n        pass',
    ]
    for snippet in snippets:
        assert name_decisions(snippet), snippet
    assert not name_decisions(
        'm == "teacher"\nx = ("sft_teacher", "eval")\ny = {"method": "dpo"}["method"]'
    )


def test_no_module_outside_the_methods_package_compares_a_method_name():
    found = []
    for folder, subfolders, files in os.walk(PACKAGE):
        subfolders[:] = [d for d in subfolders if d not in ("methods", "__pycache__")]
        for name in sorted(f for f in files if f.endswith(".py")):
            path = os.path.join(folder, name)
            with open(path, encoding="utf-8") as f:
                found += name_decisions(f.read(), os.path.relpath(path, ROOT))
    assert not found, found


def test_every_built_in_method_is_registered_once_with_its_declarations():
    assert methods.names() == (
        "sft",
        "seqkd",
        "kd",
        "fdistill_tvd",
        "fdistill_js",
        "minillm",
        "plad_rank",
        "plad_margin",
        "slic",
        "dpo",
        "pbkd_cheap",
        "pbkd_offline",
        "pbkd_online",
        "pbkd_mm",
    )
    assert methods.names(lambda c: c.iterative) == ("plad_rank", "plad_margin", "slic", "dpo")
    assert methods.names(lambda c: "teacher" in c.frozen_models) == (
        "kd",
        "fdistill_tvd",
        "fdistill_js",
        "minillm",
        "pbkd_mm",
    )
    assert methods.names(lambda c: "reference" in c.frozen_models) == ("dpo",)
    assert methods.resolve("plad_jax.methods:PladRank") is methods.PladRank


# -- a method of your own: the README's example ----------------------------------------------------


def readme_example() -> str:
    """The python block of the README's "Your own method" section."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        section = f.read().split("### Your own method", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture()
def user_module(tmp_path, monkeypatch):
    """The README example as `my_method.py` in a directory of its own, importable."""
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "my_method.py").write_text(readme_example())
    monkeypatch.syspath_prepend(str(folder))
    return folder


def test_the_readme_example_is_a_method_with_its_own_checked_knob(user_module):
    method = methods.get("my_method:RankWithAnchor", anchor=0.25, beta=0.5)
    assert method.name == "my_method:RankWithAnchor" and (method.hp.anchor, method.hp.beta) == (
        0.25,
        0.5,
    )
    assert methods.resolve("my_method:RankWithAnchor").iterative  # inherited from PladRank
    with pytest.raises(
        methods.base.ConfigError, match="distill.hparams.anchor must be >= 0, got -1"
    ):
        methods.get("my_method:RankWithAnchor", anchor=-1.0)


@pytest.mark.parametrize(
    "sets,expected",
    [
        (["distill.hparams.anchor=-1"], "distill.hparams.anchor must be >= 0, got -1"),
        (["distill.hparams.anchor=abc"], "distill.hparams.anchor expects a number, got 'abc'"),
        (["distill.hparams.anchr=1"], "did you mean distill.hparams.anchor?"),
        (
            ["distill.kd_temperature=2"],
            "distill.kd_temperature=2.0 is not a hyper-parameter of "
            "distill.method=my_method:RankWithAnchor (its hyper-parameters: distill.score, "
            "distill.beta, distill.alpha, distill.hparams.anchor)",
        ),
    ],
    ids=["invalid", "mistyped", "misspelt", "foreign"],
)
def test_a_bad_knob_of_a_user_method_is_one_line_exit_2_and_writes_nothing(
    user_module, tmp_path, capsys, sets, expected
):
    run_dir = tmp_path / "run"
    argv = [
        "--config",
        "demo",
        "--run-dir",
        str(run_dir),
        "--set",
        "distill.method=my_method:RankWithAnchor",
    ]
    for item in sets:
        argv += ["--set", item]
    assert launch.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert not run_dir.exists()


def test_a_user_method_that_cannot_be_loaded_is_one_line(tmp_path, capsys):
    argv = [
        "--config",
        "demo",
        "--run-dir",
        str(tmp_path / "run"),
        "--set",
        "distill.method=not_there:Method",
    ]
    assert launch.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "plad_jax.launch: error: distill.method=not_there:Method: cannot import not_there "
        "(ModuleNotFoundError: No module named 'not_there')"
    ]


@pytest.mark.slow
def test_the_readme_example_runs_every_stage_from_its_own_directory(user_module, tmp_path):
    """As a user runs it: `python -m plad_jax.launch` in the directory that holds my_method.py."""
    paths = tiny_run.build(tmp_path / "models")
    run_dir = tmp_path / "run"
    sets = [
        *tiny_run.tiny_overrides(paths),
        "distill.method=my_method:RankWithAnchor",
        "distill.hparams.anchor=0.5",
    ]
    argv = ["--config", "tiny", "--run-dir", str(run_dir), *[a for s in sets for a in ("--set", s)]]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "PYTHONPATH": ROOT}
    out = subprocess.run(
        [sys.executable, "-m", "plad_jax.launch", *argv],
        cwd=user_module,
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    for stage in ("sft_teacher", "sft_student", "sample", "distill", "eval"):
        assert (run_dir / stage / "DONE").exists(), stage
    with open(run_dir / "distill" / "DONE", encoding="utf-8") as f:
        done = json.load(f)
    assert done["method"] == "my_method:RankWithAnchor" and done["final_loss"] is not None
    with open(run_dir / "config.json", encoding="utf-8") as f:
        assert json.load(f)["distill"]["hparams"] == {"anchor": 0.5}
    with open(run_dir / "eval" / "metrics.json", encoding="utf-8") as f:
        assert set(json.load(f)["models"]) == {"teacher", "initial student", "distilled student"}


def test_batches_the_pipeline_cannot_build_are_refused_up_front(tmp_path, monkeypatch, capsys):
    (tmp_path / "odd_methods.py").write_text(
        "from plad_jax.methods import Batches, PladRank\n"
        "class MixedPairs(PladRank):\n"
        "    batches = Batches(responses=('teacher', 'student'), pairs=True)\n"
        "class Nothing(PladRank):\n    batches = Batches()\n"
        "class Typo(PladRank):\n    batches = Batches(responses=('teachr',))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    for name, why in (
        ("MixedPairs", "a mix of response sources has more rows than its pairs or reference"),
        ("Nothing", "they hold no responses and no pairs"),
        ("Typo", "response sources ['teachr'] are not among target, teacher, student"),
    ):
        argv = [
            "--config",
            "demo",
            "--run-dir",
            str(tmp_path / "run"),
            "--set",
            f"distill.method=odd_methods:{name}",
        ]
        assert launch.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [
            f"plad_jax.launch: error: distill.method=odd_methods:{name}: "
            f"its batches cannot be built: {why}"
        ]
    assert not (tmp_path / "run").exists()
