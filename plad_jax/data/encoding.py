"""Text -> token ids, with the special tokens each family expects and counted truncation.

- Prompt: the tokenizer's own special tokens around it, exactly as `tokenizer(prompt)` gives
  them: BOS first for LLaMA-class tokenizers, EOS last for T5 (the encoder input), none for
  GPT-2-style ones. A prompt longer than `max_prompt_tokens` (specials included) loses tokens
  from its LEFT, keeping the end (where TL;DR's `TL;DR:` and hh's last `Assistant:` sit); the
  special tokens stay. The number of cut prompts is returned and logged.
- Text is text: a special token's string inside the data (`</s>` in a Reddit post) is tokenized
  as ordinary characters (`split_special_tokens=True`), never as the control token.
- Response: tokenized alone without special tokens, then EOS appended (`add_eos`), then cut
  from the RIGHT to `max_response_tokens`. A cut response therefore has no EOS: the model is not
  taught to stop where the limit happened to fall.

Tokenizing the response alone is what a decoder-only model sees after its prompt for the usual
tokenizers when the response starts a new word (`" summary"`): GPT-2 BPE keeps the space as
`Ġsummary`, and LLaMA-style SentencePiece tokenizers (transformers >= 5, `legacy=False`) turn the
leading space into the word-start marker `▁summary`; T5 responses are a separate decoder
sequence anyway.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np

from plad_jax.data.example import Example

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EncodedExamples:
    """Token ids per example (int32, variable length) and what truncation did."""

    prompts: list[np.ndarray]
    responses: list[np.ndarray]
    num_prompts_cut: int = 0
    num_responses_cut: int = 0

    def __len__(self) -> int:
        return len(self.prompts)


def special_affixes(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a single text (e.g. ([bos], []) or ([],
    [eos]))."""
    probe = "a"
    plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    raise ValueError(
        f"cannot find the special tokens of {type(tokenizer).__name__}: "
        f"{plain} is not inside {full}"
    )


def encode_examples(
    tokenizer,
    examples: Sequence[Example],
    max_prompt_tokens: int,
    max_response_tokens: int,
    add_eos: bool = True,
) -> EncodedExamples:
    """Prompt and response ids of every example; see the module docstring for the rules."""
    return encode_texts(
        tokenizer,
        [e.prompt for e in examples],
        [e.response for e in examples],
        max_prompt_tokens,
        max_response_tokens,
        add_eos=add_eos,
    )


def encode_texts(
    tokenizer,
    prompts: Sequence[str],
    responses: Sequence[str],
    max_prompt_tokens: int,
    max_response_tokens: int,
    add_eos: bool = True,
) -> EncodedExamples:
    """`encode_examples` on parallel lists of prompts and responses."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    prefix, suffix = special_affixes(tokenizer)
    eos = []
    if add_eos:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"{type(tokenizer).__name__} has no EOS token; pass add_eos=False")
        eos = [int(tokenizer.eos_token_id)]
    return assemble(
        _tokenize(tokenizer, prompts),
        _tokenize(tokenizer, responses),
        prefix=prefix,
        suffix=suffix,
        eos=eos,
        max_prompt_tokens=max_prompt_tokens,
        max_response_tokens=max_response_tokens,
    )


def assemble(
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    *,
    prefix: Sequence[int],
    suffix: Sequence[int],
    eos: Sequence[int],
    max_prompt_tokens: int,
    max_response_tokens: int,
) -> EncodedExamples:
    """Plain ids -> model ids: prompts cut from the left inside their special tokens, responses +
    EOS cut right."""
    prefix, suffix, eos = list(prefix), list(suffix), list(eos)
    room = max_prompt_tokens - len(prefix) - len(suffix)
    if room < 1:
        raise ValueError(
            f"max_prompt_tokens={max_prompt_tokens} leaves no room next to the tokenizer's "
            f"{len(prefix) + len(suffix)} special tokens"
        )
    if max_response_tokens < 1:
        raise ValueError(f"max_response_tokens={max_response_tokens} must be at least 1")
    out_prompts, out_responses, prompts_cut, responses_cut, no_eos = [], [], 0, 0, 0
    for p, r in zip(prompt_ids, response_ids, strict=True):
        p = list(p)
        prompts_cut += len(p) > room
        out_prompts.append(np.asarray(prefix + p[max(0, len(p) - room) :] + suffix, np.int32))
        responses_cut += len(r) + len(eos) > max_response_tokens
        no_eos += max_response_tokens - len(eos) < len(r) <= max_response_tokens
        out_responses.append(np.asarray((list(r) + eos)[:max_response_tokens], np.int32))
    _log_cuts(
        len(out_prompts),
        prompts_cut,
        max_prompt_tokens,
        responses_cut - no_eos,
        no_eos,
        max_response_tokens,
    )
    return EncodedExamples(out_prompts, out_responses, prompts_cut, responses_cut)


def _log_cuts(
    n: int, prompts_cut: int, max_prompt: int, longer: int, no_eos: int, max_response: int
):
    """Say what happened: prompts cut, responses longer than the limit cut, and responses that fit
    but leave no room for EOS (typically samples that stopped at `max_new_tokens` unfinished)."""
    parts = (
        [f"cut {prompts_cut} of {n} prompts to their last {max_prompt} tokens"]
        if prompts_cut
        else []
    )
    if longer:
        parts.append(f"cut {longer} responses longer than {max_response} tokens to {max_response}")
    if no_eos:
        parts.append(
            f"{no_eos} responses fill all {max_response} tokens and keep no EOS (unfinished: "
            "e.g. samples that stopped at max_new_tokens)"
        )
    if parts:
        logger.info("encode: %s", "; ".join(parts))


def _tokenize(tokenizer, texts: Sequence[str], chunk: int = 4096) -> list[list[int]]:
    """Ids without special tokens, in chunks so a fast tokenizer batches without a huge peak.

    `split_special_tokens=True`: a special token's text inside the data (`</s>` in a post) is
    tokenized as text, never turned into the control token itself.
    """
    out: list[list[int]] = []
    for start in range(0, len(texts), chunk):
        part = list(texts[start : start + chunk])
        if part:
            out.extend(
                list(ids)
                for ids in tokenizer(part, add_special_tokens=False, split_special_tokens=True)[
                    "input_ids"
                ]
            )
    return out
