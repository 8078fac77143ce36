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


def randomize_prior_tables(model: nn.Module) -> nn.Module:
    """Random tables for ``model``'s popularity prior (``climber.models.layers.PopularityPrior``, which
    ``build_model`` fills from the data), so that its term matters in a check: log-odds N(0, 1), log
    counts in [0, 3); padding stays 0."""
    from climber.models.layers import PopularityPrior

    for m in model.modules():
        if isinstance(m, PopularityPrior):
            m.logits[1:] = torch.randn(m.logits[1:].shape)
            if hasattr(m, "log_counts"):
                m.log_counts[1:] = torch.rand(m.log_counts[1:].shape) * 3
    return model


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


def prepare_feature_log(root: Path) -> Path:
    """A small log with every kind of feature, prepared into ``root / "prep"``: an item bag (item_tags),
    per-event context (ctx_device; ctx_hour derived from ts, UTC), a number (num_price), and a user table
    (user_age; the bag user_likes) that lacks user u9."""
    from climber.cli import main

    lines = ["uid,item,ts,action,item_tags,ctx_device,num_price"]
    for u in range(10):
        for k in range(14):
            tags = ["x|y", "y", "z|x|w"][(u + k) % 3]
            lines.append(f"u{u},i{(u + 2 * k) % 12},{1_700_000_000 + 3_600 * (u * 20 + k)},{1 + (u * k) % 5},{tags},"
                         f"{['ios', 'web', 'tv'][(u * k) % 3]},{(u + k) % 7 * 1.5}")
    (root / "log.csv").write_text("\n".join(lines) + "\n")
    (root / "users.csv").write_text("uid,age,likes\n" + "".join(f"u{u},{u % 3},{'a|b' if u % 2 else 'c'}\n"
                                                             for u in range(9)))
    out = root / "prep"
    assert main(["data", "prepare", str(root / "log.csv"), "--columns", "user=uid", "--label", "action>=4",
                 "--user-table", str(root / "users.csv"), "--user-key", "uid", "--multi", "item_tags,user_likes",
                 "--derive", "hour", "--out", str(out)]) == 0
    return out
