"""SampleLoader: a prepared dir -> Batches of one split, streamed in chunks of whole users.

The user and split columns are read once, to know each user's train / val / test counts: that gives
the file rows of every chunk of ``users_per_chunk`` users and the number of batches of an epoch
without reading events. Each chunk is then read on its own (only the row groups that hold it, only
the columns samples need, in record batches), turned into rows, shuffled, and cut into batches.
Randomness (chunk order, train run offsets, row order) comes from (seed, epoch) only.

With ``shards`` (a rank's files of ``climber data shard``, see climber.train.distributed) the loader
reads those files instead of events.parquet; a chunk never spans two files, and its randomness comes
from (seed, epoch, shard number, chunk of the file), so it does not depend on which rank reads it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from climber.data.batch import Batch
from climber.data.prepare import load_manifest
from climber.data.samples import (
    COLUMNS,
    SPLITS,
    UserEvents,
    check_mode,
    check_split,
    collate,
    count_rows,
    make_rows,
)
from climber.data.schema import DataError
from climber.data.sequences import Strategy, resolve

READ_BATCH_ROWS = 1 << 16  # rows per parquet record batch while reading a chunk


class SampleLoader:
    """Iterable of :class:`Batch` for ``split`` of a prepared dir; ``shuffle`` defaults to True for train only.

    A batch holds up to ``batch_size`` rows of one chunk, each with up to ``candidates_per_row``
    candidates (mode "multi") or one (mode "single"). Call :meth:`set_epoch` before each epoch.
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
    ):
        check_split(split)
        check_mode(mode)
        for name, value in (("batch_size", batch_size), ("candidates_per_row", candidates_per_row),
                            ("users_per_chunk", users_per_chunk)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        manifest = load_manifest(prepared_dir)
        # {shard number: file}; the whole data set is one file, keyed None (the RNG keys of before shards)
        self.files = {None: Path(prepared_dir) / "events.parquet"} if shards is None else dict(sorted(shards.items()))
        self.split, self.mode, self.seed = split, mode, seed
        self.batch_size, self.candidates_per_row = batch_size, candidates_per_row
        self.shuffle = split == "train" if shuffle is None else shuffle
        self.resolved = resolve(strategies, manifest["actions"], manifest["scenarios"])
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

    def __iter__(self) -> Iterator[Batch]:
        files = {shard: pq.ParquetFile(path) for shard, path in self.files.items()}
        for chunk in self._chunk_order():
            if self._num_rows(chunk) == 0:  # e.g. only users too short for val / test
                continue
            shard, start, stop = self._file_rows[chunk]
            events = UserEvents.from_table(_read_rows(files[shard], start, stop))
            if not np.array_equal(events.split_counts(), self._counts[chunk]):
                raise DataError(f"{self.files[shard]}: events are not sorted by user; re-run `climber data prepare`")
            rng = self._rng(chunk)
            rows = make_rows(events, self.split, self.candidates_per_row, self.mode, rng)
            if self.shuffle:
                rows = rows.take(rng.permutation(len(rows)))
            for i in range(0, len(rows), self.batch_size):
                yield collate(events, rows.take(slice(i, i + self.batch_size)), self.resolved)


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


def _read_rows(pf: pq.ParquetFile, start: int, stop: int) -> pa.Table:
    """File rows [start, stop): only the row groups that hold them, in record batches of READ_BATCH_ROWS."""
    sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
    group_start = np.cumsum([0, *sizes])  # (G + 1,)
    groups = [g for g in range(len(sizes)) if group_start[g] < stop and group_start[g + 1] > start]
    pieces, pos = [], int(group_start[groups[0]])
    for batch in pf.iter_batches(batch_size=READ_BATCH_ROWS, row_groups=groups, columns=list(COLUMNS)):
        lo, hi = max(start - pos, 0), min(stop - pos, batch.num_rows)
        if lo < hi:
            pieces.append(batch.slice(lo, hi - lo))
        pos += batch.num_rows
    return pa.Table.from_batches(pieces)
