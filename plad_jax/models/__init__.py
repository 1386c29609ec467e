"""Model families (LLaMA-class, T5, GPT-Neo) behind one `LanguageModel` interface."""

from plad_jax.models.hf import CheckpointError, from_pretrained, init_model
from plad_jax.models.language_model import LanguageModel

__all__ = ["CheckpointError", "LanguageModel", "from_pretrained", "init_model"]
