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
            raise ValueError(f"strategy {self.name!r}: kind {self.kind!r} not one of {', '.join(KINDS)}")
        if self.length < 1:
            raise ValueError(f"strategy {self.name!r}: length must be >= 1, got {self.length}")
        if self.kind in ("action", "scenario") and not self.values:
            raise ValueError(f"strategy {self.name!r}: kind {self.kind} needs values")
        if self.kind == "window" and self.window_s <= 0:
            raise ValueError(f"strategy {self.name!r}: kind window needs window_s > 0")
        object.__setattr__(self, "values", tuple(str(v) for v in self.values))

    @classmethod
    def from_dict(cls, d: dict) -> "Strategy":
        unknown = set(d) - {"name", "kind", "length", "values", "window_s"}
        if unknown:
            raise ValueError(f"strategy {d.get('name')!r}: unknown keys {sorted(unknown)}")
        return cls(**d)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["values"] = list(self.values)
        return d
