"""Install plad_jax: `pip install -e ".[test,tf]" -c constraints.txt` for development (the tested
versions), `.[tf]` for the tf.data pipeline."""

from setuptools import find_packages, setup

CORE = [
    # Upper bounds on the libraries whose APIs the code calls directly: a release past them is taken
    # only after the tests pass on it (README, Dependencies). constraints.txt pins what was tested.
    "jax>=0.4.35,<0.11",
    "flax>=0.12,<0.13",
    "optax>=0.2.4,<0.3",
    "orbax-checkpoint>=0.11,<0.13",
    "transformers>=4.46,<6",
    "datasets>=3.0,<6",
    "safetensors>=0.4.5",
    "sentencepiece>=0.2",
    "tokenizers>=0.20",
    "numpy>=1.26",
    "pyarrow>=14",  # pair shards (plad_jax.data.pairs)
    # ROUGE-1/2/L and the offline scorer (plad_jax.scoring.rewards, plad_jax.scoring.evaluate)
    "rouge-score>=0.1.2",
    "matplotlib>=3.7",  # report plots, Agg canvas only (plad_jax.scoring.evaluate)
    "tensorboardX>=2.6",  # TensorBoard event files without TensorFlow (plad_jax.pipeline.train)
    "tqdm>=4.60",  # progress bars (plad_jax.training.trainer, plad_jax.generation.sampler)
    "gguf>=0.19,<0.20",  # GGUF read / write, numpy dequantization (plad_jax.models.io.gguf)
]

EXTRAS = {
    # torch pinned to the release whose CPU wheel the test machines carry; pip resolves the local
    # `2.13.0+cpu` build from the configured find-links instead of a multi-GB CUDA download.
    # trl: reference numbers for the DPO / CPO-hinge / GKD loss tests (pinned: they call its
    # internals).
    # peft: the PyTorch LoRA reference of bench/memory.py.
    # ruff: the formatter and linter tests/test_style.py runs (pinned: its output changes by
    # release).
    "test": ["pytest>=8", "torch==2.13.0", "trl==1.16.0", "peft==0.21.2", "ruff==0.17.6"],
    "tf": ["tensorflow-text>=2.16"],
}

setup(
    name="plad_jax",
    version="0.1.0",
    description="Preference-based distillation of language models (PLaD, PbKD) in JAX/Flax.",
    long_description=open("README.md", encoding="utf-8").read()
    if __import__("os").path.exists("README.md")
    else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    # The presets live in the repository's top-level configs/ and install as plad_jax.configs (a
    # top-level `configs` package would clash with other projects' in site-packages).
    packages=find_packages(include=["plad_jax", "plad_jax.*"]) + ["plad_jax.configs"],
    package_dir={"plad_jax.configs": "configs"},
    install_requires=CORE,
    extras_require=EXTRAS,
    license="Apache-2.0",
)
