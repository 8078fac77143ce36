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
    candidate_logits,
    IMPLS,
    IdEmbeddings,
    TransformerLayer,
    cached_layers,
    history_candidate_mask,
    history_strategy,
    init_weights,
    mlp,
    mlp_flops,
    one_history,
    transformer_layer_flops,
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
        self._at_least(1, "d_model", "n_heads", "n_layers", "ffn_mult", "max_len")
        if self.d_model % self.n_heads:
            raise ValueError(f"TransformerConfig: d_model {self.d_model} not divisible by n_heads {self.n_heads}")
        self._dropout_in_range()
        if self.attention not in IMPLS:
            raise ValueError(f"TransformerConfig.attention: {self.attention!r} not one of {', '.join(IMPLS)}")


class Transformer(nn.Module):
    def __init__(self, cfg: TransformerConfig, info: DataInfo):
        super().__init__()
        self.cfg, self.info = cfg, info
        d = cfg.d_model
        self.emb = IdEmbeddings(info, d)
        self.pos_emb = nn.Embedding(cfg.max_len + 1, d)  # 0: candidates; k: the k-th most recent event
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(
            TransformerLayer(d, cfg.n_heads, cfg.ffn_mult, cfg.dropout, cfg.attention) for _ in range(cfg.n_layers)
        )
        self.ln_f = nn.LayerNorm(d)
        self.head = mlp([2 * d, d, 1], cfg.dropout, act=nn.GELU)  # [candidate state ; item emb] -> logit
        self.apply(init_weights)

    def strategies(self) -> list[Strategy]:
        return history_strategy(self.cfg.max_len)

    def history_tokens(self, seq: Subsequence) -> torch.Tensor:
        """History tokens (B, L, d): item + action + scenario + pos[k], k = 1 for the most recent event (so
        every token changes when an event is appended)."""
        L, dev = seq.item.shape[1], seq.item.device
        back = (L - torch.arange(L, device=dev)).clamp(max=self.cfg.max_len)  # (L,) L .. 1, most recent = 1
        return self.emb.history(seq) + self.pos_emb(back * seq.mask)  # padding -> slot 0, never seen

    def candidate_tokens(self, batch: Batch) -> torch.Tensor:  # -> (B, C, d)
        return self.emb.candidate(batch) + self.pos_emb.weight[0]

    def layer_stack(self, x, past, mask):
        """The layers and the final LayerNorm over tokens x (B, N, d) that follow P cached tokens; past:
        per layer (k, v) of those, or None (P = 0); mask (B, N, P + N)
        -> (B, N, d), per layer (k, v) of all P + N tokens."""
        x, kvs = cached_layers(self.layers, x, past, mask)
        return self.ln_f(x), kvs

    def hidden_states(self, batch: Batch) -> torch.Tensor:
        """Final states over [history ; candidates]: (B, L + C, d). History states never depend on the
        candidates nor on later history events (the KV-cacheable part)."""
        seq = one_history(batch, "Transformer")
        L = seq.item.shape[1]
        if L > self.cfg.max_len and seq.mask[:, : L - self.cfg.max_len].any():
            raise ValueError(f"Transformer: a history has more than max_len={self.cfg.max_len} real events")
        x = self.drop(torch.cat([self.history_tokens(seq), self.candidate_tokens(batch)], dim=1))  # (B, N, d)
        mask = history_candidate_mask(seq.mask, batch.cand_mask)  # (B, N, N)
        return self.layer_stack(x, None, mask)[0]

    def forward(self, batch: Batch) -> torch.Tensor:
        """-> logits (B, C); padding candidates get finite logits that callers mask out."""
        return candidate_logits(self.head, self.hidden_states(batch), self.emb, batch)

    def flops(self, shape: SampleShape) -> int:
        """Analytic forward FLOPs of one row (2 m n k per matmul; lookups and elementwise ops count 0).
        Attention counts Q K^T and A V over the full (masked) N x N matrices, as computed."""
        if len(shape.lengths) != 1:
            raise ValueError(f"Transformer.flops: {len(shape.lengths)} lengths given, model has one history")
        d, n = self.cfg.d_model, shape.lengths[0] + shape.candidates
        layers = self.cfg.n_layers * transformer_layer_flops(n, d, self.cfg.ffn_mult)
        return layers + shape.candidates * mlp_flops([2 * d, d, 1])
