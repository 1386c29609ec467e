"""Scorers: one number per (prompt, response), higher = better, behind one interface.

    scorer.score(prompts, responses, references) -> np.ndarray [N] float64

- `RougeScorer`: ROUGE-L F1 of the response against the reference (the offline default; needs
  references). It measures closeness to the reference, so it is `reference_based`: scoring the
  reference itself gives 1.0, and `plad_jax.scoring.evaluate` does not report a win rate *against*
  the reference with it (only teacher-vs-student and per-model mean scores).
- `HFRewardModel`: a `transformers` sequence-classification reward model, by default the paper's
  `OpenAssistant/reward-model-deberta-v3-large-v2`. The pair encoding is `tokenizer(prompt,
  response)` (question = prompt, answer = response) and the score is `logits[:, 0]`. Loads
  `safetensors` only, never remote code. Runs under PyTorch (on `device`), which the reward model
  scorer needs installed.
- `JaxRewardModel` (defined beside the JAX reward model in `plad_jax.scoring.reward_model`, below
  this module): wraps any `(prompts, responses) -> [N] scores` callable, so a JAX reward model (e.g.
  PbKD's) plugs in.
- `python`: a scorer written in Python and named by its import path `module:attr` (config
  `reward_model`); `attr` is called with no arguments and must return an object with `score`
  (a class such as `bench.extraction.FieldF1Scorer`, or a factory). For programmatic, exact
  rewards (a task whose gold output is known) without a new config section.

`make_scorer(kind, path, batch_size)` builds one from the config (`eval.scorer`, `pairs.scorer`);
`win_rate(a, b)` is the share of rows where `a > b`, ties counting one half.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from plad_jax.config import UserError
from plad_jax.errors import RewardModelError  # noqa: F401 (re-exported)

# part of this interface
from plad_jax.scoring.reward_model import JaxRewardModel, RewardFn, load_scorer  # noqa: F401

SCORER_KINDS = ("rouge", "reward_model", "jax_reward_model", "python")


class Scorer(Protocol):
    """What `plad_jax.data.pairs.relabel` and `plad_jax.scoring.evaluate` call.

    `name` labels reports; `reference_based` is True when the score is closeness to the reference
    (such a scorer cannot judge a response *against* the reference). Duck-typed scorers without
    these attributes count as `name = class name`, `reference_based = False`.
    """

    name: str
    reference_based: bool

    def score(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        references: Sequence[str] | None = None,
    ) -> np.ndarray: ...


def scorer_name(scorer) -> str:
    return getattr(scorer, "name", type(scorer).__name__)


def is_reference_based(scorer) -> bool:
    return bool(getattr(scorer, "reference_based", False))


def win_rate(scores_a, scores_b) -> float:
    """Share of rows where `a` beats `b`; a tie counts one half. NaN when there are no rows."""
    a = np.asarray(scores_a, np.float64)
    b = np.asarray(scores_b, np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(
            f"win_rate needs two [N] score arrays of one length, got shapes {a.shape} and {b.shape}"
        )
    if a.size == 0:
        return float("nan")
    return float(np.mean((a > b) + 0.5 * (a == b)))


def _check_lengths(prompts, responses, references):
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if references is not None and len(references) != len(responses):
        raise ValueError(f"{len(responses)} responses but {len(references)} references")


# -- ROUGE ---------------------------------------------------------------------------------------


class RougeScorer:
    """ROUGE-L F1 (`rouge-score` package) of each response against its reference.

    `rouge-score`'s tokenizer lowercases and keeps only `[a-z0-9]` runs, so text in other scripts
    scores 0; `use_stemmer` applies the Porter stemmer (as the summarisation papers do).
    """

    name = "rougeL"
    reference_based = True

    def __init__(self, use_stemmer: bool = True):
        from rouge_score import rouge_scorer

        self._rouge = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)

    def score(self, prompts, responses, references=None) -> np.ndarray:
        if references is None:
            raise UserError(
                "the rouge scorer compares responses with references, but these examples have "
                "none; use data with targets or a reward model scorer"
            )
        _check_lengths(prompts, responses, references)
        # ROUGE ignores the prompt; rouge-score's argument order is (target, prediction).
        return np.array(
            [
                self._rouge.score(ref, resp)["rougeL"].fmeasure
                for resp, ref in zip(responses, references)
            ],
            np.float64,
        )


# -- transformers reward model -------------------------------------------------------------------


class HFRewardModel:
    """A `transformers` sequence-classification reward model scoring (prompt, response) pairs.

    path_or_id: a local directory (config.json, model.safetensors, tokenizer files) or a hub id
        (needs the hub or its local cache). batch_size: pairs per forward pass; pairs are sorted by
        length so a batch carries little padding. max_length: token cut of the pair encoding
        (longest-first); default the smaller of the tokenizer's and the model's position limit.
    """

    reference_based = False

    def __init__(
        self,
        path_or_id: str,
        batch_size: int = 32,
        device: str = "cpu",
        max_length: int | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        torch, transformers = _import_torch_transformers()
        self.name = f"reward_model:{path_or_id}"
        self.batch_size = batch_size
        self.device = device
        self._torch = torch
        path_or_id = _local_or_hub(path_or_id)
        try:  # the model first: offline, a hub id fails after one round of retries, not two
            self.model = transformers.AutoModelForSequenceClassification.from_pretrained(
                path_or_id, use_safetensors=True, dtype=torch.float32
            )
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(path_or_id)
        except (OSError, ValueError) as e:
            first_line = " ".join(str(e).split())[:300]
            raise RewardModelError(
                f"cannot load the reward model {path_or_id!r} ({first_line}); give a local "
                "directory with config.json, model.safetensors and the tokenizer files, or a hub "
                "id that is cached or reachable, or set the scorer to rouge"
            ) from None
        self.model.to(device).eval()
        limits = [
            self.tokenizer.model_max_length,
            getattr(self.model.config, "max_position_embeddings", None),
        ]
        self.max_length = max_length or min(int(m) for m in limits if m)

    def score(self, prompts, responses, references=None) -> np.ndarray:
        del (
            references
        )  # the reward model judges the answer to the question, not closeness to a target
        _check_lengths(prompts, responses, None)
        scores = np.zeros(len(prompts), np.float64)
        lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
        order = np.argsort(lengths, kind="stable")
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            scores[rows] = self._score_batch(
                [prompts[i] for i in rows], [responses[i] for i in rows]
            )
        return scores

    def _score_batch(self, prompts, responses) -> np.ndarray:
        encoded = self.tokenizer(
            list(prompts),
            list(responses),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        ).to(self.device)
        with self._torch.no_grad():
            logits = self.model(**encoded).logits  # [B, num_labels]
        return logits[:, 0].float().cpu().numpy()


def _local_or_hub(path_or_id: str) -> str:
    """`path_or_id` with `~` expanded. A path that is clearly local (absolute, ./, ~, or existing)
    must be a directory; anything else is left to transformers as a hub id."""
    if path_or_id.startswith("gs://"):
        raise RewardModelError(
            f"the reward model {path_or_id!r} is on GCS, which transformers cannot read; "
            f"copy the directory to local disk and give that path"
        )
    local = os.path.expanduser(path_or_id)
    if (
        os.path.isabs(local) or path_or_id.startswith((".", "~")) or os.path.exists(local)
    ) and not os.path.isdir(local):
        raise RewardModelError(
            f"the reward model directory {path_or_id} does not exist; give a local directory with "
            "config.json, model.safetensors and the tokenizer files, a hub id, or set the scorer "
            "to rouge"
        )
    return local if os.path.isdir(local) else path_or_id


def _import_torch_transformers():
    try:
        import torch
        import transformers
    except ImportError as e:
        raise RewardModelError(
            f"the reward_model scorer runs the model with PyTorch and transformers ({e}); "
            f"pip install torch (the CPU build is enough), or set the scorer to rouge"
        ) from None
    return torch, transformers


# -- JAX reward model: `plad_jax.scoring.reward_model.JaxRewardModel` (imported above) -------------


# -- a scorer named by its import path -------------------------------------------------------------


def python_scorer(spec: str) -> Scorer:
    """`module:attr` imported and called with no arguments; the result must have `score`."""
    import importlib

    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UserError(
            "the python scorer needs 'module:attr' (e.g. bench.extraction:FieldF1Scorer), got "
            f"{spec!r}"
        )
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise UserError(
            f"cannot import the python scorer {spec!r} ({type(e).__name__}: {e})"
        ) from None
    if not callable(factory):
        raise UserError(
            f"the python scorer {spec!r} is a {type(factory).__name__}, not a class or factory to "
            "call"
        )
    scorer = factory()
    if not callable(getattr(scorer, "score", None)):
        raise UserError(
            f"the python scorer {spec!r} made a {type(scorer).__name__}, which has no score() "
            "method"
        )
    return scorer


# -- factory -------------------------------------------------------------------------------------


def make_scorer(
    kind: str,
    path: str = "",
    batch_size: int = 32,
    *,
    device: str = "cpu",
    reward_fn: RewardFn | None = None,
) -> Scorer:
    """The scorer a config names: `rouge`, `reward_model` (a transformers model at `path`),
    `jax_reward_model`: the `reward_fn` callable when given, else the plad_jax reward model saved
    at `path` (`plad_jax.scoring.reward_model.save`; PbKD writes one to `distill/reward_model/`), or
    `python`: the scorer `path` = `module:attr` makes (`python_scorer`)."""
    if kind == "rouge":
        return RougeScorer()
    if kind == "reward_model":
        if not path:
            raise UserError("the reward_model scorer needs a model directory or hub id")
        return HFRewardModel(path, batch_size=batch_size, device=device)
    if kind == "jax_reward_model":
        if reward_fn is None:
            if not path:
                raise UserError(
                    "the jax_reward_model scorer needs a saved plad_jax reward model directory "
                    "(e.g. runs/NAME/distill/reward_model of a PbKD run)"
                )
            return load_scorer(path, batch_size=batch_size)
        return JaxRewardModel(
            reward_fn,
            batch_size=batch_size,
            name=f"jax_reward_model:{path}" if path else "jax_reward_model",
        )
    if kind == "python":
        return python_scorer(path)
    raise UserError(f"unknown scorer {kind!r}; choose one of {', '.join(SCORER_KINDS)}")
