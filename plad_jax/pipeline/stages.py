"""The five stages of a run, each a function of (context, stage directory) -> summary metrics.

    sft_teacher  base teacher, D0      -> sft_teacher/params/ (HF safetensors), best on validation
    sft_student  base student, D0      -> sft_student/params/
    sample       both SFT models, D    -> sample/pairs-*.parquet (teacher sample preferred)
    distill      SFT student, pairs    -> distill/params/ (the distilled student)
    eval         all three, test split -> eval/metrics.json, report.md, *.png, responses.jsonl

A stage whose `DONE` marker exists is skipped; `DONE` is written last, with the stage's summary.
Inside a stage, training resumes from its Orbax checkpoints (`loop.train_loop`), so a killed run
restarts where it stopped. Hand-offs between stages are HF directories (`save_pretrained`), which
transformers loads too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np

from plad_jax import data, methods
from plad_jax import sharding as shd
from plad_jax.config import Config, ConfigError, to_dict
from plad_jax.data import pairs
from plad_jax.generation import sampler
from plad_jax.methods import Method
from plad_jax.models import from_pretrained, hf, init_model, lora
from plad_jax.pipeline import inputs
from plad_jax.scoring import evaluate, rewards
from plad_jax.training import checkpointing as ckpt
from plad_jax.training.loop import LossCurve, train_loop
from plad_jax.training.step import (
    OptimizerConfig,
    TrainState,
    make_optimizer,
    make_train_step,
    state_shardings,
)

logger = logging.getLogger(__name__)

STAGES = ("sft_teacher", "sft_student", "sample", "distill", "eval")


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


# -- running stages -------------------------------------------------------------------------------


def run(config: Config, run_dir: str, stages=STAGES, *, on_start=None):
    """Run the selected stages in pipeline order, skipping those already DONE.

    The inputs of the pending stages are checked first (`check_inputs`); `on_start()` runs after
    that check and before any stage (the CLI records config.json there), so input that cannot
    work changes nothing in the run directory."""
    ctx = Context(config, run_dir)
    pending = [
        name for name in STAGES if name in stages and not os.path.exists(ctx.path(name, "DONE"))
    ]
    check_inputs(ctx, pending)
    if on_start is not None:
        on_start()
    for name in STAGES:
        if name not in stages:
            continue
        done = ctx.path(name, "DONE")
        if os.path.exists(done):
            logger.info("stage %s: already done, skipped (%s)", name, done)
            continue
        logger.info("stage %s: start", name)
        os.makedirs(ctx.path(name), exist_ok=True)
        summary = STAGE_FUNCTIONS[name](ctx, ctx.path(name))
        if jax.process_index() == 0:
            _write_json(done, summary)
        _barrier(
            f"stage {name} done"
        )  # no process reads a stage's output before every process wrote it
        logger.info("stage %s: done %s", name, json.dumps(summary))


def _barrier(name: str):
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def check_inputs(ctx: Context, pending) -> None:
    """Before any work: every earlier stage, model, tokenizer, scorer and dataset that the pending
    stages read (`plad_jax.pipeline.inputs` derives the list from the config) is done, on this
    machine or reachable. All that is missing goes into one ConfigError line naming the setting that
    reads it and the `--set` that fixes it, so a run without network fails in seconds, not after
    hours of teacher SFT. The check's own log lines (data loaded, ...) appear once it passes: a run
    that cannot start prints its one line and nothing else."""
    with _held_logs():
        _check_inputs(ctx, pending)


@contextlib.contextmanager
def _held_logs(name: str = "plad_jax"):
    """Holds the records of logger `name` and its children; replays them after a clean exit and
    drops them when the block raises."""
    held, log = [], logging.getLogger(name)
    handler = logging.Handler()
    handler.emit = held.append
    propagate, log.propagate = log.propagate, False
    log.addHandler(handler)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.propagate = propagate
    for record in held:
        logging.getLogger(record.name).handle(record)


def _check_inputs(ctx: Context, pending) -> None:
    cfg = ctx.config
    method = ctx.method  # the method and its hyper-parameters: a ConfigError before anything else
    _check_upstream(ctx, pending)
    data_problem, validation = None, True  # without data to look at, select_best is taken to score
    if pending:
        try:  # loads (and caches) the task's data, or says what is wrong
            validation = bool(ctx.splits.validation)
        except data.DataError as e:
            data_problem = e
    needs = inputs.pending_needs(cfg, pending, validation=validation)
    missing, unusable = _unavailable(ctx, needs, pending)
    if not missing and not unusable:
        if data_problem is not None:
            raise data_problem
        check_checkpoints(cfg, pending)
        if "distill" in pending and method.shared_vocabulary:
            methods.check_shared_vocabulary(
                method, cfg, ctx.tokenizer("teacher"), ctx.tokenizer("student")
            )
        return
    parts = [_missing_weights(missing)] if missing else []
    parts += [
        f"{inputs.describe(need, readers)} cannot be loaded ({why}); a python scorer is "
        "module:attr on the Python path"
        for need, readers, why in unusable
    ]
    if data_problem is not None:
        parts.append(f"and the data: {data_problem}")
    raise ConfigError("; ".join(parts))


def _check_upstream(ctx: Context, pending):
    """A pending stage whose earlier stage is neither done nor pending cannot start."""
    if "://" in ctx.run_dir:
        return  # stage markers of a remote run directory are not visible to os.path
    for stage in pending:
        for before in inputs.upstream(ctx.config, stage):
            if before not in pending and not os.path.exists(ctx.path(before, "DONE")):
                marker = ctx.path(before, "DONE")
                raise ConfigError(
                    f"stage {stage} reads the output of stage {before}, which is not "
                    f"done in {ctx.run_dir} ({marker} is missing); add {before} to "
                    "--stages or point --run-dir at the run that has it"
                )


def _unavailable(ctx: Context, needs: dict, pending):
    """([(need, readers)] not found, [(need, readers, why)] that cannot be imported)."""
    missing, unusable = [], []
    for need, readers in needs.items():
        if not need.source or _made_by_pending_stage(ctx, need.source, pending):
            continue
        if need.kind == "python":
            why = inputs.import_problem(need.source)
            if why:
                unusable.append((need, readers, why))
        elif not _found(need):
            missing.append((need, readers))
    return missing, unusable


def _found(need) -> bool:
    return os.path.isdir(need.source) if need.kind == "directory" else hf.is_available(need.source)


def _made_by_pending_stage(ctx: Context, source: str, pending) -> bool:
    """A path inside a pending stage's directory (e.g. PbKD's `distill/reward_model` for eval)."""
    where = os.path.abspath(source)
    return any(where.startswith(os.path.abspath(ctx.path(stage)) + os.sep) for stage in pending)


def _missing_weights(missing) -> str:
    names = ", ".join(inputs.describe(need, readers) for need, readers in missing)
    fix = " ".join(f"--set {need.key}={_local_hint(need.key, need.source)}" for need, _ in missing)
    scorers = sorted({need.via.split("=")[0] for need, _ in missing if need.via})
    extra = "".join(f"; also --set {s}=rouge scores offline" for s in scorers)
    selections = sorted({r for _, rs in missing for r in rs if r.endswith(".select_best")})
    extra += "".join(f"; or --set {r}=false keeps the last checkpoint" for r in selections)
    one = len(missing) == 1
    return (
        f"missing weights: {names} {'is' if one else 'are'} neither a local directory nor "
        f"reachable on the Hugging Face hub; download {'it' if one else 'them'} (config.json, "
        f"safetensors, tokenizer files) and point at the local {'copy' if one else 'copies'}: "
        f"{fix}{extra}"
    )


def check_checkpoints(cfg: Config, pending) -> None:
    """GGUF files readable (with tokenizer metadata unless a tokenizer is given) and `layers`
    within the checkpoint, for each role whose base model a pending stage loads; a
    CheckpointError names the role's key."""
    for role, stage in (("teacher", "sft_teacher"), ("student", "sft_student")):
        model = getattr(cfg, role)
        if stage not in pending or not os.path.exists(model.path):
            continue  # a hub id: checked when it loads
        try:
            hf.check_checkpoint(model.path, layers=model.cut, need_tokenizer=not model.tokenizer)
        except hf.CheckpointError as e:
            raise hf.CheckpointError(f"{role}.path: {e}") from None


