"""PbKD (our reconstruction of arXiv 2505.18952, METHODS.md section 3): `pbkd_cheap`,
`pbkd_offline`, `pbkd_online`, `pbkd_mm`. Their hyper-parameters are the config's `pbkd` section
(`plad_jax.config.pbkd.PbKDConfig`); each trains itself with `plad_jax.methods.pbkd.game.run_pbkd`
(the two-player game, or for `pbkd_cheap` CE on teacher samples + lam * DPO on the pairs)."""

from __future__ import annotations

from typing import ClassVar

from plad_jax.config import ConfigError
from plad_jax.config.pbkd import PbKDConfig
from plad_jax.methods.base import Batches, Method, Setting, register


class PbKD(Method):
    """The shared declarations; `cheap`, `online` and `white_box` pick the variant of `run_pbkd`."""

    HParams = PbKDConfig
    section = "pbkd"
    batches = Batches(responses=("teacher",), pairs=True)
    relabels = True
    own_loop = True
    reads_pairs_scorer = True
    cheap: ClassVar[bool] = False  # one model, one loss, no sampling inside the loop
    online: ClassVar[bool] = False  # `pbkd.rounds` rounds over a growing preference set
    white_box: ClassVar[bool] = False  # a Q-network over the vocabulary and the teacher's logits

    def validate(self):
        super().validate()
        if not self.cheap and self.hp.num_samples < 2:
            raise ValueError(
                f"pbkd num_samples={self.hp.num_samples}: the leave-one-out baseline "
                "needs at least 2"
            )

    def objective(self, student, *, teacher=None, combine=None):
        if not self.cheap:
            raise ValueError(
                f"method '{self.name}' alternates a reward model and the student with "
                "fresh samples; run it with plad_jax.methods.pbkd.game.run_pbkd (per-player "
                "losses: plad_jax.methods.pbkd.objectives)"
            )
        from plad_jax.methods.pbkd import objectives as pbkd_objectives

        combine = combine or pbkd_objectives.full_params
        return pbkd_objectives.cheap_objective(
            student, lam=self.hp.lam_init, beta=self.hp.dpo_beta, combine=combine
        )

    def train_own(self, student, rows, setting: Setting, *, teacher=None):
        """`run_pbkd`: the pairs are its offline preference data, labelled teacher > student unless
        `pairs.real_ratio` had a scorer relabel them; `pbkd_online` labels its fresh pairs with
        that scorer too (pseudo-labels when there is none)."""
        import jax

        from plad_jax.methods.pbkd.game import run_pbkd

        mesh, train = student.mesh, setting.train
        shards = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
        if jax.process_count() > 1 and train.batch_size % shards:  # each process feeds its own rows
            raise ConfigError(
                f"distill.batch_size={train.batch_size} must be a multiple of the "
                f"{shards} batch shards (mesh data x fsdp) for PbKD on "
                f"{jax.process_count()} processes"
            )
        return run_pbkd(self, student, rows, self.hp, setting, teacher=teacher)


@register
class PbKDCheap(PbKD):
    """CE on the teacher samples + `pbkd.lam_init` * DPO (beta `pbkd.dpo_beta`) on the pairs."""

    name = "pbkd_cheap"
    cheap = True


@register
class PbKDOffline(PbKD):
    """Reward model vs REINFORCE student on a fixed preference set."""

    name = "pbkd_offline"


@register
class PbKDOnline(PbKD):
    """`pbkd_offline` in `pbkd.rounds` rounds, each adding fresh student samples to the set."""

    name = "pbkd_online"
    online = True


@register
class PbKDMM(PbKD):
    """White-box moment matching: a Q-network over the vocabulary, the teacher's probabilities."""

    name = "pbkd_mm"
    white_box = True
    shared_vocabulary = True
    frozen_models = ("teacher",)
