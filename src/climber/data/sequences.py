"""MSE: multi-scale sequence extraction. One user history -> Nb subsequences, one per strategy.

A strategy picks events of a user's history that happened strictly before the first candidate and
keeps the most recent ``length`` of them:

- ``recency``: all events;
- ``action``: events whose raw action is in ``values`` (e.g. likes only, over the whole lifetime);
- ``scenario``: events whose raw scenario is in ``values``;
- ``window``: events within ``window_s`` seconds before the first candidate;
- ``positive``: events whose label is 1 (positive feedback, e.g. over the whole lifetime); works on
  any data set, since every prepared event has a label.

YAML form (one list item per strategy)::

    - {name: recent, kind: recency, length: 64}
    - {name: likes, kind: action, values: ["4", "5"], length: 512}
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable, Protocol, Sequence

import numpy as np

from climber.config import ConfigError

KINDS = ("recency", "action", "scenario", "window", "positive")


@dataclass(frozen=True)
class Strategy:
    name: str
    kind: str = "recency"  # one of KINDS
    length: int = 64  # the most recent events kept
    values: tuple[str, ...] = ()  # raw action / scenario values, for kind action / scenario
    window_s: int = 0  # for kind window: seconds before the first candidate

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError(f"strategy {self.name!r}: kind {self.kind!r} not one of {', '.join(KINDS)}")
        if self.length < 1:
            raise ConfigError(f"strategy {self.name!r}: length must be >= 1, got {self.length}")
        if self.kind in ("action", "scenario") and not self.values:
            raise ConfigError(f"strategy {self.name!r}: kind {self.kind} needs values")
        if self.kind == "window" and self.window_s <= 0:
            raise ConfigError(f"strategy {self.name!r}: kind window needs window_s > 0")
        object.__setattr__(self, "values", tuple(str(v) for v in self.values))

    @classmethod
    def from_dict(cls, d: dict) -> "Strategy":
        unknown = set(d) - {"name", "kind", "length", "values", "window_s"}
        if unknown:
            raise ConfigError(f"strategy {d.get('name')!r}: unknown keys {sorted(unknown)}")
        return cls(**d)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["values"] = list(self.values)
        return d


class Events(Protocol):
    """Per-event arrays (N,) of one or more users, sorted by (user, ts, item)."""

    action: np.ndarray
    scenario: np.ndarray
    ts: np.ndarray
    label: np.ndarray


@dataclass(frozen=True)
class ResolvedStrategy:
    """A strategy whose raw action / scenario values are mapped to the prepared data's dense ids."""

    strategy: Strategy
    ids: tuple[int, ...] = ()  # dense action / scenario ids, for kind action / scenario

    def matching_positions(self, events: Events) -> np.ndarray | None:
        """(M,) ascending positions of the events the strategy may keep, or None when it may keep any."""
        kind = self.strategy.kind
        if kind == "action":
            return np.flatnonzero(np.isin(events.action, self.ids))
        if kind == "scenario":
            return np.flatnonzero(np.isin(events.scenario, self.ids))
        if kind == "positive":
            return np.flatnonzero(events.label == 1)
        return None  # recency, window: every event (the window bound depends on the cut)


def resolve(
    strategies: Iterable[Strategy], actions: Sequence[str], scenarios: Sequence[str]
) -> list[ResolvedStrategy]:
    """Map each strategy's raw values to dense ids (id = index in ``actions`` / ``scenarios`` + 1)."""
    known = {"action": [str(a) for a in actions], "scenario": [str(s) for s in scenarios]}
    resolved = []
    for s in strategies:
        ids = ()
        if s.kind in known:
            values = known[s.kind]
            unknown = [v for v in s.values if v not in values]
            if unknown:
                raise ConfigError(
                    f"strategy {s.name!r}: {s.kind} value {unknown[0]!r} is not in the data; "
                    f"known {s.kind} values: {', '.join(values)}"
                )
            ids = tuple(values.index(v) + 1 for v in s.values)
        resolved.append(ResolvedStrategy(s, ids))
    return resolved


class Selector:
    """One strategy over the events of many users: matching positions found once, then any number of
    rows selected at once with binary searches (no per-event Python work).

    A row is given by ``starts`` (global position of its user's first event) and ``cuts`` (global
    position of its first candidate); it selects the most recent ``length`` matching events in
    ``[starts, cuts)``, for kind window only those with ts >= ts[cuts] - window_s.
    """

    def __init__(self, resolved: ResolvedStrategy, events: Events):
        self.strategy = resolved.strategy
        self.ts = events.ts
        self.positions = resolved.matching_positions(events)

    def ranges(self, starts: np.ndarray, cuts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(lo, hi), each (B,): row i selects ``positions[lo_i:hi_i]`` (event positions when positions is None)."""
        first = starts
        if self.strategy.kind == "window":
            first = _first_at_least(self.ts, starts, cuts, self.ts[cuts] - self.strategy.window_s)
        lo, hi = first, cuts
        if self.positions is not None:
            lo, hi = np.searchsorted(self.positions, first), np.searchsorted(self.positions, cuts)
        return np.maximum(lo, hi - self.strategy.length), hi

    def gather(self, starts: np.ndarray, cuts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(index, mask), each (B, L): global event positions, left-padded (most recent event last).

        L is the longest selection among the rows (at least 1, at most the strategy's length); padded
        slots have mask False and an arbitrary valid index.
        """
        lo, hi = self.ranges(starts, cuts)
        width = max(1, int((hi - lo).max(initial=0)))
        src = hi[:, None] - width + np.arange(width)  # (B, L) index into positions, most recent last
        mask = src >= lo[:, None]
        src = np.where(mask, src, 0)  # padding points at slot 0
        if self.positions is None:
            return src, mask
        if len(self.positions) == 0:  # nothing matches: every slot is padding
            return np.zeros_like(src), mask
        return self.positions[src], mask


def select(resolved: ResolvedStrategy, events: Events, cut: int) -> np.ndarray:
    """Positions (ascending) that ``resolved`` selects from one user's events before position ``cut``.

    ``cut`` is the position of the first candidate: 0 <= cut < n (cut == n, all history, is allowed for
    every kind but window, whose bound is measured from the candidate's ts).
    """
    n = len(events.ts)
    last = n - 1 if resolved.strategy.kind == "window" else n
    if not 0 <= cut <= last:
        raise ValueError(f"strategy {resolved.strategy.name!r}: cut {cut} outside [0, {last}] for {n} events")
    index, mask = Selector(resolved, events).gather(np.zeros(1, dtype=np.int64), np.array([cut]))
    return index[mask]


def _first_at_least(ts: np.ndarray, lo: np.ndarray, hi: np.ndarray, bound: np.ndarray) -> np.ndarray:
    """Per row, the first position p in [lo, hi) with ts[p] >= bound (hi when none); ts ascending there.

    A binary search run for all rows at once: log2(max(hi - lo)) + 1 vectorised steps.
    """
    lo, hi = lo.astype(np.int64, copy=True), hi.astype(np.int64, copy=True)
    active = np.flatnonzero(lo < hi)
    while active.size:
        mid = (lo[active] + hi[active]) // 2
        right = ts[mid] < bound[active]
        lo[active[right]] = mid[right] + 1
        hi[active[~right]] = mid[~right]
        active = active[lo[active] < hi[active]]
    return lo
