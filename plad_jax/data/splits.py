"""The paper's splits: the train split halved into D0 (SFT) and D (distillation prompts).

Every choice is by a content hash, so it is the same on every machine and does not depend on the
order in which a source lists its rows:

1. Held-out splits the source lacks are carved from train first, with a fixed salt (independent
   of the seed, so every seed is evaluated on the same examples): `test_size`, then
   `validation_size`, each a count or a fraction of train.
2. The rest is ordered by `hash(seed, example)`; the first half is D0, the second D (D0 gets the
   odd one).
3. `max_*` limits keep that many of each split, the first ones in hash order: a seeded random
   subset of D0 and D, a seed-free one of validation and test (every seed sees the same).

Each split lists its examples in the source's order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Mapping, Sequence

from plad_jax.data.example import DataError, Example

logger = logging.getLogger(__name__)

HELDOUT_SALT = "plad_jax/heldout"


@dataclasses.dataclass(frozen=True)
class Splits:
    d0: list[Example]  # SFT of teacher and student
    d: list[Example]  # distillation: prompts (responses kept as references)
    validation: list[Example]  # checkpoint choice
    test: list[Example]  # evaluation

    def sizes(self) -> dict[str, int]:
        return {f.name: len(getattr(self, f.name)) for f in dataclasses.fields(self)}


def split_examples(
    task_splits: Mapping[str, Sequence[Example]],
    *,
    seed: int = 0,
    test_size: float = 0.1,
    validation_size: float = 0.05,
    max_d0: int | None = None,
    max_d: int | None = None,
    max_validation: int | None = None,
    max_test: int | None = None,
) -> Splits:
    """D0, D, validation and test from a task's `train` (and `validation` / `test` when present)."""
    train = list(task_splits["train"])
    order = hash_order(train, HELDOUT_SALT)
    carved = {}
    for name, size in (("test", test_size), ("validation", validation_size)):
        if name in task_splits:
            carved[name] = list(task_splits[name])
            continue
        count = _count(size, len(train), name)
        carved[name], order = sorted(order[:count]), order[count:]
        carved[name] = [train[i] for i in carved[name]]
    if len(order) < 2:
        raise DataError(
            f"the train split has {len(train)} examples, too few to halve into D0 and D "
            f"after carving test/validation; lower data.test_size / data.validation_size"
        )
    rest = [train[i] for i in sorted(order)]
    halves = hash_order(rest, f"plad_jax/halves/{seed}")
    cut = len(rest) - len(rest) // 2
    d0 = [rest[i] for i in sorted(halves[:cut])]
    d = [rest[i] for i in sorted(halves[cut:])]
    splits = Splits(
        limit(d0, max_d0, f"plad_jax/limit/{seed}"),
        limit(d, max_d, f"plad_jax/limit/{seed}"),
        limit(carved["validation"], max_validation, HELDOUT_SALT),
        limit(carved["test"], max_test, HELDOUT_SALT),
    )
    logger.info(
        "splits (seed %d): %s", seed, ", ".join(f"{k} {v}" for k, v in splits.sizes().items())
    )
    return splits


def hash_order(examples: Sequence[Example], salt: str) -> list[int]:
    """Indices of `examples` sorted by a hash of (salt, prompt, response); ties by index."""

    def key(i):
        text = f"{salt}\0{examples[i].prompt}\0{examples[i].response}".encode(
            "utf-8", "surrogatepass"
        )
        return hashlib.blake2b(text, digest_size=8).digest(), i

    return sorted(range(len(examples)), key=key)


def limit(examples: Sequence[Example], max_examples: int | None, salt: str) -> list[Example]:
    """At most `max_examples`: the first in salted hash order, listed in their original order."""
    if max_examples is None or max_examples >= len(examples):
        return list(examples)
    if max_examples < 0:
        raise DataError(f"a max examples limit must be >= 0, got {max_examples}")
    keep = sorted(hash_order(examples, salt)[:max_examples])
    return [examples[i] for i in keep]


def _count(size: float, total: int, name: str) -> int:
    """A count (int >= 1 or 0) or a fraction in (0, 1) of `total`, rounded."""
    if (
        isinstance(size, bool)
        or size < 0
        or (isinstance(size, float) and size >= 1 and not size.is_integer())
    ):
        raise DataError(
            f"data.{name}_size={size!r}: give a count (0, 1, 2, ...) or a fraction in (0, 1)"
        )
    count = round(size * total) if 0 < size < 1 else int(size)
    if count >= total:
        raise DataError(
            f"data.{name}_size={size!r} would take {count} of the {total} train examples; lower it"
        )
    return count
