"""PLaD paper setting: T5-XXL -> T5-large (both T5 v1.1) on TL;DR (the paper's Table 2 setting).

Teacher google/t5-v1_1-xxl, student google/t5-v1_1-large; hyper-parameters and sharding as in
`plad_jax/config/paper.py`.
"""

from plad_jax.config.paper import paper_config


def config():
    return paper_config(
        "tldr_t5", "tldr", teacher="google/t5-v1_1-xxl", student="google/t5-v1_1-large"
    )
