"""Preference data for PbKD: (prompt, chosen, rejected) rows from the pair rows of
`plad_jax.data.pairs`.

A pair row holds one prompt with a teacher sample and a student sample. Its label says which is
preferred, from one of two sources:

- a scorer (`plad_jax.scoring.rewards`: ROUGE-L against the reference, a transformers reward model,
  or a JAX reward model via `reward_model.as_scorer`): `label_pairs(rows, scorer)` scores every
  pair with `pairs.relabel` (real_ratio 1) and prefers the student only where it scores strictly
  higher;
- pseudo-labels: the teacher is preferred (`chosen = "teacher"`, what `pairs.build_pairs` and the
  sample stage write); `label_pairs(rows, None)` keeps each row's stored label, so rows the sample
  stage already relabelled keep that label.

`preference_rows` turns labelled rows into `{"prompt", "chosen", "rejected", "reference"}` texts,
and `encode_preferences` tokenizes them for a model that reads the student's vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence

from plad_jax import data
from plad_jax.data import pairs


def label_pairs(rows: Sequence[dict], scorer=None, *, seed: int = 0) -> tuple[list[dict], dict]:
    """`(rows, stats)`: every pair scored by `scorer` (None: the stored labels, teacher by default).

    stats: `{"pairs", "scored", "swapped"}` (`swapped` counts rows whose student is preferred).
    The input rows are not modified.
    """
    if scorer is not None:
        return pairs.relabel(rows, scorer, 1.0, seed)
    rows = [dict(r) for r in rows]
    swapped = sum(r.get("chosen", "teacher") == "student" for r in rows)
    return rows, {"pairs": len(rows), "scored": 0, "swapped": swapped}


def preference_rows(rows: Sequence[dict]) -> list[dict]:
    """`{"prompt", "chosen", "rejected", "reference"}` text rows from labelled pair rows."""
    prompts, chosen, rejected = pairs.preference_texts(rows)
    return [
        {"prompt": p, "chosen": c, "rejected": r, "reference": row.get("reference") or ""}
        for p, c, r, row in zip(prompts, chosen, rejected, rows)
    ]


def encode_preferences(
    tokenizer, prefs: Sequence[dict], max_prompt_tokens: int, max_response_tokens: int
) -> tuple[data.EncodedExamples, data.EncodedExamples]:
    """`(chosen, rejected)` encodings sharing their prompts (`data.encode_texts` rules: prompt cut
    from the left, response + EOS cut to `max_response_tokens`)."""
    prompts = [p["prompt"] for p in prefs]
    encode = lambda key: data.encode_texts(
        tokenizer, prompts, [p[key] for p in prefs], max_prompt_tokens, max_response_tokens
    )
    return encode("chosen"), encode("rejected")
