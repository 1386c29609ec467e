"""Cross-entropy methods: `sft` on the human targets of D, `seqkd` on the teacher's samples."""

from __future__ import annotations

from plad_jax import losses
from plad_jax.data import SequenceBatch
from plad_jax.methods.base import Batches, Method, register


class _CrossEntropy(Method):
    """Token-level CE on a `SequenceBatch`'s responses (from the chunked log-prob path: no
    [B, R, V] logits kept)."""

    def loss(self, params, frozen, batch: SequenceBatch, rng):
        logps, hits, _ = self.student.token_logprobs(
            self.student_params(params, frozen), *batch.inputs(), rng=rng
        )
        return losses.sft_loss_tokens(logps, hits, batch.response_mask)


@register
class SFT(_CrossEntropy):
    """Supervised fine-tuning on the human targets (the SFT stages use it too)."""

    name = "sft"
    batches = Batches(responses=("target",))


@register
class SeqKD(_CrossEntropy):
    """Sequence-level KD (Kim & Rush 2016): CE on the teacher's sampled responses."""

    name = "seqkd"
    batches = Batches(responses=("teacher",))
