"""PLaD paper setting: GPT-Neo 2.7B -> 1.3B on TL;DR.

Teacher EleutherAI/gpt-neo-2.7B, student EleutherAI/gpt-neo-1.3B; hyper-parameters and sharding as
in `plad_jax/config/paper.py`.
"""

from plad_jax.config.paper import paper_config


def config():
    return paper_config(
        "tldr_gptneo", "tldr", teacher="EleutherAI/gpt-neo-2.7B", student="EleutherAI/gpt-neo-1.3B"
    )
