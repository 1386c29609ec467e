"""Config tree, presets, `--set` overrides, validation, JSON round trip, and the CLI's error
contract."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import types

import pytest

from plad_jax import config as C
from plad_jax import launch
from plad_jax.config import (
    Config,
    ConfigError,
    apply_overrides,
    from_dict,
    load_config,
    to_dict,
    validate,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = (
    "demo",
    "tiny",
    "tldr_t5",
    "hh_t5",
    "tldr_llama",
    "hh_llama",
    "tldr_gptneo",
    "hh_gptneo",
    "docstrings_smollm2",
)
PAPER = {  # preset -> (teacher, student, task)
    "tldr_t5": ("google/t5-v1_1-xxl", "google/t5-v1_1-large", "tldr"),
    "hh_t5": ("google/t5-v1_1-xxl", "google/t5-v1_1-large", "hh"),
    "tldr_llama": ("meta-llama/Llama-2-13b-hf", "meta-llama/Llama-2-7b-hf", "tldr"),
    "hh_llama": ("meta-llama/Llama-2-13b-hf", "meta-llama/Llama-2-7b-hf", "hh"),
    "tldr_gptneo": ("EleutherAI/gpt-neo-2.7B", "EleutherAI/gpt-neo-1.3B", "tldr"),
    "hh_gptneo": ("EleutherAI/gpt-neo-2.7B", "EleutherAI/gpt-neo-1.3B", "hh"),
}
TINY_PATHS = ["teacher.path=/m/teacher", "student.path=/m/student", "data.path=/d/train.jsonl"]


def message(excinfo) -> str:
    return str(excinfo.value)


# ------------------------------------------------------------------------------------------------
# Presets


def test_preset_names_are_exactly_the_presets():
    assert sorted(C.preset_names()) == sorted(PRESETS)


def test_installed_package_carries_the_presets_under_plad_jax(tmp_path):
    """`pip install .` puts the presets in plad_jax/configs (no top-level `configs` package to
    clash in site-packages), and `--config NAME` finds them from any directory."""
    source, target, cwd = tmp_path / "source", tmp_path / "site", tmp_path / "elsewhere"
    cwd.mkdir()
    skip = shutil.ignore_patterns(
        ".git", "build", "dist", "runs", "*.egg-info", "__pycache__", ".venv", ".whl"
    )
    shutil.copytree(ROOT, source, ignore=skip)  # setuptools builds in the source tree: not ours
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(source),
        ],
        check=True,
        cwd=cwd,
        capture_output=True,
    )
    assert (target / "plad_jax" / "configs" / "demo.py").is_file()
    assert not (target / "configs").exists()
    code = (
        "import plad_jax.config.presets as c; m = c._import_preset('demo'); "
        "print(m.__name__, c.load_config('demo').name, c.preset_names() == "
        f"sorted({list(PRESETS)!r}))"
    )
    env = {**subprocess_env(), "PYTHONPATH": str(target)}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True
    )
    assert out.stdout.split() == ["plad_jax.configs.demo", "demo", "True"], out.stderr


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_loads_validates_and_round_trips(name):
    config = load_config(name)
    assert isinstance(config, Config) and config.name == name
    if name == "tiny":  # its paths are the tests' to fill in
        config = apply_overrides(config, TINY_PATHS)
    assert validate(config) == config
    assert from_dict(json.loads(json.dumps(to_dict(config)))) == config


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_presets_use_the_paper_models_and_hyper_parameters(name):
    teacher, student, task = PAPER[name]
    c = load_config(name)
    assert (c.teacher.path, c.student.path, c.data.task) == (teacher, student, task)
    assert c.data.path == {"tldr": "trl-lib/tldr", "hh": "Anthropic/hh-rlhf"}[task]
    if task == "hh":
        assert c.data.hub_data_dir == "helpful-base"
    assert c.teacher.lora == c.student.lora == C.LoRASettings(rank=8, alpha=32.0, dropout=0.1)
    assert c.sample.temperature == 0.7 and c.distill.beta == 1.0 and c.distill.score == "mean"
    assert (
        c.sft_teacher.learning_rate
        == c.sft_student.learning_rate
        == c.distill.learning_rate
        == 1e-4
    )
    assert c.sft_teacher.epochs == c.sft_student.epochs == 1
    assert c.sft_teacher.select_best and not c.sft_student.select_best
    assert c.eval.scorer == "reward_model"


def test_demo_is_offline_and_builds_its_models_from_scratch():
    c = load_config("demo")
    assert c.data.task == "demo"
    for m in (c.teacher, c.student):
        assert m.path == "" and m.from_scratch and m.init["model_type"] == "llama"
    assert (
        c.teacher.init["hidden_size"] > c.student.init["hidden_size"]
    )  # the teacher must be the stronger
    assert c.eval.scorer == c.pairs.scorer == "rouge"  # no reward model to download


def test_docstrings_smollm2_names_its_checkpoint_and_cuts_the_student_from_it():
    c = load_config("docstrings_smollm2")
    assert c.teacher.path == c.student.path == "fetch:smollm2-135m-instruct"  # no machine's path
    assert c.teacher.layers is None and c.student.layers == (0, 5, 10, 15, 20, 25)
    assert c.data.task == "demo" and c.distill.method == "plad_rank"
    assert c.eval.scorer == c.pairs.scorer == "rouge"  # offline


def test_tiny_without_paths_names_what_to_set():
    with pytest.raises(ConfigError, match=r"teacher\.path"):
        validate(load_config("tiny"))
    with pytest.raises(ConfigError, match=r"data\.path"):
        validate(apply_overrides(load_config("tiny"), TINY_PATHS[:2]))


def test_defaults_follow_the_paper():
    c = Config()
    assert (c.sample.temperature, c.sample.top_k, c.sample.top_p) == (0.7, 0, 1.0)
    assert (
        c.distill.method,
        c.distill.score,
        c.distill.beta,
        c.distill.alpha,
        c.distill.rounds,
    ) == ("plad_rank", "mean", 1.0, 0.0, 1)
    assert c.distill.learning_rate == c.sft_teacher.learning_rate == 1e-4
    assert c.sft_teacher.epochs == c.sft_student.epochs == c.distill.epochs == 1
    assert c.sft_teacher.select_best and not c.sft_student.select_best
    assert C.LoRASettings() == C.LoRASettings(
        rank=8, alpha=32.0, dropout=0.1, targets=("attention", "mlp")
    )
    assert c.pairs.real_ratio == 0.0
    assert c.resolved_run_dir() == os.path.join("runs", "plad")


def test_lora_settings_convert_to_the_models_lora_config():
    from plad_jax.models.lora import LoRAConfig

    settings = C.LoRASettings(rank=4, alpha=8.0, dropout=0.0, targets=("q_proj",))
    lora = LoRAConfig(**dataclasses.asdict(settings))
    assert (lora.rank, lora.alpha, lora.dropout, lora.targets) == (4, 8.0, 0.0, ("q_proj",))
    assert {f.name for f in dataclasses.fields(LoRAConfig)} == {
        f.name for f in dataclasses.fields(C.LoRASettings)
    }


def test_distill_knobs_become_the_methods_hyper_parameters():
    from plad_jax import methods

    def configure(*sets):
        return methods.configure(apply_overrides(Config(), list(sets)))

    method = configure(
        "distill.method=plad_margin",
        "distill.score=sum",
        "distill.beta=0.5",
        "distill.alpha=0.1",
        "distill.span_max_n=2",
    )
    assert isinstance(method, methods.PladMargin) and method.name == "plad_margin"
    assert method.hparams_dict() == {
        "score": "sum",
        "beta": 0.5,
        "alpha": 0.1,
        "span_max_n": 2,
        "span_reference": "target",
    }
    assert configure("distill.method=kd", "distill.kd_temperature=2").hp.kd_temperature == 2.0
    pbkd = configure("distill.method=pbkd_offline", "pbkd.num_samples=3")
    assert pbkd.hp is not None and pbkd.hp.num_samples == 3  # the pbkd section, whole


def test_choice_lists_live_in_one_place():
    from plad_jax import methods
    from plad_jax.data.tasks import TASKS

    assert C.schema.TASKS is TASKS and not hasattr(C, "METHODS")  # the registry: plad_jax.methods
    with pytest.raises(ConfigError) as e:
        methods.configure(apply_overrides(Config(), ["distill.method=nope"]))
    assert all(m in message(e) for m in methods.names()) and "module:Class" in message(e)


# ------------------------------------------------------------------------------------------------
# Overrides: parsing against the field types


def test_overrides_parse_each_type():
    c = apply_overrides(
        Config(),
        [
            "seed=7",  # int
            "distill.beta=0.5",  # float
            "distill.learning_rate=3e-5",
            "distill.kd_temperature=2",  # an int where a float is expected
            "sft_student.select_best=true",  # bool
            "sft_teacher.select_best=0",
            "name=my run",  # str, kept as given
            "eval.num_examples=100",  # Optional[int]
            "data.max_d=none",
            "teacher.compute_dtype=bfloat16",  # Optional[Literal]
            "data.task=hh",  # Literal
            "mesh.fsdp=-1",
            "mesh.data=1",
        ],
    )
    assert c.seed == 7 and c.distill.beta == 0.5 and c.distill.learning_rate == 3e-5
    assert c.distill.kd_temperature == 2.0 and isinstance(c.distill.kd_temperature, float)
    assert c.sft_student.select_best is True and c.sft_teacher.select_best is False
    assert c.name == "my run"
    assert c.eval.num_examples == 100 and c.data.max_d is None
    assert c.teacher.compute_dtype == "bfloat16" and c.data.task == "hh"
    assert (c.mesh.data, c.mesh.fsdp, c.mesh.tensor) == (1, -1, 1)
    assert apply_overrides(c, ["eval.num_examples=null"]).eval.num_examples is None


@pytest.mark.parametrize("raw", ["true", "True", "1", "false", "FALSE", "0"])
def test_bool_spellings(raw):
    value = apply_overrides(Config(), [f"distill.select_best={raw}"]).distill.select_best
    assert value is (raw.lower() in ("true", "1"))


def test_tuples_from_comma_separated_or_json():
    c = apply_overrides(Config(), ["student.lora.targets=q_proj, v_proj"])
    assert c.student.lora.targets == ("q_proj", "v_proj")
    c = apply_overrides(Config(), ['student.lora.targets=["attention"]'])
    assert c.student.lora.targets == ("attention",)


def test_stop_strings_from_json_or_comma_separated_none_is_the_task_default():
    c = apply_overrides(Config(), ['sample.stop=["\\n\\nHuman:", "###"]', "eval.stop=END, STOP"])
    assert c.sample.stop == ("\n\nHuman:", "###") and c.eval.stop == ("END", "STOP")
    assert apply_overrides(c, ["sample.stop="]).sample.stop == ()  # none, not even the task's
    assert apply_overrides(c, ["sample.stop=none"]).sample.stop is None  # the task's own
    assert Config().sample.stop is None and Config().eval.stop is None
    assert from_dict(json.loads(json.dumps(to_dict(c)))) == c  # config.json round trip
    with pytest.raises(ConfigError, match="sample.stop expects a comma-separated list"):
        apply_overrides(Config(), ["sample.stop=[1]"])


def test_optional_section_starts_from_its_defaults_and_can_be_removed():
    c = apply_overrides(Config(), ["student.lora.rank=16"])
    assert c.student.lora == C.LoRASettings(rank=16) and c.teacher.lora is None
    assert apply_overrides(c, ["student.lora=none"]).student.lora is None
    c = apply_overrides(Config(), ['teacher.lora={"rank": 4, "targets": ["mlp"]}'])
    assert c.teacher.lora == C.LoRASettings(rank=4, targets=("mlp",))


def test_init_dict_takes_json_or_single_keys():
    c = apply_overrides(
        Config(),
        [
            'student.init={"model_type": "llama", "hidden_size": 32}',
            "student.init.num_hidden_layers=2",
            "student.init.hidden_act=silu",
            "student.init.rope_scaling.factor=2.0",
        ],
    )
    assert c.student.init == {
        "model_type": "llama",
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "hidden_act": "silu",
        "rope_scaling": {"factor": 2.0},
    }
    assert Config().student.init is None  # the default was not mutated


def test_overrides_apply_in_order_and_leave_the_input_alone():
    base = Config()
    c = apply_overrides(base, ["distill.beta=2", "distill.beta=3"])
    assert c.distill.beta == 3.0 and base.distill.beta == 1.0


@pytest.mark.parametrize(
    "override, expected",
    [
        ("distill.beta=abc", "distill.beta expects a number, got 'abc'"),
        ("seed=1.5", "seed expects an integer, got '1.5'"),
        (
            "sft_teacher.select_best=yes",
            "sft_teacher.select_best expects a boolean (true/false/1/0), got 'yes'",
        ),
        ("eval.num_examples=lots", "eval.num_examples expects an integer or none, got 'lots'"),
        ("distill.score=avg", "distill.score expects one of mean, sum, got 'avg'"),
        (
            "student.lora.targets=[1]",
            "student.lora.targets expects a comma-separated list (or JSON list) of strings, got ",
        ),
        ("teacher.init=[1]", "teacher.init expects a JSON object or none, got '[1]'"),
    ],
)
def test_wrong_type_names_key_expected_type_and_value(override, expected):
    with pytest.raises(ConfigError) as e:
        apply_overrides(Config(), [override])
    assert message(e).startswith(expected)


@pytest.mark.parametrize(
    "key, suggestion",
    [
        ("distill.metod", "distill.method"),
        ("disitll.method", "distill.method"),
        ("student.lora.rnk", "student.lora.rank"),
        ("sample.temprature", "sample.temperature"),
        ("nme", "name"),
    ],
)
def test_unknown_key_suggests_the_closest(key, suggestion):
    with pytest.raises(ConfigError) as e:
        apply_overrides(Config(), [f"{key}=1"])
    assert message(e) == f"unknown config key '{key}'; did you mean {suggestion}?"


def test_unknown_key_without_a_close_match_lists_the_section():
    with pytest.raises(ConfigError) as e:
        apply_overrides(Config(), ["distill.lr=1"])
    assert message(e).startswith("unknown config key 'distill.lr'; valid keys under 'distill': ")
    assert "learning_rate" in message(e)
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides(Config(), ["distill.beta.x=1"])
    with pytest.raises(ConfigError, match="not key=value"):
        apply_overrides(Config(), ["distill.beta"])


# ------------------------------------------------------------------------------------------------
# Validation


def valid(*overrides) -> Config:
    """The config checks, then the method's (`plad_jax.methods.configure`), as the CLI runs them."""
    from plad_jax import methods

    config = validate(apply_overrides(load_config("demo"), list(overrides)))
    methods.configure(config)
    return config


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["pairs.real_ratio=1.5"], "pairs.real_ratio must be in [0, 1], got 1.5"),
        (["pairs.real_ratio=-0.1"], "pairs.real_ratio must be in [0, 1]"),
        (["distill.rounds=0"], "distill.rounds must be >= 1, got 0"),
        (["distill.rounds=2", "distill.method=kd"], "distill.rounds=2 (iterative distillation)"),
        (
            ["pairs.real_ratio=0.5", "distill.method=seqkd"],
            "pairs.real_ratio=0.5 relabels preference pairs",
        ),
        (
            ["pairs.real_ratio=0.5", "pairs.scorer=reward_model", "pairs.reward_model="],
            "pairs.scorer=reward_model needs pairs.reward_model",
        ),
        (
            ["eval.scorer=jax_reward_model", "eval.reward_model="],
            "eval.scorer=jax_reward_model needs eval.reward_model",
        ),
        (
            ["distill.batch_size=6", "distill.grad_accum=4"],
            "distill.batch_size (6) must be a multiple of distill.grad_accum (4)",
        ),
        (["sft_teacher.epochs=0"], "sft_teacher.epochs must be >= 1"),
        (["sft_student.learning_rate=0"], "sft_student.learning_rate must be positive"),
        (["sample.top_p=0"], "sample.top_p must be in (0, 1]"),
        (["sample.temperature=-1"], "sample.temperature must be >= 0"),
        (
            ["mesh.data=-1", "mesh.fsdp=-1"],
            "mesh (-1, -1, 1): at most one of mesh.data/fsdp/tensor may be -1",
        ),
        (["mesh.tensor=0"], "mesh (-1, 1, 0): axis sizes must be positive or -1"),
        (["teacher.path=/some/dir"], "teacher.path and teacher.init are both set"),
        (["student.init=none"], "student has no weights: set student.path"),
        (['teacher.init={"model_type": "gpt2"}'], "teacher.init.model_type must be one of"),
        (["data.task=tldr"], "teacher.init builds a model from scratch, so set teacher.tokenizer"),
        (
            ["data.task=csv", "teacher.tokenizer=/t", "student.tokenizer=/t"],
            "data.task=csv reads a local file: set data.path",
        ),
        (["data.test_size=2.5"], "data.test_size must be a count"),
        (["data.max_d0=0"], "data.max_d0 must be >= 1 or none"),
        (["eval.calibration_samples=1"], "eval.calibration_samples must be 0 (off) or >= 2"),
        (["student.lora.dropout=1"], "student.lora.dropout must be in [0, 1)"),
        (["student.lora.targets="], "student.lora.targets must name at least one"),
        (["distill.method=dpo", "distill.beta=0"], "distill.beta must be positive for dpo"),
        (["distill.method=slic", "distill.beta=0"], "distill.beta must be positive for slic"),
        (["distill.beta=-1"], "distill.beta must be >= 0, got -1.0"),
        (
            ["distill.method=kd", "distill.kd_temperature=0"],
            "distill.kd_temperature must be positive",
        ),
        (
            ["distill.method=dpo", "distill.label_smoothing=0.5"],
            "distill.label_smoothing must be in [0, 0.5)",
        ),
        (["distill.method=plad_margin", "distill.span_max_n=0"], "distill.span_max_n must be >= 1"),
        (
            ["distill.method=kd", "distill.beta=0.5"],
            "distill.beta=0.5 is not a hyper-parameter of distill.method=kd "
            "(its hyper-parameters: distill.kd_temperature)",
        ),
        (
            ["distill.method=sft", "distill.score=sum"],
            "distill.score=sum is not a hyper-parameter of distill.method=sft "
            "(its hyper-parameters: none)",
        ),
        (
            ["distill.method=pbkd_cheap", "distill.alpha=0.1"],
            "distill.alpha=0.1 is not a hyper-parameter of "
            "distill.method=pbkd_cheap (its hyper-parameters: pbkd.*)",
        ),
        (
            ["distill.hparams.betta=2"],
            "distill.hparams.betta is not a hyper-parameter of distill.method=plad_rank",
        ),
        (["distill.hparams.beta=2"], "distill.hparams.beta: set distill.beta instead"),
        (
            ["distill.method=pbkd_online", "pbkd.num_samples=1"],
            "pbkd num_samples=1: the leave-one-out baseline",
        ),
        (["distill.method=pbkd_mm", "pbkd.r_max=0"], "pbkd r_max must be > 0"),
        (
            ["distill.method=no_such_module:Method"],
            "distill.method=no_such_module:Method: cannot import no_such_module",
        ),
        (
            ["distill.method=json:loads"],
            "distill.method=json:loads: json.loads is not a subclass of plad_jax.methods.Method",
        ),
        (
            ["distill.method=plad_rnak"],
            "unknown distill.method 'plad_rnak'; did you mean plad_rank?",
        ),
        (["name=a/b"], "name must be a non-empty directory name"),
        (['eval.stop=["x", ""]'], "eval.stop must not hold an empty string"),
    ],
)
def test_validation_rejects_contradictions_in_one_sentence(overrides, expected):
    with pytest.raises(ConfigError) as e:
        valid(*overrides)
    assert message(e).startswith(expected)
    assert "\n" not in message(e)


