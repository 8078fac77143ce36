"""SampleLoader: a prepared dir -> Batches of one split, streamed in chunks of whole users.

The user and split columns are read once, to know each user's train / val / test counts: that gives
the file rows of every chunk of ``users_per_chunk`` users and the number of batches of an epoch
without reading events. Each chunk is then read on its own (only the row groups that hold it, only
the columns samples need, in record batches), turned into rows, shuffled, and cut into batches.
Randomness (chunk order, train run offsets, row order) comes from (seed, epoch) only.

``bucket`` (train): the shuffled rows of a chunk are sorted by history length (:func:`history_lengths`,
summed over the strategies) within windows of BUCKET_BATCHES batches, cut into batches, and the
chunk's batches are shuffled; a batch holds rows of similar length and pads little, the number of
batches is unchanged, and the batches still change with the epoch (which rows share a window, ties,
batch order). Eval splits keep user order: predictions come out in the order of their rows.

``workers`` > 0 collate in DataLoader worker processes (one intra-op thread each), worker w of W
making batches w, w + W, ...: the DataLoader fetches from the workers in turn, so the batches and
their order are those of ``workers=0`` (every worker reads each chunk and draws its rows; only the
collating is split).

With ``shards`` (a rank's files of ``climber data shard``, see climber.train.distributed) the loader
reads those files instead of events.parquet; a chunk never spans two files, and its randomness comes
from (seed, epoch, shard number, chunk of the file), so it does not depend on which rank reads it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from climber.config import ConfigError
from climber.data.batch import Batch
from climber.data.prepare import load_manifest
from climber.data.samples import (
    COLUMNS,
    SPLITS,
    UserEvents,
    check_mode,
    check_split,
    Rows,
    collate,
    count_rows,
    event_feature_columns,
    history_lengths,
    make_rows,
)
from climber.data.schema import DataError
from climber.data.sequences import Strategy, resolve

READ_BATCH_ROWS = 1 << 16  # rows per parquet record batch while reading a chunk
BUCKET_BATCHES = 64  # bucket: rows are sorted by history length within windows of this many batches
PREFETCH_BATCHES = 2  # batches each worker process collates ahead (DataLoader prefetch_factor)


def auto_workers(cpus: int | None = None) -> int:
    """Worker processes for ``workers=-1``: none on 1-2 cores, else min(2, cores - 1).

    On 2 cores a worker takes a core from the training threads for less than it saves: an ML-100k Climber
    epoch (186 batches of 32 rows; collating one takes about 2 ms against about 90 ms for its step) ran
    21.8 s with one worker and 18.6 s without (2026-12-02, AMD EPYC 2 cores).
    """
    cpus = len(os.sched_getaffinity(0)) if cpus is None else cpus
    return 0 if cpus <= 2 else min(2, cpus - 1)


class SampleLoader:
    """Iterable of :class:`Batch` for ``split`` of a prepared dir; ``shuffle`` defaults to True for train only.

    A batch holds up to ``batch_size`` rows of one chunk, each with up to ``candidates_per_row``
    candidates (mode "multi") or one (mode "single"). Call :meth:`set_epoch` before each epoch.
    ``bucket`` groups rows of similar history length (needs ``shuffle``); ``workers`` collate in that many processes
    (-1: :func:`auto_workers`); ``pin_memory`` puts batches in page-locked memory (for CUDA).
    """

    def __init__(
        self,
        prepared_dir: Path | str,
        split: str,
        strategies: Sequence[Strategy],
        *,
        batch_size: int,
        candidates_per_row: int,
        mode: str = "multi",
        seed: int = 0,
        shuffle: bool | None = None,
        users_per_chunk: int = 200_000,
        shards: dict[int, Path] | None = None,
        bucket: bool = False,
        workers: int = 0,
        pin_memory: bool = False,
    ):
        check_split(split)
        check_mode(mode)
        for name, value in (("batch_size", batch_size), ("candidates_per_row", candidates_per_row),
                            ("users_per_chunk", users_per_chunk)):
            if value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        if workers < -1:
            raise ConfigError(f"workers must be >= 0 (or -1 for auto), got {workers}")
        manifest = load_manifest(prepared_dir)
        # {shard number: file}; the whole data set is one file, keyed None (the RNG keys of before shards)
        self.files = {None: Path(prepared_dir) / "events.parquet"} if shards is None else dict(sorted(shards.items()))
        self.split, self.mode, self.seed = split, mode, seed
        self.batch_size, self.candidates_per_row = batch_size, candidates_per_row
        self.shuffle = split == "train" if shuffle is None else shuffle
        if bucket and not self.shuffle:
            raise ConfigError("bucket needs shuffle (unshuffled batches stay in user order)")
        self.bucket, self.pin_memory = bucket, pin_memory
        self.workers = auto_workers() if workers == -1 else workers
        self.resolved = resolve(strategies, manifest["actions"], manifest["scenarios"])
        self.columns = [*COLUMNS, *event_features(manifest)]  # what a chunk reads
        self.epoch = 0

        self._counts, self._file_rows, self._keys = [], [], []  # per chunk: (U_k, 3), (file, start, stop), RNG key
        for shard, path in self.files.items():
            counts, events = _user_split_counts(path)  # (P, 3), (P,) per user, in file order
            bounds = np.concatenate([[0], np.cumsum(events)])  # (P + 1,) file row of each user's first event
            for k, i in enumerate(range(0, len(counts), users_per_chunk)):  # i: first user of chunk k
                self._counts.append(counts[i : i + users_per_chunk])
                self._file_rows.append((shard, int(bounds[i]), int(bounds[min(i + users_per_chunk, len(counts))])))
                self._keys.append([len(self._keys)] if shard is None else [shard, k])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rng(self, chunk: int) -> np.random.Generator:
        """The generator of one chunk in the current epoch: run offsets first, then the row order."""
        return np.random.default_rng([self.seed, self.epoch, *self._keys[chunk]])

    def _chunk_order(self) -> np.ndarray:
        if self.shuffle:
            return np.random.default_rng([self.seed, self.epoch]).permutation(len(self._counts))
        return np.arange(len(self._counts))

    def _num_rows(self, chunk: int) -> int:
        return count_rows(self._counts[chunk], self.split, self.candidates_per_row, self.mode, self._rng(chunk))

    def __len__(self) -> int:
        """Batches in the current epoch (train run offsets, hence row counts, change with the epoch)."""
        return sum(-(-self._num_rows(k) // self.batch_size) for k in range(len(self._counts)))

    def rows_per_step_for(self, steps: int) -> int:
        """The most rows a batch may hold (at most ``batch_size``) for an epoch of at least ``steps`` batches."""
        if len(self) >= steps:
            return self.batch_size
        rows = sum(self._num_rows(k) for k in range(len(self._counts)))
        return max(1, min(self.batch_size, rows // steps))

    def __iter__(self) -> Iterator[Batch]:
        """The epoch's batches, collated in ``workers`` processes (0: in this one)."""
        loader = DataLoader(_EpochBatches(self), batch_size=None, num_workers=self.workers,
                            pin_memory=self.pin_memory, worker_init_fn=_one_thread,
                            prefetch_factor=PREFETCH_BATCHES if self.workers else None)
        return map(_as_tensors, loader)

    def batches(self, worker: int = 0, workers: int = 1) -> Iterator[Batch]:
        """The epoch's batches j with j % workers == worker, in order (all of them by default)."""
        files = {shard: pq.ParquetFile(path) for shard, path in self.files.items()}
        j = 0  # the epoch's batches before this chunk's
        for chunk in self._chunk_order():
            count = -(-self._num_rows(chunk) // self.batch_size)
            mine = [i for i in range(count) if (j + i) % workers == worker]
            j += count
            if not mine:  # e.g. only users too short for val / test
                continue
            events, batches = self._chunk_batches(chunk, files)
            for i in mine:
                yield collate(events, batches[i], self.resolved)

    def _chunk_batches(self, chunk: int, files: dict) -> tuple[UserEvents, list[Rows]]:
        """The events of a chunk and the rows of each of its batches, in the epoch's order."""
        shard, start, stop = self._file_rows[chunk]
        events = UserEvents.from_table(_read_rows(files[shard], start, stop, self.columns))
        if not np.array_equal(events.split_counts(), self._counts[chunk]):
            raise DataError(f"{self.files[shard]}: events are not sorted by user; re-run `climber data prepare`")
        rng = self._rng(chunk)
        rows = make_rows(events, self.split, self.candidates_per_row, self.mode, rng)
        if self.shuffle:
            rows = rows.take(rng.permutation(len(rows)))
        if self.bucket:
            rows = rows.take(_sort_in_windows(history_lengths(events, rows, self.resolved),
                                              BUCKET_BATCHES * self.batch_size))
        batches = [rows.take(slice(i, i + self.batch_size)) for i in range(0, len(rows), self.batch_size)]
        if self.bucket:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return events, batches


class _EpochBatches(IterableDataset):
    """A loader's batches of its current epoch as the dataset of a DataLoader: in worker w of W, the
    batches w, w + W, ... (the DataLoader takes one from each worker in turn, so they come out in order).

    A worker sends its batches with numpy arrays for tensors: pickled through the pipe, they cost far
    less than torch's shared memory, one file per tensor (ML-100k train epoch, 186 batches of 32 rows,
    one worker: 0.6 s against 3.3 s).
    """

    def __init__(self, loader: SampleLoader):
        self.loader = loader

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        if info is None:
            return self.loader.batches()
        return (b.apply(torch.Tensor.numpy) for b in self.loader.batches(info.id, info.num_workers))


def _as_tensors(batch: Batch) -> Batch:
    """A batch from a worker (numpy arrays; pinned tensors with ``pin_memory``) as tensors, zero-copy."""
    return batch.apply(torch.as_tensor)


def _one_thread(worker: int) -> None:
    """DataLoader worker_init_fn: one intra-op thread per worker, so workers and training share the cores."""
    torch.set_num_threads(1)


def _sort_in_windows(lengths: np.ndarray, window: int) -> np.ndarray:
    """(R,) permutation sorting rows by ``lengths`` (R,) within consecutive windows of ``window`` rows;
    ties keep their order (stable)."""
    return np.lexsort((lengths, np.arange(len(lengths)) // window))


def _user_split_counts(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Per user, in file (= ascending user) order: (P, 3) train, val and test events, (P,) all events."""
    per_user = (
        pl.scan_parquet(path)
        .group_by("user")
        .agg(pl.len().alias("events"), *[(pl.col("split") == s).sum().alias(s) for s in SPLITS])
        .sort("user")
        .collect(engine="streaming")
    )
    return per_user.select(SPLITS).to_numpy().astype(np.int64), per_user["events"].to_numpy()


def event_features(manifest: dict) -> list[str]:
    """The per-event feature columns (``ctx_*``, ``num_*``) of a prepared dir, in their Batch order."""
    return [*event_feature_columns(manifest.get("side_columns", {}), "ctx"),
            *event_feature_columns(manifest.get("numeric_features", {}), "num")]


def _read_rows(pf: pq.ParquetFile, start: int, stop: int, columns: Sequence[str] = COLUMNS) -> pa.Table:
    """File rows [start, stop) of ``columns``: only the row groups that hold them, in record batches of
    READ_BATCH_ROWS."""
    sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
    group_start = np.cumsum([0, *sizes])  # (G + 1,)
    groups = [g for g in range(len(sizes)) if group_start[g] < stop and group_start[g + 1] > start]
    pieces, pos = [], int(group_start[groups[0]])
    for batch in pf.iter_batches(batch_size=READ_BATCH_ROWS, row_groups=groups, columns=list(columns)):
        lo, hi = max(start - pos, 0), min(stop - pos, batch.num_rows)
        if lo < hi:
            pieces.append(batch.slice(lo, hi - lo))
        pos += batch.num_rows
    return pa.Table.from_batches(pieces)
