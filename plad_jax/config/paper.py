"""The PLaD paper's setting (Sec. 5.1), shared by the tldr_* and hh_* presets in `configs/`.

LoRA rank 8 / alpha 32 / dropout 0.1 on attention and MLP of both models, learning rate 1e-4 with a
linear schedule, one SFT epoch, sampling temperature 0.7, PLaD ranking loss with beta 1.0 on
length-normalised scores; win rates judged by the OpenAssistant DeBERTa reward model.

Weights are bf16 (LoRA adapters stay fp32) and FSDP-sharded over every device. `batch_size` is
global: 64 is the paper's 8 per device on 8 devices; on a bigger slice keep it a multiple of the
device count, e.g. --set sft_teacher.batch_size=256 --set sft_student.batch_size=256 --set
distill.batch_size=256. The presets need the hub, or local copies: --set teacher.path=DIR --set
student.path=DIR (tokenizers default to the model directories) --set data.path=FILE.
"""

from plad_jax.config import (
    Config,
    DataConfig,
    DistillConfig,
    EvalConfig,
    LoRASettings,
    ModelConfig,
    SampleConfig,
    TrainConfig,
)
from plad_jax.sharding import MeshConfig

TASKS = {  # task -> (data settings, response tokens)
    "tldr": (dict(task="tldr", path="trl-lib/tldr"), 64),
    "hh": (dict(task="hh", path="Anthropic/hh-rlhf", hub_data_dir="helpful-base"), 128),
}


def paper_config(name: str, task: str, teacher: str, student: str) -> Config:
    data, new_tokens = TASKS[task]
    return Config(
        name=name,
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        teacher=ModelConfig(path=teacher, dtype="bfloat16", lora=LoRASettings()),
        student=ModelConfig(path=student, dtype="bfloat16", lora=LoRASettings()),
        data=DataConfig(**data, max_prompt_tokens=512, max_response_tokens=new_tokens),
        sft_teacher=TrainConfig(epochs=1, batch_size=64, learning_rate=1e-4, select_best=True),
        sft_student=TrainConfig(epochs=1, batch_size=64, learning_rate=1e-4),
        sample=SampleConfig(temperature=0.7, max_new_tokens=new_tokens, batch_size=64),
        distill=DistillConfig(
            method="plad_rank", beta=1.0, score="mean", epochs=1, batch_size=64, learning_rate=1e-4
        ),
        eval=EvalConfig(scorer="reward_model", max_new_tokens=new_tokens, batch_size=64),
    )