def test_validation_accepts_the_extensions():
    c = valid(
        "pairs.real_ratio=0.5",
        "pairs.scorer=rouge",
        "distill.rounds=3",
        "distill.method=plad_margin",
    )
    assert (c.pairs.real_ratio, c.distill.rounds) == (0.5, 3)
    c = valid(
        "teacher.tokenizer=/tok", "student.tokenizer=/tok", "data.task=jsonl", "data.path=/x.jsonl"
    )
    assert c.teacher.tokenizer_path == "/tok"  # init models with an explicit tokenizer
    assert (
        Config().student.tokenizer_path is None and C.ModelConfig(path="/m").tokenizer_path == "/m"
    )


def test_validate_checks_leaf_types_of_hand_built_configs():
    bad = dataclasses.replace(Config(), distill=dataclasses.replace(C.DistillConfig(), epochs="3"))
    with pytest.raises(ConfigError, match="distill.epochs expects an integer, got '3'"):
        validate(bad)


class FakeTokenizer:
    def __init__(self, vocab):
        self.vocab = vocab

    def get_vocab(self):
        return dict(self.vocab)


def test_logit_methods_need_one_vocabulary():
    from plad_jax import methods

    def check(config, *tokenizers):
        methods.check_shared_vocabulary(methods.configure(config), config, *tokenizers)

    a, b = FakeTokenizer({"x": 0, "y": 1}), FakeTokenizer({"x": 0, "z": 1})
    assert methods.names(lambda c: c.shared_vocabulary) == (
        "kd",
        "fdistill_tvd",
        "fdistill_js",
        "minillm",
        "pbkd_mm",
    )
    for method in ("kd", "fdistill_tvd", "fdistill_js", "minillm", "pbkd_mm"):
        config = apply_overrides(
            Config(), [f"distill.method={method}", "teacher.path=/t", "student.path=/s"]
        )
        check(config, a, FakeTokenizer({"x": 0, "y": 1}))  # same vocabulary: fine
        with pytest.raises(ConfigError) as e:
            check(config, a, b)
        assert message(e).startswith(
            f"distill.method={method} compares teacher and student token distributions"
        )
        assert "/t: 2 tokens" in message(e) and "plad_rank" in message(e)
    check(apply_overrides(Config(), ["distill.method=plad_rank"]), a, b)  # text-level


