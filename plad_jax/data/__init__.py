"""Data: tasks -> examples -> the paper's splits -> token ids -> padded, bucketed, resumable
batches.

    splits = load_splits("tldr", seed=0)                      # D0, D, validation, test (Example
                                                              # lists)
    encoded = encode_examples(tokenizer, splits.d0, 512, 64)  # ids; prompts cut from the left,
                                                              # counted
    for batch, position in iterate_batches(encoded, 32, shuffle_seed=0):
        ...                                                   # a SequenceBatch (`batch.py`);
                                                              # save `position` to resume exactly

Tasks: `tldr`, `hh`, `jsonl`, `csv`, `parquet`, `demo` (offline; `demo.py`). Bad data raises
`DataError` (a `ValueError`) with a one-line message.
"""

from plad_jax.data.batch import (
    Batch,
    GameBatch,
    PairBatch,
    ReferenceLogprobs,
    SequenceBatch,
    TeacherLogits,
    join_parts,
)
from plad_jax.data.batching import (
    DataPosition,
    batches,
    bucket_length,
    epoch_order,
    epoch_rows,
    host_shard,
    iterate_batches,
    make_batch,
    num_batches,
    stream_rows,
)
from plad_jax.data.demo import build_demo_tokenizer, demo_tokenizer_texts, docstring_examples
from plad_jax.data.encoding import EncodedExamples, encode_examples, encode_texts, special_affixes
from plad_jax.data.example import DataError, Example
from plad_jax.data.splits import Splits, split_examples
from plad_jax.data.tasks import TASKS, load_task, split_hh_transcript, task_stop_strings


def load_splits(
    task: str,
    path: str | None = None,
    *,
    prompt_field: str | None = None,
    response_field: str | None = None,
    hub_data_dir: str | None = None,
    seed: int = 0,
    test_size: float = 0.1,
    validation_size: float = 0.05,
    max_d0: int | None = None,
    max_d: int | None = None,
    max_validation: int | None = None,
    max_test: int | None = None,
) -> Splits:
    """`load_task` then `split_examples`: the task's D0, D, validation and test splits."""
    task_splits = load_task(
        task,
        path,
        prompt_field=prompt_field,
        response_field=response_field,
        hub_data_dir=hub_data_dir,
    )
    return split_examples(
        task_splits,
        seed=seed,
        test_size=test_size,
        validation_size=validation_size,
        max_d0=max_d0,
        max_d=max_d,
        max_validation=max_validation,
        max_test=max_test,
    )


__all__ = [
    "TASKS",
    "Batch",
    "DataError",
    "DataPosition",
    "EncodedExamples",
    "Example",
    "GameBatch",
    "PairBatch",
    "ReferenceLogprobs",
    "SequenceBatch",
    "Splits",
    "TeacherLogits",
    "batches",
    "bucket_length",
    "build_demo_tokenizer",
    "demo_tokenizer_texts",
    "docstring_examples",
    "encode_examples",
    "encode_texts",
    "epoch_order",
    "epoch_rows",
    "stream_rows",
    "host_shard",
    "iterate_batches",
    "join_parts",
    "load_splits",
    "load_task",
    "make_batch",
    "num_batches",
    "special_affixes",
    "split_examples",
    "split_hh_transcript",
    "task_stop_strings",
]
