"""The real-weights track of `bench/efficacy.py` (`--track real`): does distillation make a real
student better, at the paper's budget shape, with each method tuned on validation?

Teacher: SmolLM2-135M-Instruct (`python -m plad_jax.fetch smollm2-135m-instruct`; 30 LLaMA blocks),
LoRA-SFT'd on D0 with its best checkpoint on validation (the `docstrings_smollm2` preset's recipe).
Student: `depth` blocks spread evenly through the teacher's (`even_blocks`; same tokenizer,
embeddings, final norm and head), fully SFT'd on D0. Both are trained once per task (seed 0) and
shared by every seed: the seeds vary the sampled pairs and the distillation (its data order and
dropout), which is what a method's gain depends on.

Budget (`RealSize`): D0 and D of equal size; distillation is `distill_epochs` epochs of D at one
batch size for every method, so every method takes the same number of optimizer steps from the
same initial student, pairs and seed. Each method is declared with its fixed knob (PLaD beta, score
and CE anchor, DPO beta, KD temperature) and a grid of learning rates of the same size for every
method (`GRID`); the grid point is chosen on the validation split (`eval.split=validation`) of the
first seed, and only the chosen setting is run on the test split, for every seed. The test data
are never evaluated before a setting is chosen.

Every evaluation is one ledger row (`ledger.jsonl`: task, seed, method, grid point, split and the
metrics), appended and flushed as soon as it is measured; a killed run started again with the same
`--out` skips every row the ledger holds, so the run spans sessions. The shared SFT models are
retrained when a new machine resumes (their folders are not committed), and XLA compiles for the
host's CPU, so another CPU can train different ones from the same settings: `shared.json` records
a digest of the models each task's rows were measured with and the host that trained them, and a
resume whose models differ stops with a one-line error instead of mixing the two. The teacher's
and the initial student's evaluations are answered from the sampling memo of `bench/efficacy.py`
after their first fork (greedy decoding and calibration samples are pure functions of weights,
prompts and seed).

`--quick` runs the same code on a random 4-block LLaMA teacher written as a GGUF with a byte-level
BPE tokenizer trained on the task's text (the real file's format and path through `fetch`-style
loading), a 2-block student cut from it, tiny splits and two methods: it checks that the track runs,
resumes from its ledger and writes sane numbers, not which method wins.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import shutil
import time

from bench import efficacy as eff
from bench import extraction
from plad_jax.errors import UserError

PRESET = "docstrings_smollm2"
SMOLLM2 = "fetch:smollm2-135m-instruct"
TASKS = ("demo", "extraction")


def even_blocks(depth: int, total: int) -> tuple[int, ...]:
    """`depth` block indices spread evenly over `total` (6 of 30: 0, 5, 10, 15, 20, 25)."""
    if not 1 <= depth <= total:
        raise ValueError(f"student depth {depth} must be in 1..{total}")
    return tuple(i * total // depth for i in range(depth))


@dataclasses.dataclass(frozen=True)
class RealSize:
    """Splits, budget and sizes of one mode of the real track (both tasks)."""

    depth: int  # student blocks, cut evenly from the teacher's
    d0: int  # = D: the train split's two halves, equal
    validation: int
    test: int
    batch: int  # every SFT and distillation step
    teacher_epochs: int
    student_epochs: int
    distill_epochs: int
    calibration_samples: int  # K per test prompt
    teacher_blocks: int = 30
    max_steps: int | None = None  # quick: caps every stage's steps
    checkpoint_every: int = 16  # the teacher's validation checkpoints


# Full. Depth 12 of 30 (the sizing probe, bench/results/efficacy-real/probe.json: 6, 8 and 12
# blocks after 3 epochs of D0 = 256, 48 steps, all reach ROUGE-L ~0.1 on validation against the
# teacher's 0.276; 12 has the lowest SFT loss and writes summaries of the right form ("Return a
# string for a string.") where 8 still falls into repetitions ("Return a the Returns a a a a ...").
# Budget for the 4-hour bound on the 2-core CPU, where a training step is compute-bound (about
# 0.13 TFLOP/s; a 16-row step of the 12-block student on 128-token prompts takes 8-14 s): D0 = D =
# 128 at batch 8, so distillation is still 16 optimizer steps; the student's SFT is 6 epochs of D0
# (96 steps: the same 768 examples the probe's student saw), the teacher's one epoch (LoRA).
REAL = RealSize(
    depth=12,
    d0=128,
    validation=48,
    test=64,
    batch=8,
    teacher_epochs=1,
    student_epochs=6,
    distill_epochs=1,
    calibration_samples=4,
)
QUICK_REAL = RealSize(
    depth=2,
    d0=32,
    validation=8,
    test=8,
    batch=8,
    teacher_epochs=1,
    student_epochs=1,
    distill_epochs=1,
    calibration_samples=2,
    teacher_blocks=4,
    max_steps=2,
    checkpoint_every=2,
)

# Each method: its fixed settings (at most one knob besides the learning rate) and the grid of
# learning rates, the same size for every method. PLaD variants are separate rows so the table
# shows what the CE anchor and the score normalisation do. The grid starts at 3e-4: in a first run
# at (1e-4, 3e-4), 16 steps at 1e-4 left every greedy answer of the extraction student unchanged
# (sft, seqkd and kd all at the initial student's validation F1, 0.062).
GRID = (3e-4, 1e-3)
REAL_METHODS = {
    "sft": ["distill.method=sft"],
    "seqkd": ["distill.method=seqkd"],
    "kd": ["distill.method=kd", "distill.kd_temperature=1.0"],
    "minillm": ["distill.method=minillm"],
    "dpo": ["distill.method=dpo", "distill.beta=0.1"],
    "plad_rank": ["distill.method=plad_rank", "distill.beta=1.0"],
    "plad_rank_ce": ["distill.method=plad_rank", "distill.alpha=1.0"],
    "plad_rank_ce_sum": ["distill.method=plad_rank", "distill.alpha=1.0", "distill.score=sum"],
    "plad_margin_ce": ["distill.method=plad_margin", "distill.alpha=1.0"],
}
QUICK_REAL_METHODS = ("kd", "plad_rank_ce")


def fingerprint(*parts) -> str:
    """A short digest of what a measurement depends on (sizes, grid, a method's settings): ledger
    rows and run folders of another configuration are never reused."""
    text = json.dumps([dataclasses.asdict(p) if dataclasses.is_dataclass(p) else p for p in parts])
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def grid_point(method: str, index: int) -> list[str]:
    return REAL_METHODS[method] + [f"distill.learning_rate={GRID[index]}"]


def describe(method: str, index: int) -> str:
    """The chosen setting as the table shows it: the fixed knobs and the learning rate."""
    knobs = [s.split(".", 1)[1] for s in REAL_METHODS[method] if not s.startswith("distill.method")]
    return " ".join(knobs + [f"lr={GRID[index]:g}"])


def base_overrides(task, size: RealSize, seed: int, teacher: str, data_path: str | None) -> list:
    """`--set` items over the `docstrings_smollm2` preset for this task, size and seed."""
    steps = [f"{s}.max_steps={size.max_steps or 'none'}" for s in ("sft_teacher", "sft_student")]
    sets = [
        f"seed={seed}",
        f"teacher.path={teacher}",
        f"student.path={teacher}",
        f"student.layers={json.dumps(list(even_blocks(size.depth, size.teacher_blocks)))}",
        f"data.max_d0={size.d0}",
        f"data.max_d={size.d0}",
        f"data.max_validation={size.validation}",
        f"data.max_test={max(size.test, size.validation)}",
        f"eval.num_examples={size.test}",
        f"sft_teacher.epochs={size.teacher_epochs}",
        f"sft_student.epochs={size.student_epochs}",
        f"sft_teacher.validation_examples={size.validation}",
        f"sft_teacher.checkpoint_every={size.checkpoint_every}",
        f"sft_student.checkpoint_every={size.checkpoint_every}",
        f"distill.epochs={size.distill_epochs}",
        f"distill.max_steps={size.max_steps or 'none'}",
        f"distill.checkpoint_every={size.checkpoint_every}",
        "distill.alpha=0.0",  # the preset's CE anchor; the methods that want it set it
        *steps,
    ]
    sets += [f"{s}.batch_size={size.batch}" for s in ("sft_teacher", "sft_student", "distill")]
    if task == "extraction":
        sets += [
            "data.task=jsonl",
            f"data.path={data_path}",
            "data.max_response_tokens=24",
            "eval.scorer=python",
            f"eval.reward_model={eff.SCORER_SPEC}",
            "pairs.scorer=python",
            f"pairs.reward_model={eff.SCORER_SPEC}",
        ]
    return sets


def _link(src: str, dst: str):
    """copytree's copy function: model weights (never written again once their stage is done)
    are hard-linked, everything else copied (a stage may rewrite a log or config in place)."""
    if f"{os.sep}params{os.sep}" in src:
        os.link(src, dst)
    else:
        shutil.copy2(src, dst)


class SharedModelsError(UserError):
    """This host trained shared SFT models other than those the ledger's rows were measured with."""


def host() -> str:
    """The CPU this process runs on, as XLA compiles for it: model name, family and model
    numbers, AVX-512 or not, cores."""
    info = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                name, _, value = line.partition(":")
                info.setdefault(name.strip(), value.strip())
    except OSError:
        pass
    model = info.get("model name") or platform.processor() or platform.machine()
    ident = f"family {info['cpu family']} model {info['model']}, " if "cpu family" in info else ""
    isa = "AVX-512" if "avx512f" in info.get("flags", "").split() else "no AVX-512"
    return f"{model} ({ident}{isa}, {os.cpu_count()} cores)"


def models_digest(run_dir: str, stages=("sft_teacher", "sft_student")) -> str:
    """sha256 over every file of the stages' saved weights (`<stage>/params`), in path order."""
    digest = hashlib.sha256()
    for stage in stages:
        params = os.path.join(run_dir, stage, "params")
        for name in sorted(os.listdir(params)):
            digest.update(f"{stage}/{name}".encode())
            with open(os.path.join(params, name), "rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    digest.update(block)
    return digest.hexdigest()[:16]


def check_shared_models(out: str, name: str, task: str, digest: str, ledger) -> None:
    """Record in `out/shared.json` which shared SFT models (`digest`) task folder `name` is
    measured with; if the ledger already holds rows of `task` measured with other models, raise
    SharedModelsError (the file and the ledger are left as they are)."""
    path = os.path.join(out, "shared.json")
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except FileNotFoundError:
        record = {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SharedModelsError(f"{path} is not valid JSON ({e}); fix or remove it") from None
    mine, seen = {"digest": digest, "host": host()}, record.get(name)
    if seen is not None and seen.get("digest") == digest:
        return
    if seen is not None and any(k[0] == task for k in ledger.rows):
        raise SharedModelsError(
            f"{path}: the {task} rows of ledger.jsonl were measured with shared SFT models "
            f"{seen.get('digest')} trained on {seen.get('host')}; this host ({mine['host']}) "
            f"trained {digest} from the same settings (XLA's CPU code can differ by host), so "
            f"these rows cannot be extended: resume on a host like the first, or delete the "
            f"{task} rows from ledger.jsonl to measure the task again"
        )
    record[name] = mine
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(path + ".tmp", path)


class Ledger:
    """`ledger.jsonl` under the output folder: one row per (task, seed, method, point, split),
    appended and fsync'ed as soon as it is measured; a restarted run skips what it holds. Each row
    carries the `fingerprint` of the sizes and the method's settings it was measured with (a row
    of another configuration stays in the file but is never used) and the host that measured it."""

    def __init__(self, path: str):
        self.path, self.rows = path, {}
        if not os.path.exists(path):
            return
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
        good = []
        for line in lines:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill: measured again
            self.rows[self.key(**row["key"], config=row.get("config"))] = row
            good.append(line)
        if len(good) != len(lines):  # rewrite without the cut line before appending
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                f.write("".join(line + "\n" for line in good))
            os.replace(path + ".tmp", path)

    @staticmethod
    def key(task, seed, method, point, split, config):
        return (task, int(seed), method, int(point), split, config)

    def get(self, config: str, **key):
        return self.rows.get(self.key(**key, config=config))

    def add(self, key: dict, config: str, models: dict, setting: str, seconds: float):
        row = {
            "key": key,
            "config": config,
            "setting": setting,
            "seconds": seconds,
            "host": host(),
            "models": models,
        }
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.rows[self.key(**key, config=config)] = row
        return row


def eval_models(task, seed, method, eval_dir, seconds) -> dict:
    """The bench row (efficacy.model_row) of each of the three models in one eval stage."""
    return {
        name: eff.model_row(task, seed, method, eval_dir, name, seconds)
        for name in ("teacher", "initial student", "distilled student")
    }


class RealTrack:
    """The runs of one task: the shared SFT models, one base per seed, one fork per setting."""

    def __init__(self, task, size: RealSize, out, teacher, data_path, ledger: Ledger, log):
        self.task, self.size, self.out, self.teacher = task, size, out, teacher
        self.data_path, self.ledger, self.log = data_path, ledger, log
        self.root = os.path.join(out, "runs", f"{task}-{fingerprint(size)}")
        self.bases, self.checked = {}, False

    def sets(self, seed: int) -> list[str]:
        return base_overrides(self.task, self.size, seed, self.teacher, self.data_path)

    def shared(self) -> str:
        """sft_teacher and sft_student, once per task (seed 0)."""
        run_dir = os.path.join(self.root, "shared")
        t0 = time.perf_counter()
        eff.run_stages(self.sets(0), run_dir, ("sft_teacher", "sft_student"), preset=PRESET)
        self.log(f"{self.task}: teacher and student SFT ready ({time.perf_counter() - t0:.0f} s)")
        return run_dir

    def base(self, seed: int) -> str:
        """The seed's run with the shared SFT models and its own sampled pairs."""
        if seed in self.bases:
            return self.bases[seed]
        shared, run_dir = self.shared(), os.path.join(self.root, f"seed{seed}", "base")
        if not self.checked:  # the rows about to be added must be measured with the ledger's models
            name, digest = os.path.basename(self.root), models_digest(shared)
            check_shared_models(self.out, name, self.task, digest, self.ledger)
            self.checked = True
        for stage in ("sft_teacher", "sft_student", "tokenizer"):
            src, dst = os.path.join(shared, stage), os.path.join(run_dir, stage)
            if os.path.isdir(src) and not os.path.exists(dst):
                shutil.copytree(
                    src, dst, ignore=shutil.ignore_patterns("checkpoints*"), copy_function=_link
                )
        eff.run_stages(self.sets(seed), run_dir, ("sample",), preset=PRESET)
        self.bases[seed] = run_dir
        return run_dir

    def evaluate(self, seed, method, point, split) -> dict:
        """One ledger row: distil `method` at grid `point` on the seed's base, evaluate on
        `split`. A validation run keeps its distilled student, so the chosen point's test
        evaluation on the same seed reuses it instead of distilling again."""
        key = dict(task=self.task, seed=seed, method=method, point=point, split=split)
        config = self.config(method, point)
        done = self.ledger.get(config, **key)
        if done is not None:
            return done
        base = self.base(seed)
        run_dir = self.fork_dir(seed, method, point)
        t0 = time.perf_counter()
        if not os.path.exists(os.path.join(run_dir, "distill", "DONE")):
            shutil.rmtree(run_dir, ignore_errors=True)
            shutil.copytree(
                base, run_dir, ignore=shutil.ignore_patterns("checkpoints*"), copy_function=_link
            )
            sets = self.sets(seed) + grid_point(method, point)
            eff.run_stages(sets, run_dir, ("distill",), preset=PRESET)
        shutil.rmtree(os.path.join(run_dir, "eval"), ignore_errors=True)
        eff.run_stages(self.eval_sets(seed, method, point, split), run_dir, ("eval",), PRESET)
        seconds = time.perf_counter() - t0
        models = eval_models(self.task, seed, method, os.path.join(run_dir, "eval"), seconds)
        row = self.ledger.add(key, config, models, describe(method, point), seconds)
        reward = models["distilled student"]["reward"]
        where = f"{self.task} seed {seed} {method} [{describe(method, point)}] {split}"
        self.log(f"{where}: reward {reward:.3f} ({seconds:.0f} s)")
        return row

    def config(self, method: str, point: int) -> str:
        """The fingerprint of a ledger row: sizes, the method's settings at this grid point."""
        return fingerprint(self.size, grid_point(method, point))

    def fork_dir(self, seed: int, method: str, point: int) -> str:
        return os.path.join(
            self.root, f"seed{seed}", f"{method}-{point}-{self.config(method, point)}"
        )

    def eval_sets(self, seed, method, point, split) -> list[str]:
        k = self.size.calibration_samples if split == "test" else 0
        return (
            self.sets(seed)
            + grid_point(method, point)
            + [
                f"eval.split={split}",
                f"eval.calibration_samples={k}",
                f"eval.num_examples={self.size.test if split == 'test' else self.size.validation}",
            ]
        )

    def select(self, method: str, seed: int) -> int:
        """The grid point with the best mean validation reward on `seed` (ties: the first)."""
        rewards = [
            self.evaluate(seed, method, i, "validation")["models"]["distilled student"]["reward"]
            for i in range(len(GRID))
        ]
        chosen = max(range(len(GRID)), key=lambda i: (rewards[i], -i))
        for i in range(len(GRID)):  # disk: only the chosen point's student is read again
            if i != chosen:
                shutil.rmtree(self.fork_dir(seed, method, i), True)
        return chosen

    def test(self, method: str, seeds) -> list[dict]:
        """Bench rows of `method` at its validation-chosen point on the test split, per seed."""
        chosen, rows = self.select(method, seeds[0]), []
        for seed in seeds:
            row = self.evaluate(seed, method, chosen, "test")
            shutil.rmtree(self.fork_dir(seed, method, chosen), True)
            rows.append(dict(row["models"]["distilled student"], chosen=row["setting"]))
        return rows


def probe(out, depths, *, quick, log) -> list[dict]:
    """The sizing probe: students of several depths cut from the teacher and SFT'd on D0 as the
    track does (the teacher is the track's own shared one), each with the teacher's greedy answers
    on the validation prompts: mean reward, T-S WR, the SFT loss and two answers to read."""
    from plad_jax import config as cfg
    from plad_jax import fetch
    from plad_jax.pipeline.context import Context
    from plad_jax.scoring import evaluate

    size = QUICK_REAL if quick else REAL
    data_path = extraction_data(out, size)
    track = RealTrack("demo", size, out, teacher_path(out, quick, data_path), data_path, None, log)
    shared, rows = track.shared(), []
    for depth in depths:
        run_dir = os.path.join(track.root, f"probe-depth{depth}")
        src, dst = os.path.join(shared, "sft_teacher"), os.path.join(run_dir, "sft_teacher")
        if not os.path.exists(dst):
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoints*"))
        layers = f"student.layers={json.dumps(list(even_blocks(depth, size.teacher_blocks)))}"
        sets = track.sets(0) + [layers]
        t0 = time.perf_counter()
        eff.run_stages(sets, run_dir, ("sft_student",), preset=PRESET)
        ctx = Context(fetch.resolve_config(cfg.resolve(PRESET, sets, run_dir=run_dir)), run_dir)
        examples = ctx.splits.validation[: size.validation]
        prompts, refs = [e.prompt for e in examples], [e.response for e in examples]
        scorer, answers = ctx.scorer(ctx.config.eval), {}
        for stage, role in (("sft_teacher", "teacher"), ("sft_student", "student")):
            answers[role], _, _ = ctx.sample_responses(
                ctx.stage_model(stage, role),
                role,
                prompts,
                temperature=0.0,
                max_new_tokens=ctx.config.eval.max_new_tokens,
                seed=0,
                desc=f"probe {role}",
                stop=ctx.stop_strings(ctx.config.eval),
            )
        reward = {r: float(scorer.score(prompts, answers[r], refs).mean()) for r in answers}
        with open(ctx.path("sft_student", "curve.json"), encoding="utf-8") as f:
            curve = json.load(f)
        rows.append(
            {
                "depth": depth,
                "student_steps": curve[-1][0],
                "student_loss": curve[-1][1],
                "teacher_reward": reward["teacher"],
                "student_reward": reward["student"],
                "ts_wr": evaluate.teacher_student_win_rate(
                    answers["teacher"], answers["student"], prompts, scorer, references=refs
                ),
                "seconds": time.perf_counter() - t0,
                "examples": [
                    {
                        "reference": refs[i],
                        "teacher": answers["teacher"][i],
                        "student": answers["student"][i],
                    }
                    for i in range(2)
                ],
            }
        )
        log(f"probe depth {depth}: {json.dumps({k: v for k, v in rows[-1].items()})}")
    return rows


def reference_rows(ledger: Ledger, task: str, seeds, configs) -> list[dict]:
    """Teacher and initial-student rows per seed, from any test evaluation of that seed measured
    with one of `configs` (this run's fingerprints)."""
    rows = []
    for seed in seeds:
        test = [
            r
            for k, r in ledger.rows.items()
            if k[:2] == (task, seed) and k[4] == "test" and k[5] in configs
        ]
        if test:
            models = test[0]["models"]
            rows += [
                dict(models["teacher"], method="teacher"),
                dict(models["initial student"], method="initial student"),
            ]
    return rows


def quick_teacher(out: str, texts) -> str:
    """A random 4-block LLaMA (SmolLM2's shape family, tied embeddings) and a byte-level BPE
    tokenizer trained on `texts`, written as one GGUF the way the real teacher is stored."""
    path = os.path.join(out, "quick-teacher.gguf")
    if os.path.exists(path):
        return path
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from plad_jax.models import hf

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(texts, trainer)
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=specials[1], eos_token=specials[2], pad_token=specials[0]
    )
    lm = hf.init_model(
        {
            "model_type": "llama",
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": QUICK_REAL.teacher_blocks,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 512,
            "tie_word_embeddings": True,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        }
    )
    hf.save_gguf(lm, path + ".tmp", "f32", tokenizer)
    os.replace(path + ".tmp", path)
    return path


def extraction_data(out: str, size: RealSize) -> str:
    """The extraction task's records: enough for D0 = D = size.d0 and the held-out splits."""
    n = 2 * size.d0 + 10 * max(size.test, size.validation)
    path = os.path.join(out, "extraction-data", f"records-{n}.jsonl")
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        extraction.write_jsonl(path + ".tmp", n, seed=1234)
        os.replace(path + ".tmp", path)
    return path


def task_texts(data_path: str) -> list[str]:
    """Text for the quick teacher's tokenizer: both tasks' prompts and answers."""
    from plad_jax.data import demo_tokenizer_texts, docstring_examples

    with open(data_path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return demo_tokenizer_texts(docstring_examples()) + [
        t for r in rows for t in (r["prompt"], r["response"])
    ]


def teacher_path(out: str, quick: bool, data_path: str) -> str:
    if not quick:
        from plad_jax import fetch

        return fetch.resolve(SMOLLM2, "teacher.path")  # one-line error if not fetched yet
    return quick_teacher(out, task_texts(data_path))


def run(out, *, quick, seeds, tasks, methods, log) -> list[dict]:
    """Every task: each method selected on the first seed's validation, then tested on every
    seed; bench rows (efficacy.summarise's input) for the teacher, initial student and methods."""
    size = QUICK_REAL if quick else REAL
    data_path = extraction_data(out, size)
    teacher = teacher_path(out, quick, data_path)
    ledger, rows = Ledger(os.path.join(out, "ledger.jsonl")), []
    for task in tasks:
        track = RealTrack(task, size, out, teacher, data_path, ledger, log)
        method_rows = [r for m in methods for r in track.test(m, list(seeds))]
        configs = {track.config(m, i) for m in methods for i in range(len(GRID))}
        rows += reference_rows(ledger, task, seeds, configs) + method_rows
    return rows
