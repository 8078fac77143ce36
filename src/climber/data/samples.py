"""Samples: prepared events of a set of users -> rows -> model batches (the contract of batch.py).

- :class:`UserEvents`: the events of some users as CSR arrays, in the order of events.parquet
  (sorted by (user, ts, item); per user train, then val, then test).
- :class:`Rows`: one row = (user, cut, candidates). The history is the user's events at positions
  ``< cut``; the candidates are ``count`` consecutive events from position ``start >= cut``.
- :func:`make_rows`: the rows of one split (PROTOCOL.md). Mode "multi" ("single user, multiple
  items") puts up to C candidates in a row; mode "single" one.
- :func:`collate`: rows -> :class:`~climber.data.batch.Batch`, one Subsequence per resolved strategy.
- :func:`history_lengths`: the history events a row selects, what length bucketing sorts by.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Sequence

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import torch

from climber.config import ConfigError
from climber.data.batch import Batch, Subsequence
from climber.data.prepare import SPLIT_CODES
from climber.data.schema import DataError, feature_kind
from climber.data.sequences import ResolvedStrategy, Selector

SPLITS = tuple(SPLIT_CODES)  # ("train", "val", "test"), codes 0, 1, 2
MODES = ("multi", "single")
COLUMNS = ("user", "item", "action", "scenario", "ts", "label", "split")  # what samples read (+ ctx_*, num_*)


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ConfigError(f"split {split!r} is not one of {', '.join(SPLITS)}")


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ConfigError(f"mode {mode!r} is not one of {', '.join(MODES)}")


def split_codes(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """(N,) int8 codes (train 0, val 1, test 2) of a string column; DataError naming an unknown value."""
    codes = pc.index_in(column, value_set=pa.array(SPLITS))
    if codes.null_count:
        bad = pc.filter(column, pc.is_null(codes))[0].as_py()
        raise DataError(f"split value {bad!r} is not one of {', '.join(SPLITS)}")
    return codes.to_numpy().astype(np.int8)


@dataclass
class UserEvents:
    """The events of U users (N events in all), user i's at positions offsets[i] .. offsets[i+1] - 1."""

    offsets: np.ndarray  # (U + 1,) int64
    user: np.ndarray  # (U,) int64 dense user ids, ascending
    item: np.ndarray  # (N,) int32 dense ids
    action: np.ndarray  # (N,) int32 dense ids
    scenario: np.ndarray  # (N,) int32 dense ids
    ts: np.ndarray  # (N,) int64 seconds
    label: np.ndarray  # (N,) int8
    split: np.ndarray  # (N,) int8: 0 train, 1 val, 2 test
    ctx: np.ndarray | None = None  # (N, F_ctx) int32 ctx_* value ids (sorted by name); None: no such columns
    num: np.ndarray | None = None  # (N, F_num) float32 num_* values (sorted by name); None: no such columns
    _selectors: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_table(cls, table: pa.Table | pl.DataFrame) -> "UserEvents":
        """From prepared events (at least COLUMNS; and the per-event features, ``ctx_*`` and ``num_*``
        columns, it holds) in file order, each user's events complete."""
        if isinstance(table, pl.DataFrame):
            table = table.to_arrow()
        missing = [c for c in COLUMNS if c not in table.column_names]
        if missing:
            raise DataError(f"events table lacks columns {missing}; has {table.column_names}")

        def column(name: str, dtype) -> np.ndarray:
            return table.column(name).to_numpy().astype(dtype, copy=False)

        user = column("user", np.int64)
        starts = np.flatnonzero(np.diff(user, prepend=user[:1] - 1))  # (U,) first event of each user
        events = cls(
            offsets=np.append(starts, len(user)),
            user=user[starts],
            item=column("item", np.int32),
            action=column("action", np.int32),
            scenario=column("scenario", np.int32),
            ts=column("ts", np.int64),
            label=column("label", np.int8),
            split=split_codes(table.column("split")),
            ctx=_stack(table, "ctx", np.int32),
            num=_stack(table, "num", np.float32),
        )
        events._check_order()
        return events

    def _check_order(self) -> None:
        """What history selection relies on: users contiguous; per user ts ascending, train < val < test."""
        if np.any(np.diff(self.user) <= 0):
            raise DataError("events are not sorted by user (a user's events must be contiguous, users ascending)")
        continues = np.ones(len(self.ts), dtype=bool)  # (N,) event i is not its user's first
        continues[self.offsets[:-1]] = False
        for name, values in (("ts", self.ts), ("split", self.split)):
            back = np.flatnonzero((np.diff(values) < 0) & continues[1:])
            if back.size:
                owner = self.user[np.searchsorted(self.offsets, back[0] + 1, side="right") - 1]
                raise DataError(
                    f"events of user {owner}: {name} goes back at event {back[0] + 1}; expected "
                    "(user, ts, item) order with train, val, test events in that order"
                )

    @property
    def num_users(self) -> int:
        return len(self.user)

    def split_counts(self) -> np.ndarray:
        """(U, 3) int64: each user's number of train, val and test events."""
        owner = np.repeat(np.arange(self.num_users), np.diff(self.offsets))
        return np.bincount(owner * 3 + self.split, minlength=3 * self.num_users).reshape(-1, 3)

    def selector(self, resolved: ResolvedStrategy) -> Selector:
        """The strategy's selector over these events, built once (its matching positions are O(N))."""
        if resolved not in self._selectors:
            self._selectors[resolved] = Selector(resolved, self)
        return self._selectors[resolved]


