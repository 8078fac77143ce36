"""RankMixer (Zhu et al. 2025, "RankMixer: scaling up ranking models in industrial recommenders"):
token mixing and per-token FFNs over the feature tokens of each candidate, no sequence attention.

    feature tokens (features.py)                                      (B, C, n_f, d_feature)
    concatenate, zero-pad to T equal chunks, project each chunk       X   (N, T, D), N = B C
        with its own weights
    n_layers layers:
        S = LN(TokenMix(X) + X)      TokenMix: split every token into H = T heads of D / T; token t's
                                     head h becomes slot t of new token h (a transpose of the T x H grid)
        X = LN(PFFN(S) + S)          PFFN: a separate GELU FFN D -> k D -> D for every token
    mean over the T tokens -> MLP -> logits                                 (B, C)

With moe_experts = E > 0 every token's FFN becomes a ReLU-routed sparse MoE:
    g = ReLU(W_r s + b_r) (E gates, no softmax, no top-k),   PFFN(s) = sum_e g_e FFN_e(s),
trained dense (every expert runs; an L1 penalty on g, ``aux_loss()``, pushes gates to exact zeros) and
run sparse in eval mode (only the experts with g_e > 0 of each token are computed), which gives the
same output.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from climber.config import ConfigError
from climber.data.batch import Batch
from climber.data.sequences import Strategy
from climber.models import DataInfo, SampleShape
from climber.models.base import ModelConfig
from climber.models.features import FeatureTokens
from climber.models.layers import history_strategy


@dataclass
class RankMixerConfig(ModelConfig):
    T: int = 8  # tokens (and heads of the token mixing)
    d_token: int = 64  # D, divisible by T
    d_feature: int = 32  # width of each feature embedding before tokenization
    n_layers: int = 2
    ffn_mult: int = 4  # k: per-token FFN hidden width k D (per expert with MoE)
    moe_experts: int = 0  # E; 0 = one dense FFN per token
    l1_weight: float = 1e-3  # weight of the L1 penalty on the MoE gates (aux_loss)
    dropout: float = 0.1
    max_len: int = 64  # history events read
    recent_k: int = 4  # most recent history events kept as separate features

    def check(self) -> None:
        self._at_least(1, "T", "d_token", "d_feature", "n_layers", "ffn_mult", "max_len")
        self._at_least(0, "moe_experts", "recent_k", "l1_weight")
        if self.d_token % self.T:
            raise ConfigError(f"RankMixerConfig: d_token {self.d_token} not divisible by T {self.T} (T heads per token)")
        self._dropout_in_range()


def mix_tokens(x: torch.Tensor) -> torch.Tensor:
    """Parameter-free multi-head token mixing, H = T: (N, T, D) -> (N, T, D), out[:, h, t-th slot] =
    x[:, t, h-th slot], slots of width D / T. A permutation of the values (it is its own inverse)."""
    N, T, D = x.shape
    return x.view(N, T, T, D // T).transpose(1, 2).reshape(N, T, D)


class TokenLinear(nn.Module):
    """A separate affine map per token: (N, T, d_in) -> (N, T, d_out), weight (T, d_in, d_out)."""

    def __init__(self, T: int, d_in: int, d_out: int):
        super().__init__()
        bound = 1 / math.sqrt(d_in)  # nn.Linear's default scale
        self.weight = nn.Parameter(torch.empty(T, d_in, d_out).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.zeros(T, d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("nti,tio->nto", x, self.weight) + self.bias


class TokenFFN(nn.Module):
    """E independent GELU FFNs D -> H -> D for every one of T tokens (E = 1: RankMixer's PFFN).
    w1 (T, E, D, H), w2 (T, E, H, D): one batched matmul over (token, expert) pairs."""

    def __init__(self, T: int, E: int, D: int, H: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(T, E, D, H).uniform_(-1 / math.sqrt(D), 1 / math.sqrt(D)))
        self.b1 = nn.Parameter(torch.zeros(T, E, H))
        self.w2 = nn.Parameter(torch.empty(T, E, H, D).uniform_(-1 / math.sqrt(H), 1 / math.sqrt(H)))
        self.b2 = nn.Parameter(torch.zeros(T, E, D))

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        """s (N, T, D) -> (N, T, E, D): every expert of every token."""
        h = F.gelu(torch.einsum("ntd,tedh->nteh", s, self.w1) + self.b1)
        return torch.einsum("nteh,tehd->nted", h, self.w2) + self.b2

    def expert(self, s: torch.Tensor, t: int, e: int) -> torch.Tensor:
        """s (M, D), rows of token t -> (M, D) through expert e of token t only."""
        return F.gelu(s @ self.w1[t, e] + self.b1[t, e]) @ self.w2[t, e] + self.b2[t, e]


class ReLUMoE(nn.Module):
    """Per token: E expert FFNs and a ReLU router, PFFN(s) = sum_e g_e FFN_e(s), g = ReLU(W_r s + b_r).
    Dense in train mode, sparse in eval mode; the gates of the last call stay in ``gates`` (N, T, E)."""

    def __init__(self, T: int, E: int, D: int, H: int):
        super().__init__()
        self.router = TokenLinear(T, D, E)
        self.experts = TokenFFN(T, E, D, H)
        self.gates: torch.Tensor | None = None

    def forward(self, s: torch.Tensor) -> torch.Tensor:  # (N, T, D) -> (N, T, D)
        self.gates = F.relu(self.router(s))  # (N, T, E), exact zeros where a gate is off
        return self.dense(s, self.gates) if self.training else self.sparse(s, self.gates)

    def dense(self, s: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Every expert runs; switched-off experts are multiplied by an exact 0."""
        return (g[..., None] * self.experts(s)).sum(dim=2)

    def sparse(self, s: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """For each (token, expert) only the rows whose gate is on are gathered, computed and added back."""
        N, T, D = s.shape
        out = s.new_zeros(N * T, D)
        for t, e in itertools.product(range(T), range(g.shape[2])):
            rows = (g[:, t, e] > 0).nonzero().squeeze(1)  # (M,)
            if rows.numel():
                y = g[rows, t, e, None] * self.experts.expert(s[rows, t], t, e)  # (M, D)
                out.index_add_(0, rows * T + t, y)
        return out.view(N, T, D)


class DenseFFN(nn.Module):
    """RankMixer's per-token FFN (PFFN): one expert per token, no router."""

    def __init__(self, T: int, D: int, H: int):
        super().__init__()
        self.experts = TokenFFN(T, 1, D, H)

    def forward(self, s: torch.Tensor) -> torch.Tensor:  # (N, T, D) -> (N, T, D)
        return self.experts(s)[:, :, 0]


class RankMixerLayer(nn.Module):
    def __init__(self, cfg: RankMixerConfig):
        super().__init__()
        T, D, H = cfg.T, cfg.d_token, cfg.ffn_mult * cfg.d_token
        self.ln_mix = nn.LayerNorm(D)
        self.ffn = ReLUMoE(T, cfg.moe_experts, D, H) if cfg.moe_experts else DenseFFN(T, D, H)
        self.drop = nn.Dropout(cfg.dropout)
        self.ln_ffn = nn.LayerNorm(D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, T, D) -> (N, T, D)
        s = self.ln_mix(mix_tokens(x) + x)
        return self.ln_ffn(self.drop(self.ffn(s)) + s)


class RankMixer(nn.Module):
    def __init__(self, cfg: RankMixerConfig, info: DataInfo):
        super().__init__()
        self.cfg, self.info = cfg, info
        T, D = cfg.T, cfg.d_token
        self.features = FeatureTokens(info, cfg.d_feature, cfg.recent_k)
        self.chunk = math.ceil(self.features.n_features * cfg.d_feature / T)  # input width of each token
        self.drop = nn.Dropout(cfg.dropout)
        self.tokenize = TokenLinear(T, self.chunk, D)
        self.layers = nn.ModuleList(RankMixerLayer(cfg) for _ in range(cfg.n_layers))
        self.head = nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(D, 1))
        self._aux: torch.Tensor | None = None

    def strategies(self) -> list[Strategy]:
        return history_strategy(self.cfg.max_len)

    def forward(self, batch: Batch) -> torch.Tensor:
        """-> logits (B, C); padding candidates get finite logits that callers mask out."""
        B, C = batch.cand_item.shape
        T = self.cfg.T
        f = self.drop(self.features(batch)).flatten(0, 1).flatten(1)  # (N, n_f d_feature)
        f = F.pad(f, (0, T * self.chunk - f.shape[1]))  # (N, T chunk)
        x = self.tokenize(f.view(-1, T, self.chunk))  # (N, T, D)
        for layer in self.layers:
            x = layer(x)
        if self.cfg.moe_experts:
            gate_sum = sum(layer.ffn.gates.sum(dim=(1, 2)) for layer in self.layers)  # (N,)
            real = batch.cand_mask.flatten().float()
            self._aux = self.cfg.l1_weight * (gate_sum * real).sum() / real.sum().clamp(min=1)
        return self.head(x.mean(dim=1)).view(B, C)

    def aux_loss(self) -> torch.Tensor:
        """The L1 penalty of the last forward: l1_weight x (sum of every gate of a real candidate, over
        layers, tokens and experts), averaged over real candidates; 0 without MoE. Add it to the loss."""
        if not self.cfg.moe_experts:
            return self.head[0].weight.new_zeros(())
        if self._aux is None:
            raise RuntimeError("RankMixer.aux_loss: call forward first")
        return self._aux

    def flops(self, shape: SampleShape) -> int:
        """Analytic forward FLOPs of one row (2 m n k per matmul; lookups and elementwise ops count 0).
        With MoE it counts every expert: the dense training cost, an upper bound of sparse inference."""
        cfg, T, D = self.cfg, self.cfg.T, self.cfg.d_token
        H, E = cfg.ffn_mult * D, max(cfg.moe_experts, 1)
        layer = 2 * 2 * T * E * D * H + (2 * T * D * E if cfg.moe_experts else 0)
        per_cand = 2 * T * self.chunk * D + cfg.n_layers * layer + 2 * D * D + 2 * D
        return self.features.flops(shape.candidates) + shape.candidates * per_cand
