"""A real pretrained teacher on CPU, offline: SmolLM2-135M-Instruct and a student cut from it.

Teacher: SmolLM2-135M-Instruct (LLaMA architecture, 30 blocks, Apache-2.0), the GGUF that
`python -m plad_jax.fetch smollm2-135m-instruct` puts in the local cache; the config names it
(`fetch:smollm2-135m-instruct`) rather than a path, and a run on a machine that has not fetched
it stops at once with the command to run. Student: blocks 0, 5, 10, 15, 20, 25 of the same file
(Minitron / DistilBERT-style initialisation): same tokenizer, embeddings, final norm and head.
Task: the demo's docstring summaries (`data.task=demo`), which SmolLM2 saw the like of (it was
trained on code), scored offline with ROUGE-L. A summary is one line, so sampling stops at "\n".

Sized for the 2-core CPU: the teacher is instruction-tuned and needs only a few LoRA steps to
learn the answer format; the cut student needs full SFT (its six blocks no longer fit together)
and gets half an epoch of D0 (512 examples). D and the test split are kept small because every
sample of the 30-block teacher costs a prefill of up to 128 prompt tokens, and on this CPU each
jitted function of the 30-block teacher takes minutes to compile. What it showed and how long it
took: README, Models, "The SmolLM2 preset".
"""

from plad_jax.config import (
    Config,
    DataConfig,
    DistillConfig,
    EvalConfig,
    LoRASettings,
    ModelConfig,
    PairsConfig,
    SampleConfig,
    TrainConfig,
)

SMOLLM2 = "fetch:smollm2-135m-instruct"  # resolved by plad_jax.fetch to the cached GGUF
STUDENT_BLOCKS = (0, 5, 10, 15, 20, 25)
ONE_LINE = ("\n",)


def config() -> Config:
    return Config(
        name="docstrings_smollm2",
        teacher=ModelConfig(path=SMOLLM2, lora=LoRASettings(rank=8, alpha=32.0, dropout=0.0)),
        student=ModelConfig(path=SMOLLM2, layers=STUDENT_BLOCKS),
        data=DataConfig(
            task="demo",
            max_prompt_tokens=128,
            max_response_tokens=24,
            max_d=64,
            max_validation=32,
            max_test=64,
        ),
        sft_teacher=TrainConfig(
            batch_size=8,
            learning_rate=1e-3,
            warmup_steps=2,
            max_steps=16,
            checkpoint_every=16,
            log_every=4,
        ),
        sft_student=TrainConfig(
            batch_size=16,
            learning_rate=5e-4,
            warmup_steps=4,
            max_steps=32,
            checkpoint_every=16,
            log_every=4,
        ),
        sample=SampleConfig(temperature=0.7, max_new_tokens=24, batch_size=32, stop=ONE_LINE),
        pairs=PairsConfig(scorer="rouge", reward_model=""),
        # alpha: the CE term on the teacher's response. With the ranking loss alone (alpha=0)
        # this barely healed student fell from ROUGE-L 12.0 to 0.8 in 8 steps, its answers
        # degenerate repetitions ("olds olds olds ...") running to the 24-token limit.
        distill=DistillConfig(
            method="plad_rank",
            alpha=1.0,
            epochs=2,
            batch_size=16,
            learning_rate=1e-4,
            checkpoint_every=8,
            log_every=4,
        ),
        eval=EvalConfig(
            scorer="rouge",
            reward_model="",
            num_examples=64,
            max_new_tokens=24,
            batch_size=32,
            stop=ONE_LINE,
        ),
    )