def _local_hint(key: str, source: str) -> str:
    return (
        "/models/" + source.rstrip("/").rpartition("/")[2]
        if "/" in source
        else f"/models/{key.split('.')[0]}"
    )


def _write_json(path: str, obj):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=float)
    os.replace(tmp, path)


def _config_hash(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


# -- training --------------------------------------------------------------------------------------


def with_lora(ctx: Context, lm, role: str):
    """The model with LoRA adapters when the role's config asks for them (exports merge them)."""
    settings = getattr(ctx.config, role).lora
    if settings is None:
        return lm
    return lora.add_lora(lm, lora.LoRAConfig(**dataclasses.asdict(settings)), seed=ctx.config.seed)


class BestCheckpoint:
    """`on_checkpoint` hook of the training loop: scores the model at every checkpoint with
    `score_fn(lm) -> float` (higher is better) and keeps the best one as an HF directory.

    `<stage>/selection.json` maps step -> score; `<stage>/params/` holds the best model so far (the
    stage's hand-off: one copy on disk, not a second `best/`). Both survive a restart: a step
    already scored is not scored again, and the directory is replaced only by a complete one
    (written beside it, then renamed)."""

    def __init__(self, stage_dir: str, model_at, score_fn):
        self.record_path = os.path.join(stage_dir, "selection.json")
        self.best_dir = os.path.join(stage_dir, "params")
        legacy = os.path.join(stage_dir, "best")  # where earlier versions kept it
        if os.path.isdir(legacy) and not os.path.exists(self.best_dir) and jax.process_index() == 0:
            os.replace(legacy, self.best_dir)
        self.model_at, self.score_fn = model_at, score_fn
        self.scores = {}
        if os.path.exists(self.record_path):
            with open(self.record_path, encoding="utf-8") as f:
                self.scores = {int(k): v for k, v in json.load(f).items()}

    @property
    def best_step(self) -> int | None:  # ties go to the earlier step
        return max(sorted(self.scores), key=self.scores.get) if self.scores else None

    def __call__(self, step: int, state):
        if step in self.scores:
            return
        lm = self.model_at(state.params)
        score = float(self.score_fn(lm))
        logger.info(
            "step %d: validation score %.4f (best so far %s)",
            step,
            score,
            "none"
            if self.best_step is None
            else f"{self.scores[self.best_step]:.4f} at step {self.best_step}",
        )
        if self.best_step is None or score > self.scores[self.best_step]:
            tmp = self.best_dir + ".tmp"
            lm.save_pretrained(tmp)
            if jax.process_index() == 0:
                shutil.rmtree(self.best_dir, ignore_errors=True)
                os.replace(tmp, self.best_dir)
        self.scores[step] = score
        if jax.process_index() == 0:
            _write_json(self.record_path, {str(k): v for k, v in sorted(self.scores.items())})

    def summary(self) -> dict:
        return {
            "best_step": self.best_step,
            "validation_score": self.scores.get(self.best_step),
            "validation_by_step": {str(k): v for k, v in sorted(self.scores.items())},
        }


def train_model(
    ctx: Context,
    lm,
    stage_dir: str,
    train_cfg,
    method: Method,
    batch_fn,
    num_examples: int,
    *,
    teacher=None,
    reference=None,
    tag: str = "",
    select=None,
):
    """Train `lm` with `method`'s loss on `batch_fn(rows) -> batch`; returns (trained lm, summary).

    select: optional `score_fn(lm) -> float`; the model is then scored at every checkpoint, the best
    one (not the last) is written to `<stage>/params/`, and None is returned in place of the
    model."""
    steps_per_epoch = max(num_examples // train_cfg.batch_size, 1)
    total = steps_per_epoch * train_cfg.epochs
    if train_cfg.max_steps:
        total = min(total, train_cfg.max_steps)
    optimizer = make_optimizer(
        OptimizerConfig(
            learning_rate=train_cfg.learning_rate,
            warmup_steps=train_cfg.warmup_steps,
            total_steps=total,
            weight_decay=train_cfg.weight_decay,
            max_grad_norm=train_cfg.max_grad_norm,
        )
    )
    frozen, trainable, combine = {}, lm.params, methods.full_params
    if isinstance(lm, lora.LoRAModel):  # adapters train, base weights ride along frozen
        trainable, frozen[lora.FROZEN_KEY] = lora.split_trainable(lm.params)
        trainable, combine = jax.tree.map(jnp.copy, trainable), lora.objective_combine
    loss_fn, frozen_fn = method.objective(lm, teacher=teacher, combine=combine)
    if "teacher" in method.frozen_models:
        frozen["teacher"] = teacher.params
    if reference is not None:
        frozen["reference"] = reference
    state = TrainState.create(trainable, optimizer, seed=ctx.config.seed)
    step = make_train_step(
        loss_fn,
        optimizer,
        grad_accum=train_cfg.grad_accum,
        frozen_fn=frozen_fn,
        state_shardings=state_shardings(state),
    )
    seed = ctx.config.seed

    def batches(epoch: int, index: int):
        order = data.epoch_order(num_examples, shuffle_seed=seed, epoch=epoch)
        rows = order[index * train_cfg.batch_size : (index + 1) * train_cfg.batch_size]
        batch = batch_fn(rows)
        return shd.place_batch(ctx.mesh, batch)

    to_full = (
        (lambda p: lora.combine(p, frozen[lora.FROZEN_KEY]))
        if lora.FROZEN_KEY in frozen
        else (lambda p: p)
    )
    selector = (
        BestCheckpoint(stage_dir, lambda p: lm.with_params(to_full(p)), select) if select else None
    )
    curve = LossCurve(os.path.join(stage_dir, f"curve{tag}.json"))
    board = _board(ctx, os.path.basename(stage_dir) + tag)

    def on_metrics(step, means):
        curve.add(step, means["loss"])
        if board is not None:
            for name, value in means.items():
                board.add_scalar(f"train/{name}", value, step)

    manager = ckpt.open_manager(
        os.path.join(stage_dir, f"checkpoints{tag}"),
        ckpt.CheckpointConfig(every_steps=train_cfg.checkpoint_every, keep=train_cfg.keep),
    )
    state = train_loop(
        step,
        state,
        batches,
        frozen,
        total_steps=total,
        steps_per_epoch=steps_per_epoch,
        manager=manager,
        log_every=train_cfg.log_every,
        on_metrics=on_metrics,
        progress=os.path.basename(stage_dir) + tag,
        config_hash=_config_hash(to_dict(train_cfg), method.name, method.hparams_dict(), tag),
        on_checkpoint=selector,
    )
    manager.close()
    if board is not None:
        if selector is not None:
            for step, score in sorted(selector.scores.items()):
                board.add_scalar("validation/score", score, step)
        board.close()
    summary = {"steps": total, "final_loss": curve.final_loss}
    if selector is not None:
        return None, {**summary, **selector.summary()}
    return lm.with_params(to_full(state.params)), summary


def _board(ctx: Context, name: str):
    """A TensorBoard writer for `<run>/tb/<name>` on process 0 (None elsewhere)."""
    if jax.process_index() != 0:
        return None
    from tensorboardX import SummaryWriter

    return SummaryWriter(ctx.path("tb", name), flush_secs=30)


def sft_batches(encoded: data.EncodedExamples, batch_size: int):
    """Batches of (prompt, response) rows of one encoding."""
    return parts_batches({"response": encoded}, batch_size)


# -- sampling --------------------------------------------------------------------------------------


def stop_strings(ctx: Context, section) -> tuple[str, ...]:
    """`section.stop` (`sample` or `eval`), or the task's own stop strings when it is None."""
    if section.stop is not None:
        return section.stop
    return data.task_stop_strings(ctx.config.data.task)


def sample_responses(
    ctx: Context,
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
):
    """(texts, token id lists, sequence log-probs) of one sample per prompt
    (`sampler.generate_many`: batched by length, progress bar, tokens/s in the log). Prompts are
    encoded as for training.
    sample_ids: each prompt's index in its split, so that its sample is the same on any number
    of hosts (default: position in `prompts`). stop: strings a response ends before (its ids and
    log-prob too: the text is exactly the decoded ids)."""
    cfg = ctx.config.sample
    tok = ctx.tokenizer(role)
    encoded = ctx.encode(role, prompts, [""] * len(prompts))
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
        desc=f"{desc} ({role})",
        stop=sampler.stop_strings(tok, stop),
    )
    texts = [tok.decode(s.ids, skip_special_tokens=True) for s in sampled]
    return texts, [s.ids for s in sampled], np.array([s.logprob for s in sampled], np.float32)


# -- the stages ------------------------------------------------------------------------------------


def _sft_stage(role: str):
    def stage(ctx: Context, stage_dir: str):
        lm = with_lora(ctx, ctx.base_model(role), role)
        train_cfg = getattr(ctx.config, f"sft_{role}")
        d0 = ctx.splits.d0
        encoded = ctx.encode(role, [e.prompt for e in d0], [e.response for e in d0])
        logger.info(
            "sft_%s: %d examples, %d prompts cut to %d tokens",
            role,
            len(d0),
            encoded.num_prompts_cut,
            ctx.config.data.max_prompt_tokens,
        )
        select = None
        if train_cfg.select_best and ctx.splits.validation:
            select = lambda model: validation_score(ctx, model, role, train_cfg.validation_examples)
        lm, summary = train_model(
            ctx,
            lm,
            stage_dir,
            train_cfg,
            methods.SFT(),
            sft_batches(encoded, train_cfg.batch_size),
            len(d0),
            select=select,
        )
        if lm is not None:  # else the selection already wrote the best checkpoint there
            lm.save_pretrained(os.path.join(stage_dir, "params"))
        return {**summary, "examples": len(d0), "prompts_cut": encoded.num_prompts_cut}

    return stage


def validation_score(ctx: Context, lm, role: str, n: int) -> float:
    """The paper's model selection on validation, greedy decoding, scored with `eval.scorer`: the
    win rate against the targets, or, for a scorer that measures closeness to the target (ROUGE-L),
    the mean score (a win rate against the target itself would always be 0)."""
    examples = ctx.splits.validation[:n]
    prompts, refs = [e.prompt for e in examples], [e.response for e in examples]
    texts, _, _ = sample_responses(
        ctx,
        lm,
        role,
        prompts,
        temperature=0.0,
        max_new_tokens=ctx.config.eval.max_new_tokens,
        seed=ctx.config.seed,
        desc="validation",
        stop=stop_strings(ctx, ctx.config.eval),
    )
    scorer = _scorer(ctx, ctx.config.eval)
    scores = scorer.score(prompts, texts, refs)
    if rewards.is_reference_based(scorer):
        return float(np.mean(scores))
    return rewards.win_rate(scores, scorer.score(prompts, refs, refs))


def _scorer(ctx: Context, cfg):
    return rewards.make_scorer(cfg.scorer, cfg.reward_model, cfg.batch_size)


def sample_stage(ctx: Context, stage_dir: str):
    """One teacher and one student sample per prompt of D. Each process samples every
    `process_count`-th prompt; a prompt's samples depend only on its index in D and the seed, so
    the pairs are the same on any number of processes."""
    teacher, student = (
        ctx.stage_model("sft_teacher", "teacher"),
        ctx.stage_model("sft_student", "student"),
    )
    everything = ctx.splits.d
    indices = list(range(jax.process_index(), len(everything), jax.process_count()))
    examples = [everything[i] for i in indices]
    prompts = [e.prompt for e in examples]
    cfg, seed = ctx.config.sample, ctx.config.seed
    common = dict(
        temperature=cfg.temperature,
        max_new_tokens=cfg.max_new_tokens,
        sample_ids=indices,
        stop=stop_strings(ctx, cfg),
    )
    t_texts, t_ids, t_logp = sample_responses(ctx, teacher, "teacher", prompts, seed=seed, **common)
    s_texts, s_ids, s_logp = sample_responses(
        ctx, student, "student", prompts, seed=seed + 1, **common
    )
    rows = [
        dict(
            prompt=e.prompt,
            reference=e.response,
            teacher=t,
            student=s,
            chosen="teacher",
            index=i,
            teacher_ids=ti,
            student_ids=si,
            teacher_logp=float(tl),
            student_logp=float(sl),
        )
        for i, e, t, s, ti, si, tl, sl in zip(
            indices, examples, t_texts, s_texts, t_ids, s_ids, t_logp, s_logp
        )
    ]
    stats = {}
    if ctx.config.pairs.real_ratio > 0:
        rows, stats = pairs.relabel(
            rows,
            _scorer(ctx, ctx.config.pairs),
            ctx.config.pairs.real_ratio,
            seed,
            population=len(everything),
        )
        stats = {k: v for k, v in stats.items() if k != "pairs"}  # this process's counts
    pairs.write_pairs(stage_dir, rows, jax.process_index())
    return {"pairs": len(everything), **stats}


def distill_stage(ctx: Context, stage_dir: str):
    cfg, method = ctx.config.distill, ctx.method
    student = with_lora(ctx, ctx.stage_model("sft_student", "student"), "student")
    teacher = None
    if method.shared_vocabulary:
        methods.check_shared_vocabulary(
            method, ctx.config, ctx.tokenizer("teacher"), ctx.tokenizer("student")
        )
    if "teacher" in method.frozen_models:
        teacher = ctx.stage_model("sft_teacher", "teacher")
    rows = pairs.read_pairs(ctx.path("sample"))
    if method.own_loop:
        return own_loop_distill(ctx, stage_dir, method, student, teacher, rows)
    summary = {}
    for round_ in range(cfg.rounds):
        if round_ > 0:  # iterative PLaD: new student samples from the student distilled so far
            rows = resampled_rows(ctx, student, rows, round_)
        batch_fn, n = method_batches(ctx, method, rows, cfg.batch_size)
        # A frozen reference is the student as it starts (LoRA: adapters at their start). A copy:
        # the train step donates the trainable params, which must not be the reference's buffers.
        reference = None
        if "reference" in method.frozen_models:
            reference = jax.tree.map(jnp.copy, student.params)
        tag = "" if cfg.rounds == 1 else f"-round{round_}"
        student, summary = train_model(
            ctx,
            student,
            stage_dir,
            cfg,
            method,
            batch_fn,
            n,
            teacher=teacher,
            reference=reference,
            tag=tag,
        )
    student.save_pretrained(os.path.join(stage_dir, "params"))
    exported = export_gguf(ctx, student, stage_dir)
    return {"method": method.name, "rounds": cfg.rounds, **summary, **exported}


def resampled_rows(ctx: Context, student, rows, round_: int):
    """The pair rows with a new student sample each, from `student` (iterative distillation)."""
    ids = [r["index"] if r["index"] is not None else i for i, r in enumerate(rows)]
    texts, _, _ = sample_responses(
        ctx,
        student,
        "student",
        [r["prompt"] for r in rows],
        sample_ids=ids,
        temperature=ctx.config.sample.temperature,
        max_new_tokens=ctx.config.sample.max_new_tokens,
        seed=ctx.config.seed + 100 * round_,
        desc=f"round {round_}",
        stop=stop_strings(ctx, ctx.config.sample),
    )
    return [{**r, "student": t, "chosen": "teacher"} for r, t in zip(rows, texts)]


def export_gguf(ctx: Context, student, stage_dir: str) -> dict:
    """`distill.export_gguf`: the distilled student as one GGUF file beside its safetensors."""
    dtype = ctx.config.distill.export_gguf
    if not dtype:
        return {}
    path = os.path.join(stage_dir, f"student-{dtype}.gguf")
    student.save_gguf(path, dtype, tokenizer=ctx.tokenizer("student"))
    logger.info("distill: student written as GGUF (%s) to %s", dtype, path)
    return {"gguf": path}


def own_loop_distill(ctx: Context, stage_dir: str, method: Method, student, teacher, rows):
    """A method that trains itself (`Method.own_loop`, PbKD's game): it gets the pairs, the
    distillation TrainConfig and, when `pairs.real_ratio` > 0, the pairs scorer to label fresh
    pairs."""
    d = ctx.config.data
    scorer = _scorer(ctx, ctx.config.pairs) if ctx.config.pairs.real_ratio > 0 else None
    student, summary = method.train_own(
        student,
        rows,
        teacher=teacher,
        workdir=stage_dir,
        train=ctx.config.distill,
        tokenizer=ctx.tokenizer("student"),
        max_prompt_tokens=d.max_prompt_tokens,
        max_response_tokens=d.max_response_tokens,
        scorer=scorer,
        seed=ctx.config.seed,
    )
    student.save_pretrained(os.path.join(stage_dir, "params"))
    return {"method": method.name, **summary, **export_gguf(ctx, student, stage_dir)}


def method_batches(ctx: Context, method: Method, rows, batch_size: int):
    """(batch_fn, number of rows) of the student's batches for `method`, from the pairs, as its
    `Method.batches` declares them (texts re-tokenized by the student)."""
    spec, prompts = method.batches, [r["prompt"] for r in rows]
    parts = {}  # batch key prefix -> encoding; every part's rows share their prompts
    if spec.responses:  # several sources: the rows of each, one after the other (a mix)
        texts = [text for source in spec.responses for text in _texts(rows, source)]
        parts["response"] = ctx.encode("student", prompts * len(spec.responses), texts)
    if spec.pairs:
        parts["pos"] = ctx.encode("student", prompts, _texts(rows, "chosen"))
        parts["neg"] = ctx.encode("student", prompts, _texts(rows, "rejected"))
    if spec.reference:
        parts["ref"] = ctx.encode("student", prompts, [method.reference_text(r) for r in rows])
    return parts_batches(parts, batch_size), len(next(iter(parts.values())))


def _texts(rows, source: str) -> list[str]:
    """One text per pair row: target (the human reference), teacher, student, chosen, rejected."""
    if source == "target":
        return [r["reference"] for r in rows]
    if source == "chosen":
        return [r[r["chosen"]] for r in rows]
    if source == "rejected":
        return [r["student" if r["chosen"] == "teacher" else "teacher"] for r in rows]
    return [r[source] for r in rows]


def parts_batches(parts: dict, batch_size: int):
    """Batches of the same rows of several encodings: `<prefix>_ids` / `<prefix>_mask` of each
    part's responses, and the prompts (the first part's)."""

    def batch_fn(rows):
        batch = {}
        for prefix, encoded in parts.items():
            b = data.make_batch(encoded, rows, num_rows=batch_size)
            if not batch:
                batch.update(prompt_ids=b["prompt_ids"], prompt_mask=b["prompt_mask"])
            batch.update({f"{prefix}_ids": b["response_ids"], f"{prefix}_mask": b["response_mask"]})
        return batch

    return batch_fn


def eval_stage(ctx: Context, stage_dir: str):
    cfg = ctx.config.eval
    examples = ctx.splits.test[: cfg.num_examples] if cfg.num_examples else ctx.splits.test
    prompts, refs = [e.prompt for e in examples], [e.response for e in examples]
    responses = {}
    for name, stage, role in (
        ("teacher", "sft_teacher", "teacher"),
        ("initial student", "sft_student", "student"),
        ("distilled student", "distill", "student"),
    ):
        lm = ctx.stage_model(stage, role)
        responses[name], _, _ = sample_responses(
            ctx,
            lm,
            role,
            prompts,
            temperature=cfg.temperature,
            max_new_tokens=cfg.max_new_tokens,
            seed=ctx.config.seed,
            desc=f"eval {name}",
            stop=stop_strings(ctx, cfg),
        )
    scorer = _scorer(ctx, cfg)
    metrics = evaluate.evaluate_responses(prompts, responses, refs, scorer, teacher="teacher")
    rows = pairs.read_pairs(ctx.path("sample"))
    metrics["teacher_student_win_rate"] = evaluate.teacher_student_win_rate(
        [r["teacher"] for r in rows],
        [r["student"] for r in rows],
        [r["prompt"] for r in rows],
        scorer,
        references=[r["reference"] for r in rows],
    )
    curves = {}
    for stage in ("sft_teacher", "sft_student", "distill"):
        path = ctx.path(stage, "curve.json")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                curves[stage] = [tuple(x) for x in json.load(f)]
    evaluate.write_report(stage_dir, metrics, curves, process_index=jax.process_index())
    if (
        jax.process_index() == 0
    ):  # every model's text per test prompt, for per-row analysis after the run
        from etils import epath  # local or gs://, as the report

        epath.Path(stage_dir, "responses.jsonl").write_text(
            "".join(
                json.dumps(
                    {
                        "prompt": p,
                        "reference": r,
                        **{name: texts[i] for name, texts in responses.items()},
                    }
                )
                + "\n"
                for i, (p, r) in enumerate(zip(prompts, refs))
            )
        )
    return {
        name: {"win_rate": m.get("win_rate"), "mean_score": m.get("mean_score")}
        for name, m in metrics.get("models", {}).items()
    }


STAGE_FUNCTIONS = {
    "sft_teacher": _sft_stage("teacher"),
    "sft_student": _sft_stage("student"),
    "sample": sample_stage,
    "distill": distill_stage,
    "eval": eval_stage,
}
