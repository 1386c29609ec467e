"""PLaD paper setting: GPT-Neo-2.7B -> GPT-Neo-1.3B on TL;DR.

Teacher EleutherAI/gpt-neo-2.7B, student EleutherAI/gpt-neo-1.3B, data trl-lib/tldr; the paper's
hyper-parameters (Sec. 5.1): LoRA rank 8 / alpha 32 / dropout 0.1 on attention and MLP, learning
rate 1e-4 with a linear schedule, one SFT epoch, sampling temperature 0.7, PLaD ranking loss with
beta 1.0 on length-normalised scores; win rates judged by the OpenAssistant DeBERTa reward model.

Weights are bf16 (LoRA adapters stay fp32) and FSDP-sharded over every device. `batch_size` is
global: 64 is the paper's 8 per device on 8 devices; on a bigger slice keep it a multiple of the
device count, e.g. --set sft_teacher.batch_size=256 --set sft_student.batch_size=256 --set
distill.batch_size=256. Needs the hub, or local copies: --set teacher.path=DIR --set
student.path=DIR (tokenizers default to the model directories).
"""

from plad_jax.config import (Config, DataConfig, DistillConfig, EvalConfig, LoRASettings,
                             ModelConfig, SampleConfig, TrainConfig)
from plad_jax.sharding import MeshConfig


def config() -> Config:
    return Config(
        name="tldr_gptneo",
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        teacher=ModelConfig(path="EleutherAI/gpt-neo-2.7B", dtype="bfloat16", lora=LoRASettings()),
        student=ModelConfig(path="EleutherAI/gpt-neo-1.3B", dtype="bfloat16", lora=LoRASettings()),
        data=DataConfig(task="tldr", path="trl-lib/tldr", max_prompt_tokens=512, max_response_tokens=64),
        sft_teacher=TrainConfig(epochs=1, batch_size=64, learning_rate=1e-4, select_best=True),
        sft_student=TrainConfig(epochs=1, batch_size=64, learning_rate=1e-4),
        sample=SampleConfig(temperature=0.7, max_new_tokens=64, batch_size=64),
        distill=DistillConfig(method="plad_rank", beta=1.0, score="mean", epochs=1, batch_size=64,
                              learning_rate=1e-4),
        eval=EvalConfig(scorer="reward_model", max_new_tokens=64, batch_size=64),
    )
