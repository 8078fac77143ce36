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


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, row_tables: bool = True) -> torch.optim.AdamW:
    """AdamW: ``weight_decay`` on weight matrices, none on biases and norms (1-d), and
    ``embedding_decay`` on the lookup tables, whose learning rate is ``embedding_lr_mult`` times the
    others' (the group's ``lr_mult``, applied by :func:`set_lr`). Decoupled decay shrinks every row at
    every step, so a row that few batches look up (a rare item or user) drifts back towards zero
    between its updates. With ``lazy_embeddings`` the tables' Adam steps are :class:`LazyRowsAdamW`'s,
    where the tables are plain tensors of rows (``row_tables``; FSDP's sharded DTensors are not: they
    keep AdamW's steps)."""
    decay, no_decay, tables = [], [], []
    for name, p in model.named_parameters():
        (tables if "emb" in name and p.dim() == 2 else no_decay if p.dim() < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0},
              {"params": tables, "weight_decay": cfg.embedding_decay, "lazy_rows": cfg.lazy_embeddings and row_tables,
               "lr_mult": cfg.embedding_lr_mult}]
    return LazyRowsAdamW(groups, lr=cfg.lr, betas=(0.9, 0.98))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The learning rate of every parameter group: ``lr`` times the group's ``lr_mult`` (1 if it has none)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)


class LazyRowsAdamW(torch.optim.AdamW):
    """AdamW, except in parameter groups with ``lazy_rows`` (lookup tables): there a step updates the
    moments and moves the rows that the batch looked up (a nonzero gradient row) and leaves the others'
    moments as they were, each row's bias correction counting its own updates (``row_steps``). The
    decoupled weight decay still shrinks every row.

    Why: with plain Adam a row looked up once keeps moving for tens of steps after (its first moment
    decays by beta1 a step while its second moment, decaying by beta2, keeps the step size), about
    eleven times its first step in all at betas (0.9, 0.98), in the direction of that one gradient:
    rare items' rows move most on the least evidence. Lazily, each look-up moves a row by at most about
    ``lr`` a coordinate (docs/results/robustness.md, sixth round)."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = self.param_groups
        self.param_groups = [g for g in groups if not g.get("lazy_rows")]
        try:
            super().step()
        finally:
            self.param_groups = groups
        for group in (g for g in groups if g.get("lazy_rows")):
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.mul_(1 - group["lr"] * group["weight_decay"])
                state = self.state[p]
                if not state:  # "step" (the table's steps) as AdamW keeps it, so its checkpoint code reads ours
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
                    state["row_steps"] = torch.zeros(p.shape[0], 1, dtype=p.dtype, device=p.device)
                state["step"] += 1
                rows = p.grad.ne(0).any(dim=1).nonzero().squeeze(1)  # (R,) the rows looked up
                grad, n = p.grad[rows], state["row_steps"][rows] + 1  # (R, d), (R, 1)
                m, v = state["exp_avg"][rows], state["exp_avg_sq"][rows]
                m.mul_(beta1).add_(grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                step = (m / (1 - beta1 ** n)) / ((v / (1 - beta2 ** n)).sqrt() + group["eps"])
                p.index_add_(0, rows, step, alpha=-group["lr"])
                state["exp_avg"][rows], state["exp_avg_sq"][rows], state["row_steps"][rows] = m, v, n
        return loss


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
