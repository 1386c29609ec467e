"""Batches of encoded examples: right-padded int32 arrays with bucketed lengths, deterministic
order.

A batch is a `SequenceBatch` (`plad_jax.data.batch`) of NumPy arrays: `prompt_ids`,
`prompt_mask` [B, P], `response_ids`, `response_mask` [B, R] (int32, right-padded, mask 1 = real
token) and `example_index` [B] (the row's index into the encoded examples, -1: filler row).

`P` and `R` are the longest prompt / response of the batch rounded up by `bucket_length`, so a
long run compiles a handful of shapes. The order of an epoch is a pure function of
`(shuffle_seed, epoch)` (a SplitMix64 hash of each index, not NumPy's shuffle, so it is the same
on every machine and NumPy version); `shuffle_seed=None` keeps the stored order.

Resuming: `DataPosition(epoch, index)` names the next batch to read. `iterate_batches` yields each
batch with the position after it; save that with the checkpoint and pass it back to continue
exactly where the run stopped.

Multi-host: every host builds the same global batch (same data, same seed) and keeps its rows with
`host_shard`, so the padded shapes agree across hosts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import jax
import numpy as np

from plad_jax.data.batch import SequenceBatch
from plad_jax.data.encoding import EncodedExamples


@dataclasses.dataclass(frozen=True)
class DataPosition:
    """The next batch to read: batch `index` of epoch `epoch` (`index` batches of that epoch are
    consumed). Saved with every checkpoint, so a resumed run reads the batch it would have read."""

    epoch: int = 0
    index: int = 0

    def advance(self, steps_per_epoch: int) -> DataPosition:
        index = self.index + 1
        return DataPosition(self.epoch + index // steps_per_epoch, index % steps_per_epoch)


def bucket_length(length: int, buckets: int | Sequence[int] = 64, minimum: int = 8) -> int:
    """`length` rounded up to a bucket (training batches; the sampler's prompts too, with
    `buckets=128, minimum=16`).

    An int `m`: powers of two from `minimum` up to `m`, then multiples of `m` (64 -> 8, 16, 32, 64,
    128, 192, ...). A sequence: its smallest entry >= length (ValueError past the largest).
    """
    if isinstance(buckets, int):
        if buckets < 1:
            raise ValueError(f"buckets={buckets} must be positive")
        if length > buckets:
            return -(-length // buckets) * buckets
        size = min(minimum, buckets)
        while size < length:
            size *= 2
        return min(size, buckets)
    fitting = [b for b in sorted(buckets) if b >= length]
    if not fitting:
        raise ValueError(f"length {length} is longer than the largest bucket {max(buckets)}")
    return fitting[0]


def epoch_rows(num_examples: int, batch_size: int, *, seed: int | None, epoch: int, index: int):
    """Row indices of batch `index` of epoch `epoch`: the epoch's order read `batch_size` at a time
    (what the pipeline's training steps read; the last batch of an epoch may be short)."""
    order = epoch_order(num_examples, shuffle_seed=seed, epoch=epoch)
    return order[index * batch_size : (index + 1) * batch_size]


def stream_rows(num_rows: int, batch_size: int, *, seed: int, index: int) -> np.ndarray:
    """Row indices of batch `index` of a shuffled stream of epochs read `batch_size` at a time
    (PbKD's rounds).

    Always a full batch (it runs into the next epoch's order, so the set may be smaller than a
    batch); a pure function of its arguments, so a resumed run reads the same batches.
    """
    positions = np.arange(index * batch_size, (index + 1) * batch_size)
    epochs, offsets = np.divmod(positions, num_rows)
    orders = {e: epoch_order(num_rows, shuffle_seed=seed, epoch=int(e)) for e in np.unique(epochs)}
    return np.array([orders[e][o] for e, o in zip(epochs, offsets)], np.int64)


def epoch_order(num_examples: int, *, shuffle_seed: int | None, epoch: int) -> np.ndarray:
    """Example indices in the order epoch `epoch` reads them."""
    index = np.arange(num_examples, dtype=np.int64)
    if shuffle_seed is None:
        return index
    keys = _splitmix64(
        index.astype(np.uint64)
        ^ _splitmix64(np.uint64(shuffle_seed % 2**64) ^ _splitmix64(np.uint64(epoch % 2**64)))
    )
    return index[np.argsort(keys, kind="stable")]


def num_batches(num_examples: int, batch_size: int, drop_last: bool) -> int:
    return num_examples // batch_size if drop_last else -(-num_examples // batch_size)


def batches(
    encoded: EncodedExamples,
    batch_size: int,
    *,
    shuffle_seed: int | None = None,
    epoch: int = 0,
    drop_last: bool = False,
    start: int = 0,
    buckets: int | Sequence[int] = 64,
    pad_id: int = 0,
    fill_last: bool = False,
) -> Iterator[SequenceBatch]:
    """The batches of one epoch, from batch `start` on.

    Without `drop_last` the last batch is short, or, with `fill_last`, filled to `batch_size` with
    rows whose masks are all zero and whose `example_index` is -1 (one shape for every batch).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be positive")
    order = epoch_order(len(encoded), shuffle_seed=shuffle_seed, epoch=epoch)
    for b in range(start, num_batches(len(encoded), batch_size, drop_last)):
        rows = order[b * batch_size : (b + 1) * batch_size]
        yield make_batch(
            encoded,
            rows,
            buckets=buckets,
            pad_id=pad_id,
            num_rows=batch_size if fill_last else len(rows),
        )


def iterate_batches(
    encoded: EncodedExamples,
    batch_size: int,
    *,
    shuffle_seed: int | None,
    position: DataPosition = DataPosition(),
    num_epochs: int | None = None,
    drop_last: bool = True,
    buckets: int | Sequence[int] = 64,
    pad_id: int = 0,
) -> Iterator[tuple[SequenceBatch, DataPosition]]:
    """(batch, position after it) from `position` on, epoch after epoch (`num_epochs` in all, None =
    forever)."""
    per_epoch = num_batches(len(encoded), batch_size, drop_last)
    if per_epoch == 0:
        raise ValueError(f"{len(encoded)} examples make no batch of {batch_size}")
    epoch, start = position.epoch + position.index // per_epoch, position.index % per_epoch
    while num_epochs is None or epoch < num_epochs:
        for index, batch in enumerate(
            batches(
                encoded,
                batch_size,
                shuffle_seed=shuffle_seed,
                epoch=epoch,
                drop_last=drop_last,
                start=start,
                buckets=buckets,
                pad_id=pad_id,
            ),
            start + 1,
        ):
            yield (
                batch,
                (DataPosition(epoch, index) if index < per_epoch else DataPosition(epoch + 1, 0)),
            )
        epoch, start = epoch + 1, 0


def make_batch(
    encoded: EncodedExamples,
    rows: Sequence[int],
    *,
    buckets: int | Sequence[int] = 64,
    pad_id: int = 0,
    num_rows: int | None = None,
) -> SequenceBatch:
    """One right-padded batch of the given example indices (plus filler rows up to `num_rows`)."""
    rows = [int(r) for r in rows]
    num_rows = len(rows) if num_rows is None else num_rows
    prompts = [encoded.prompts[r] for r in rows]
    responses = [encoded.responses[r] for r in rows]
    prompt_ids, prompt_mask = _pad(
        prompts, num_rows, bucket_length(max(map(len, prompts), default=1), buckets), pad_id
    )
    response_ids, response_mask = _pad(
        responses, num_rows, bucket_length(max(map(len, responses), default=1), buckets), pad_id
    )
    index = np.full((num_rows,), -1, np.int32)
    index[: len(rows)] = rows
    return SequenceBatch(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=response_ids,
        response_mask=response_mask,
        example_index=index,
    )


def host_shard(batch, process_index: int, process_count: int):
    """This host's contiguous block of rows: rows `[i * B / n, (i + 1) * B / n)` of every array of
    a batch (any pytree of arrays sharing their leading axis)."""
    size = len(jax.tree.leaves(batch)[0])
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, {process_count})")
    if size % process_count:
        raise ValueError(
            f"a batch of {size} rows does not split evenly over {process_count} processes; "
            f"make the batch size a multiple of the process count"
        )
    per_host = size // process_count
    rows = slice(process_index * per_host, (process_index + 1) * per_host)
    return jax.tree.map(lambda v: v[rows], batch)


def _pad(
    seqs: Sequence[np.ndarray], num_rows: int, width: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    ids = np.full((num_rows, width), pad_id, np.int32)
    mask = np.zeros((num_rows, width), np.int32)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return ids, mask


def _splitmix64(x):
    """SplitMix64's finaliser, elementwise on uint64 (wrapping arithmetic)."""
    x = np.asarray(x, np.uint64)
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))
