"""Methods on preference pairs (y+ = chosen, y- = rejected; teacher > student unless relabelled):
`plad_rank`, `plad_margin` (PLaD, arXiv 2406.02886, Eq. 4 and 5), `slic` (hinge), `dpo`.

All of them take `distill.rounds > 1` (iterative PLaD: resample the student's side) and
`pairs.real_ratio` (scorer-relabelled pairs). `alpha > 0` adds `alpha * CE(y+)` (SLiC-style)."""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax.numpy as jnp

from plad_jax import losses
from plad_jax.data import PairBatch, ReferenceLogprobs
from plad_jax.methods.base import Batches, Method, register


@dataclasses.dataclass(frozen=True)
class PairHParams:
    """score: sequence log-prob as token `mean` (length-normalised) or `sum`. beta: PLaD margin
    (rank), hinge margin (slic). alpha: weight of the CE regulariser on y+."""

    score: Literal["mean", "sum"] = "mean"
    beta: float = 1.0
    alpha: float = 0.0

    def validate(self):
        if self.beta < 0:
            raise ValueError(f"distill.beta must be >= 0, got {self.beta}")
        if self.alpha < 0:
            raise ValueError(f"distill.alpha must be >= 0, got {self.alpha}")


@dataclasses.dataclass(frozen=True)
class MarginHParams(PairHParams):
    """span_max_n: the score's n-grams 1..N; span_reference: the text it compares against, the
    example's `target` (the prompt when it has none) or the `prompt`."""

    span_max_n: int = 4
    span_reference: Literal["target", "prompt"] = "target"

    def validate(self):
        super().validate()
        if self.span_max_n < 1:
            raise ValueError(f"distill.span_max_n must be >= 1, got {self.span_max_n}")


@dataclasses.dataclass(frozen=True)
class SLiCHParams(PairHParams):
    def validate(self):
        super().validate()
        if self.beta <= 0:
            raise ValueError(f"distill.beta must be positive for slic, got {self.beta}")


@dataclasses.dataclass(frozen=True)
class DPOHParams:
    """beta: DPO's beta (applied once); alpha: CE on y+; label_smoothing: conservative DPO."""

    beta: float = 1.0
    alpha: float = 0.0
    label_smoothing: float = 0.0

    def validate(self):
        if self.beta <= 0:
            raise ValueError(f"distill.beta must be positive for dpo, got {self.beta}")
        if self.alpha < 0:
            raise ValueError(f"distill.alpha must be >= 0, got {self.alpha}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(
                f"distill.label_smoothing must be in [0, 0.5), got {self.label_smoothing}"
            )


def pair_forward(lm, params, batch: PairBatch, rng=None):
    """Per-token log-probs, argmax hits, hidden states and masks of y+ and y-, from one forward
    over a 2B batch (`LanguageModel.token_logprobs`: no [2B, R, V] logits are kept)."""
    r = max(batch.chosen_ids.shape[1], batch.rejected_ids.shape[1])
    pad = lambda x: jnp.pad(x, ((0, 0), (0, r - x.shape[1])))  # noqa: E731
    prompt = jnp.concatenate([batch.prompt_ids] * 2)
    prompt_mask = jnp.concatenate([batch.prompt_mask] * 2)
    ids = jnp.concatenate([pad(batch.chosen_ids), pad(batch.rejected_ids)])
    mask = jnp.concatenate([pad(batch.chosen_mask), pad(batch.rejected_mask)])
    logps, hits, hidden = lm.token_logprobs(params, prompt, prompt_mask, ids, mask, rng=rng)
    b = batch.chosen_ids.shape[0]
    halves = lambda rows: tuple(x[rows] for x in (logps, hits, hidden, mask))  # noqa: E731
    return halves(slice(None, b)), halves(slice(b, None))


class PairMethod(Method):
    """A loss on the sequence log-probs of a `PairBatch`'s y+ and y- (`pair_loss`), plus
    `alpha * CE(y+)`."""

    HParams = PairHParams
    batches = Batches(pairs=True)
    iterative = True
    relabels = True

    def loss(self, params, frozen, batch: PairBatch, rng):
        params = self.student_params(params, frozen)
        pos, neg = pair_forward(self.student, params, batch, rng)
        loss, metrics = self.pair_loss(params, batch, pos, neg)
        return self.with_ce(loss, metrics, pos)

    def pair_loss(self, params, batch, pos, neg):
        """pos, neg: (token log-probs, argmax hits, hidden states, mask) of y+ and y-."""
        raise NotImplementedError

    def seq_logps(self, pos, neg, score=None):
        score = score or self.hp.score
        return (
            losses.sequence_logprobs(pos[0], pos[3], score),
            losses.sequence_logprobs(neg[0], neg[3], score),
        )

    def with_ce(self, loss, metrics, pos):
        """`loss + alpha * CE(y+)` (the SLiC-style regulariser) when alpha > 0."""
        if self.hp.alpha <= 0:
            return loss, metrics
        ce, ce_metrics = losses.sft_loss_tokens(pos[0], pos[1], pos[3])
        return loss + self.hp.alpha * ce, {**metrics, "ce_pos": ce_metrics["loss"]}


@register
class PladRank(PairMethod):
    """PLaD ranking calibration (Eq. 4): max(0, beta - log P(y+) + log P(y-))."""

    name = "plad_rank"

    def pair_loss(self, params, batch, pos, neg):
        return losses.rank_calibration(*self.seq_logps(pos, neg), self.hp.beta)


@register
class PladMargin(PairMethod):
    """PLaD margin calibration (Eq. 5): the margin scaled by the difference of the responses'
    n-gram span scores against the reference text (the student's own hidden states)."""

    name = "plad_margin"
    HParams = MarginHParams
    batches = Batches(pairs=True, reference=True)

    def reference_text(self, row):
        if self.hp.span_reference == "target":
            return row["reference"] or row["prompt"]
        return row["prompt"]

    def pair_loss(self, params, batch, pos, neg):
        logp_pos, logp_neg = self.seq_logps(pos, neg)
        _, ref_hidden = self.student.apply(
            params, batch.prompt_ids, batch.prompt_mask, batch.reference_ids, batch.reference_mask
        )

        def score(hidden, mask):
            return losses.ngram_span_score(
                hidden, mask, ref_hidden, batch.reference_mask, self.hp.span_max_n
            )

        return losses.margin_calibration(
            logp_pos, logp_neg, score(pos[2], pos[3]), score(neg[2], neg[3]), self.hp.beta
        )


@register
class SLiC(PairMethod):
    """SLiC-HF / CPO hinge: max(0, beta - log P(y+) + log P(y-))."""

    name = "slic"
    HParams = SLiCHParams

    def pair_loss(self, params, batch, pos, neg):
        return losses.hinge_loss(*self.seq_logps(pos, neg), self.hp.beta)


@register
class DPO(PairMethod):
    """DPO with a frozen reference: the student as it starts (LoRA: adapters at their start)."""

    name = "dpo"
    HParams = DPOHParams
    frozen_models = ("reference",)

    def frozen(self, frozen, batch: PairBatch) -> ReferenceLogprobs:
        pos, neg = pair_forward(self.student, frozen["reference"], batch)
        ref_pos, ref_neg = self.seq_logps(pos, neg, "sum")
        return ReferenceLogprobs(chosen=ref_pos, rejected=ref_neg)

    def pair_loss(self, params, batch, pos, neg):
        reference = batch.frozen_outputs
        return losses.dpo_loss(
            *self.seq_logps(pos, neg, "sum"),
            reference.chosen,
            reference.rejected,
            self.hp.beta,
            self.hp.label_smoothing,
        )