@dataclass(frozen=True)
class Rows:
    """R rows; positions count from the user's first event."""

    user: np.ndarray  # (R,) int64 index of the user in UserEvents (not the dense id)
    cut: np.ndarray  # (R,) int64 history = the user's events at positions < cut
    start: np.ndarray  # (R,) int64 first candidate's position, >= cut
    count: np.ndarray  # (R,) int64 candidates at positions start .. start + count - 1

    def __len__(self) -> int:
        return len(self.user)

    def take(self, index) -> "Rows":
        """The rows at ``index`` (a slice or an integer array)."""
        return Rows(*(getattr(self, f.name)[index] for f in fields(self)))


def _plan(counts: np.ndarray, split: str, candidates_per_row: int, mode: str, rng: np.random.Generator | None):
    """Per user: the candidates are the ``n`` split events from position ``base``, cut into runs of
    ``width`` with boundaries at base + offset + k * width. Returns (base, n, shift, width, rows per user),
    shift = width - offset (mod width) being how far the first run is short of a full one.

    ``offset`` is drawn per user from ``rng`` for split train (every train event is a candidate once
    per epoch, in runs that change from epoch to epoch); 0 otherwise.
    """
    check_split(split)
    check_mode(mode)
    if candidates_per_row < 1:
        raise ConfigError(f"candidates_per_row must be >= 1, got {candidates_per_row}")
    code = SPLIT_CODES[split]
    base = counts[:, :code].sum(axis=1)
    n = counts[:, code]
    width = candidates_per_row if mode == "multi" else 1
    offset = np.zeros(len(n), dtype=np.int64)
    if split == "train" and rng is not None:
        offset = rng.integers(0, width, size=len(n))
    shift = (width - offset) % width
    per_user = np.where(n > 0, (n - 1 + shift) // width + 1, 0)
    return base, n, shift, width, per_user


def count_rows(counts: np.ndarray, split: str, candidates_per_row: int, mode: str = "multi", rng=None) -> int:
    """len(make_rows(...)) from the (U, 3) split counts alone, for the same rng state."""
    return int(_plan(counts, split, candidates_per_row, mode, rng)[-1].sum())


def make_rows(
    events: UserEvents, split: str, candidates_per_row: int, mode: str = "multi", rng: np.random.Generator | None = None
) -> Rows:
    """The rows of ``split``, users in order (shuffling is the loader's job).

    - train: cut = the first candidate's position, so a candidate's history holds only events strictly
      earlier in the order; "multi" runs of up to C consecutive train events, their boundaries shifted
      by a per-user offset drawn from ``rng`` (None: 0); "single": one row per train event.
    - val / test: cut = the user's first event of the split (history = train, resp. train + val);
      candidates = all the user's events of the split, C per row ("multi") or 1 ("single").
    """
    base, n, shift, width, per_user = _plan(events.split_counts(), split, candidates_per_row, mode, rng)
    user = np.repeat(np.arange(len(n)), per_user)  # (R,)
    k = np.arange(len(user)) - np.repeat(np.cumsum(per_user) - per_user, per_user)  # (R,) row within its user
    lo = np.maximum(0, k * width - shift[user])  # (R,) run bounds, relative to base
    hi = np.minimum(n[user], (k + 1) * width - shift[user])
    start = base[user] + lo
    cut = start if split == "train" else base[user]
    return Rows(user=user, cut=cut, start=start, count=hi - lo)


def history_lengths(events: UserEvents, rows: Rows, resolved: Sequence[ResolvedStrategy]) -> np.ndarray:
    """(R,) int64: the events each row's subsequences select, summed over the strategies (no padding)."""
    first, cuts = _first_and_cuts(events, rows)
    total = np.zeros(len(rows), dtype=np.int64)
    for r in resolved:
        lo, hi = events.selector(r).ranges(first, cuts)
        total += hi - lo
    return total


def collate(events: UserEvents, rows: Rows, resolved: Sequence[ResolvedStrategy]) -> Batch:
    """A Batch of B = len(rows) rows: subsequences left-padded to the longest selection in the batch
    (most recent event last), candidates right-padded to the most candidates of a row; ids 0 at padding."""
    first, cuts = _first_and_cuts(events, rows)
    width = max(1, int(rows.count.max(initial=0)))
    slots = np.arange(width)  # (C,)
    cand_mask = slots < rows.count[:, None]  # (B, C)
    cand = np.where(cand_mask, (first + rows.start)[:, None] + slots, 0)  # (B, C) global positions
    seqs = []
    for r in resolved:
        index, mask = events.selector(r).gather(first, cuts)  # (B, L) each
        seqs.append(Subsequence(
            item=_take(events.item, index, mask),
            action=_take(events.action, index, mask),
            scenario=_take(events.scenario, index, mask),
            ts=_take(events.ts, index, mask),
            mask=torch.from_numpy(mask),
            ctx=_take_features(events.ctx, index, mask),
            num=_take_features(events.num, index, mask),
        ))
    return Batch(
        user=torch.from_numpy(events.user[rows.user]),
        seqs=seqs,
        cand_item=_take(events.item, cand, cand_mask),
        cand_scenario=_take(events.scenario, cand, cand_mask),
        cand_ts=_take(events.ts, cand, cand_mask),
        cand_mask=torch.from_numpy(cand_mask),
        label=_take(events.label, cand, cand_mask).float(),
        cand_action=_take(events.action, cand, cand_mask),
        cand_ctx=_take_features(events.ctx, cand, cand_mask),
        cand_num=_take_features(events.num, cand, cand_mask),
    )


def _stack(table: pa.Table, kind: str, dtype) -> np.ndarray | None:
    """(N, F) the table's per-event feature columns of ``kind`` (sorted by name), or None without any."""
    names = event_feature_columns(table.column_names, kind)
    if not names:
        return None
    return np.stack([table.column(c).to_numpy().astype(dtype, copy=False) for c in names], axis=1)


def event_feature_columns(columns: Sequence[str], kind: str) -> list[str]:
    """The per-event feature columns of ``kind`` ("ctx" or "num", ``feature_kind``) among ``columns``,
    sorted by name: the order of their features everywhere (Batch, DataInfo)."""
    return sorted(c for c in columns if feature_kind(c) == kind)


def _first_and_cuts(events: UserEvents, rows: Rows) -> tuple[np.ndarray, np.ndarray]:
    """(B,) global position of each row's user's first event, (B,) of its first candidate (the cut)."""
    first = events.offsets[rows.user]
    return first, first + rows.cut


def _take(column: np.ndarray, index: np.ndarray, mask: np.ndarray) -> torch.Tensor:
    """column[index] as int64, 0 where mask is False."""
    return torch.from_numpy(np.where(mask, column[index], 0).astype(np.int64))


def _take_features(columns: np.ndarray | None, index: np.ndarray, mask: np.ndarray) -> torch.Tensor | None:
    """columns (N, F)[index] -> (..., F): int64 ids or float32 values, 0 where mask is False; None
    when the events carry no such features."""
    if columns is None:
        return None
    taken = np.where(mask[..., None], columns[index], 0)
    return torch.from_numpy(taken.astype(np.int64 if columns.dtype.kind == "i" else np.float32))
