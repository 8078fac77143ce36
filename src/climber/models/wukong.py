"""Wukong (Zhang et al. 2024, "Wukong: towards a scaling law for large-scale recommendation"): stacked
factorization machines over the feature tokens of each candidate, no sequence attention.

    feature tokens (features.py)                               X_0       (B, C, n, d), n = 5 + recent_k
    n_layers interaction layers, per candidate:
        FMB(X) = reshape(MLP(LN(flatten(FM(X)))))                        (n_F, d)
                 FM(X) = X X^T (n, n), or the optimized X (X^T Y) (n, k) with a learned Y (n, k)
        LCB(X) = W_L X,  W_L (n_L, n)                                    (n_L, d)
        X_{i+1} = LN(concat(FMB(X_i), LCB(X_i)) + R X_i)                 (n_F + n_L, d)
                 R = identity when n = n_F + n_L, else a learned (n_F + n_L, n) map over the feature axis
    flatten -> top MLP -> logits                                         (B, C)

Layer i captures feature interactions up to order 2^i (FMB) while LCB keeps the lower orders.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from climber.data.batch import Batch
from climber.data.sequences import Strategy
from climber.models import DataInfo, SampleShape
from climber.models.base import ModelConfig
from climber.models.features import FeatureTokens
from climber.models.layers import history_strategy


@dataclass
class WukongConfig(ModelConfig):
    d_model: int = 64  # d: width of every feature token
    n_layers: int = 2
    n_fmb: int = 8  # n_F: tokens out of the factorization machine block
    n_lcb: int = 8  # n_L: tokens out of the linear compression block
    fm_rank: int = 0  # k; 0 = full FM X X^T, k > 0 = optimized FM X (X^T Y) with Y (n, k)
    mlp_hidden: int = 256  # hidden width of every FMB MLP and of the top MLP
    dropout: float = 0.1
    max_len: int = 64  # history events read
    recent_k: int = 4  # most recent history events kept as separate tokens

    def check(self) -> None:
        self._at_least(1, "d_model", "n_layers", "n_fmb", "n_lcb", "mlp_hidden", "max_len")
        self._at_least(0, "fm_rank", "recent_k")
        self._dropout_in_range()


class InteractionLayer(nn.Module):
    """One Wukong layer: (N, n_in, d) -> (N, n_F + n_L, d), N = rows x candidates."""

    def __init__(self, n_in: int, cfg: WukongConfig):
        super().__init__()
        d, n_out = cfg.d_model, cfg.n_fmb + cfg.n_lcb
        self.n_fmb = cfg.n_fmb
        self.fm_proj = nn.Parameter(torch.randn(n_in, cfg.fm_rank) / n_in**0.5) if cfg.fm_rank else None  # Y
        fm_width = n_in * (cfg.fm_rank or n_in)
        self.fmb_mlp = nn.Sequential(
            nn.LayerNorm(fm_width),
            nn.Linear(fm_width, cfg.mlp_hidden),
            nn.ReLU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.mlp_hidden, cfg.n_fmb * d),
        )
        self.lcb = nn.Parameter(torch.randn(cfg.n_lcb, n_in) / n_in**0.5)  # W_L
        self.residual = nn.Parameter(torch.randn(n_out, n_in) / n_in**0.5) if n_out != n_in else None  # R
        self.ln = nn.LayerNorm(d)

    def fm(self, x: torch.Tensor) -> torch.Tensor:
        """(N, n, d) -> (N, n, n) all pairwise dot products, or (N, n, k) with X^T Y computed first."""
        if self.fm_proj is None:
            return x @ x.transpose(1, 2)
        return x @ (x.transpose(1, 2) @ self.fm_proj)  # (N, d, k) first: O(n d k) instead of O(n^2 d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, _, d = x.shape
        fmb = self.fmb_mlp(self.fm(x).flatten(1)).view(N, self.n_fmb, d)  # (N, n_F, d)
        lcb = self.lcb @ x  # (N, n_L, d)
        res = x if self.residual is None else self.residual @ x  # (N, n_F + n_L, d)
        return self.ln(torch.cat([fmb, lcb], dim=1) + res)


class Wukong(nn.Module):
    def __init__(self, cfg: WukongConfig, info: DataInfo):
        super().__init__()
        self.cfg, self.info = cfg, info
        self.features = FeatureTokens(info, cfg.d_model, cfg.recent_k)
        self.drop = nn.Dropout(cfg.dropout)
        n, n_out = self.features.n_features, cfg.n_fmb + cfg.n_lcb
        self.layers = nn.ModuleList(InteractionLayer(n if i == 0 else n_out, cfg) for i in range(cfg.n_layers))
        self.top = nn.Sequential(
            nn.Linear(n_out * cfg.d_model, cfg.mlp_hidden),
            nn.ReLU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.mlp_hidden, 1),
        )

    def strategies(self) -> list[Strategy]:
        return history_strategy(self.cfg.max_len)

    def forward(self, batch: Batch) -> torch.Tensor:
        """-> logits (B, C); padding candidates get finite logits that callers mask out."""
        B, C = batch.cand_item.shape
        x = self.drop(self.features(batch)).flatten(0, 1)  # (B C, n, d)
        for layer in self.layers:
            x = layer(x)  # (B C, n_F + n_L, d)
        return self.top(x.flatten(1)).view(B, C)

    def flops(self, shape: SampleShape) -> int:
        """Analytic forward FLOPs of one row (2 m n k per matmul; lookups and elementwise ops count 0)."""
        cfg, d, h, k = self.cfg, self.cfg.d_model, self.cfg.mlp_hidden, self.cfg.fm_rank
        n_out = cfg.n_fmb + cfg.n_lcb
        per_cand = 0
        n = self.features.n_features
        for _ in range(cfg.n_layers):
            fm = 2 * n * n * d if k == 0 else 2 * d * n * k + 2 * n * d * k
            mlp = 2 * n * (k or n) * h + 2 * h * cfg.n_fmb * d
            res = 2 * n_out * n * d if n != n_out else 0
            per_cand += fm + mlp + 2 * cfg.n_lcb * n * d + res
            n = n_out
        per_cand += 2 * n_out * d * h + 2 * h
        return self.features.flops(shape.candidates) + shape.candidates * per_cand
