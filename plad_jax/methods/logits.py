"""Methods that match the teacher's token distributions (shared vocabulary, teacher logits
computed by the frozen teacher outside the gradient): `kd`, `fdistill_tvd`, `fdistill_js`,
`minillm`."""

from __future__ import annotations

import dataclasses

from plad_jax import losses
from plad_jax.data import SequenceBatch, TeacherLogits
from plad_jax.methods.base import Batches, Method, register


@dataclasses.dataclass(frozen=True)
class KDHParams:
    kd_temperature: float = 1.0  # softmax temperature of both distributions (loss scaled by T^2)

    def validate(self):
        if self.kd_temperature <= 0:
            raise ValueError(f"distill.kd_temperature must be positive, got {self.kd_temperature}")


class _TeacherLogits(Method):
    """Student and teacher logits on a `SequenceBatch`'s responses; `divergence(student, teacher,
    mask)`."""

    frozen_models = ("teacher",)
    shared_vocabulary = True

    def frozen(self, frozen, batch: SequenceBatch) -> TeacherLogits:
        logits, _ = self.teacher.apply(frozen["teacher"], *batch.inputs())
        return TeacherLogits(logits=logits)

    def loss(self, params, frozen, batch: SequenceBatch, rng):
        logits, _ = self.student.apply(
            self.student_params(params, frozen), *batch.inputs(), rng=rng
        )
        return self.divergence(logits, batch.frozen_outputs.logits, batch.response_mask)

    def divergence(self, logits, teacher_logits, mask):
        raise NotImplementedError


@register
class KD(_TeacherLogits):
    """Standard KD (Hinton 2015): forward KL(p_T^T || q^T) * T^2, teacher-forced on the targets."""

    name = "kd"
    HParams = KDHParams
    batches = Batches(responses=("target",))

    def divergence(self, logits, teacher_logits, mask):
        return losses.kd_forward_kl(logits, teacher_logits, mask, self.hp.kd_temperature)


_MIX = Batches(
    responses=("teacher", "student")
)  # f-distill: teacher- and student-sampled sequences


@register
class FDistillTVD(_TeacherLogits):
    """f-distill (Wen et al. 2023), total variation distance."""

    name = "fdistill_tvd"
    batches = _MIX

    def divergence(self, logits, teacher_logits, mask):
        return losses.tvd_loss(logits, teacher_logits, mask)


@register
class FDistillJS(_TeacherLogits):
    """f-distill (Wen et al. 2023), Jensen-Shannon divergence."""

    name = "fdistill_js"
    batches = _MIX

    def divergence(self, logits, teacher_logits, mask):
        return losses.js_loss(logits, teacher_logits, mask)


@register
class MiniLLM(_TeacherLogits):
    """MiniLLM (Gu et al. 2023) in its GKD-style form: the exact per-position reverse KL(q || p_T)
    over the vocabulary on the student's own samples."""

    name = "minillm"
    batches = Batches(responses=("student",))

    def divergence(self, logits, teacher_logits, mask):
        return losses.reverse_kl_loss(logits, teacher_logits, mask)
