"""A real checkpoint given to a bench (`--model PATH`: a safetensors directory or a GGUF
file), loaded by both libraries: plad_jax's `from_pretrained`, and transformers' (`gguf_file=`
for GGUF)."""

from __future__ import annotations

import dataclasses
import os


def model_type(path: str) -> str:
    from plad_jax.models.hf import read_config

    return read_config(path)["model_type"]


def hf_config(path: str) -> dict:
    from plad_jax.models.hf import read_config

    return read_config(path)


def load_torch(path: str, seq2seq: bool = False):
    """transformers' fp32 model of `path`, in eval mode."""
    import torch
    import transformers

    from plad_jax.models.io.gguf import find_gguf

    cls = transformers.AutoModelForSeq2SeqLM if seq2seq else transformers.AutoModelForCausalLM
    gguf = find_gguf(path) if os.path.exists(path) else None
    if gguf is not None:
        return cls.from_pretrained(
            os.path.dirname(gguf) or ".", gguf_file=os.path.basename(gguf), dtype=torch.float32
        ).eval()
    return cls.from_pretrained(path, dtype=torch.float32).eval()


def without_eos(lm):
    """`lm` that never stops at EOS, so a real model generates exactly the tokens a bench asks for
    (transformers gets the same through `min_new_tokens`)."""
    from plad_jax.models import LanguageModel

    config = dataclasses.replace(lm.config, eos_token_id=())
    return LanguageModel(
        lm.model_type,
        config,
        lm.graphdef,
        lm.params,
        lm.hf_config,
        compute_dtype=lm.compute_dtype,
        mesh=lm.mesh,
    )
