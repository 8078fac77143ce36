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

from climber.config import ConfigError
from climber.data.batch import Batch, Subsequence
from climber.data.sequences import Strategy
from climber.models import DataInfo, SampleShape
from climber.models.base import ModelConfig
from climber.models.attention import FULL_SEQUENCE, Keys, Plan, causal_tile_pairs, check_attention, kernel_for
from climber.models.layers import (
    candidate_logits,
    IdEmbeddings,
    RelativeBias,
    Steps,
    encode_layers,
    extend_kv,
    history_candidate_mask,
    history_candidate_positions,
    history_strategy,
    init_weights,
    mlp,
    mlp_flops,
    one_history,
    score_layers,
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
    attention: str = "structured"  # "structured" | "tiled" | "flex" | "dense" = "reference" (the explicit full sequence)

    def check(self) -> None:
        self.attention = check_attention("HSTUConfig", self.attention)
        self._at_least(1, "d_model", "n_heads", "n_layers", "max_len", "time_buckets")
        self._at_least(2, "pos_buckets")
        if self.d_model % self.n_heads:
            raise ConfigError(f"HSTUConfig: d_model {self.d_model} not divisible by n_heads {self.n_heads}")
        self._dropout_in_range()


class HSTULayer(Steps):
    """One HSTU layer (see the module docstring): over a full sequence (``forward``) or in the structured
    steps ``encode`` (history) and ``score`` (candidates)."""

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
        """A = M * SiLU(Q K^T + rab) / n over a full sequence: q, k (B, N, d), mask (B, N, N), pos (N,),
        ts (B, N) -> (B, H, N, N); exactly 0 where mask is False."""
        scores = self.heads(q) @ self.heads(k).transpose(-2, -1) + self.rab(pos, ts)
        return (F.silu(scores) / self.n).masked_fill(~mask[:, None], 0.0)

    def full(self, x, mask, pos, ts):
        """The layer over a full sequence x (B, N, d); mask (B, N, N), pos (N,), ts (B, N) -> (B, N, d)."""
        u, v, q, k = self.project(x)
        return self._output(x, u, self.attention_weights(q, k, mask, pos, ts) @ self.heads(v))

    def encode(self, x, past, plan: Plan, last: bool = False):
        """History tokens x (B, N, d) after P cached ones (past: (k, v) each (B, H, P, dh), or None) ->
        (x (B, N, d), or None when ``last`` (K and V alone); the (k, v) of all P + N tokens)."""
        if last:  # V and K rows of f1 only
            w, bias = self.f1.weight.view(4, -1, x.shape[-1]), self.f1.bias.view(4, -1)
            v, k = F.silu(F.linear(self.ln_in(x), w[[1, 3]].flatten(0, 1), bias[[1, 3]].flatten())).chunk(2, dim=-1)
            return None, extend_kv(past, self.heads(k), self.heads(v))
        u, v, q, k = self.project(x)
        k, v = self.heads(k), self.heads(v)
        keys = extend_kv(past, k, v)
        return self._output(x, u, plan.with_bias(self.rab).attend(self.heads(q), k, v, *keys)), keys

    def score(self, x, kv, plan: Plan) -> torch.Tensor:
        """Candidate tokens x (B, C, d) against the history's (k, v) of this layer -> (B, C, d)."""
        u, v, q, k = self.project(x)
        return self._output(x, u, plan.with_bias(self.rab).attend(self.heads(q), self.heads(k), self.heads(v), *kv))

    def _output(self, x, u, av):
        """X + Dropout(f2(LN(A V) * U)): av (B, H, N, dh), heads concatenated."""
        B, H, N, dh = av.shape
        return x + self.drop(self.f2(self.ln_av(av.transpose(1, 2).reshape(B, N, H * dh)) * u))


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

    history_extends = True  # relative biases only: tokens appended to a cached history leave earlier K / V unchanged

    def head_logits(self, states: list, batch: Batch) -> torch.Tensor:
        """Click logits (B, C) from the candidates' states of each block (list of (B, C, d))."""
        return candidate_logits(self.head, states[0], self.emb, batch)

    def strategies(self) -> list[Strategy]:
        return history_strategy(self.cfg.max_len)

    def history_tokens(self, b: int, seq: Subsequence) -> torch.Tensor:  # -> (B, L, d)
        return self.emb.history(seq)

    def candidate_tokens(self, batch: Batch) -> torch.Tensor:  # -> (B, C, d)
        return self.emb.candidate(batch)

    def keys(self, ts, item, mask) -> Keys:
        return Keys(ts, mask)

    def encode(self, b: int, x: torch.Tensor, keys: Keys, scenario: torch.Tensor, past=None) -> list:
        """History tokens x (B, N, d) after P cached ones (past: per layer (k, v), or None); keys: all
        P + N -> per layer the (k, v) of all of them."""
        return encode_layers(self.layers, x, past, self._plan(keys, keys.ts.shape[1] - x.shape[1]))

    def score(self, b: int, cand: torch.Tensor, kvs: list, keys: Keys, batch: Batch) -> torch.Tensor:
        """Candidate states (B, C, d): candidate tokens cand (B, C, d) against the history's per-layer (k, v)."""
        plan = Plan.candidates(self._plan(keys, keys.ts.shape[1]), batch.cand_ts, None)
        return self.ln_f(score_layers(self.layers, cand, kvs, plan))

    def _plan(self, keys: Keys, past: int) -> Plan:
        kernel = kernel_for(self.cfg.attention)
        return Plan.history(keys.ts, None, keys.mask, past, kernel, pointwise=float(self.cfg.max_len))

    def hidden_states(self, batch: Batch) -> torch.Tensor:
        """Final states over [history ; candidates] of the full-sequence path: (B, L + C, d). History states
        never depend on the candidates nor on later history events (the KV-cacheable part)."""
        seq = one_history(batch, "HSTU")
        x = self.drop(torch.cat([self.emb.history(seq), self.emb.candidate(batch)], dim=1))  # (B, N, d)
        mask = history_candidate_mask(seq.mask, batch.cand_mask)  # (B, N, N)
        pos, ts = history_candidate_positions(seq, batch)  # (1, N), (B, N)
        for layer in self.layers:
            x = layer(x, mask, pos[0], ts)
        return self.ln_f(x)

    def forward(self, batch: Batch) -> torch.Tensor:
        """-> logits (B, C); padding candidates get finite logits that callers mask out."""
        if self.cfg.attention in FULL_SEQUENCE:
            return candidate_logits(self.head, self.hidden_states(batch), self.emb, batch)
        seq = one_history(batch, "HSTU")
        keys = self.keys(seq.ts, seq.item, seq.mask)
        kvs = self.encode(0, self.drop(self.history_tokens(0, seq)), keys, seq.scenario)
        states = self.score(0, self.drop(self.candidate_tokens(batch)), kvs, keys, batch)  # (B, C, d)
        return self.head_logits([states], batch)

    def flops(self, shape: SampleShape) -> int:
        """Analytic forward FLOPs of one row (2 m n k per matmul; lookups and elementwise ops count 0), as
        the configured attention path computes them (see ``Climber.flops``)."""
        if len(shape.lengths) != 1:
            raise ValueError(f"HSTU.flops: {len(shape.lengths)} lengths given, model has one history")
        d, L, C, layers = self.cfg.d_model, shape.lengths[0], shape.candidates, self.cfg.n_layers

        def layer(n: int, pairs: int) -> int:  # f1, Q K^T and A V, f2
            return 2 * n * d * 4 * d + 2 * 2 * pairs * d + 2 * n * d * d

        if self.cfg.attention in FULL_SEQUENCE:
            stack = layers * layer(L + C, (L + C) ** 2)
        else:  # the history through all layers but the last (K, V only there), the candidates through all
            stack = (layers - 1) * layer(L, causal_tile_pairs(L)) + 2 * L * d * 2 * d + layers * layer(C, C * L)
        return stack + C * mlp_flops([2 * d, d, 1])
