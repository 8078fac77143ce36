"""Features read without sequence attention: the two dense features of each candidate (DLRM, and the
dense token below) and the feature tokens of the feature-interaction models (Wukong, RankMixer): per
candidate, a set of n_f embedding vectors of width d. In order:

    user id                                                   1
    candidate item, candidate scenario                        2
    masked mean of the history tokens (zero when empty)       1
    the recent_k most recent history tokens (zero if missing) recent_k, most recent last
    dense_features (a linear layer 2 -> d)                    1

so n_f = 5 + recent_k and the output is (B, C, n_f, d). A history token is item + action + scenario
embedding, as in every model of the package. Only the scenario/item/dense tokens depend on the
candidate; the other tokens are computed once per row and broadcast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from climber.data.batch import Batch, Subsequence
from climber.models import DataInfo
from climber.models.layers import IdEmbeddings, init_weights, masked_mean, one_history


NUM_DENSE = 2  # dense features per candidate: history length, gap to the most recent event


def dense_features(seq: Subsequence, batch: Batch) -> torch.Tensor:
    """(B, C, 2): ``history_dense_features`` of ``seq`` for the batch's candidates."""
    return history_dense_features(seq.ts, seq.mask, batch.cand_ts)


def history_dense_features(ts: torch.Tensor, mask: torch.Tensor, cand_ts: torch.Tensor) -> torch.Tensor:
    """History events' ts, mask (B, L) and candidates' ts (B, C) -> (B, C, 2): [log1p(#history events),
    log1p(seconds from the most recent history event to the candidate's ts) / 10]. A negative gap (a
    padding candidate has ts 0) counts 0; an empty history gives [0, 0]."""
    count = mask.sum(dim=1)  # (B,)
    last_ts = F.pad(ts * mask, (1, 0)).amax(dim=1)  # (B,) the most recent event; 0 when empty (also L = 0)
    gap = (cand_ts - last_ts[:, None]).clamp(min=0) * (count > 0)[:, None]  # (B, C) seconds
    C = cand_ts.shape[1]
    return torch.stack([torch.log1p(count.float())[:, None].expand(-1, C), torch.log1p(gap.float()) / 10], dim=-1)


class FeatureTokens(nn.Module):
    def __init__(self, info: DataInfo, d: int, recent_k: int):
        super().__init__()
        self.d, self.recent_k = d, recent_k
        self.emb = IdEmbeddings(info, d, user=True)
        self.dense = nn.Linear(NUM_DENSE, d)
        self.apply(init_weights)  # the dense token starts at the embeddings' scale

    @property
    def n_features(self) -> int:
        return 5 + self.recent_k

    def forward(self, batch: Batch) -> torch.Tensor:
        """-> (B, C, n_f, d)."""
        seq = one_history(batch, "feature tokens")
        B, C = batch.cand_item.shape
        k = self.recent_k
        hist = self.emb.history(seq) * seq.mask[..., None]  # (B, L, d), zero at padding
        mean = masked_mean(hist, seq.mask)  # (B, d), zero when empty
        recent = hist[:, hist.shape[1] - min(k, hist.shape[1]) :]  # (B, <= k, d), left padding is zero
        recent = F.pad(recent, (0, 0, k - recent.shape[1], 0))  # (B, k, d)
        row = torch.cat([mean[:, None], recent], dim=1)  # (B, 1 + k, d)
        dense = self.dense(dense_features(seq, batch))  # (B, C, d)
        cand = torch.stack([self.emb.candidate_item(batch), self.emb.candidate_scenario(batch), dense], dim=2)
        user = self.emb.user_vector(batch)[:, None, None].expand(B, C, 1, self.d)
        return torch.cat([user, cand[:, :, :2], row[:, None].expand(B, C, 1 + k, self.d), cand[:, :, 2:]], dim=2)

    def flops(self, candidates: int) -> int:
        """The dense linear layer of each candidate (lookups and pooling count 0)."""
        return candidates * 2 * 2 * self.d
