"""PLaD paper setting: LLaMA-2-13B -> LLaMA-2-7B on Anthropic HH, helpful-base.

Teacher meta-llama/Llama-2-13b-hf, student meta-llama/Llama-2-7b-hf; hyper-parameters and sharding
as in `plad_jax/config/paper.py`.
"""

from plad_jax.config.paper import paper_config


def config():
    return paper_config(
        "hh_llama", "hh", teacher="meta-llama/Llama-2-13b-hf", student="meta-llama/Llama-2-7b-hf"
    )
