"""DIN (Zhou et al. 2018): a local activation unit weighs each history event by its relevance to the
candidate; the weights are NOT normalised (no softmax), so the pooled interest keeps the intensity of
the user's interest (twice as many relevant events -> twice the vector).

    w_j      = a([h_j, c, h_j - c, h_j * c])  activation unit: MLP -> scalar, 0 at padding   (B, C, L)
    interest = sum_j w_j h_j                                                                 (B, C, d)
    logit    = MLP([interest, c, mean_j h_j, user])  with Dice (or PReLU) activations       (B, C)

h_j = item + action + scenario embedding of history event j, c = item + scenario embedding of the candidate.
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
from climber.models.layers import IdEmbeddings, history_strategy, init_weights, masked_mean, mlp_flops, one_history

ACTIVATIONS = ("dice", "prelu")


@dataclass
class DINConfig(ModelConfig):
    d_model: int = 64  # embedding width
    max_len: int = 100  # recent history events
    att_hidden: list[int] = field(default_factory=lambda: [36])  # activation unit: 4d -> ... -> 1 (paper: 36)
    mlp_hidden: list[int] = field(default_factory=lambda: [200, 80])  # head: 4d -> ... -> 1
    activation: str = "dice"  # "dice" | "prelu", in both MLPs
    dropout: float = 0.1  # in the head MLP

    def check(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"DINConfig.activation: {self.activation!r} not one of {', '.join(ACTIVATIONS)}")
        self._at_least(1, "d_model", "max_len")
        self._layer_sizes("att_hidden", "mlp_hidden", nonempty=True)
        self._dropout_in_range()


class Dice(nn.Module):
    """Data-adaptive activation: f(s) = p(s) s + (1 - p(s)) alpha s, p(s) = sigmoid((s - E[s]) / sqrt(Var[s] + eps)).

    E and Var are per feature: in training the statistics of the real positions of the batch (``mask``;
    padding never counts), tracked as running averages that are used in evaluation, as batch norm does.
    """

    def __init__(self, width: int, momentum: float = 0.1, eps: float = 1e-8):
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.alpha = nn.Parameter(torch.zeros(width))
        self.register_buffer("running_mean", torch.zeros(width))
        self.register_buffer("running_var", torch.ones(width))

    def forward(self, s: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """s (..., width), mask (...) bool -> (..., width)."""
        if self.training:
            m = mask.to(s.dtype)[..., None]
            n = m.sum().clamp(min=1.0)
            mean = (s * m).flatten(0, -2).sum(0) / n  # (width,)
            var = (((s - mean) * m) ** 2).flatten(0, -2).sum(0) / n
            with torch.no_grad():
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(var, self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        p = torch.sigmoid((s - mean) * torch.rsqrt(var + self.eps))
        return s * (self.alpha + (1 - self.alpha) * p)  # = p s + (1 - p) alpha s


class MaskedMLP(nn.Module):
    """Linear -> activation (Dice, or PReLU with one slope per layer) -> dropout per hidden size, then a
    linear output. The mask (...) marks the real positions, whose statistics Dice uses."""

    def __init__(self, sizes: list[int], activation: str, dropout: float):
        super().__init__()
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))
        self.acts = nn.ModuleList(Dice(b) if activation == "dice" else nn.PReLU() for b in sizes[1:-1])
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # x (..., sizes[0]) -> (..., sizes[-1])
        return self.after_first(self.linears[0](x), mask)

    def after_first(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The layers after the first Linear, given its output h (..., sizes[1])."""
        for linear, act in zip(self.linears[1:], self.acts):
            h = act(h, mask) if isinstance(act, Dice) else act(h)
            h = linear(self.drop(h))
        return h


class DIN(nn.Module):
    def __init__(self, cfg: DINConfig, info: DataInfo):
        super().__init__()
        self.cfg, self.info = cfg, info
        d = cfg.d_model
        self.emb = IdEmbeddings(info, d, user=True)
        self.emb.apply(init_weights)  # the other layers keep PyTorch's default init
        self.att = MaskedMLP([4 * d, *cfg.att_hidden, 1], cfg.activation, 0.0)
        self.head = MaskedMLP([4 * d, *cfg.mlp_hidden, 1], cfg.activation, cfg.dropout)

    def strategies(self) -> list[Strategy]:
        return history_strategy(self.cfg.max_len)

    def _inputs(self, batch: Batch):
        """h (B, L, d) history tokens, c (B, C, d) candidate tokens, mask (B, L) bool."""
        seq = one_history(batch, "DIN")
        return self.emb.history(seq), self.emb.candidate(batch), seq.mask

    def _weights(self, h, c, mask, cand_mask) -> torch.Tensor:
        """w (B, C, L): the activation unit's unnormalised weight of each history event per candidate, 0 at padding.

        The first layer is one Linear over [h, c, h - c, h * c] (4d inputs); with its weight split into
        [W_h, W_c, W_s, W_p] it equals h (W_h + W_s) + c (W_c - W_s) + (h * c) W_p, so only the
        elementwise product goes through a matmul per (candidate, event) pair.
        """
        first = self.att.linears[0]
        w_h, w_c, w_s, w_p = first.weight.split(h.shape[-1], dim=1)  # each (att_hidden[0], d)
        from_h = h @ (w_h + w_s).T  # (B, L, a)
        from_c = c @ (w_c - w_s).T + first.bias  # (B, C, a)
        from_hc = (c[:, :, None] * h[:, None]) @ w_p.T  # (B, C, L, a)
        pairs = mask[:, None, :] & cand_mask[:, :, None]  # (B, C, L): real event of a real candidate
        w = self.att.after_first(from_hc + from_h[:, None] + from_c[:, :, None], pairs).squeeze(-1)  # (B, C, L)
        return w * mask[:, None, :].to(w.dtype)

    def activation_weights(self, batch: Batch) -> torch.Tensor:
        """w (B, C, L), see ``_weights``."""
        return self._weights(*self._inputs(batch), batch.cand_mask)

    def interest(self, batch: Batch) -> torch.Tensor:
        """sum_j w_j h_j: (B, C, d), the pooled interest before the head MLP."""
        h, c, mask = self._inputs(batch)
        return self._weights(h, c, mask, batch.cand_mask) @ h

    def forward(self, batch: Batch) -> torch.Tensor:
        """-> logits (B, C); padding candidates get finite logits that callers mask out."""
        h, c, mask = self._inputs(batch)
        C = c.shape[1]
        interest = self._weights(h, c, mask, batch.cand_mask) @ h  # (B, C, d)
        pooled = masked_mean(h, mask)[:, None].expand(-1, C, -1)  # (B, C, d)
        user = self.emb.user_vector(batch)[:, None].expand(-1, C, -1)  # (B, C, d)
        x = torch.cat([interest, c, pooled, user], dim=-1)  # (B, C, 4d)
        return self.head(x, batch.cand_mask).squeeze(-1)

    def flops(self, shape: SampleShape) -> int:
        """Analytic forward FLOPs of one row (2 m n k per matmul; lookups and elementwise ops count 0)."""
        d, (L,), C = self.cfg.d_model, shape.lengths, shape.candidates
        a = self.cfg.att_hidden
        first = 2 * L * d * a[0] + 2 * C * d * a[0] + 2 * C * L * d * a[0]  # h part, c part, h * c part
        att = first + C * L * mlp_flops([*a, 1])
        pool = 2 * C * L * d  # w @ h
        return att + pool + C * mlp_flops([4 * d, *self.cfg.mlp_hidden, 1])
