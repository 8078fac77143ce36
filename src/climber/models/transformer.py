"""Transformer: a SASRec-style baseline (Kang & McAuley, "Self-attentive sequential recommendation", 2018)
scoring C candidates of one user in one pass ("single user, multiple items").

    tokens: history event = item + action + scenario + pos[k]   (k-th most recent event, k = 1..L)
            candidate     = item + scenario + pos[0]            (every candidate sits right after the history)
    [history (L) ; candidates (C)] --[n_layers pre-norm layers, final LayerNorm]--> states (B, L + C, d)
    head MLP on [candidate state ; candidate item embedding]                     -> logits (B, C)

Attention is plain softmax(Q K^T / sqrt(dh)) V (no relative bias, no temperature) under the
"single user, multiple items" mask: history causal, candidates see the whole history and themselves.
Positions are counted from the most recent event backwards, so left padding does not shift them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from climber.data.batch import Batch, Subsequence
from climber.data.sequences import Strategy
from climber.models import DataInfo, SampleShape
from climber.models.base import ModelConfig
from climber.models.layers import (
    IMPLS,
    EventEmbedding,
    TransformerLayer,
    history_candidate_mask,
    init_weights,
    mlp,
    mlp_flops,
)


@dataclass
class TransformerConfig(ModelConfig):
    d_model: int = 64
    n_heads: int = 2
    n_layers: int = 2
    ffn_mult: int = 4
    dropout: float = 0.1
    max_len: int = 64  # the most recent events kept (one recency subsequence); size of the position table
    attention: str = "sdpa"  # "reference" | "sdpa"

    def __post_init__(self):
        for name in ("d_model", "n_heads", "n_layers", "ffn_mult", "max_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"TransformerConfig.{name}: must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"TransformerConfig: d_model {self.d_model} not divisible by n_heads {self.n_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"TransformerConfig.dropout: must be in [0, 1), got {self.dropout}")
        if self.attention not in IMPLS:
            raise ValueError(f"TransformerConfig.attention: {self.attention!r} not one of {', '.join(IMPLS)}")


class Transformer(nn.Module):
    def __init__(self, cfg: TransformerConfig, info: DataInfo):
        super().__init__()
        self.cfg, self.info = cfg, info
        d = cfg.d_model
        self.emb = EventEmbedding(info, d)
        self.pos_emb = nn.Embedding(cfg.max_len + 1, d)  # 0: candidates; k: the k-th most recent event
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(
            TransformerLayer(d, cfg.n_heads, cfg.ffn_mult, cfg.dropout, cfg.attention) for _ in range(cfg.n_layers)
        )
        self.ln_f = nn.LayerNorm(d)
        self.head = mlp([2 * d, d, 1], cfg.dropout, act=nn.GELU)  # [candidate state ; item emb] -> logit
        self.apply(init_weights)

    def strategies(self) -> list[Strategy]:
        return [Strategy(name="history", kind="recency", length=self.cfg.max_len)]

    def _history(self, batch: Batch) -> Subsequence:
        if len(batch.seqs) != 1:
            raise ValueError(f"Transformer: batch has {len(batch.seqs)} subsequences, model expects 1 (history)")
        seq = batch.seqs[0]
        L = seq.item.shape[1]
        if L > self.cfg.max_len and seq.mask[:, : L - self.cfg.max_len].any():
            raise ValueError(f"Transformer: a history has more than max_len={self.cfg.max_len} real events")
        return seq

    def hidden_states(self, batch: Batch) -> torch.Tensor:
        """Final states over [history ; candidates]: (B, L + C, d). History states never depend on the
        candidates nor on later history events (the KV-cacheable part)."""
        seq = self._history(batch)
        L, dev = seq.item.shape[1], seq.item.device
        back = (L - torch.arange(L, device=dev)).clamp(max=self.cfg.max_len)  # (L,) L .. 1, most recent = 1
        hist = self.emb.history(seq) + self.pos_emb(back * seq.mask)  # (B, L, d); padding -> slot 0, never seen
        cand = self.emb.candidate(batch) + self.pos_emb.weight[0]  # (B, C, d)
        x = self.drop(torch.cat([hist, cand], dim=1))  # (B, N, d), N = L + C
        mask = history_candidate_mask(seq.mask, batch.cand_mask)  # (B, N, N)
        for layer in self.layers:
            x = layer(x, mask)
        return self.ln_f(x)

    def forward(self, batch: Batch) -> torch.Tensor:
        """-> logits (B, C); padding candidates get finite logits that callers mask out."""
        C = batch.cand_item.shape[1]
        h = self.hidden_states(batch)[:, -C:]  # (B, C, d)
        return self.head(torch.cat([h, self.emb.item(batch.cand_item)], dim=-1)).squeeze(-1)

    def flops(self, shape: SampleShape) -> int:
        """Analytic forward FLOPs of one row (2 m n k per matmul; lookups and elementwise ops count 0).
        Attention counts Q K^T and A V over the full (masked) N x N matrices, as computed."""
        if len(shape.lengths) != 1:
            raise ValueError(f"Transformer.flops: {len(shape.lengths)} lengths given, model has one history")
        d, f = self.cfg.d_model, self.cfg.ffn_mult
        n = shape.lengths[0] + shape.candidates
        # per layer: QKV and output projections, Q K^T and A V, two FFN matmuls
        layer = 2 * n * d * 3 * d + 2 * n * d * d + 2 * 2 * n * n * d + 2 * 2 * n * d * f * d
        return self.cfg.n_layers * layer + shape.candidates * mlp_flops([2 * d, d, 1])
