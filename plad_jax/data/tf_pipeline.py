"""Optional tf.data input pipeline: SentencePiece inside TensorFlow (tensorflow-text), same batches.

Install with `pip install -e ".[tf]"`. For a SentencePiece model wrapped the LLaMA way (the demo
tokenizer, LLaMA-1/2), `tf_batches` yields the batches `batching.batches(encode_examples(...))`
yields: same ids, same order for the same `(shuffle_seed, epoch)`, same bucketed shapes. A tf.data
element cannot be a dataclass, so the dataset's elements are dicts of the `SequenceBatch` fields;
`as_batches(dataset)` gives the `SequenceBatch`es themselves.

Why the ids agree: the transformers tokenizer (`legacy=False`, Metaspace `prepend_scheme="first"`)
does not add SentencePiece's word-start marker to a text that already starts with a space, while
SentencePiece always adds it; so a text's ids are SentencePiece's ids of the text without one
leading space. Special-token strings in the text stay text on both sides. The pure-Python
`encode_with_sentencepiece` states the rule and is tested against the transformers tokenizer;
the tf.data path applies the same rule with tensorflow-text. (A text that is a single space is the
one case that differs.)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from plad_jax.data.batch import SequenceBatch
from plad_jax.data.batching import bucket_length, epoch_order, num_batches
from plad_jax.data.encoding import EncodedExamples, assemble


def sentencepiece_ids(model_proto: bytes, texts: Sequence[str]) -> list[list[int]]:
    """Plain ids (no special tokens) of each text, as the LLaMA-style transformers tokenizer gives
    them."""
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_proto=model_proto)
    return processor.encode([_strip_one_space(t) for t in texts])


def encode_with_sentencepiece(
    model_proto: bytes,
    prompts: Sequence[str],
    responses: Sequence[str],
    max_prompt_tokens: int,
    max_response_tokens: int,
    *,
    prompt_prefix: Sequence[int] = (),
    prompt_suffix: Sequence[int] = (),
    eos_id: int | None = None,
) -> EncodedExamples:
    """`encode_texts` with SentencePiece itself; prefix/suffix as `special_affixes` gives them,
    eos_id None = no EOS."""
    return assemble(
        sentencepiece_ids(model_proto, prompts),
        sentencepiece_ids(model_proto, responses),
        prefix=prompt_prefix,
        suffix=prompt_suffix,
        eos=[] if eos_id is None else [eos_id],
        max_prompt_tokens=max_prompt_tokens,
        max_response_tokens=max_response_tokens,
    )


def tf_batches(
    model_proto: bytes,
    prompts: Sequence[str],
    responses: Sequence[str],
    batch_size: int,
    *,
    max_prompt_tokens: int,
    max_response_tokens: int,
    prompt_prefix: Sequence[int] = (),
    prompt_suffix: Sequence[int] = (),
    eos_id: int | None = None,
    pad_id: int = 0,
    shuffle_seed: int | None = None,
    epoch: int = 0,
    drop_last: bool = False,
    buckets: int | Sequence[int] = 64,
):
    """A `tf.data.Dataset` of one epoch's batches: dicts of int32 tensors named as the fields of
    the `SequenceBatch`es `batching.batches` yields (`as_batches` makes them those)."""
    tf, tf_text = _require_tf()
    prefix, suffix = [int(i) for i in prompt_prefix], [int(i) for i in prompt_suffix]
    room = max_prompt_tokens - len(prefix) - len(suffix)
    if room < 1 or max_response_tokens < 1:
        raise ValueError(
            f"max_prompt_tokens={max_prompt_tokens} / max_response_tokens={max_response_tokens} "
            f"leave no room for tokens"
        )
    order = epoch_order(len(prompts), shuffle_seed=shuffle_seed, epoch=epoch)
    order = order[: num_batches(len(prompts), batch_size, drop_last) * batch_size]
    eos = [] if eos_id is None else [int(eos_id)]
    tokenizer = tf_text.SentencepieceTokenizer(model=model_proto, out_type=tf.int32)
    # bucket of every possible length, computed by the NumPy path's own function
    prompt_widths = tf.constant(
        [bucket_length(max(n, 1), buckets) for n in range(max_prompt_tokens + 1)], tf.int32
    )
    response_widths = tf.constant(
        [bucket_length(max(n, 1), buckets) for n in range(max_response_tokens + 1)], tf.int32
    )

    def encode(batch):
        rows = tf.shape(batch["prompt"])[0]
        p = tokenizer.tokenize(tf.strings.regex_replace(batch["prompt"], "^ ", ""))
        p = _keep(tf, p, room, from_end=True)
        p = tf.concat(
            [_constant_rows(tf, prefix, rows), p, _constant_rows(tf, suffix, rows)], axis=1
        )
        r = tokenizer.tokenize(tf.strings.regex_replace(batch["response"], "^ ", ""))
        r = _keep(
            tf,
            tf.concat([r, _constant_rows(tf, eos, rows)], axis=1),
            max_response_tokens,
            from_end=False,
        )
        prompt_ids, prompt_mask = _pad(tf, p, prompt_widths, pad_id)
        response_ids, response_mask = _pad(tf, r, response_widths, pad_id)
        return {
            "prompt_ids": prompt_ids,
            "prompt_mask": prompt_mask,
            "response_ids": response_ids,
            "response_mask": response_mask,
            "example_index": batch["example_index"],
        }

    data = {
        "prompt": [prompts[i] for i in order],
        "response": [responses[i] for i in order],
        "example_index": order.astype(np.int32),
    }
    return (
        tf.data.Dataset.from_tensor_slices(data)
        .batch(batch_size, drop_remainder=drop_last)
        .map(encode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    )


def as_batches(dataset) -> Iterator[SequenceBatch]:
    """The `SequenceBatch`es (NumPy arrays) of a `tf_batches` dataset, in its order."""
    for element in dataset.as_numpy_iterator():
        yield SequenceBatch(**element)


def _strip_one_space(text: str) -> str:
    return text.removeprefix(" ")


def _keep(tf, ragged, count: int, *, from_end: bool):
    """The first (or last) `count` ids of every row of a RaggedTensor."""
    lengths = ragged.row_lengths()
    kept = tf.minimum(lengths, count)
    starts = ragged.row_starts() + (lengths - kept if from_end else 0)
    index = tf.ragged.range(starts, starts + kept)
    return tf.RaggedTensor.from_row_lengths(tf.gather(ragged.flat_values, index.flat_values), kept)


def _constant_rows(tf, ids: Sequence[int], rows):
    """A [rows, len(ids)] RaggedTensor repeating `ids`."""
    dense = tf.tile(tf.constant([list(ids)], tf.int32, shape=(1, len(ids))), tf.stack([rows, 1]))
    return tf.RaggedTensor.from_tensor(dense)


def _pad(tf, ragged, widths, pad_id: int):
    """Right-padded [rows, bucket] ids and mask."""
    lengths = tf.cast(ragged.row_lengths(), tf.int32)
    width = tf.gather(widths, tf.reduce_max(tf.concat([lengths, [0]], 0)))
    dense = ragged.to_tensor(default_value=pad_id)
    ids = tf.pad(dense, [[0, 0], [0, width - tf.shape(dense)[1]]], constant_values=pad_id)
    return ids, tf.sequence_mask(lengths, width, dtype=tf.int32)


def _require_tf():
    try:
        import tensorflow as tf
        import tensorflow_text as tf_text
    except ImportError:
        raise ImportError(
            'the tf.data pipeline needs tensorflow and tensorflow-text: pip install -e ".[tf]"'
        ) from None
    return tf, tf_text
