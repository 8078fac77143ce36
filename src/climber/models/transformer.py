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

from climber.config import ConfigError
from climber.data.batch import Batch, Subsequence
from climber.data.sequences import Strategy
from climber.models import DataInfo, SampleShape
from climber.models.base import ModelConfig
from climber.models.attention import FULL_SEQUENCE, Keys, Plan, check_attention, full_sequence_impl, kernel_for
from climber.models.layers import (
    candidate_logits,
    IdEmbeddings,
    TransformerLayer,
    encode_layers,
    history_candidate_mask,
    history_strategy,
    init_weights,
    mlp,
    mlp_flops,
    one_history,
    score_layers,
    structured_stack_flops,
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
    attention: str = "structured"  # "structured" | "tiled" | "flex" | "dense" | "reference" (climber.models.attention)

    def check(self) -> None:
        self._at_least(1, "d_model", "n_heads", "n_layers", "ffn_mult", "max_len")
        if self.d_model % self.n_heads:
            raise ConfigError(f"TransformerConfig: d_model {self.d_model} not divisible by n_heads {self.n_heads}")
        self._dropout_in_range()
        self.attention = check_attention("TransformerConfig", self.attention)


class Transformer(nn.Module):
    def __init__(self, cfg: TransformerConfig, info: DataInfo):
        super().__init__()
        self.cfg, self.info = cfg, info
        d = cfg.d_model
        self.emb = IdEmbeddings(info, d)
        self.pos_emb = nn.Embedding(cfg.max_len + 1, d)  # 0: candidates; k: the k-th most recent event
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(
            TransformerLayer(d, cfg.n_heads, cfg.ffn_mult, cfg.dropout, full_sequence_impl(cfg.attention))
            for _ in range(cfg.n_layers)
        )
        self.ln_f = nn.LayerNorm(d)
        self.head = mlp([2 * d, d, 1], cfg.dropout, act=nn.GELU)  # [candidate state ; item emb] -> logit
        self.apply(init_weights)

    history_extends = False  # absolute positions count back from the most recent event: an appended event moves every token

    def head_logits(self, states: list, batch: Batch) -> torch.Tensor:
        """Click logits (B, C) from the candidates' states of each block (list of (B, C, d))."""
        return candidate_logits(self.head, states[0], self.emb, batch)

    def strategies(self) -> list[Strategy]:
        return history_strategy(self.cfg.max_len)

    def history_tokens(self, b: int, seq: Subsequence) -> torch.Tensor:
        """History tokens (B, L, d): item + action + scenario + pos[k], k = 1 for the most recent event (so
        every token changes when an event is appended)."""
        L, dev = seq.item.shape[1], seq.item.device
        back = (L - torch.arange(L, device=dev)).clamp(max=self.cfg.max_len)  # (L,) L .. 1, most recent = 1
        return self.emb.history(seq) + self.pos_emb(back * seq.mask)  # padding -> slot 0, never seen

    def candidate_tokens(self, batch: Batch) -> torch.Tensor:  # -> (B, C, d)
        return self.emb.candidate(batch) + self.pos_emb.weight[0]

    def keys(self, ts, item, mask) -> Keys:
        return Keys(ts, mask)

    def encode(self, b: int, x: torch.Tensor, keys: Keys, scenario: torch.Tensor, past=None) -> list:
        """History tokens x (B, N, d) after P cached ones (past: per layer (k, v), or None); keys: all
        P + N -> per layer the (k, v) of all of them."""
        plan = Plan.history(keys.ts, None, keys.mask, keys.ts.shape[1] - x.shape[1], self._kernel())
        return encode_layers(self.layers, x, past, plan)

    def score(self, b: int, cand: torch.Tensor, kvs: list, keys: Keys, batch: Batch) -> torch.Tensor:
        """Candidate states (B, C, d): candidate tokens cand (B, C, d) against the history's per-layer (k, v)."""
        history = Plan.history(keys.ts, None, keys.mask, keys.ts.shape[1], self._kernel())
        return self.ln_f(score_layers(self.layers, cand, kvs, Plan.candidates(history, batch.cand_ts, None)))

    def _kernel(self) -> str:
        return kernel_for(self.cfg.attention)

    def hidden_states(self, batch: Batch) -> torch.Tensor:
        """Final states over [history ; candidates] of the full-sequence path: (B, L + C, d). History states
        never depend on the candidates nor on later history events (the KV-cacheable part)."""
        seq = self._history(batch)
        x = self.drop(torch.cat([self.history_tokens(0, seq), self.candidate_tokens(batch)], dim=1))  # (B, N, d)
        mask = history_candidate_mask(seq.mask, batch.cand_mask)  # (B, N, N)
        for layer in self.layers:
            x = layer(x, mask)
        return self.ln_f(x)

    def _history(self, batch: Batch) -> Subsequence:
        seq = one_history(batch, "Transformer")
        L = seq.item.shape[1]
        if L > self.cfg.max_len and seq.mask[:, : L - self.cfg.max_len].any():
            raise ValueError(f"Transformer: a history has more than max_len={self.cfg.max_len} real events")
        return seq

    def forward(self, batch: Batch) -> torch.Tensor:
        """-> logits (B, C); padding candidates get finite logits that callers mask out."""
        if self.cfg.attention in FULL_SEQUENCE:
            return candidate_logits(self.head, self.hidden_states(batch), self.emb, batch)
        seq = self._history(batch)
        keys = self.keys(seq.ts, seq.item, seq.mask)
        kvs = self.encode(0, self.drop(self.history_tokens(0, seq)), keys, seq.scenario)
        states = self.score(0, self.drop(self.candidate_tokens(batch)), kvs, keys, batch)  # (B, C, d)
        return self.head_logits([states], batch)

    def flops(self, shape: SampleShape) -> int:
        """Analytic forward FLOPs of one row (2 m n k per matmul; lookups and elementwise ops count 0), as
        the configured attention path computes them (see ``Climber.flops``)."""
        if len(shape.lengths) != 1:
            raise ValueError(f"Transformer.flops: {len(shape.lengths)} lengths given, model has one history")
        cfg, d, L, C = self.cfg, self.cfg.d_model, shape.lengths[0], shape.candidates
        if cfg.attention in FULL_SEQUENCE:
            layers = cfg.n_layers * transformer_layer_flops(L + C, d, cfg.ffn_mult)
        else:
            layers = structured_stack_flops(cfg.n_layers, L, C, d, cfg.ffn_mult)
        return layers + shape.candidates * mlp_flops([2 * d, d, 1])
