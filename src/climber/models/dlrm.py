"""DLRM (Naumov et al. 2019): sparse features as embedding vectors, dense features through a bottom MLP,
an explicit feature interaction, then a top MLP. Every candidate is scored on its own features.

    sparse: user, candidate item, candidate scenario, mean-pooled history       -> 4 vectors (B, C, d)
    dense:  [log1p(history length), log1p(seconds since last event) / 10] -> bottom MLP -> z (B, C, d)
    interaction "dot": <f_i, f_j> for all i < j over the 5 vectors, concatenated with z -> (B, C, d + 10)
    interaction "dcn": DCNv2 cross layers x_{l+1} = x_0 * (W_l x_l + b_l) + x_l over x_0 = [f_1 .. f_5] (B, C, 5d)
    top MLP -> logits (B, C)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from climber.data.batch import Batch
from climber.data.sequences import Strategy
from climber.models import DataInfo, SampleShape
from climber.models.base import ModelConfig
from climber.models.layers import IdEmbeddings, masked_mean, mlp, mlp_flops

INTERACTIONS = ("dot", "dcn")
NUM_DENSE = 2  # dense features per candidate
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

    def __post_init__(self):
        if self.interaction not in INTERACTIONS:
            raise ValueError(f"DLRMConfig.interaction: {self.interaction!r} not one of {', '.join(INTERACTIONS)}")
        for name in ("d_model", "max_len", "n_cross"):
            if getattr(self, name) < 1:
                raise ValueError(f"DLRMConfig.{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("bottom_mlp", "top_mlp"):
            sizes = list(getattr(self, name))
            if any(int(s) < 1 for s in sizes):
                raise ValueError(f"DLRMConfig.{name}: hidden sizes must be >= 1, got {sizes}")
            setattr(self, name, [int(s) for s in sizes])
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"DLRMConfig.dropout: must be in [0, 1), got {self.dropout}")


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
        self.emb = IdEmbeddings(info, d)
        self.bottom = mlp([NUM_DENSE, *cfg.bottom_mlp, d])
        if cfg.interaction == "dcn":
            self.cross = nn.ModuleList(CrossLayer(NUM_VECTORS * d) for _ in range(cfg.n_cross))
        self.top = mlp([self._top_in(), *cfg.top_mlp, 1], cfg.dropout)
        rows, cols = torch.triu_indices(NUM_VECTORS, NUM_VECTORS, offset=1)
        self.register_buffer("pair_rows", rows, persistent=False)
        self.register_buffer("pair_cols", cols, persistent=False)

    def _top_in(self) -> int:
        d = self.cfg.d_model
        if self.cfg.interaction == "dot":
            return d + NUM_VECTORS * (NUM_VECTORS - 1) // 2
        return NUM_VECTORS * d

    def strategies(self) -> list[Strategy]:
        return [Strategy(name="history", kind="recency", length=self.cfg.max_len)]

    @staticmethod
    def dense_features(batch: Batch) -> torch.Tensor:
        """(B, C, 2): log1p(history length), log1p(seconds from the last history event to the candidate) / 10;
        both 0 for an empty history."""
        seq = batch.seqs[0]
        n = seq.mask.sum(dim=1)  # (B,)
        last = torch.where(seq.mask, seq.ts, torch.zeros_like(seq.ts)).max(dim=1).values  # (B,) 0 when empty
        gap = (batch.cand_ts - last[:, None]).clamp(min=0)  # (B, C); padding candidates (ts 0) clamp to 0
        gap = torch.where(n[:, None] > 0, gap, torch.zeros_like(gap))
        C = batch.cand_item.shape[1]
        return torch.stack([torch.log1p(n.float())[:, None].expand(-1, C), torch.log1p(gap.float()) / 10], dim=-1)

    def feature_vectors(self, batch: Batch) -> torch.Tensor:
        """The 5 feature vectors of each candidate: (B, C, 5, d) = [user, item, scenario, history, z]."""
        if len(batch.seqs) != 1:
            raise ValueError(f"DLRM: batch has {len(batch.seqs)} subsequences, model expects 1 (history)")
        seq = batch.seqs[0]
        C = batch.cand_item.shape[1]
        user = self.emb.user(batch.user)[:, None].expand(-1, C, -1)  # (B, C, d)
        history = masked_mean(self.emb.history(seq), seq.mask)[:, None].expand(-1, C, -1)  # (B, C, d)
        z = self.bottom(self.dense_features(batch))  # (B, C, d)
        item, scenario = self.emb.item(batch.cand_item), self.emb.scenario(batch.cand_scenario)  # (B, C, d)
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
        return self.top(self.interact(self.feature_vectors(batch))).squeeze(-1)

    def flops(self, shape: SampleShape) -> int:
        """Analytic forward FLOPs of one row (2 m n k per matmul; lookups, pooling and elementwise ops count 0)."""
        d, C = self.cfg.d_model, shape.candidates
        per_cand = mlp_flops([NUM_DENSE, *self.cfg.bottom_mlp, d]) + mlp_flops([self._top_in(), *self.cfg.top_mlp, 1])
        if self.cfg.interaction == "dot":
            per_cand += 2 * NUM_VECTORS * NUM_VECTORS * d
        else:
            per_cand += self.cfg.n_cross * 2 * (NUM_VECTORS * d) ** 2
        return C * per_cand
