"""TWIN (Chang et al. 2023, Kuaishou): two-stage target attention over a long history, where the search
stage scores events with the SAME projections as the attention stage (consistency-preserving).

Following the paper, an event's inherent features (item + scenario) give its key, its user-item cross
feature (the action) enters the score as a per-head scalar bias, and the whole event (item + action +
scenario) gives its value. Per head h (dh = d / H), candidate c, history event j:

    alpha_hj = <W_q c, W_k (item_j + scenario_j)>_h / sqrt(dh) + beta_h(action_j)        target-attention logit
    GSU: s_j = mean_h alpha_hj, top-k events by s (padding never selected)   (B, C, k) indices, no gradient
    ESU: y   = W_o concat_h sum_{j in top-k} softmax_j(alpha_hj) W_v token_j              (B, C, d)
    logit = MLP([y, c, user])                                                            (B, C)

The mean of the heads' logits is one d-wide dot product per (candidate, event), the cost of a single head.
Top-k is not differentiable; gradients reach the shared projections through the ESU's logits of the
selected events.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from climber.config import ConfigError
from climber.data.batch import Batch
from climber.data.sequences import Strategy
from climber.models import DataInfo, SampleShape
from climber.models.base import ModelConfig
from climber.models.layers import IdEmbeddings, history_strategy, init_weights, mlp, mlp_flops, one_history


@dataclass
class TWINConfig(ModelConfig):
    d_model: int = 64  # embedding and attention width
    n_heads: int = 4
    max_len: int = 512  # long history searched by the GSU
    top_k: int = 32  # events the GSU keeps per candidate for the ESU
    mlp_hidden: list[int] = field(default_factory=lambda: [128, 64])  # head: 3d -> ... -> 1
    dropout: float = 0.1  # in the head MLP

    def check(self) -> None:
        self._at_least(1, "d_model", "n_heads", "max_len", "top_k")
        if self.d_model % self.n_heads:
            raise ConfigError(f"TWINConfig: d_model {self.d_model} not divisible by n_heads {self.n_heads}")
        self._layer_sizes("mlp_hidden")
        self._dropout_in_range()


class TWIN(nn.Module):
    def __init__(self, cfg: TWINConfig, info: DataInfo):
        super().__init__()
        self.cfg, self.info = cfg, info
        d, H = cfg.d_model, cfg.n_heads
        self.emb = IdEmbeddings(info, d, user=True)
        self.emb.apply(init_weights)  # the other layers keep PyTorch's default init
        self.query = nn.Linear(d, d)  # candidate -> query
        self.key = nn.Linear(d, d)  # event's inherent features -> key
        self.action_bias = nn.Embedding(info.num_actions + 1, H, padding_idx=0)  # cross feature -> logit bias
        init_weights(self.action_bias)
        self.value = nn.Linear(d, d)  # whole event -> value
        self.out = nn.Linear(d, d)
        self.head = mlp([3 * d, *cfg.mlp_hidden, 1], cfg.dropout)

    def strategies(self) -> list[Strategy]:
        return history_strategy(self.cfg.max_len)

    def project(self, batch: Batch):
        """Shared projections: q (B, C, H, dh), k (B, L, H, dh), bias (B, L, H), v (B, L, H, dh), mask (B, L)."""
        seq, H = one_history(batch, "TWIN"), self.cfg.n_heads
        inherent = self.emb.item(seq.item) + self.emb.scenario(seq.scenario)  # (B, L, d)
        q = self.query(self.emb.candidate(batch)).unflatten(-1, (H, -1))
        k = self.key(inherent).unflatten(-1, (H, -1))
        v = self.value(self.emb.history(seq)).unflatten(-1, (H, -1))
        return q, k, self.action_bias(seq.action), v, seq.mask

    def gsu(self, q, k, bias, mask):
        """General search unit: (index, valid), each (B, C, K), K = min(top_k, L): the events with the
        highest mean-over-heads target-attention logit per candidate; valid False on padding picks (rows
        with fewer than K real events keep all of them)."""
        H, dh = q.shape[-2], q.shape[-1]
        K = min(self.cfg.top_k, k.shape[1])
        with torch.no_grad():
            # mean_h <q_h, k_h> / sqrt(dh) = <q, k> / (H sqrt(dh)): one d-wide dot product
            s = torch.einsum("bcd,bld->bcl", q.flatten(2), k.flatten(2)) / (H * math.sqrt(dh))  # (B, C, L)
            s = (s + bias.mean(-1)[:, None]).masked_fill(~mask[:, None], float("-inf"))
            top, index = s.topk(K, dim=-1)  # (B, C, K)
        return index, top > float("-inf")

    def esu(self, q, k, bias, v, index, valid) -> torch.Tensor:
        """Exact search unit: multi-head target attention of each candidate over its selected events -> (B, C, d)."""
        dh = q.shape[-1]
        rows = torch.arange(index.shape[0], device=index.device)[:, None, None]
        k_sel, v_sel, b_sel = k[rows, index], v[rows, index], bias[rows, index]  # (B, C, K, H, dh), (B, C, K, H)
        logits = torch.einsum("bchd,bckhd->bchk", q, k_sel) / math.sqrt(dh) + b_sel.transpose(-2, -1)  # (B, C, H, K)
        keep = valid[:, :, None]  # (B, C, 1, K)
        logits = logits.masked_fill(~keep, float("-inf")).masked_fill(~keep.any(-1, keepdim=True), 0.0)
        att = logits.softmax(dim=-1) * keep  # an empty history attends to nothing: y = W_o 0
        y = torch.einsum("bchk,bckhd->bchd", att, v_sel)  # (B, C, H, dh)
        return self.out(y.flatten(2))

    def forward(self, batch: Batch) -> torch.Tensor:
        """-> logits (B, C); padding candidates get finite logits that callers mask out."""
        q, k, bias, v, mask = self.project(batch)
        y = self.esu(q, k, bias, v, *self.gsu(q, k, bias, mask))  # (B, C, d)
        C = y.shape[1]
        user = self.emb.user_vector(batch)[:, None].expand(-1, C, -1)  # (B, C, d)
        return self.head(torch.cat([y, self.emb.candidate(batch), user], dim=-1)).squeeze(-1)

    def flops(self, shape: SampleShape) -> int:
        """Analytic forward FLOPs of one row (2 m n k per matmul; lookups, top-k and elementwise ops count 0)."""
        d, (L,), C = self.cfg.d_model, shape.lengths, shape.candidates
        K = min(self.cfg.top_k, L)
        projections = 2 * 2 * L * d * d + 2 * C * d * d  # keys and values of every event, queries
        gsu = 2 * C * L * d
        esu = 2 * 2 * C * K * d + 2 * C * d * d  # logits, weighted values, output projection
        return projections + gsu + esu + C * mlp_flops([3 * d, *self.cfg.mlp_hidden, 1])
