"""PbKD training (our reconstruction of arXiv 2505.18952): one entry point, `run_pbkd`, for every
variant.

    setting = Setting(train, workdir, tok, max_prompt_tokens=512, max_response_tokens=64)
    student, summary = run_pbkd("pbkd_offline", student, rows, PbKDConfig(), setting,
                                teacher=teacher)

- `pbkd_cheap`: CE on teacher samples + lam * DPO on the pairs, one model (`training.trainer`).
- `pbkd_offline`: a reward model (RM) is fitted to the preference pairs by Bradley-Terry for
  `rm_warmup_steps` steps, giving `NLL*`; then every step (1) samples k responses per prompt from
  the current student, (2) takes one RM step on `-gap + lam * NLL + c * mean(r^2)` and a dual-ascent
  step on `lam`, (3) takes one student step (REINFORCE, leave-one-out baseline, KL to the initial
  student, optional CE anchor on teacher samples).
- `pbkd_online`: the same, in T rounds over a growing preference set (`pbkd_rounds`); each round
  refits `NLL*` by a Bradley-Terry warm-up started from the current RM, and both players carry on
  from where the last round left them (warm start).
- `pbkd_mm`: `pbkd_offline` with a Q-network over the vocabulary for the RM and teacher token
  probabilities (white-box, shared vocabulary); the vocabulary sums run in `mm_chunk` blocks.

Checkpoints. The whole game state (both players' `TrainState`s, `lam`, `NLL*`, the global step) is
one Orbax checkpoint (`<workdir>/checkpoints`, `plad_jax.training.checkpointing`), saved every
`train.checkpoint_every` steps and at the end of every phase. A step's data and its samples' seed
are pure functions of the step number, and each round's preference rows are stored before the
round trains, so a run killed anywhere, mid-round included, resumes where it stopped.

`train` is the distillation `TrainConfig` (duck-typed: batch_size, epochs, max_steps,
learning_rate, warmup_steps, weight_decay, max_grad_norm, grad_accum, checkpoint_every, keep,
log_every): the student's optimizer and the schedule. Written beside the checkpoints: `curve.json`
(step, student loss) and the final adversary: `reward_model/` (`reward_model.save` with the
student's tokenizer, so `reward_model.load_scorer(<workdir>/reward_model)` is a scorer) or
`q_network/`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from plad_jax import data
from plad_jax import sharding as shd
from plad_jax.config.pbkd import PbKDConfig
from plad_jax.generation import sampler
from plad_jax.losses import pbkd
from plad_jax.methods.base import Setting, resolve
from plad_jax.methods.pbkd import objectives as po
from plad_jax.methods.pbkd import rounds as pbkd_rounds
from plad_jax.models import from_pretrained, lora
from plad_jax.scoring import reward_model
from plad_jax.training import checkpointing as ckpt
from plad_jax.training.step import (
    OptimizerConfig,
    TrainState,
    check_finite,
    make_optimizer,
    make_train_step,
    reduce_metrics,
    state_shardings,
)
from plad_jax.training.trainer import LossCurve, Trainer

logger = logging.getLogger(__name__)

__all__ = ["PbKDConfig", "run_pbkd"]


def run_pbkd(
    method,
    student,
    rows,
    cfg: PbKDConfig,
    setting: Setting,
    *,
    teacher=None,
    programs: dict | None = None,
):
    """Distil `student` with PbKD `method`; returns `(distilled student LanguageModel, summary
    dict)`.

    Args:
      method: a `plad_jax.methods.PbKD` instance or the name of one (pbkd_cheap, pbkd_offline,
        pbkd_online, pbkd_mm); its flags pick the variant, `cfg` is its hyper-parameters.
      student: the initial (SFT) student, a `LanguageModel` (a LoRA model trains its adapters).
      rows: pair rows of `plad_jax.data.pairs` (prompt, teacher and student texts, chosen,
        reference).
      cfg: `PbKDConfig`.
      setting: `methods.base.Setting`: the distillation TrainConfig (see the module docstring);
        the workdir (checkpoints, round data, curve and the final adversary); the student's
        tokenizer (every text, teacher samples included, is re-tokenized with it, and the RM /
        Q-network read the student's tokens); the encoding limits; the scorer that labels the
        pairs (None keeps the rows' stored labels, teacher preferred unless the sample stage
        relabelled them, and pseudo-labels fresh pairs); the seed (data order, sampling and
        adversary head).
      teacher: the teacher `LanguageModel`, needed by `pbkd_mm` only (same vocabulary as the
          student).
      programs: optional dict the caller keeps across calls: jitted steps are stored there under a
        key of everything they are compiled from (the loss settings, optimizers, schedule lengths,
        model structures and mesh), so a later call with the same key (a sweep, a run restarted in
        the same process, tests) reuses them instead of compiling again. None: compile afresh.
    """
    named = isinstance(method, str)
    cls, name = (resolve(method), method) if named else (type(method), method.name)
    if not all(hasattr(cls, flag) for flag in ("cheap", "online", "white_box")):  # methods.PbKD's
        raise ValueError(f"run_pbkd runs the PbKD methods, not {name}")
    method = cls(cfg, name=name)
    method.validate()
    if not rows:
        raise ValueError("run_pbkd: no pair rows to distil on; run the sample stage first")
    if method.white_box:
        if teacher is None or teacher.vocab_size != student.vocab_size:
            raise ValueError(
                f"{method.name} compares token distributions: it needs the teacher "
                f"model, with the student's vocabulary (student {student.vocab_size}, teacher "
                f"{None if teacher is None else teacher.vocab_size})"
            )
    os.makedirs(setting.workdir, exist_ok=True)
    run = _Run(method, student, rows, cfg, setting, teacher, programs)
    return run.cheap() if method.cheap else run.game()


def _optimizer(train, learning_rate: float, total: int):
    return make_optimizer(
        OptimizerConfig(
            learning_rate=learning_rate,
            warmup_steps=train.warmup_steps,
            total_steps=max(total, 1),
            weight_decay=train.weight_decay,
            max_grad_norm=train.max_grad_norm,
        )
    )


def _replicated(value, mesh, dtype=jnp.float32):
    """A scalar of the game state, replicated on the mesh (where the checkpoint restores it)."""
    x = jnp.asarray(value, dtype)
    return (
        _commit(x, None)
        if mesh is None
        else jax.device_put(x, NamedSharding(mesh, PartitionSpec()))
    )


def _commit(tree, mesh):
    """Without a mesh, pin arrays to the default device: jitted steps then see one argument layout
    from the first step on (uncommitted initial arrays and committed step outputs would compile
    twice)."""
    return jax.device_put(tree, jax.devices()[0]) if mesh is None and tree is not None else tree


def _model_key(lm):
    """What a model's traced programs depend on, besides its params (None for no model)."""
    if lm is None:
        return None
    return (
        type(lm).__name__,
        lm.model_type,
        lm.config,
        lm.graphdef,
        str(lm.compute_dtype),
        lm.mesh,
        getattr(lm, "lora", None),
        getattr(lm, "remat", None),
    )


class _Run:
    """The setup shared by the variants: models, schedule, data, checkpoints."""

    def __init__(self, method, student, rows, cfg, setting: Setting, teacher, programs):
        self.programs, self.teacher = programs, teacher
        self.method, self.student, self.rows, self.cfg = method, student, list(rows), cfg
        s = setting
        self.train, self.workdir, self.tokenizer, self.scorer, self.seed = (
            s.train,
            s.workdir,
            s.tokenizer,
            s.scorer,
            s.seed,
        )
        self.max_prompt, self.max_response = s.max_prompt_tokens, s.max_response_tokens
        self.mesh = student.mesh
        self.rounds = cfg.rounds if method.online else 1
        self.bounds = pbkd_rounds.chunk_bounds(len(self.rows), self.rounds)
        self.is_lora = isinstance(student, lora.LoRAModel)
        if self.is_lora:  # adapters train, the base rides along frozen (as in pipeline.train)
            adapters, base = lora.split_trainable(student.params)
            self.trainable, self.combine = jax.tree.map(jnp.copy, adapters), lora.objective_combine
        else:
            base, self.trainable, self.combine = (
                None,
                jax.tree.map(jnp.copy, student.params),
                po.full_params,
            )
        self.trainable, self.base = _commit(self.trainable, self.mesh), _commit(base, self.mesh)
        self.reference = _commit(
            student.params, self.mesh
        )  # the initial student (KL, DPO); never donated
        self.teacher_params = None if teacher is None else _commit(teacher.params, self.mesh)

    # -- shared pieces -----------------------------------------------------------------------
    def steps(self, num_rows: int) -> int:
        """Student steps of a round on a set of `num_rows` rows."""
        if self.cfg.steps_per_round:
            return self.cfg.steps_per_round
        total = self.train.epochs * -(-num_rows // self.train.batch_size)
        return min(total, self.train.max_steps) if self.train.max_steps else total

    def compiled(self, name: str, totals: tuple, build):
        """`build()` (jitted steps), or the ones a former call stored in `programs` under the same
        key.

        The key holds what the programs are traced from: the loss settings (PbKDConfig without its
        host-side and schedule fields), the optimizers (train fields, learning rates, `totals`: the
        schedule lengths), and the structure of every model involved (family, config, graph,
        dtype, mesh, LoRA settings). Offline and online PbKD share programs (same players).
        """
        if self.programs is None:
            return build()
        host_side = dict(
            rounds=0,
            steps_per_round=0,
            rm_warmup_steps=0,
            temperature=0.0,
            max_new_tokens=1,
            alpha_lam=0.0,
            eps=0.0,
            lam_max=0.0,
            head_std=0.0,
        )
        train = tuple(
            getattr(self.train, k)
            for k in (
                "learning_rate",
                "warmup_steps",
                "weight_decay",
                "max_grad_norm",
                "grad_accum",
            )
        )
        kind = "mm" if self.method.white_box else "cheap" if self.method.cheap else "reward_model"
        key = (
            name,
            kind,
            dataclasses.replace(self.cfg, **host_side),
            train,
            totals,
            _model_key(self.student),
            _model_key(self.teacher),
        )
        try:
            hash(key)
        except TypeError:  # a model from another stack without hashable structure: no reuse
            return build()
        if key not in self.programs:
            self.programs[key] = build()
        return self.programs[key]

    def student_frozen(self) -> dict:
        return {} if self.base is None else {lora.FROZEN_KEY: self.base}

    def student_lm(self, params):
        return self.student.with_params(self.combine(params, self.student_frozen()))

    def config_hash(self) -> str:
        fields = {
            k: getattr(self.train, k, None)
            for k in (
                "batch_size",
                "epochs",
                "max_steps",
                "learning_rate",
                "warmup_steps",
                "weight_decay",
                "max_grad_norm",
                "grad_accum",
            )
        }
        text = json.dumps(
            [self.method.name, dataclasses.asdict(self.cfg), fields, self.seed, len(self.rows)],
            sort_keys=True,
            default=str,
        )
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def manager(self):
        return ckpt.open_manager(
            os.path.join(self.workdir, "checkpoints"),
            ckpt.CheckpointConfig(every_steps=self.train.checkpoint_every, keep=self.train.keep),
        )

    def round_encoding(self, r: int, student_params) -> tuple[pbkd_rounds.Encoding, dict]:
        """Encoding of round r's preference set (chunks 0..r), sampling chunk r first if new."""
        rows, stats = [], {}
        for j in range(r + 1):
            begin, end = self.bounds[j]
            make = lambda j=j, chunk=self.rows[begin:end]: (
                chunk if j == 0 else self.fresh_rows(chunk, j, student_params)
            )
            chunk_rows, stats = pbkd_rounds.round_rows(
                self.workdir, j, make, self.scorer, self.seed
            )
            rows.extend(chunk_rows)
        stats = {
            **stats,
            "pairs": len(rows),
            "swapped": sum(x["chosen"] == "student" for x in rows),
        }
        return pbkd_rounds.encode(self.tokenizer, rows, self.max_prompt, self.max_response), stats

    def fresh_rows(self, chunk, round_: int, student_params):
        """Chunk rows with new samples of the current student (online rounds >= 1)."""
        # As many rows per sampler call as a game step samples (B prompts x k): one compiled
        # sampler.
        return pbkd_rounds.fresh_student_rows(
            chunk,
            self.student_lm(student_params),
            self.tokenizer,
            max_new_tokens=self.cfg.max_new_tokens,
            temperature=self.cfg.temperature,
            batch_size=self.train.batch_size * self.cfg.num_samples,
            max_prompt_tokens=self.max_prompt,
            seed=self.seed + 7919 * round_,
        )

    def curve(self) -> LossCurve:
        return LossCurve(os.path.join(self.workdir, "curve.json"))

    # -- pbkd_cheap ------------------------------------------------------------------------------
    def cheap(self):
        encoding, stats = self.round_encoding(0, self.trainable)
        total = self.steps(len(encoding))
        optimizer = _optimizer(self.train, self.train.learning_rate, total)
        state = _commit(TrainState.create(self.trainable, optimizer, seed=self.seed), self.mesh)

        def build():
            loss_fn, frozen_fn = po.cheap_objective(
                self.student, lam=self.cfg.lam_init, beta=self.cfg.dpo_beta, combine=self.combine
            )
            return make_train_step(
                loss_fn,
                optimizer,
                grad_accum=self.train.grad_accum,
                frozen_fn=frozen_fn,
                state_shardings=state_shardings(state),
            )

        step = self.compiled("cheap", (total,), build)
        frozen = {**self.student_frozen(), "reference": self.reference}

        def batches(epoch, index):
            rows = data.stream_rows(
                len(encoding), self.train.batch_size, seed=self.seed, index=index
            )
            b = pbkd_rounds.make_batch(encoding, rows)  # response_*: the teacher samples
            return _placed(self.mesh, shd.local_rows(self.mesh, b))

        curve, manager = self.curve(), self.manager()
        state = Trainer(
            step,
            state,
            batches,
            frozen,
            total_steps=total,
            steps_per_epoch=max(total, 1),
            manager=manager,
            config_hash=self.config_hash(),
            log_every=self.train.log_every,
            hooks=[curve],
        ).run()
        manager.close()
        summary = {
            "method": self.method.name,
            "steps": total,
            "final_loss": curve.final_loss,
            **stats,
        }
        return self.student_lm(state.params), summary

    # -- the two-player game ---------------------------------------------------------------------
    def game(self):
        return _Game(self).run()


class _Game:
    """pbkd_offline / pbkd_online / pbkd_mm: warm-up and alternating phases over rounds."""

    def __init__(self, run: _Run):
        self.run_, cfg = run, run.cfg
        self.sizes = pbkd_rounds.round_sizes(len(run.rows), run.rounds)
        self.game_steps = [run.steps(n) for n in self.sizes]
        self.phases = self._phases()
        student_opt = _optimizer(run.train, run.train.learning_rate, sum(self.game_steps))
        adversary_opt = _optimizer(run.train, cfg.rm_learning_rate, self.phases[-1][3])
        self.adversary = self._adversary()
        student_state = _commit(
            TrainState.create(run.trainable, student_opt, seed=run.seed), run.mesh
        )
        adversary_state = _commit(
            TrainState.create(self.adversary.params, adversary_opt, seed=run.seed + 1), run.mesh
        )
        self.state = {  # the game's own scalars; the players hold their train states
            "step": _replicated(0, run.mesh, jnp.int32),
            "lam": _replicated(cfg.lam_init, run.mesh),
            "nll_star": _replicated(0.0, run.mesh),
        }
        totals = (sum(self.game_steps), self.phases[-1][3])
        self.warm_step, adv_step, student_step, self.nll_fn = run.compiled(
            "game",
            totals,
            lambda: self._programs(student_opt, adversary_opt, student_state, adversary_state),
        )
        # The two players: each a Trainer the game steps with its own batches (the adversary has
        # two programs: the Bradley-Terry warm-up and its game step).
        self.student_player = Trainer(student_step, student_state)
        self.adversary_player = Trainer(adv_step, adversary_state)

    def checkpoint_tree(self) -> dict:
        """What a checkpoint holds: both players' train states and the game's scalars."""
        return {
            **self.state,
            "student": self.student_player.state,
            "adversary": self.adversary_player.state,
        }

    def load(self, tree: dict):
        self.student_player.state = tree["student"]
        self.adversary_player.state = tree["adversary"]
        self.state = {k: v for k, v in tree.items() if k not in ("student", "adversary")}

    def _programs(self, student_opt, adversary_opt, student_state, adversary_state):
        """The jitted warm-up, adversary and student steps and the NLL evaluation."""
        accum = self.run_.train.grad_accum
        warm_loss, warm_frozen, adv_loss, adv_frozen, st_loss, st_frozen = self._objectives()
        warm_step = make_train_step(
            warm_loss,
            adversary_opt,
            grad_accum=accum,
            frozen_fn=warm_frozen,
            state_shardings=state_shardings(adversary_state),
        )
        adv_step = make_train_step(
            adv_loss,
            adversary_opt,
            grad_accum=accum,
            frozen_fn=adv_frozen,
            state_shardings=state_shardings(adversary_state),
        )
        student_step = make_train_step(
            st_loss,
            student_opt,
            grad_accum=accum,
            frozen_fn=st_frozen,
            state_shardings=state_shardings(student_state),
        )

        def nll(params, frozen, batch):
            if warm_frozen is not None:
                batch = batch.replace(frozen_outputs=warm_frozen(frozen, batch))
            return warm_loss(params, frozen, batch, None)[1]["nll"]

        return warm_step, adv_step, student_step, jax.jit(nll)

    def _phases(self):
        """[(round, kind, first step, last step)], global steps numbered from 1; kind warmup |
        game."""
        phases, step = [], 0
        for r, n_game in enumerate(self.game_steps):
            for kind, n in (("warmup", self.run_.cfg.rm_warmup_steps), ("game", n_game)):
                phases.append((r, kind, step + 1, step + n))
                step += n
        return phases

    def _adversary(self):
        """The RM (offline / online) or the Q-network (mm), started from the student unless
        `rm_init`."""
        run, cfg = self.run_, self.run_.cfg
        backbone = lora.merge_lora(run.student) if run.is_lora else run.student
        if cfg.rm_init:
            backbone = from_pretrained(cfg.rm_init, mesh=run.mesh)
            if backbone.vocab_size != run.student.vocab_size:
                raise ValueError(
                    f"pbkd rm_init {cfg.rm_init}: vocabulary {backbone.vocab_size} differs from "
                    f"the student's {run.student.vocab_size}; the adversary reads the student's "
                    "tokens"
                )
        if run.method.white_box:
            return backbone.with_params(jax.tree.map(jnp.copy, backbone.params))
        return reward_model.from_backbone(
            backbone, r_max=cfg.r_max, seed=run.seed, head_std=cfg.head_std
        )

    def _objectives(self):
        run, cfg, adv = self.run_, self.run_.cfg, self.adversary
        if run.method.white_box:
            warm_loss, warm_frozen = po.mm_bt_objective(cfg, adv, run.teacher)
            adv_loss, adv_frozen = po.mm_q_objective(cfg, adv, run.teacher, run.student)
            st_loss, st_frozen = po.mm_student_objective(
                cfg, run.student, run.teacher, adv, run.combine
            )
        else:
            warm_loss, warm_frozen = reward_model.bt_loss_fn(adv, cfg.c_reg), None
            adv_loss, adv_frozen = po.reward_model_objective(cfg, adv), None
            st_loss, st_frozen = po.reinforce_objective(cfg, run.student, adv, run.combine)
        return warm_loss, warm_frozen, adv_loss, adv_frozen, st_loss, st_frozen

    # -- what each player's step reads besides its own params ----------------------------------
    def warm_frozen(self):
        return {"teacher": self.run_.teacher_params} if self.run_.method.white_box else {}

    def adversary_frozen(self):
        run, state = self.run_, self.state
        if not run.method.white_box:
            return {"lam": state["lam"]}
        student_params = run.combine(self.student_player.state.params, run.student_frozen())
        return {"teacher": run.teacher_params, "student": student_params, "lam": state["lam"]}

    def student_frozen(self):
        run, adversary = self.run_, self.adversary_player.state.params
        if run.method.white_box:
            return {**run.student_frozen(), "teacher": run.teacher_params, "qnet": adversary}
        return {**run.student_frozen(), "reference": run.reference, "rm": adversary}

    # -- the loop --------------------------------------------------------------------------------
    def run(self):
        run, manager = self.run_, self.run_.manager()
        restored = ckpt.restore_latest(
            manager, ckpt.abstract_like(self.checkpoint_tree()), config_hash=run.config_hash()
        )
        if restored is not None:
            self.load(restored[0])
            logger.info(
                "pbkd: resumed at step %d from %s", int(self.state["step"]), manager.directory
            )
        curve, last, stats = run.curve(), {}, {}
        try:
            for r in range(run.rounds):
                if int(self.state["step"]) >= self._round_end(r):
                    continue
                encoding, stats = run.round_encoding(r, self.student_player.state.params)
                logger.info(
                    "pbkd round %d: %d preference pairs (%d prefer the student)",
                    r,
                    stats["pairs"],
                    stats["swapped"],
                )
                for phase in (p for p in self.phases if p[0] == r):
                    last.update(self._phase(phase, encoding, manager, curve))
        finally:
            ckpt.wait(manager)
            manager.close()
        curve.save()
        self._save_adversary()
        summary = {
            "method": run.method.name,
            "rounds": run.rounds,
            "steps": self.phases[-1][3],
            "student_steps": sum(self.game_steps),
            "lam": float(self.state["lam"]),
            "nll_star": float(self.state["nll_star"]),
            **stats,
            **last,
        }
        return run.student_lm(self.student_player.state.params), summary

    def _round_end(self, r: int) -> int:
        return max(p[3] for p in self.phases if p[0] == r)

    def _phase(self, phase, encoding, manager, curve) -> dict:
        r, kind, first, last_step = phase
        out = {}
        for step in range(max(int(self.state["step"]) + 1, first), last_step + 1):
            index = step - first
            if kind == "warmup":
                metrics = self._warmup_step(encoding, r, index, step)
                if step == last_step:
                    self.state["nll_star"] = _replicated(self._nll(encoding), self.run_.mesh)
            else:
                metrics = self._game_step(encoding, r, index, step)
                curve.add(step, metrics["student_loss"], save=False)
            self.state["step"] = _replicated(step, self.run_.mesh, jnp.int32)
            out = metrics
            if step == last_step or manager.should_save(step):
                ckpt.save(
                    manager,
                    step,
                    self.checkpoint_tree(),
                    ckpt.DataPosition(r, index + 1),
                    metrics=metrics,
                    config_hash=self.run_.config_hash(),
                    force=True,
                )
                curve.save()
            if self.run_.train.log_every and step % self.run_.train.log_every == 0:
                logger.info(
                    "pbkd %s round %d step %d: %s",
                    kind,
                    r,
                    step,
                    " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())),
                )
        if (
            kind == "warmup" and last_step < first and int(self.state["step"]) < first
        ):  # no warm-up steps
            self.state["nll_star"] = _replicated(self._nll(encoding), self.run_.mesh)
        return out

    def _batch(self, encoding, r: int, index: int) -> data.GameBatch:
        rows = data.stream_rows(
            len(encoding), self.run_.train.batch_size, seed=self.run_.seed + r, index=index
        )
        return shd.local_rows(self.run_.mesh, pbkd_rounds.make_batch(encoding, rows))

    def _warmup_step(self, encoding, r, index, step) -> dict:
        batch = _placed(self.run_.mesh, self._batch(encoding, r, index))
        metrics = self.adversary_player.step(batch, self.warm_frozen(), step_fn=self.warm_step)
        check_finite(metrics, step)
        return {f"warmup_{k}": v for k, v in reduce_metrics(metrics).items() if k != "finite"}

    def _game_step(self, encoding, r, index, step) -> dict:
        run, cfg = self.run_, self.run_.cfg
        batch = self._batch(encoding, r, index)
        # Each row samples from the stream of its place in the global batch: the same samples on any
        # number of processes.
        positions = shd.local_rows(run.mesh, np.arange(run.train.batch_size))
        generation = sampler.generate(
            run.student_lm(self.student_player.state.params),
            batch.prompt_ids,
            batch.prompt_mask,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            num_samples=cfg.num_samples,
            seed=(run.seed * 1_000_003 + step) % 2**31,
            sample_ids=positions,
        )
        batch = _placed(
            run.mesh, batch.replace(sample_ids=generation.tokens, sample_mask=generation.mask)
        )
        adv = self.adversary_player.step(batch, self.adversary_frozen())
        check_finite(adv, step)
        adv = reduce_metrics(adv)
        self.state["lam"] = _replicated(
            pbkd.dual_ascent(
                self.state["lam"],
                adv["nll"],
                self.state["nll_star"],
                alpha_lam=cfg.alpha_lam,
                eps=cfg.eps,
                lam_max=cfg.lam_max,
            ),
            run.mesh,
        )
        st = self.student_player.step(batch, self.student_frozen())
        check_finite(st, step)
        st = reduce_metrics(st)
        out = {f"adversary_{k}": v for k, v in adv.items() if k != "finite"}
        out.update({f"student_{k}": v for k, v in st.items() if k != "finite"})
        return {**out, "lam": float(self.state["lam"])}

    def _nll(self, encoding) -> float:
        """Mean Bradley-Terry NLL of the adversary over the whole preference set (its NLL*)."""
        run, size = self.run_, self.run_.train.batch_size
        total, count = 0.0, 0.0
        for start in range(0, len(encoding), size):
            real = min(size, len(encoding) - start)
            rows = np.minimum(
                np.arange(start, start + size), start + real - 1
            )  # full batch: one program
            batch = pbkd_rounds.make_batch(encoding, rows)
            batch.prompt_mask[real:] = 0  # repeated rows count as padding (`real_pairs`)
            s, n = self.nll_fn(
                self.adversary_player.state.params,
                self.warm_frozen(),
                _placed(run.mesh, shd.local_rows(run.mesh, batch)),
            )
            total, count = total + float(s), count + float(n)
        return total / max(count, 1.0)

    def _save_adversary(self):
        run, params = self.run_, self.adversary_player.state.params
        if run.method.white_box:
            self.adversary.with_params(params).save_pretrained(
                os.path.join(run.workdir, "q_network")
            )
        else:
            reward_model.save(
                self.adversary.with_params(params),
                os.path.join(run.workdir, "reward_model"),
                tokenizer=run.tokenizer,
            )


def _placed(mesh, batch: data.GameBatch) -> data.GameBatch:
    """This process's rows of the global batch on the mesh."""
    return shd.place_batch(mesh, batch, local=True)
