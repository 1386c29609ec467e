"""plad_jax presets: each `<name>.py` defines `config() -> plad_jax.config.Config`.

    python -m plad_jax.launch --config <name> [--set a.b=value ...]

demo          offline CPU run in minutes: tiny LLaMA-style teacher/student from scratch,
              built-in task
tiny          test fixture: tiny sizes everywhere; teacher.path, student.path, data.path via --set
tldr_t5       paper Table 2: T5-XXL (v1.1) -> T5-large (v1.1) on TL;DR
tldr_llama    LLaMA-2-13B -> LLaMA-2-7B on TL;DR
tldr_gptneo   GPT-Neo-2.7B -> GPT-Neo-1.3B on TL;DR
hh_t5         T5-XXL (v1.1) -> T5-large (v1.1) on Anthropic HH (helpful-base)
hh_llama      LLaMA-2-13B -> LLaMA-2-7B on Anthropic HH (helpful-base)
hh_gptneo     GPT-Neo-2.7B -> GPT-Neo-1.3B on Anthropic HH (helpful-base)
"""
