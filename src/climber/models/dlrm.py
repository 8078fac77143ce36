"""DLRM (Naumov et al. 2019): sparse features as embedding vectors, dense features through a bottom MLP,
an explicit feature interaction, then a top MLP. Every candidate is scored on its own features.

    sparse: user, candidate item, candidate scenario, mean-pooled history       -> 4 vectors (B, C, d)
    dense:  features.dense_features: [log1p(history length),
            log1p(seconds from the last event to the candidate) / 10] -> bottom MLP -> z (B, C, d)
    interaction "dot": <f_i, f_j> for all i < j over the 5 vectors, concatenated with z -> (B, C, d + 10)
    interaction "dcn": DCNv2 cross layers x_{l+1} = x_0 * (W_l x_l + b_l) + x_l over x_0 = [f_1 .. f_5] (B, C, 5d)
    top MLP -> logits (B, C)   (popularity_prior: + w * the candidate item's smoothed train rate as
    log-odds, popularity_count: + v * log1p(its train events), layers.PopularityPrior, as Climber's)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from climber.config import ConfigError
from climber.data.batch import Batch
from climber.data.sequences import Strategy
from climber.models import DataInfo, SampleShape
from climber.models.base import ModelConfig
from climber.models.features import NUM_DENSE, dense_features
from climber.models.layers import (
    IdEmbeddings,
    PopularityPrior,
    history_strategy,
    init_weights,
    masked_mean,
    mlp,
    mlp_flops,
    one_history,
)

INTERACTIONS = ("dot", "dcn")
NUM_VECTORS = 5  # user, item, scenario, pooled history, bottom-MLP output


@dataclass
class DLRMConfig(ModelConfig):
    d_model: int = 64  # embedding width; the bottom MLP ends at this width too
    max_len: int = 128  # recent history events mean-pooled into one sparse feature
    bottom_mlp: list[int] = field(default_factory=lambda: [32])  # hidden sizes: 2 -> ... -> d_model
    top_mlp: list[int] = field(default_factory=lambda: [128, 64])  # hidden sizes: interaction -> ... -> 1
    interaction: str = "dot"  # "dot" | "dcn"
    n_cross: int = 2  # DCNv2 cross layers (interaction "dcn")
    dropout: float = 0.1  # in the top MLP
    popularity_prior: bool = False  # add w * the item's smoothed train rate as log-odds (out-of-fold in training) to the logit
    popularity_count: bool = False  # with popularity_prior: + a learned weight (from 0) x log1p(the item's train events)
    popularity_fit: bool = False  # with popularity_prior: its weights start at their within-user fit on the train split (else 1, 0)

    def check(self) -> None:
        if self.interaction not in INTERACTIONS:
            raise ConfigError(f"DLRMConfig.interaction: {self.interaction!r} not one of {', '.join(INTERACTIONS)}")
        self._at_least(1, "d_model", "max_len", "n_cross")
        self._layer_sizes("bottom_mlp", "top_mlp")
        self._dropout_in_range()
        self._popularity_needs_prior()


class CrossLayer(nn.Module):
    """One DCNv2 cross layer with a full-rank W: x_{l+1} = x_0 * (W x_l + b) + x_l."""

    def __init__(self, width: int):
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # (..., width) -> (..., width)
        return x0 * self.linear(x) + x


class DLRM(nn.Module):
    def __init__(self, cfg: DLRMConfig, info: DataInfo):
        super().__init__()
        self.cfg, self.info = cfg, info
        d = cfg.d_model
        self.emb = IdEmbeddings(info, d, user=True)
        self.emb.apply(init_weights)  # the other layers keep PyTorch's default init
        self.bottom = mlp([NUM_DENSE, *cfg.bottom_mlp, d])
        if cfg.interaction == "dcn":
            self.cross = nn.ModuleList(CrossLayer(NUM_VECTORS * d) for _ in range(cfg.n_cross))
        self.top = mlp([self._top_in(), *cfg.top_mlp, 1], cfg.dropout)
        rows, cols = torch.triu_indices(NUM_VECTORS, NUM_VECTORS, offset=1)
        self.register_buffer("pair_rows", rows, persistent=False)
        self.register_buffer("pair_cols", cols, persistent=False)
        if cfg.popularity_prior:
            self.prior = PopularityPrior(info.num_items, cfg.popularity_count, cfg.popularity_fit)

    def _top_in(self) -> int:
        d = self.cfg.d_model
        if self.cfg.interaction == "dot":
            return d + NUM_VECTORS * (NUM_VECTORS - 1) // 2
        return NUM_VECTORS * d

    def strategies(self) -> list[Strategy]:
        return history_strategy(self.cfg.max_len)

    def feature_vectors(self, batch: Batch) -> torch.Tensor:
        """The 5 feature vectors of each candidate: (B, C, 5, d) = [user, item, scenario, history, z]."""
        seq = one_history(batch, "DLRM")
        C = batch.cand_item.shape[1]
        user = self.emb.user_vector(batch)[:, None].expand(-1, C, -1)  # (B, C, d)
        history = masked_mean(self.emb.history(seq), seq.mask)[:, None].expand(-1, C, -1)  # (B, C, d)
        z = self.bottom(dense_features(seq, batch))  # (B, C, d)
        item, scenario = self.emb.candidate_item(batch), self.emb.candidate_scenario(batch)  # (B, C, d)
        return torch.stack([user, item, scenario, history, z], dim=2)

    def interact(self, f: torch.Tensor) -> torch.Tensor:
        """f (B, C, 5, d) -> top-MLP input: (B, C, d + 10) for "dot", (B, C, 5d) for "dcn"."""
        if self.cfg.interaction == "dot":
            dots = f @ f.transpose(-2, -1)  # (B, C, 5, 5)
            return torch.cat([f[:, :, -1], dots[:, :, self.pair_rows, self.pair_cols]], dim=-1)
        x0 = x = f.flatten(2)  # (B, C, 5d)
        for layer in self.cross:
            x = layer(x0, x)
        return x

    def forward(self, batch: Batch) -> torch.Tensor:
        """-> logits (B, C); padding candidates get finite logits that callers mask out."""
        logits = self.top(self.interact(self.feature_vectors(batch))).squeeze(-1)
        if self.cfg.popularity_prior:
            logits = logits + self.prior(batch.cand_item, batch.user)
        return logits

    def flops(self, shape: SampleShape) -> int:
        """Analytic forward FLOPs of one row (2 m n k per matmul; lookups, pooling and elementwise ops count 0)."""
        d, C = self.cfg.d_model, shape.candidates
        per_cand = mlp_flops([NUM_DENSE, *self.cfg.bottom_mlp, d]) + mlp_flops([self._top_in(), *self.cfg.top_mlp, 1])
        if self.cfg.interaction == "dot":
            per_cand += 2 * NUM_VECTORS * NUM_VECTORS * d
        else:
            per_cand += self.cfg.n_cross * 2 * (NUM_VECTORS * d) ** 2
        return C * per_cand
