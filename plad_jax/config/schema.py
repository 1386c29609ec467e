"""The config tree: frozen dataclasses, one per section, and the choice lists their fields are
checked against (see the package docstring for the tree)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Literal

from plad_jax.config.pbkd import PbKDConfig
from plad_jax.data.tasks import TASKS
from plad_jax.models.layers import REMAT_POLICIES
from plad_jax.sharding import MeshConfig

# Each choice list lives in one place: tasks next to their loaders, the rest here (distillation
# methods are a registry, `plad_jax.methods`). `Literal[...]` of them is what `--set` and
# `from_dict` check values against.
STAGES = ("sft_teacher", "sft_student", "sample", "distill", "eval")
DTYPES = ("float32", "bfloat16", "float16")
SCORERS = ("rouge", "reward_model", "jax_reward_model", "python")
# Scorers that need `reward_model`: a model directory / hub id, or for `python` a `module:attr`.
MODEL_SCORERS = ("reward_model", "jax_reward_model", "python")
SCORES = ("mean", "sum")
SPAN_REFERENCES = ("target", "prompt")
DEFAULT_REWARD_MODEL = "OpenAssistant/reward-model-deberta-v3-large-v2"  # the paper's judge

Task = Literal[TASKS]
Dtype = Literal[DTYPES]
Remat = Literal[tuple(REMAT_POLICIES)]
Scorer = Literal[SCORERS]
GGUFExport = Literal["", "f32", "f16", "bf16", "q8_0"]
Score = Literal[SCORES]
SpanReference = Literal[SPAN_REFERENCES]


# ----------------------------------------------------------------------------------------------
# The tree


@dataclasses.dataclass(frozen=True)
class LoRASettings:
    """LoRA adapters (paper: rank 8, alpha 32, dropout 0.1). Field for field the same as
    `plad_jax.models.lora.LoRAConfig`: `LoRAConfig(**dataclasses.asdict(settings))`.
    targets: groups (`attention`, `mlp`) or the family's projection names (`q_proj`, `wi_0`,
        ...)."""

    rank: int = 8
    alpha: float = 32.0
    dropout: float = 0.1
    targets: tuple[str, ...] = ("attention", "mlp")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A teacher or student: pretrained weights (`path`) or a fresh model of a given shape (`init`).

    path: local Hugging Face model directory (config.json + safetensors), `gs://` path, hub id, or
        a GGUF file (llama / qwen2; its tokenizer comes from the file's metadata).
    init: instead of `path`, HF config.json fields (`model_type` plus the family's sizes) of a
        model built with random weights, e.g. {"model_type": "llama", "hidden_size": 64, ...};
        `vocab_size` and the special token ids, when left out, are the tokenizer's.
    tokenizer: tokenizer directory or hub id; None = the model's `path`, or for an `init` model
        the data task's own tokenizer (only `demo` has one).
    dtype: parameter storage dtype; compute_dtype: activations/matmuls (None = dtype).
    remat: activation checkpointing per block when this model trains: none (keep every
        activation: fastest, most memory), full (keep each block's input, recompute the block in
        the backward pass), dots (keep the weight projections' outputs too, recompute the rest).
        Values and gradients are the same. On XLA:CPU it saves little so far (README, "Memory of
        a training step").
    lora: None = train all weights; LoRASettings = train adapters only (merged on export).
    layers: keep only these blocks of `path`, in this order (a student cut from its teacher, e.g.
        [0, 5, 10]); T5: the encoder blocks. decoder_layers: T5's decoder blocks. None = all.
    """

    path: str = ""
    init: dict[str, Any] | None = None
    tokenizer: str | None = None
    dtype: Dtype = "float32"
    compute_dtype: Dtype | None = None
    remat: Remat = "none"
    lora: LoRASettings | None = None
    layers: tuple[int, ...] | None = None
    decoder_layers: tuple[int, ...] | None = None

    @property
    def cut(self) -> dict | None:
        """`from_pretrained(layers=...)`: {stack: blocks}, or None for the whole model."""
        given = (("layers", self.layers), ("decoder_layers", self.decoder_layers))
        stacks = {k: list(v) for k, v in given if v is not None}
        return stacks or None

    @property
    def tokenizer_path(self) -> str | None:
        return self.tokenizer or self.path or None

    @property
    def from_scratch(self) -> bool:
        return self.init is not None


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The task, its splits, and how examples become token sequences (`plad_jax.data`).

    task: tldr (hub trl-lib/tldr), hh (hub Anthropic/hh-rlhf, helpful-base), jsonl / csv /
        parquet (a local file or folder), demo (built offline from the Python standard library).
    path: the file, folder, or hub dataset name; "" = the task's default source.
    hub_data_dir: `load_dataset(..., data_dir=)` of a hub source (None = the task's: hh
        helpful-base).
    prompt_field / response_field: the columns (None = the task's layout; prompt / response for the
        file tasks; response_field "" = prompts only).
    Splits: test_size / validation_size are carved from train when the source lacks them (a count,
    or a fraction when < 1); the rest is halved by `split_seed` into D0 (SFT) and D (distillation).
    max_d0 / max_d / max_validation / max_test keep a seeded subset of each split (None = all).
    Prompts longer than max_prompt_tokens lose tokens from the left; responses are cut at
    max_response_tokens.
    """

    task: Task = "tldr"
    path: str = ""
    hub_data_dir: str | None = None
    prompt_field: str | None = None
    response_field: str | None = None
    max_prompt_tokens: int = 512
    max_response_tokens: int = 128
    split_seed: int = 0
    test_size: float = 0.1
    validation_size: float = 0.05
    max_d0: int | None = None
    max_d: int | None = None
    max_validation: int | None = None
    max_test: int | None = None


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training stage: AdamW, linear warmup then linear decay to 0 (`plad_jax.training.step`).

    batch_size: global sequences per optimizer step, split into `grad_accum` micro-batches.
    max_steps: stop after this many steps even if the epochs are not done (None = run them all).
    checkpoint_every: steps between Orbax checkpoints (and the end of training); keep: how many.
    select_best: evaluate each checkpoint on `validation_examples` validation prompts (win rate
        against the targets, with `eval.scorer`) and hand off the best, not the last.
    """

    epochs: int = 1
    batch_size: int = 8
    grad_accum: int = 1
    learning_rate: float = 1e-4
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 disables clipping
    max_steps: int | None = None
    checkpoint_every: int = 500
    keep: int = 2
    select_best: bool = False
    validation_examples: int = 256
    log_every: int = 10


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    """Sampling the teacher and student responses that make the pairs (paper: temperature 0.7).

    stop: strings that end a response, which is cut before the first one
    (`plad_jax.generation.sampler`); None = the task's own (`hh`: the next "\n\nHuman:" turn;
    others: none), () = none."""

    temperature: float = 0.7  # 0 = greedy
    top_k: int = 0  # 0 = no top-k cut
    top_p: float = 1.0
    max_new_tokens: int = 128
    batch_size: int = 32
    stop: tuple[str, ...] | None = None


