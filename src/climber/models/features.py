"""Feature tokens of the feature-interaction models (Wukong, RankMixer): per candidate, a set of n_f
embedding vectors of width d, built without sequence attention. In order:

    user id                                                   1
    candidate item, candidate scenario                        2
    masked mean of the history tokens (zero when empty)       1
    the recent_k most recent history tokens (zero if missing) recent_k, most recent last
    dense [log1p(#history events),
           log1p(seconds since the last history event) / 10]  1   (a linear layer 2 -> d)

so n_f = 5 + recent_k and the output is (B, C, n_f, d). A history token is item + action + scenario
embedding, as in every model of the package. Only the scenario/item/dense tokens depend on the
candidate; the other tokens are computed once per row and broadcast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from climber.data.batch import Batch
from climber.data.sequences import Strategy
from climber.models import DataInfo


def history_strategy(max_len: int) -> list[Strategy]:
    """The one recency subsequence the feature tokens read."""
    return [Strategy(name="history", kind="recency", length=max_len)]


class FeatureTokens(nn.Module):
    def __init__(self, info: DataInfo, d: int, recent_k: int):
        super().__init__()
        self.d, self.recent_k = d, recent_k
        self.user_emb = nn.Embedding(info.num_users + 1, d)
        self.item_emb = nn.Embedding(info.num_items + 1, d, padding_idx=0)
        self.action_emb = nn.Embedding(info.num_actions + 1, d, padding_idx=0)
        self.scenario_emb = nn.Embedding(info.num_scenarios + 1, d, padding_idx=0)
        self.dense = nn.Linear(2, d)
        for emb in (self.user_emb, self.item_emb, self.action_emb, self.scenario_emb):
            nn.init.normal_(emb.weight, std=0.02)
            if emb.padding_idx is not None:
                emb.weight.data[emb.padding_idx].zero_()
        nn.init.normal_(self.dense.weight, std=0.02)  # the dense token starts at the embeddings' scale
        nn.init.zeros_(self.dense.bias)

    @property
    def n_features(self) -> int:
        return 5 + self.recent_k

    def forward(self, batch: Batch) -> torch.Tensor:
        """-> (B, C, n_f, d)."""
        if len(batch.seqs) != 1:
            raise ValueError(f"feature tokens: batch has {len(batch.seqs)} subsequences, expected 1 (history)")
        seq = batch.seqs[0]
        B, C = batch.cand_item.shape
        k = self.recent_k
        hist = self.item_emb(seq.item) + self.action_emb(seq.action) + self.scenario_emb(seq.scenario)
        hist = hist * seq.mask[..., None]  # (B, L, d), zero at padding
        count = seq.mask.sum(dim=1)  # (B,)
        mean = hist.sum(dim=1) / count.clamp(min=1)[:, None]  # (B, d), zero when empty
        recent = hist[:, hist.shape[1] - min(k, hist.shape[1]) :]  # (B, <= k, d), left padding is zero
        recent = F.pad(recent, (0, 0, k - recent.shape[1], 0))  # (B, k, d)
        row = torch.cat([mean[:, None], recent], dim=1)  # (B, 1 + k, d)

        last_ts = (seq.ts * seq.mask).amax(dim=1)  # (B,) the most recent event; 0 when empty
        gap = (batch.cand_ts - last_ts[:, None]).clamp(min=0) * (count > 0)[:, None]  # (B, C) seconds
        dense = torch.stack([torch.log1p(count.float())[:, None].expand(B, C), torch.log1p(gap.float()) / 10], -1)

        cand = torch.stack(
            [self.item_emb(batch.cand_item), self.scenario_emb(batch.cand_scenario), self.dense(dense)], dim=2
        )  # (B, C, 3, d)
        user = self.user_emb(batch.user)[:, None, None].expand(B, C, 1, self.d)
        return torch.cat([user, cand[:, :, :2], row[:, None].expand(B, C, 1 + k, self.d), cand[:, :, 2:]], dim=2)

    def flops(self, candidates: int) -> int:
        """The dense linear layer of each candidate (lookups and pooling count 0)."""
        return candidates * 2 * 2 * self.d
