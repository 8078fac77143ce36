"""The batch contract between data and models. Shapes: B rows (one user each), C candidates, L_k events.

A row is one user's history, extracted into one Subsequence per MSE strategy, plus up to C candidates.
"Single user, multiple items": candidates see the whole history and themselves only, never each other;
"single user, single item" is the same with C = 1. Padding is on the left of subsequences (the most
recent event is always at index L_k - 1) and on the right of candidates.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class Subsequence:
    item: torch.Tensor  # (B, L) int64 dense item ids, 0 = padding
    action: torch.Tensor  # (B, L) int64 dense action ids, 0 = padding
    scenario: torch.Tensor  # (B, L) int64 dense scenario ids, 0 = padding
    ts: torch.Tensor  # (B, L) int64 seconds, 0 at padding
    mask: torch.Tensor  # (B, L) bool, True = real event
    ctx: torch.Tensor | None = None  # (B, L, F_ctx) int64 ctx_* value ids, 0 at padding; None: the data has none
    num: torch.Tensor | None = None  # (B, L, F_num) float32 num_* values (raw), 0 at padding; None: none

    def apply(self, fn) -> "Subsequence":
        """``fn`` applied to every tensor."""
        return Subsequence(**{f.name: _maybe(fn, getattr(self, f.name)) for f in fields(self)})

    def to(self, device) -> "Subsequence":
        return self.apply(lambda t: t.to(device))


@dataclass
class Batch:
    user: torch.Tensor  # (B,) int64 dense user ids
    seqs: list[Subsequence]  # one per strategy, in the order of the model's strategies
    cand_item: torch.Tensor  # (B, C) int64, 0 = padding
    cand_scenario: torch.Tensor  # (B, C) int64
    cand_ts: torch.Tensor  # (B, C) int64 seconds
    cand_mask: torch.Tensor  # (B, C) bool, True = real candidate
    label: torch.Tensor  # (B, C) float32, 0 at padding
    cand_action: torch.Tensor  # (B, C) int64 dense action id: a training TARGET (multi-task heads), never an input
    cand_ctx: torch.Tensor | None = None  # (B, C, F_ctx) int64 the candidates' ctx_* value ids (request context)
    cand_num: torch.Tensor | None = None  # (B, C, F_num) float32 the candidates' num_* values
    user_values: torch.Tensor | None = None  # (B, F_user) int64 user_* value ids given with a request (serving);
    user_bags: torch.Tensor | None = None  # (B, Fb, K) int64 and its bags; None: the model's stored profile

    def apply(self, fn) -> "Batch":
        """``fn`` applied to every tensor, subsequences included."""
        moved = {f.name: _maybe(fn, getattr(self, f.name)) for f in fields(self) if f.name != "seqs"}
        return Batch(seqs=[s.apply(fn) for s in self.seqs], **moved)

    def to(self, device) -> "Batch":
        return self.apply(lambda t: t.to(device))

    def pin_memory(self) -> "Batch":
        """The batch in page-locked memory (what DataLoader's ``pin_memory`` calls), for fast copies to
        CUDA; fields may also be numpy arrays (a batch on its way from a loader's worker process)."""
        return self.apply(lambda t: torch.as_tensor(t).pin_memory())

    def take(self, rows) -> "Batch":
        """The rows ``rows`` (an index tensor, list or slice) of every field, subsequences included."""
        return self.apply(lambda t: t[rows])

    @property
    def num_candidates(self) -> int:
        return int(self.cand_mask.sum())

    def history_slots(self) -> tuple[int, int]:
        """(padding, all) history token slots, summed over the subsequences: B * L_k each."""
        slots = sum(s.mask.numel() for s in self.seqs)
        return slots - sum(int(s.mask.sum()) for s in self.seqs), slots


def _maybe(fn, value):
    """``fn(value)``, or None for a feature the batch does not carry."""
    return None if value is None else fn(value)