@dataclasses.dataclass(frozen=True)
class PairsConfig:
    """Pseudo-preference pairs (teacher sample > student sample) and optional real relabelling.

    real_ratio: share of pairs that `scorer` relabels (swapped when it prefers the student's
        response); 0 = pure PLaD pseudo-preferences.
    """

    real_ratio: float = 0.0
    scorer: Scorer = "reward_model"
    reward_model: str = DEFAULT_REWARD_MODEL
    batch_size: int = 32


@dataclasses.dataclass(frozen=True)
class DistillConfig(TrainConfig):
    """Distilling the student, with the training fields of `TrainConfig` plus the method.

    method: a registered method name (`plad_jax.methods.names()`) or `module:Class` of your own
    `plad_jax.methods.Method` subclass. rounds: iterative PLaD (resample the student, distil
    again; methods that train on pairs). export_gguf: also write the distilled student as
    `distill/student-<dtype>.gguf` (f32, f16, bf16, q8_0; llama / qwen2), tokenizer included;
    "" = safetensors only.

    The method's hyper-parameters (`METHOD_KNOBS` keep their keys here; each method reads those
    it has and refuses one set away from its default that it does not have): score: sequence
    log-prob as token `mean` or `sum`. beta: PLaD margin (rank) / margin scale (margin); DPO and
    SLiC beta. alpha: weight of the CE regulariser on the preferred response. kd_temperature: KD
    softmax temperature. label_smoothing: DPO. span_max_n / span_reference: PLaD margin score over
    1..N-gram spans against the target (or the prompt). hparams: any other hyper-parameter of the
    method by name (`--set distill.hparams.anchor=0.5`), type-checked against its dataclass. PbKD
    reads the `pbkd` section instead.
    """

    method: str = "plad_rank"
    score: Score = "mean"
    beta: float = 1.0
    alpha: float = 0.0
    rounds: int = 1
    kd_temperature: float = 1.0
    label_smoothing: float = 0.0
    span_max_n: int = 4
    span_reference: SpanReference = "target"
    export_gguf: GGUFExport = ""
    hparams: dict[str, Any] = dataclasses.field(default_factory=dict)


# DistillConfig fields that are hyper-parameters of some methods (`plad_jax.methods.configure`).
METHOD_KNOBS = (
    "score",
    "beta",
    "alpha",
    "kd_temperature",
    "label_smoothing",
    "span_max_n",
    "span_reference",
)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Win rates vs references and teacher-vs-student, ROUGE, lengths, on the test split.

    num_examples: test prompts to evaluate (None = all). temperature: 0 = greedy decoding. stop:
    as `SampleConfig.stop` (also for `select_best`'s validation samples).
    scorer `python` (also for `pairs`): reward_model is `module:attr`, a Scorer class or factory
    (`plad_jax.scoring.rewards.python_scorer`), for programmatic rewards such as
    bench/extraction.py's.
    calibration_samples: K >= 2 samples per test prompt (at `sample.temperature`) for the
    calibration metrics (`plad_jax.scoring.calibration`: does each model's own likelihood rank its
    samples as the scorer does?); 0 = off.
    split: the split evaluated. `test` for the figures one reports; `validation` to choose
    hyper-parameters (a method's learning rate, say) without touching the test split."""

    scorer: Scorer = "reward_model"
    reward_model: str = DEFAULT_REWARD_MODEL
    num_examples: int | None = None
    max_new_tokens: int = 128
    temperature: float = 0.0
    batch_size: int = 32
    stop: tuple[str, ...] | None = None
    calibration_samples: int = 0
    split: Literal["test", "validation"] = "test"


@dataclasses.dataclass(frozen=True)
class Config:
    """A whole run. run_dir "" = runs/<name> (relative to the working directory, or gs://...)."""

    name: str = "plad"
    run_dir: str = ""
    seed: int = 0
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    teacher: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    student: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    sft_teacher: TrainConfig = dataclasses.field(
        default_factory=lambda: TrainConfig(select_best=True)
    )
    sft_student: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    sample: SampleConfig = dataclasses.field(default_factory=SampleConfig)
    pairs: PairsConfig = dataclasses.field(default_factory=PairsConfig)
    distill: DistillConfig = dataclasses.field(default_factory=DistillConfig)
    pbkd: PbKDConfig = dataclasses.field(default_factory=PbKDConfig)  # read by PbKD methods only
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)

    def resolved_run_dir(self) -> str:
        return self.run_dir or os.path.join("runs", self.name)
