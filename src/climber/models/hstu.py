"""HSTU: Hierarchical Sequential Transduction Units (Zhai et al., "Actions speak louder than words:
trillion-parameter sequential transducers for generative recommendations", ICML 2024), as a ranking
baseline scoring C candidates of one user in one pass ("single user, multiple items").

    tokens: history event = item + action + scenario, candidate = item + scenario (no absolute positions:
            order and recency enter through the relative bias rab^{p,t})
    [history (L) ; candidates (C)] --[n_layers HSTU layers, final LayerNorm]--> states (B, L + C, d)
    head MLP on [candidate state ; candidate item embedding]                 -> logits (B, C)

One HSTU layer (paper eqs. 1-3), per head for Q K^T and A V:

    U, V, Q, K = split(SiLU(f1(LN(X))))
    A          = M * SiLU(Q K^T + rab^{p,t}) / n        pointwise, NO softmax; M the 0/1 mask
    Y          = f2(LN(A V) * U)
    X          = X + Dropout(Y)

M is the "single user, multiple items" mask (history causal, candidates see the whole history and
themselves); masked keys get weight exactly 0. The normaliser n is the constant max_len, not the number
of visible keys: the paper's pointwise aggregation keeps the intensity of engagement (a longer history
sums more terms) instead of averaging it away, and a constant keeps left padding and the candidate count
out of every score. rab^{p,t} is a per-layer, per-head learned bias of the bucketed relative position and
the bucketed time gap (query minus key); candidates sit at position L, right after the most recent event.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from climber.data.batch import Batch
from climber.data.sequences import Strategy
from climber.models import DataInfo, SampleShape
from climber.models.base import ModelConfig
from climber.models.layers import (
    candidate_logits,
    IdEmbeddings,
    RelativeBias,
    cached_layers,
    history_candidate_mask,
    history_candidate_positions,
    history_strategy,
    init_weights,
    mlp,
    mlp_flops,
    one_history,
)


@dataclass
class HSTUConfig(ModelConfig):
    d_model: int = 64
    n_heads: int = 2
    n_layers: int = 2
    dropout: float = 0.1
    max_len: int = 64  # the most recent events kept (one recency subsequence); also the normaliser n
    pos_buckets: int = 32
    time_buckets: int = 32

    def __post_init__(self):
        self._at_least(1, "d_model", "n_heads", "n_layers", "max_len", "time_buckets")
        self._at_least(2, "pos_buckets")
        if self.d_model % self.n_heads:
            raise ValueError(f"HSTUConfig: d_model {self.d_model} not divisible by n_heads {self.n_heads}")
        self._dropout_in_range()


class HSTULayer(nn.Module):
    """One HSTU layer (see the module docstring). x (B, N, d), mask (B, N, N), pos (1, N), ts (B, N)."""

    def __init__(self, cfg: HSTUConfig):
        super().__init__()
        d = cfg.d_model
        self.n_heads, self.n = cfg.n_heads, cfg.max_len
        self.ln_in = nn.LayerNorm(d)
        self.f1 = nn.Linear(d, 4 * d)
        self.rab = RelativeBias(cfg.n_heads, cfg.pos_buckets, cfg.time_buckets, cfg.max_len + 1)
        self.ln_av = nn.LayerNorm(d)
        self.f2 = nn.Linear(d, d)
        self.drop = nn.Dropout(cfg.dropout)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """U, V, Q, K = split(SiLU(f1(LN(X)))): (B, N, d) -> four (B, N, d)."""
        return F.silu(self.f1(self.ln_in(x))).chunk(4, dim=-1)

    def heads(self, t: torch.Tensor) -> torch.Tensor:  # (B, N, d) -> (B, H, N, dh)
        B, N, d = t.shape
        return t.view(B, N, self.n_heads, d // self.n_heads).transpose(1, 2)

    def attention_weights(self, q, k, mask, pos, ts) -> torch.Tensor:
        """A = M * SiLU(Q K^T + rab) / n: q (B, N, d) of the last N of the M keys k (B, M, d), mask (B, N, M),
        pos (1, M), ts (B, M) -> (B, H, N, M); exactly 0 where mask is False."""
        rab = self.rab(pos, ts, k.shape[1] - q.shape[1])  # (B, H, N, M)
        scores = self.heads(q) @ self.heads(k).transpose(-2, -1) + rab
        return (F.silu(scores) / self.n).masked_fill(~mask[:, None], 0.0)

    def forward(self, x, mask, pos, ts, past=None, return_kv: bool = False):
        """The layer over the query tokens x (B, N, d) that follow P cached tokens; past (k, v) each
        (B, P, d) of those, or None (P = 0); mask (B, N, P + N); pos (1, P + N), ts (B, P + N) of all
        tokens -> (B, N, d), and with return_kv the (k, v) of all P + N tokens, each (B, P + N, d)."""
        B, N, d = x.shape
        u, v, q, k = self.project(x)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=1), torch.cat([past[1], v], dim=1)  # (B, P + N, d)
        av = self.attention_weights(q, k, mask, pos, ts) @ self.heads(v)  # (B, H, N, dh)
        av = av.transpose(1, 2).reshape(B, N, d)  # heads concatenated
        x = x + self.drop(self.f2(self.ln_av(av) * u))
        return (x, (k, v)) if return_kv else x


class HSTU(nn.Module):
    def __init__(self, cfg: HSTUConfig, info: DataInfo):
        super().__init__()
        self.cfg, self.info = cfg, info
        d = cfg.d_model
        self.emb = IdEmbeddings(info, d)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(HSTULayer(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = mlp([2 * d, d, 1], cfg.dropout, act=nn.GELU)  # [candidate state ; item emb] -> logit
        self.apply(init_weights)

    def strategies(self) -> list[Strategy]:
        return history_strategy(self.cfg.max_len)

    def layer_stack(self, x, past, mask, pos, ts):
        """The layers and the final LayerNorm over tokens x (B, N, d) that follow P cached tokens; past:
        per layer (k, v) of those, or None (P = 0); mask (B, N, P + N); pos (1, P + N), ts (B, P + N) of
        all tokens -> (B, N, d), per layer (k, v) of all P + N tokens."""
        x, kvs = cached_layers(self.layers, x, past, mask, pos, ts)
        return self.ln_f(x), kvs

    def hidden_states(self, batch: Batch) -> torch.Tensor:
        """Final states over [history ; candidates]: (B, L + C, d). History states never depend on the
        candidates nor on later history events (the KV-cacheable part)."""
        seq = one_history(batch, "HSTU")
        x = self.drop(torch.cat([self.emb.history(seq), self.emb.candidate(batch)], dim=1))  # (B, N, d)
        mask = history_candidate_mask(seq.mask, batch.cand_mask)  # (B, N, N)
        pos, ts = history_candidate_positions(seq, batch)  # (1, N), (B, N)
        return self.layer_stack(x, None, mask, pos, ts)[0]

    def forward(self, batch: Batch) -> torch.Tensor:
        """-> logits (B, C); padding candidates get finite logits that callers mask out."""
        return candidate_logits(self.head, self.hidden_states(batch), self.emb, batch)

    def flops(self, shape: SampleShape) -> int:
        """Analytic forward FLOPs of one row (2 m n k per matmul; lookups and elementwise ops count 0).
        Attention counts Q K^T and A V over the full (masked) N x N matrices, as computed."""
        if len(shape.lengths) != 1:
            raise ValueError(f"HSTU.flops: {len(shape.lengths)} lengths given, model has one history")
        d = self.cfg.d_model
        n = shape.lengths[0] + shape.candidates
        layer = 2 * n * d * 4 * d + 2 * 2 * n * n * d + 2 * n * d * d  # f1, Q K^T and A V, f2
        return self.cfg.n_layers * layer + shape.candidates * mlp_flops([2 * d, d, 1])
