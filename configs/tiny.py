"""Test fixture: everything tiny, so a whole pipeline runs in seconds on CPU.

Tests point it at what they built:
    --set teacher.path=DIR --set student.path=DIR --set data.path=FILE.jsonl
(model directories with config.json, safetensors and a tokenizer; a jsonl with `prompt` and
`response` fields).
"""

from plad_jax.config import (
    Config,
    DataConfig,
    DistillConfig,
    EvalConfig,
    ModelConfig,
    PairsConfig,
    SampleConfig,
    TrainConfig,
)
from plad_jax.config.pbkd import PbKDConfig


def _train(**kw) -> TrainConfig:
    return TrainConfig(
        batch_size=4,
        learning_rate=1e-3,
        max_steps=2,
        checkpoint_every=1,
        keep=1,
        log_every=1,
        validation_examples=4,
        **kw,
    )


def config() -> Config:
    return Config(
        name="tiny",
        teacher=ModelConfig(path=""),
        student=ModelConfig(path=""),
        data=DataConfig(
            task="jsonl",
            path="",
            max_prompt_tokens=16,
            max_response_tokens=8,
            test_size=4,
            validation_size=4,
            max_d0=8,
            max_d=8,
            max_validation=4,
            max_test=4,
        ),
        sft_teacher=_train(select_best=True),
        sft_student=_train(),
        sample=SampleConfig(max_new_tokens=8, batch_size=4),
        pairs=PairsConfig(scorer="rouge", reward_model="", batch_size=4),
        distill=DistillConfig(
            batch_size=4, learning_rate=1e-3, max_steps=2, checkpoint_every=1, keep=1, log_every=1
        ),
        pbkd=PbKDConfig(num_samples=2, max_new_tokens=8, rm_warmup_steps=2, rounds=2, mm_chunk=4),
        eval=EvalConfig(
            scorer="rouge", reward_model="", num_examples=4, max_new_tokens=8, batch_size=4
        ),
    )