def test_stages_are_checked_and_ordered():
    assert (
        C.parse_stages(None)
        == C.STAGES
        == ("sft_teacher", "sft_student", "sample", "distill", "eval")
    )
    assert C.parse_stages("eval, sample") == ("sample", "eval")
    with pytest.raises(ConfigError, match="unknown stage 'distil'; did you mean distill?"):
        C.parse_stages("sample,distil")


# ------------------------------------------------------------------------------------------------
# JSON and config files


def test_to_dict_is_json_and_from_dict_round_trips():
    c = apply_overrides(
        load_config("tldr_llama"),
        [
            "student.lora.targets=q_proj,v_proj",
            "eval.num_examples=9",
            "teacher.init.x=1",
            "teacher.path=",
        ],
    )
    d = to_dict(c)
    assert d["student"]["lora"]["targets"] == ["q_proj", "v_proj"] and d["mesh"] == {
        "data": 1,
        "fsdp": -1,
        "tensor": 1,
    }
    back = from_dict(json.loads(json.dumps(d)))
    assert back == c and isinstance(back.student.lora.targets, tuple)


def test_from_dict_fills_missing_keys_and_rejects_unknown_or_mistyped_ones():
    assert from_dict({"distill": {"beta": 2}}) == dataclasses.replace(
        Config(), distill=C.DistillConfig(beta=2.0)
    )
    with pytest.raises(
        ConfigError, match="unknown config key 'distill.metod'; did you mean distill.method?"
    ):
        from_dict({"distill": {"metod": "kd"}})
    with pytest.raises(ConfigError, match="sample.max_new_tokens expects an integer, got '64'"):
        from_dict({"sample": {"max_new_tokens": "64"}})
    with pytest.raises(ConfigError, match="distill.select_best expects a boolean"):
        from_dict({"distill": {"select_best": 1}})


