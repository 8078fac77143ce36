"""Shared fixtures: a tiny synthetic prepared dir, and the tiny training overrides that go with it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from climber.data.synthetic import synthesize

# The tests run tiny tensors: one intra-op thread is faster than several, and far faster while other
# processes keep the cores busy (a training run beside the tests).
torch.set_num_threads(1)

# Training overrides that make a run take seconds on 2 cores.
TINY = ["train.epochs=3", "train.patience=5", "train.batch_size=16", "train.candidates_per_row=8",
        "train.warmup_steps=5", "model.d_model=16", "model.n_heads=2", "model.n_layers=1",
        "train.threads=1"]

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "data"
    synthesize(out, users=120, events_per_user=30, items=60, topics=4, seed=1, log=lambda *_: None)
    return out
