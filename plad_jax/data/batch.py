"""Typed batches: what a training step or a scorer reads, one frozen dataclass per kind, instead
of string-keyed dicts.

Conventions, for every field below unless it says otherwise:

    *_ids    int32 token ids, right-padded with the tokenizer's pad id (`make_batch`'s `pad_id`)
    *_mask   int32, the shape of its ids: 1 = a real token, 0 = padding; real tokens come first
    B        rows of the batch. A filler row (a batch filled to a fixed size) has all-zero masks
    P, R...  widths, each the longest real row rounded up by `bucket_length`, so a long run
             compiles a handful of shapes

Every model family reads (prompt, response) the same way: the prompt is the encoder input or the
decoder-only prefix, the response the teacher-forced continuation (EOS included when the encoding
added one). Encoder-decoder models (T5) build their decoder inputs from the response themselves,
so no batch carries decoder fields.

The classes are pytrees (`flax.struct.dataclass`, keyword-only): `jax.tree.map` reaches every
array, so placement (`sharding.place_batch`), the micro-batch split of gradient accumulation and
host sharding treat them like any other tree, and a field left `None` is no leaf at all. Change one
with `.replace(...)`.

`frozen_outputs`: what a method's frozen models computed for this batch (`Method.frozen`: the
teacher's logits, the reference's log-probs), set by the train step with `.replace` before the
gradient; None until then. Its type is the method's: `TeacherLogits`, `ReferenceLogprobs` here,
PbKD's own in `plad_jax.methods.pbkd.objectives`. Its arrays have B rows (or B*k with samples), so
micro-batches split them with the rest.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import numpy as np

Array = Any  # a NumPy array on the host, a jax.Array once placed

_batch = flax.struct.dataclass(kw_only=True)


@_batch
class Batch:
    """The prompts every batch holds.

    prompt_ids, prompt_mask: [B, P] the prompts (cut from the left to the encoding's limit).
    reference_ids, reference_mask: [B, F] or None: a reference text per prompt (`Batches.reference`,
        `Method.reference_text`; PLaD's margin compares the responses against it).
    frozen_outputs: see the module docstring; None until the train step sets it.
    """

    prompt_ids: Array
    prompt_mask: Array
    reference_ids: Array | None = None
    reference_mask: Array | None = None
    frozen_outputs: Any = None

    def num_tokens(self):
        """The real tokens of the batch: the sum of every mask (0-d array, not synced)."""
        names = [f.name for f in dataclasses.fields(self) if f.name.endswith("_mask")]
        masks = [getattr(self, name) for name in names]
        return sum(m.sum(dtype=np.int32) for m in masks if m is not None)

    def _inputs(self, ids: Array, mask: Array) -> tuple[Array, Array, Array, Array]:
        """What `LanguageModel.apply` reads: (prompt ids, prompt mask, response ids, mask)."""
        return self.prompt_ids, self.prompt_mask, ids, mask


@_batch
class SequenceBatch(Batch):
    """One response per prompt: SFT, KD and the other token-level methods, scoring, evaluation.

    response_ids, response_mask: [B, R] the response (target, teacher or student sample; rows of
        several sources one after the other for a mix), EOS included when encoded with one.
    example_index: [B] int32 or None: each row's index into the encoded examples it came from
        (`make_batch`), -1 for a filler row.
    """

    response_ids: Array
    response_mask: Array
    example_index: Array | None = None

    def inputs(self) -> tuple[Array, Array, Array, Array]:
        """(prompt ids, prompt mask, response ids, response mask)."""
        return self._inputs(self.response_ids, self.response_mask)


@_batch
class PairBatch(Batch):
    """A preference pair per prompt (PLaD, SLiC, DPO, the reward model), and what may ride along.

    chosen_ids, chosen_mask: [B, Rc] y+, the preferred response (the teacher's sample unless a
        scorer relabelled the pair).
    rejected_ids, rejected_mask: [B, Rr] y-, the other one. Rc and Rr are bucketed separately.
    response_ids, response_mask: [B, R] or None: a further response per prompt (`Batches.responses`
        beside pairs; PbKD: the teacher's sample, whatever the label).
    """

    chosen_ids: Array
    chosen_mask: Array
    rejected_ids: Array
    rejected_mask: Array
    response_ids: Array | None = None
    response_mask: Array | None = None

    def chosen_inputs(self) -> tuple[Array, Array, Array, Array]:
        return self._inputs(self.chosen_ids, self.chosen_mask)

    def rejected_inputs(self) -> tuple[Array, Array, Array, Array]:
        return self._inputs(self.rejected_ids, self.rejected_mask)

    def response_inputs(self) -> tuple[Array, Array, Array, Array]:
        return self._inputs(self.response_ids, self.response_mask)


@_batch
class GameBatch(PairBatch):
    """A batch of PbKD's two-player game: the pair, the teacher's sample in `response_*`, and the
    student's fresh samples, which the game adds (`.replace`) after sampling from the current
    student.

    sample_ids, sample_mask: [B*k, Rs] or None: k samples per prompt, rows grouped by prompt (rows
        b*k ... b*k + k - 1 answer prompt b), EOS included; a sample holds at least one token.
    """

    sample_ids: Array | None = None
    sample_mask: Array | None = None


@_batch
class TeacherLogits:
    """`frozen_outputs` of the teacher-logit methods (kd, fdistill_*, minillm).

    logits: [B, R, V] float32, the frozen teacher's logits on `response_*` (position t predicts
        token t).
    """

    logits: Array


@_batch
class ReferenceLogprobs:
    """`frozen_outputs` of the methods with a frozen reference (dpo, pbkd_cheap).

    chosen, rejected: [B] float32, the summed log-probs of y+ and y- under the reference (the
        student as it started).
    """

    chosen: Array
    rejected: Array


def join_parts(parts: dict[str, SequenceBatch], cls: type[Batch] | None = None) -> Batch:
    """One batch of the same rows of several encodings (`make_batch` of each): the prompts of the
    first part, and the responses of each part as the field of its name, `response`, `chosen`,
    `rejected` or `reference`. Of type `cls`; by default a `PairBatch` when there is a `chosen`
    part, else a `SequenceBatch`."""
    first = next(iter(parts.values()))
    fields = {}
    for name, part in parts.items():
        fields[f"{name}_ids"], fields[f"{name}_mask"] = part.response_ids, part.response_mask
    cls = cls or (PairBatch if "chosen" in parts else SequenceBatch)
    return cls(prompt_ids=first.prompt_ids, prompt_mask=first.prompt_mask, **fields)