def test_config_from_json_and_py_files(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(
        json.dumps(to_dict(apply_overrides(load_config("demo"), ["distill.beta=0.25"])))
    )
    assert load_config(str(path)).distill.beta == 0.25
    py = tmp_path / "mine.py"
    py.write_text(
        "from plad_jax.config import Config, DistillConfig\n\n"
        "def config():\n    return Config(name='mine', distill=DistillConfig(method='kd'))\n"
    )
    assert load_config(str(py)).distill.method == "kd"


@pytest.mark.parametrize(
    "content, suffix, expected",
    [
        ("{not json", ".json", "is not valid JSON"),
        ("[1, 2]", ".json", "a config must be a JSON object"),
        ("x = 1\n", ".py", "defines no config() function"),
        ("def config():\n    raise KeyError('k')\n", ".py", "config() failed: KeyError"),
        ("def config():\n    return {}\n", ".py", "config() returned dict"),
        ("import nosuchmodule_xyz\n", ".py", "failed to load: ModuleNotFoundError"),
    ],
)
def test_bad_config_files_are_one_line_errors(tmp_path, content, suffix, expected):
    path = tmp_path / f"bad{suffix}"
    path.write_text(content)
    with pytest.raises(ConfigError) as e:
        load_config(str(path))
    assert expected in message(e)


def test_unknown_preset_suggests_and_lists():
    with pytest.raises(ConfigError) as e:
        load_config("tldr_lama")
    assert "unknown preset 'tldr_lama'; did you mean tldr_llama?" in message(
        e
    ) and "hh_gptneo" in message(e)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/no/such/file.json")


def test_resolve_fills_the_run_dir_and_makes_local_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert C.resolve("demo").run_dir == str(tmp_path / "runs" / "demo")
    assert C.resolve("demo", ["name=x"]).run_dir == str(tmp_path / "runs" / "x")
    assert C.resolve("demo", run_dir="rel/run").run_dir == str(tmp_path / "rel" / "run")
    assert C.resolve("demo", run_dir="gs://bucket/run").run_dir == "gs://bucket/run"
    (tmp_path / "data.jsonl").write_text("")
    (tmp_path / "teacher").mkdir()
    c = C.resolve(
        "tiny",
        TINY_PATHS + ["data.path=data.jsonl", "teacher.path=teacher", "student.path=org/hub-model"],
    )
    assert c.data.path == str(tmp_path / "data.jsonl") and c.teacher.path == str(
        tmp_path / "teacher"
    )
    assert c.student.path == "org/hub-model"  # not a local path: a hub id, kept as given
    assert C.resolve("tiny", TINY_PATHS + ["teacher.path=./not-there"]).teacher.path == str(
        tmp_path / "not-there"
    )


# ------------------------------------------------------------------------------------------------
# Run directory and multi-host


def test_write_run_config_is_atomic_and_keeps_an_earlier_different_config(tmp_path):
    run = tmp_path / "run"
    first = C.resolve("demo", run_dir=str(run))
    assert launch.write_run_config(first, str(run)) is None
    assert from_dict(json.loads((run / "config.json").read_text())) == first
    assert launch.write_run_config(first, str(run)) is None  # same config: untouched
    assert sorted(os.listdir(run)) == ["config.json"]
    second = C.resolve("demo", ["distill.method=plad_margin"], run_dir=str(run))
    warning = launch.write_run_config(second, str(run))
    assert "distill.method" in warning and "\n" not in warning
    kept = [f for f in os.listdir(run) if f != "config.json"]
    assert len(kept) == 1 and kept[0].startswith("config.") and kept[0].endswith(".json")
    assert from_dict(json.loads((run / kept[0]).read_text())) == first
    assert from_dict(json.loads((run / "config.json").read_text())) == second


def test_unwritable_run_dir_is_a_user_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(C.UserError, match="cannot write the run directory"):
        launch.write_run_config(Config(), str(blocker / "run"))
    assert blocker.read_text() == "not a directory"


@pytest.mark.parametrize(
    "env, tpu, expected",
    [
        ({}, False, None),
        (
            {
                "JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234",
                "JAX_NUM_PROCESSES": "4",
                "JAX_PROCESS_ID": "2",
            },
            False,
            {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 2},
        ),
        ({"JAX_COORDINATOR_ADDRESS": "h:1"}, False, {"coordinator_address": "h:1"}),
        ({}, True, {}),
        ({"PLAD_JAX_DISTRIBUTED": "0"}, True, None),
        ({"PLAD_JAX_DISTRIBUTED": "1"}, False, {}),
        ({"SLURM_JOB_ID": "5", "SLURM_NTASKS": "8"}, False, {}),
        ({"SLURM_JOB_ID": "5", "SLURM_NTASKS": "1"}, False, None),
    ],
)
def test_distributed_initialization_is_decided_from_the_environment(env, tpu, expected):
    assert launch.distributed_kwargs(env, on_cloud_tpu=tpu) == expected


def test_bad_distributed_environment_is_a_usage_error():
    with pytest.raises(launch.UsageError, match="JAX_NUM_PROCESSES must be an integer"):
        launch.distributed_kwargs(
            {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "four"}, on_cloud_tpu=False
        )


# ------------------------------------------------------------------------------------------------
# CLI in process (stages replaced by a recorder; plad_jax.pipeline.runner is written separately)


@pytest.fixture
def fake_stages(monkeypatch):
    calls = []
    module = types.ModuleType("plad_jax.pipeline.runner")

    def run(
        config, run_dir, stages, on_start=None
    ):  # the real one calls on_start once inputs are checked
        on_start()
        calls.append((config, run_dir, stages))

    module.run = run
    import plad_jax.pipeline

    # `from plad_jax.pipeline import runner` reads the package's attribute once the real module
    # has been imported, so both are replaced
    monkeypatch.setitem(sys.modules, "plad_jax.pipeline.runner", module)
    monkeypatch.setattr(plad_jax.pipeline, "runner", module, raising=False)
    for name in ("JAX_COORDINATOR_ADDRESS", "PLAD_JAX_DISTRIBUTED", "SLURM_JOB_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(launch, "_on_cloud_tpu_vm", lambda: False)
    return calls


def test_main_writes_config_and_runs_the_stages(tmp_path, fake_stages, capsys):
    run = tmp_path / "run"
    assert (
        launch.main(
            [
                "--config",
                "demo",
                "--set",
                "distill.beta=0.5",
                "--stages",
                "distill,sample",
                "--run-dir",
                str(run),
            ]
        )
        == 0
    )
    [(config, run_dir, stages)] = fake_stages
    assert run_dir == str(run) and config.run_dir == str(run) and stages == ("sample", "distill")
    assert config.distill.beta == 0.5
    assert from_dict(json.loads((run / "config.json").read_text())) == config
    assert capsys.readouterr().err == ""


def test_main_reports_a_bad_json_config_in_one_line(tmp_path, fake_stages, capsys):
    bad = tmp_path / "c.json"
    bad.write_text(json.dumps(to_dict(apply_overrides(load_config("demo"), ["distill.rounds=0"]))))
    assert launch.main(["--config", str(bad), "--run-dir", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == "plad_jax.launch: error: distill.rounds must be >= 1, got 0\n"
    assert fake_stages == [] and not (tmp_path / "run").exists()


def test_main_reruns_from_a_run_config_json(tmp_path, fake_stages):
    run = tmp_path / "run"
    assert launch.main(["--set", "seed=3", "--run-dir", str(run)]) == 0
    assert launch.main(["--config", str(run / "config.json")]) == 0
    first, second = fake_stages
    assert first[0] == second[0] and second[1] == str(run) and second[2] == C.STAGES


@pytest.mark.parametrize("error", [C.ConfigError("bad thing"), "checkpoint", "data"])
def test_user_errors_from_the_stages_are_one_line_and_exit_2(tmp_path, fake_stages, capsys, error):
    from plad_jax.data import DataError
    from plad_jax.models import CheckpointError

    error = {
        "checkpoint": CheckpointError("/m: no config.json"),
        "data": DataError("x.jsonl has\nno rows"),
    }.get(error, error)

    def boom(config, run_dir, stages, on_start=None):
        raise error

    sys.modules["plad_jax.pipeline.runner"].run = boom
    assert launch.main(["--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1
        and err.startswith("plad_jax.launch: error: ")
        and "Traceback" not in err
    )
    assert not (
        tmp_path / "run"
    ).exists()  # a run that cannot start writes nothing, not even config.json


def test_bugs_keep_their_traceback(tmp_path, fake_stages):
    def bug(config, run_dir, stages, on_start=None):
        raise ZeroDivisionError("a bug")

    sys.modules["plad_jax.pipeline.runner"].run = bug
    with pytest.raises(ZeroDivisionError):
        launch.main(["--run-dir", str(tmp_path / "run")])


def test_help_exits_0(capsys):
    with pytest.raises(SystemExit) as e:
        launch.main(["--help"])
    assert e.value.code == 0 and "--run-dir" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------
# CLI as a subprocess, from another working directory that has a `configs` package of its own
# (presets must not depend on the cwd). The processes start together (each spends seconds
# importing JAX) and the tests read their results.


def subprocess_env() -> dict:
    env = {
        k: v for k, v in os.environ.items() if k not in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID")
    }
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["PLAD_JAX_DISTRIBUTED"] = "0"
    return env


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """name -> CompletedProcess-like (returncode, stdout, stderr) of each command below."""
    cwd, plain_cwd = tmp_path_factory.mktemp("elsewhere"), tmp_path_factory.mktemp("plain")
    (cwd / "file").write_text("keep me")
    shadow = cwd / "configs"  # a user's own `configs` package in the working directory
    shadow.mkdir()
    (shadow / "__init__.py").write_text("")
    launch_cmd = [sys.executable, "-m", "plad_jax.launch"]
    commands = {  # name -> (working directory, command); the last two load the demo preset
        "nosuch": (cwd, launch_cmd + ["--config", "nosuch"]),
        "stages": (cwd, launch_cmd + ["--stages", "nope"]),
        "flag": (cwd, launch_cmd + ["--bogus"]),
        "metod": (cwd, launch_cmd + ["--set", "distill.metod=x"]),
        "unwritable": (plain_cwd, launch_cmd + ["--run-dir", str(cwd / "file" / "run")]),
        "unfetched": (
            cwd,
            launch_cmd + ["--config", "docstrings_smollm2", "--run-dir", str(cwd / "smol")],
        ),
    }
    envs = {"unfetched": {"PLAD_JAX_CACHE": str(cwd / "cache")}}  # a machine that never fetched
    procs = {
        name: subprocess.Popen(
            cmd,
            cwd=where,
            env={**subprocess_env(), **envs.get(name, {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, (where, cmd) in commands.items()
    }
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        results[name] = subprocess.CompletedProcess(commands[name][1], proc.returncode, out, err)
    results["cwd"] = cwd
    return results


def assert_one_line_exit_2(result, *needles):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("plad_jax.launch: error: ")
    for needle in needles:
        assert needle in lines[0]


def test_cli_unknown_preset(cli):
    assert_one_line_exit_2(cli["nosuch"], "unknown preset 'nosuch'", "demo")


def test_cli_unknown_key_names_the_closest(cli):
    assert_one_line_exit_2(
        cli["metod"], "unknown config key 'distill.metod'; did you mean distill.method?"
    )


def test_cli_unknown_stage_and_bad_flags(cli):
    assert_one_line_exit_2(cli["stages"], "unknown stage 'nope'")
    assert_one_line_exit_2(cli["flag"], "unrecognized arguments: --bogus")


def test_cli_unwritable_run_dir(cli):
    assert_one_line_exit_2(cli["unwritable"], "cannot write the run directory")
    assert (cli["cwd"] / "file").read_text() == "keep me"


def test_cli_a_checkpoint_not_fetched_stops_before_anything_with_the_fetch_command(cli):
    assert_one_line_exit_2(
        cli["unfetched"],
        "teacher.path=fetch:smollm2-135m-instruct is not downloaded",
        "python -m plad_jax.fetch smollm2-135m-instruct",
    )
    assert not (cli["cwd"] / "smol").exists()  # no run directory, no config.json
    assert not (cli["cwd"] / "cache").exists()  # and nothing fetched


def test_unreachable_hub_switches_to_local_files():
    import socket

    with socket.socket() as s:  # a port nothing listens on: the connection is refused at once
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    env = {"HF_ENDPOINT": closed}
    assert not launch.hub_reachable(env, timeout=1.0)
    assert launch.prefer_local_files(env) and env["HF_HUB_OFFLINE"] == "1"
    kept = {"HF_ENDPOINT": closed, "HF_HUB_OFFLINE": "0"}  # the user's own setting is left alone
    assert not launch.prefer_local_files(kept) and kept["HF_HUB_OFFLINE"] == "0"
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        assert launch.hub_reachable(
            {"HF_ENDPOINT": f"http://127.0.0.1:{server.getsockname()[1]}"}, timeout=1.0
        )


# ------------------------------------------------------------------------------------------------
# What the pending stages read (plad_jax.pipeline.inputs): the up-front check's list comes from the
# config


def _needs(sets, stages, **kw):
    from plad_jax.pipeline import inputs

    config = apply_overrides(load_config("tiny"), TINY_PATHS + sets)
    needs = inputs.pending_needs(config, stages, **kw)
    return {(n.key, n.source, n.via): readers for n, readers in needs.items()}


def test_select_best_reads_the_eval_scorers_model_while_its_stage_trains():
    rm = ["eval.scorer=reward_model", "eval.reward_model=org/rm", "sft_student.select_best=true"]
    needs = _needs(rm, ("sft_teacher", "sft_student", "sample"))
    assert needs[("eval.reward_model", "org/rm", "eval.scorer=reward_model")] == [
        "sft_teacher.select_best",
        "sft_student.select_best",
    ]
    assert needs[("teacher.path", "/m/teacher", "")] == ["sft_teacher", "sample"]  # tokenizer
    everything = _needs(rm, C.STAGES)[("eval.reward_model", "org/rm", "eval.scorer=reward_model")]
    assert everything == ["sft_teacher.select_best", "sft_student.select_best", "eval"]
    # No reader, no need: selection off, no validation split to score on, a scorer reading nothing.
    off = ["sft_teacher.select_best=false", "sft_student.select_best=false"]
    no_validation = {"validation": False}
    for sets, stages, kw in (
        (rm + off, C.STAGES[:3], {}),
        (rm, C.STAGES[:3], no_validation),
        (["eval.scorer=rouge"], C.STAGES, {}),
    ):
        assert not any(key == "eval.reward_model" for key, _, _ in _needs(sets, stages, **kw))


@pytest.mark.parametrize(
    "method,pairs_readers", [("pbkd_online", ["sample", "distill"]), ("plad_rank", ["sample"])]
)
def test_the_pairs_scorer_is_read_by_sample_and_by_pbkd(method, pairs_readers):
    method = f"distill.method={method}"
    needs = _needs(
        [method, "pairs.real_ratio=0.5", "pairs.scorer=jax_reward_model", "pairs.reward_model=/rm"],
        C.STAGES,
    )
    assert needs[("pairs.reward_model", "/rm", "pairs.scorer=jax_reward_model")] == pairs_readers
    assert not any(key == "pairs.reward_model" for key, _, _ in _needs([method], C.STAGES))


@pytest.mark.parametrize("method,teacher", [("kd", True), ("pbkd_mm", True), ("plad_rank", False)])
def test_distill_reads_the_teacher_only_for_methods_comparing_token_distributions(method, teacher):
    from plad_jax.pipeline import inputs

    config = apply_overrides(
        load_config("tiny"),
        TINY_PATHS + [f"distill.method={method}", "teacher.tokenizer=/m/teacher-tok"],
    )
    keys = {n.key for n in inputs.stage_needs(config, "distill")}
    assert keys == ({"teacher.tokenizer", "student.path"} if teacher else {"student.path"})
    assert ("sft_teacher" in inputs.upstream(config, "distill")) == teacher
    assert inputs.upstream(config, "eval") == ("sft_teacher", "sft_student", "sample", "distill")


def test_a_python_scorer_that_cannot_be_imported_says_why():
    from plad_jax.pipeline import inputs

    assert inputs.import_problem("json:loads") is None
    assert "No module named 'no_such_module'" in inputs.import_problem("no_such_module:Scorer")
    assert inputs.import_problem("json:NoScorer") == "module json has no attribute 'NoScorer'"
    assert inputs.import_problem("json") == "it is not module:attr"


def test_remat_is_a_model_switch_checked_by_set():
    c = apply_overrides(Config(), ["student.remat=full", "teacher.remat=dots"])
    assert (c.student.remat, c.teacher.remat, Config().student.remat) == ("full", "dots", "none")
    assert from_dict(json.loads(json.dumps(to_dict(c)))).student.remat == "full"
    with pytest.raises(ConfigError, match=r"student\.remat"):
        apply_overrides(Config(), ["student.remat=true"])
