"""What every stage reads and uses: the run's config, directory, mesh, data splits, tokenizers
and models (`Context`), and the helpers the stages share (LoRA, stop strings, scorers, sampling)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from plad_jax import data, losses, methods
from plad_jax import sharding as shd
from plad_jax.config import Config
from plad_jax.generation import sampler
from plad_jax.methods import Method
from plad_jax.models import from_pretrained, hf, init_model, lora
from plad_jax.scoring import rewards

logger = logging.getLogger(__name__)


class Context:
    """What every stage reads: the config, the run directory, the mesh, data and tokenizers
    (lazily)."""

    def __init__(self, config: Config, run_dir: str):
        self.config = config
        self.run_dir = run_dir
        self.mesh = shd.make_mesh(config.mesh)
        self._splits = None
        self._tokenizers = {}
        self._method = None

    @property
    def method(self) -> Method:
        """The distillation method of `distill.method`, with its checked hyper-parameters."""
        if self._method is None:
            self._method = methods.configure(self.config)
        return self._method

    def path(self, *parts) -> str:
        return os.path.join(self.run_dir, *parts)

    @property
    def splits(self) -> data.Splits:
        if self._splits is None:
            d = self.config.data
            self._splits = data.load_splits(
                d.task,
                d.path or None,
                prompt_field=d.prompt_field,
                response_field=d.response_field,
                hub_data_dir=d.hub_data_dir,
                seed=d.split_seed,
                test_size=d.test_size,
                validation_size=d.validation_size,
                max_d0=d.max_d0,
                max_d=d.max_d,
                max_validation=d.max_validation,
                max_test=d.max_test,
            )
            logger.info(
                "data %s: D0 %d, D %d, validation %d, test %d",
                d.task,
                len(self._splits.d0),
                len(self._splits.d),
                len(self._splits.validation),
                len(self._splits.test),
            )
        return self._splits

    def tokenizer(self, role: str):
        if role not in self._tokenizers:
            model = getattr(self.config, role)
            source = model.tokenizer or model.path
            if not source:  # a model built from scratch on the demo task: the task's own tokenizer
                texts = data.demo_tokenizer_texts(self.splits.d0 + self.splits.d)
                source = data.build_demo_tokenizer(self.path("tokenizer"), texts)
            self._tokenizers[role] = hf.load_tokenizer(source)  # a GGUF file: from its metadata
        return self._tokenizers[role]

    def base_model(self, role: str):
        """The role's starting weights: a local/hub HF model or GGUF file (cut to `layers` when
        set), or a fresh init from config fields."""
        model = getattr(self.config, role)
        kwargs = dict(
            dtype=model.dtype, compute_dtype=model.compute_dtype, remat=model.remat, mesh=self.mesh
        )
        if model.path:
            return self._fits(from_pretrained(model.path, layers=model.cut, **kwargs), role)
        tok = self.tokenizer(role)
        fields = {
            "vocab_size": len(tok),
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
            **model.init,
        }
        return self._fits(
            init_model(fields, seed=self.config.seed + (role == "student"), **kwargs), role
        )

    def _fits(self, lm, role: str):
        """`lm`, after one clear error, before any stage work, if the longest sequence the run can
        make is past its position table (GPT-Neo), instead of a silent clamp mid-run."""
        c = self.config
        longest = c.data.max_prompt_tokens + max(
            c.data.max_response_tokens, c.sample.max_new_tokens, c.eval.max_new_tokens
        )
        if lm.max_positions is not None and longest > lm.max_positions:
            raise ValueError(
                f"{role}: data.max_prompt_tokens {c.data.max_prompt_tokens} + the longest response "
                "(data.max_response_tokens / sample.max_new_tokens / eval.max_new_tokens) = "
                f"{longest} tokens exceeds the model's {lm.max_positions} positions "
                "(max_position_embeddings)"
            )
        return lm

    def stage_model(self, stage: str, role: str):
        model = getattr(self.config, role)
        return self._fits(
            from_pretrained(
                self.path(stage, "params"),
                dtype=model.dtype,
                compute_dtype=model.compute_dtype,
                remat=model.remat,
                mesh=self.mesh,
            ),
            role,
        )

    def encode(self, role: str, prompts, responses):
        d = self.config.data
        return data.encode_texts(
            self.tokenizer(role), prompts, responses, d.max_prompt_tokens, d.max_response_tokens
        )

    def with_lora(self, lm, role: str):
        """The model with LoRA adapters when the role's config asks for them (exports merge
        them)."""
        settings = getattr(self.config, role).lora
        if settings is None:
            return lm
        return lora.add_lora(
            lm, lora.LoRAConfig(**dataclasses.asdict(settings)), seed=self.config.seed
        )

    def stop_strings(self, section) -> tuple[str, ...]:
        """`section.stop` (`sample` or `eval`), or the task's own stop strings when it is None."""
        if section.stop is not None:
            return section.stop
        return data.task_stop_strings(self.config.data.task)

    def scorer(self, cfg):
        """The scorer a config section (`eval`, `pairs`) names."""
        return rewards.make_scorer(cfg.scorer, cfg.reward_model, cfg.batch_size)

    def sample_responses(
        self,
        lm,
        role: str,
        prompts,
        *,
        temperature,
        max_new_tokens,
        seed,
        desc="sample",
        sample_ids=None,
        stop=(),
        num_samples=1,
    ):
        """(texts, token id lists, sequence log-probs) of one sample per prompt
        (`sampler.generate_many`: batched by length, progress bar, tokens/s in the log). Prompts are
        encoded as for training.
        sample_ids: each prompt's index in its split, so that its sample is the same on any number
        of hosts (default: position in `prompts`). stop: strings a response ends before (its ids and
        log-prob too: the text is exactly the decoded ids). num_samples: responses per prompt,
        grouped by prompt."""
        cfg = self.config.sample
        tok = self.tokenizer(role)
        encoded = self.encode(role, prompts, [""] * len(prompts))
        sampled = sampler.generate_many(
            lm,
            encoded.prompts,
            max_new_tokens=max_new_tokens,
            batch_size=cfg.batch_size,
            temperature=temperature,
            top_k=cfg.top_k,
            top_p=cfg.top_p,
            seed=seed,
            sample_ids=sample_ids,
            num_samples=num_samples,
            desc=f"{desc} ({role})",
            stop=sampler.stop_strings(tok, stop),
        )
        texts = [tok.decode(s.ids, skip_special_tokens=True) for s in sampled]
        return texts, [s.ids for s in sampled], np.array([s.logprob for s in sampled], np.float32)

    def loglikelihood(self, lm, role: str, prompts, texts) -> np.ndarray:
        """Each response's length-normalised log-likelihood under `lm` [N] (teacher-forced,
        temperature 1; tokens as training encodes them, EOS included), `eval.batch_size` rows at a
        time."""
        encoded, size = self.encode(role, prompts, texts), self.config.eval.batch_size
        fn, out = _mean_logprob_fn(lm), []
        for start in range(0, len(texts), size):
            rows = range(start, min(start + size, len(texts)))
            b = shd.place_batch(lm.mesh, data.make_batch(encoded, rows, num_rows=size))
            out.append(np.asarray(fn(lm.params, *b.inputs()))[: len(rows)])
        return np.concatenate(out) if out else np.zeros((0,), np.float32)


def _mean_logprob_fn(lm):
    """Jitted: each row's mean response-token log-prob under `lm` (its output replicated, so
    every process can read it)."""

    def mean_logprob(params, prompt_ids, prompt_mask, response_ids, response_mask):
        logps = lm.token_logprobs(params, prompt_ids, prompt_mask, response_ids, response_mask)[0]
        return losses.sequence_logprobs(logps, response_mask, "mean")

    if lm.mesh is None:
        return jax.jit(mean_logprob)
    return jax.jit(mean_logprob, out_shardings=NamedSharding(lm.mesh, PartitionSpec()))


def write_json(path: str, obj):
    """`obj` as indented JSON at `path`, written beside it and renamed (never half a file)."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=float)
    os.replace(tmp, path)


def config_hash(*parts) -> str:
    """A short hash of the settings a checkpoint was made under (resume refuses a different one)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
