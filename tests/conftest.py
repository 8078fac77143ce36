"""Shared fixtures: a tiny synthetic prepared dir, and the tiny training overrides that go with it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from climber.data.synthetic import synthesize

# The tests run tiny tensors: one intra-op thread is faster than several, and far faster while other
# processes keep the cores busy (a training run beside the tests).
torch.set_num_threads(1)

# Training overrides that make a run take seconds on 2 cores.
TINY = ["train.epochs=3", "train.patience=5", "train.batch_size=16", "train.min_steps_per_epoch=0", "train.candidates_per_row=8",
        "train.warmup_steps=5", "model.d_model=16", "model.n_heads=2", "model.n_layers=1",
        "train.threads=1"]

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "data"
    synthesize(out, users=120, events_per_user=30, items=60, topics=4, seed=1, log=lambda *_: None)
    return out


def perturb_parameters(model: nn.Module, seed: int) -> nn.Module:
    """Move every parameter by N(0, 0.3) noise so that each one matters in a check (zero relative biases,
    unit norm gains and 0.02-scale embeddings would hide mistakes); padding rows of embeddings stay
    zero, as training keeps them."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
        for m in model.modules():
            if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                m.weight[m.padding_idx].zero_()
    return model
