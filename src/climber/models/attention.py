"""Structured attention of "single user, multiple items" sequences: no N x N (or C x C) tensor.

Under the protocol's mask a history token attends causally to the history, and a candidate attends to the
whole history and to itself, never to another candidate. Both are one pattern, "a visible prefix of the
keys, plus the query's own key":

    history token at position i:   keys j < i of the history (cached ones included)   + itself
    candidate:                     keys j < L (every history event)                     + itself

so a block runs in two steps that training, evaluation and the serving engine share:

    encode   the history tokens through the block's layers; the last layer computes only its keys and
             values (only candidates read them)                              -> per layer (K, V) of the history
    score    the candidate tokens through every layer, as queries against that layer's history (K, V) and
             their own key                                                   -> candidate states

``Plan`` holds what a block's attention needs besides the per-layer Q, K, V (positions, timestamps, side
ids, the key mask, each query's visible prefix, the temperature, the relative bias), built once per block
call. ``Plan.attend`` computes, per head,

    softmax: Y = softmax((Q K^T / sqrt(dh) + bias) / tau) V      over the visible keys (Climber ATL, Transformer)
    silu:    Y = SiLU(Q K^T + bias) / n . V                      over the visible keys (HSTU, no normalisation)

with one of two kernels:

- ``tiled``: queries in tiles of ``QUERY_TILE``; each tile scores only its visible key range (causal: the
  keys up to the tile's last query), builds its bias and mask itself, and adds the own-key score as one
  more column of the softmax. Under autograd a large tile set is checkpointed (recomputed in backward),
  so the memory held for backward grows with the history length, not with its square.
- ``flex``: ``torch.nn.attention.flex_attention`` with the bias and temperature in a ``score_mod`` and the
  structure in a ``block_mask`` (climber.models.flex; compiled; no backward on CPU in torch 2.13; HSTU's
  pointwise attention and attention dropout run tiled).

``model.attention`` selects the path: "structured" (the default: the tiled kernel on every device; on
the CPU flex has no backward and its forward was 1.3x faster at history 1,024 and slower at 4,096,
docs/benchmarks.md; on CUDA it is not measured yet, so it is opt-in), "tiled", "flex", or the
full-sequence oracles "dense" (the
[history ; candidates] sequence with an N x N mask through scaled_dot_product_attention) and "reference"
(the same as an explicit matmul). "sdpa", the earlier name of "dense", is still read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from climber.config import ConfigError

ATTENTION = ("structured", "tiled", "flex", "dense", "reference")
FULL_SEQUENCE = ("dense", "reference")  # the oracles: one pass over [history ; candidates] with an N x N mask
LEGACY_NAMES = {"sdpa": "dense"}
QUERY_TILE = 128  # queries per tile of the tiled kernel
CHECKPOINT_SCORES = 1 << 22  # recompute tiles in backward when a layer's scores would exceed this many floats


def check_attention(owner: str, name: str) -> str:
    """The attention path ``name`` (legacy names mapped); ConfigError naming ``owner`` when unknown."""
    name = LEGACY_NAMES.get(name, name)
    if name not in ATTENTION:
        raise ConfigError(f"{owner}.attention: {name!r} not one of {', '.join(ATTENTION)}")
    return name


def full_sequence_impl(attention: str) -> str:
    """The full-sequence attention of a layer under path ``attention``: the oracle itself, else "dense"
    (structured paths use it only where a sequence has no structure, e.g. Climber's fusion over blocks)."""
    return attention if attention in FULL_SEQUENCE else "dense"


def kernel_for(attention: str) -> str:
    """The kernel of the structured steps under path ``attention``: "structured" is the tiled kernel on
    every device until flex is measured faster on one (see the module doc); the full-sequence oracles run
    their structured steps (the serving engine's) tiled."""
    if attention == "structured" or attention in FULL_SEQUENCE:
        return "tiled"
    return attention


@dataclass
class Keys:
    """The history tokens a block's queries attend to, besides their per-layer K and V."""

    ts: torch.Tensor  # (B, M) int64 seconds
    mask: torch.Tensor  # (B, M) bool, True = a real event
    side: torch.Tensor | None = None  # (B, M, F) item side feature ids (Climber's match bias / mask)


@dataclass
class Plan:
    """What a block's attention needs besides the per-layer Q, K, V. N queries, M keys; the keys are the
    history tokens (cached ones first), the queries either the last N of them (history) or candidates."""

    q_pos: torch.Tensor  # (N,) int64 positions of the queries
    q_ts: torch.Tensor  # (B, N) int64 seconds
    limit: torch.Tensor  # (N,) int64, non-decreasing: query i sees the keys j < limit[i], and itself
    k_pos: torch.Tensor  # (M,) int64 positions of the keys
    k_ts: torch.Tensor  # (B, M) int64 seconds
    k_mask: torch.Tensor  # (B, M) bool, True = a real event
    kernel: str = "tiled"  # "tiled" | "flex"
    tau: torch.Tensor | None = None  # (B, N) temperature of each query (None: 1)
    rel_bias: object = None  # a climber.models.layers.RelativeBias, or None
    q_side: torch.Tensor | None = None  # (B, N, F) item side feature ids (match bias / mask)
    k_side: torch.Tensor | None = None  # (B, M, F)
    match_mask: bool = False  # a query sees only keys whose items share all its known side values
    pointwise: float = 0.0  # > 0: HSTU's SiLU(scores) / pointwise instead of the softmax

    @classmethod
    def history(cls, ts: torch.Tensor, side, mask: torch.Tensor, past: int, kernel: str, **kw) -> "Plan":
        """The causal plan of history tokens: keys = all P + N history tokens at positions 0 .. P + N - 1
        (ts (B, P + N), side (B, P + N, F) or None, mask (B, P + N)); queries = the last N of them."""
        pos = torch.arange(ts.shape[1], device=ts.device)
        return cls(q_pos=pos[past:], q_ts=ts[:, past:], limit=pos[past:], k_pos=pos, k_ts=ts, k_mask=mask,
                   kernel=kernel, q_side=None if side is None else side[:, past:], k_side=side, **kw)

    @classmethod
    def candidates(cls, keys: "Plan", cand_ts: torch.Tensor, cand_side, **kw) -> "Plan":
        """The plan of C candidates (ts (B, C), side (B, C, F) or None) against the keys of a history plan:
        every candidate sits at position M, right after the last history slot, and sees every key."""
        M, C = keys.k_pos.shape[0], cand_ts.shape[1]
        at = torch.full((C,), M, dtype=torch.long, device=cand_ts.device)
        return replace(keys, q_pos=at, q_ts=cand_ts, limit=at, q_side=cand_side, **kw)

    def with_bias(self, rel_bias) -> "Plan":
        return replace(self, rel_bias=rel_bias)

    def attend(self, q, k_self, v_self, k, v, dropout_p: float = 0.0, sink=None) -> torch.Tensor:
        """q, k_self, v_self (B, H, N, dh) the queries and their own keys and values; k, v (B, H, M, dh) the
        keys of the plan; sink (k, v) each (B, H, 1, dh): a key every query sees with bias 0, or None
        -> (B, H, N, dh)."""
        if self.kernel == "flex" and not self.pointwise and not dropout_p:  # else: not a softmax score_mod
            from climber.models.flex import flex_attend

            return flex_attend(self, q, k_self, v_self, k, v, sink)
        if self.kernel not in ("tiled", "flex"):
            raise ValueError(f"attention kernel {self.kernel!r} not one of tiled, flex")
        return self._tiled(q, k_self, v_self, k, v, dropout_p, sink)

    # ------------------------------------------------------------------ tiled kernel

    def _tiled(self, q, k_self, v_self, k, v, dropout_p, sink) -> torch.Tensor:
        B, H, N, _ = q.shape
        if N == 0:
            return torch.zeros_like(q)
        first = self.first_key()
        limits = self.limit.tolist()
        scores = sum(B * H * min(QUERY_TILE, N - a) * max(0, limits[min(N, a + QUERY_TILE) - 1] - first)
                     for a in range(0, N, QUERY_TILE))
        recompute = torch.is_grad_enabled() and scores > CHECKPOINT_SCORES
        out = []
        for a in range(0, N, QUERY_TILE):
            b = min(N, a + QUERY_TILE)
            hi = max(first, limits[b - 1])  # the tile's visible keys are [first, hi)
            args = (q[:, :, a:b], k_self[:, :, a:b], v_self[:, :, a:b], k[:, :, first:hi], v[:, :, first:hi],
                    a, b, first, hi, dropout_p, sink)
            out.append(checkpoint(self._tile, *args, use_reentrant=False) if recompute else self._tile(*args))
        return torch.cat(out, dim=2)

    def first_key(self) -> int:
        """The first key that is real in some row: the keys before it are padding everywhere."""
        real = self.k_mask.any(dim=0)
        return int(real.int().argmax()) if bool(real.any()) else self.k_mask.shape[1]

    def _tile(self, q, k_self, v_self, k, v, a, b, lo, hi, dropout_p, sink) -> torch.Tensor:
        """Queries a .. b - 1 (q (B, H, T, dh)) against keys lo .. hi - 1 (k, v (B, H, K, dh)) and their own
        keys -> (B, H, T, dh)."""
        if not self.pointwise:
            q = q / math.sqrt(q.shape[-1])  # scaled here, (T, dh), rather than the (T, K) scores
        s = q @ k.transpose(-2, -1)  # (B, H, T, K)
        s_self = (q * k_self).sum(dim=-1)  # (B, H, T)
        if self.rel_bias is not None:
            s = s + self.rel_bias.pairs(self.q_pos[a:b], self.q_ts[:, a:b], self.k_pos[lo:hi], self.k_ts[:, lo:hi],
                                        *self._sides(a, b, lo, hi))
            s_self = s_self + self.rel_bias.on_itself(None if self.q_side is None else self.q_side[:, a:b])
        visible = self.k_mask[:, None, lo:hi] & (self.k_pos[None, None, lo:hi] < self.limit[None, a:b, None])
        if self.match_mask:
            from climber.models.layers import side_matches

            visible = visible & side_matches(self.q_side[:, a:b], self.k_side[:, lo:hi]).all(dim=-1)  # (B, T, K)
        if self.pointwise:  # HSTU: SiLU weights, 0 where hidden, no normalisation over the keys
            w = (F.silu(s) / self.pointwise).masked_fill(~visible[:, None], 0.0)
            return w @ v + (F.silu(s_self) / self.pointwise)[..., None] * v_self
        columns = [s, s_self[..., None]]
        if sink is not None:
            columns.append(q @ sink[0].transpose(-2, -1))  # (B, H, T, 1), bias 0
        z = torch.cat(columns, dim=-1)  # (B, H, T, K + 1 [+ 1])
        if self.tau is not None:
            z = z / self.tau[:, None, a:b, None]  # before the mask: no inf in the temperature's gradient
        z = z.masked_fill(F.pad(~visible, (0, z.shape[-1] - k.shape[2]))[:, None], float("-inf"))
        p = F.dropout(z.softmax(dim=-1), p=dropout_p, training=dropout_p > 0)
        K = k.shape[2]
        y = p[..., :K] @ v + p[..., K : K + 1] * v_self
        return y if sink is None else y + p[..., K + 1 :] * sink[1]

    def _sides(self, a, b, lo, hi):
        if self.q_side is None:
            return None, None
        return self.q_side[:, a:b], self.k_side[:, lo:hi]


def causal_tile_pairs(n: int, past: int = 0) -> int:
    """(query, key) score pairs the tiled kernel computes for n history queries after ``past`` cached keys,
    every key real: per tile of QUERY_TILE queries, its queries x the keys up to its last query."""
    return sum(min(QUERY_TILE, n - a) * (past + min(n, a + QUERY_TILE) - 1) for a in range(0, n, QUERY_TILE))
