"""A controlled extraction task with an exact reward, for `bench/efficacy.py`.

Each example is a short "record": a few people, each described by 2-4 facts written as varied
natural-ish sentences (several phrasings per attribute), all sentences shuffled together. The
instruction asks for two of one person's attributes; the gold answer lists them in the order asked:

    prompt:   "RECORD: Ada is 41 years old. The home town of Bruno is Oslo. Ada works as a baker.
               ... \\nQUESTION: give the job and age of Ada.\\nANSWER:"
    response: " job: baker; age: 41"

Solving it needs reading comprehension of a kind a small model finds hard: find the sentences about
the right person among distractors about the others (same attributes, other values), map each
phrasing to its attribute, and copy the value. A larger model learns it faster, so after SFT the
teacher is clearly better than the student; the reward is exact.

Reward (`FieldF1Scorer`, scorer name `field_f1`): parse the response and the gold as
`key: value` items separated by `;` (case and surrounding spaces ignored, the first value of a
repeated key kept), and take the F1 of the (key, value) pairs: precision = correct pairs / pairs
given, recall = correct pairs / pairs asked. 1.0 exactly when every asked field is right and
nothing else is given; 0.5 for one of two right and nothing extra; 0 for unparseable text. The gold
scores 1.0 by construction, so no response can beat it: "win rate against the reference" for this
reward is the share of prompts where the response ties the gold (reward 1, an exact match).

The pipeline reaches the scorer through `eval.scorer=python`,
`eval.reward_model=bench.extraction:FieldF1Scorer` (`plad_jax.scoring.rewards.python_scorer`), and
likewise for `pairs.*` in real-pair relabelling."""

from __future__ import annotations

import json
import random

import numpy as np

NAMES = (
    "Ada Bruno Chen Dara Elif Femi Gus Hana Ivo Jun Kofi Lena Milo Nia Omar Pia Quin Rosa Sami "
    "Tara Uma Vic Wen Xena Yuri Zoe Abel Bea Cyd Dov Eva Finn Gia Hugo Ines Jax Kai Lola Mats Noor"
).split()
CITIES = (
    "Oslo Lima Cairo Delhi Paris Rome Quito Seoul Tunis Accra Dakar Hanoi Kyiv Lagos Minsk Riga "
    "Sofia Tokyo Vienna Zagreb Porto Bern Dublin Havana"
).split()
JOBS = (
    "baker nurse pilot farmer tailor judge miner poet chemist plumber teacher dentist sailor "
    "painter butcher clerk"
).split()
PETS = "cat dog parrot rabbit turtle hamster goat pony snake ferret".split()
COLORS = "red blue green yellow purple orange black white grey pink".split()

ATTRIBUTES = {
    "city": (
        CITIES,
        ("{n} lives in {v}.", "The home town of {n} is {v}.", "{n} moved to {v} last year."),
    ),
    "job": (
        JOBS,
        ("{n} works as a {v}.", "By trade {n} is a {v}.", "{n} earns a living as a {v}."),
    ),
    "age": (
        None,
        ("{n} is {v} years old.", "The age of {n} is {v}.", "{n} turned {v} this spring."),
    ),
    "pet": (PETS, ("{n} has a pet {v}.", "{n} keeps a {v} at home.", "The pet of {n} is a {v}.")),
    "color": (
        COLORS,
        (
            "{n} likes the colour {v}.",
            "The favourite colour of {n} is {v}.",
            "{n} always wears {v}.",
        ),
    ),
}
QUESTION = "\nQUESTION: give the {a} and {b} of {n}.\nANSWER:"


def make_example(rng: random.Random, people: int = 2, facts: tuple[int, int] = (2, 3)) -> dict:
    """One record, question and gold answer (`prompt`, `response`)."""
    names = rng.sample(NAMES, people)
    sentences, known = [], {}
    for name in names:
        attrs = rng.sample(sorted(ATTRIBUTES), rng.randint(*facts))
        known[name] = {}
        for attr in attrs:
            values, templates = ATTRIBUTES[attr]
            value = str(rng.randint(18, 79)) if values is None else rng.choice(values)
            known[name][attr] = value
            sentences.append(rng.choice(templates).format(n=name, v=value))
    rng.shuffle(sentences)
    target = rng.choice(names)
    a, b = rng.sample(sorted(known[target]), 2)
    prompt = "RECORD: " + " ".join(sentences) + QUESTION.format(a=a, b=b, n=target)
    return {"prompt": prompt, "response": f" {a}: {known[target][a]}; {b}: {known[target][b]}"}


def make_examples(n: int, seed: int = 0, **kw) -> list[dict]:
    rng = random.Random(seed)
    return [make_example(rng, **kw) for _ in range(n)]


def write_jsonl(path, n: int, seed: int = 0, **kw) -> str:
    """`n` examples as jsonl rows with `prompt` and `response` (the `jsonl` task's default
    fields)."""
    with open(path, "w", encoding="utf-8") as f:
        for row in make_examples(n, seed, **kw):
            f.write(json.dumps(row) + "\n")
    return str(path)


def parse_fields(text: str) -> dict[str, str]:
    """`key: value; key: value` -> {key: value}, lowercased and stripped; first value of a key
    wins."""
    out = {}
    for item in (text or "").split(";"):
        key, sep, value = item.partition(":")
        key, value = key.strip().lower(), value.strip().lower().rstrip(".")
        if sep and key and value and key not in out:
            out[key] = value
    return out


def field_f1(response: str, reference: str) -> float:
    """F1 of the (key, value) pairs of `response` against those of `reference` (see the module
    doc)."""
    got, gold = parse_fields(response), parse_fields(reference)
    if not got or not gold:
        return 0.0
    correct = sum(1 for k, v in got.items() if gold.get(k) == v)
    if correct == 0:
        return 0.0
    precision, recall = correct / len(got), correct / len(gold)
    return 2 * precision * recall / (precision + recall)


class FieldF1Scorer:
    """The exact reward as a `plad_jax.scoring.rewards.Scorer`: `field_f1(response, reference)` per
    row."""

    name = "field_f1"
    reference_based = True  # closeness to the gold; the gold itself scores 1.0

    def score(self, prompts, responses, references=None) -> np.ndarray:
        if references is None:
            raise ValueError(
                "field_f1 compares each response with its gold answer; these rows have none"
            )
        if not len(prompts) == len(responses) == len(references):
            raise ValueError(
                f"{len(prompts)} prompts, {len(responses)} responses, {len(references)} references"
            )
        return np.array([field_f1(r, g) for r, g in zip(responses, references)], np.float64)
