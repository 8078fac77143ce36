"""Optimizer, learning-rate schedule and weight averaging."""

from __future__ import annotations

import contextlib
import math

import torch

from climber.config import TrainConfig


def warmup_steps(total: int, cfg: TrainConfig) -> int:
    """Steps of linear warmup in a run of ``total`` steps: ``warmup_steps``, but at most a tenth of the
    run, so a small data set (a few steps per epoch) still trains at the peak rate."""
    return max(1, min(cfg.warmup_steps, total // 10))


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warmup (``warmup_steps``), then cosine decay to 10% of the peak at ``total``."""
    warmup = warmup_steps(total, cfg)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW: ``weight_decay`` on weight matrices, none on biases and norms (1-d), and
    ``embedding_decay`` on the lookup tables. Decoupled decay shrinks every row at every step, so a row
    that few batches look up (a rare item or user) drifts back towards zero between its updates."""
    decay, no_decay, tables = [], [], []
    for name, p in model.named_parameters():
        (tables if "emb" in name and p.dim() == 2 else no_decay if p.dim() < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0},
              {"params": tables, "weight_decay": cfg.embedding_decay}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98))


class WeightAverage:
    """Exponential moving average of a model's floating-point state, updated after every optimizer step
    with decay ``min(decay, (1 + t) / (10 + t))`` (a short warm-up, so early averages are not stale)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay, self.updates = decay, 0
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        state = model.state_dict()
        for k, avg in self.shadow.items():
            avg.mul_(d).add_(state[k].detach(), alpha=1 - d)

    @contextlib.contextmanager
    def applied(self, model: torch.nn.Module):
        """Swap the averaged weights in for the duration of the block, then restore the live ones."""
        live = {k: v.detach().clone() for k, v in model.state_dict().items() if k in self.shadow}
        model.load_state_dict(self.shadow, strict=False)
        try:
            yield
        finally:
            model.load_state_dict(live, strict=False)
