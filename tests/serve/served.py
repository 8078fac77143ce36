"""The served run of the HTTP tests (a fixture test modules import): a tiny Climber trained on a MovieLens-format log."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import polars as pl
import pytest
import torch

from climber.data.samples import Rows, UserEvents, collate
from climber.data.sequences import resolve

USERS, ITEMS, EVENTS_PER_USER = 30, 40, 25


def train_tiny(data, out, seed: int = 0):
    from climber.config import resolve as resolve_config
    from climber.train.loop import Trainer
    from conftest import TINY

    cfg = resolve_config("climber-tiny", None, TINY + ["train.epochs=1", f"train.seed={seed}"])
    Trainer(out, data, cfg, log=lambda *_: None, progress=False).fit()
    return out


@pytest.fixture(scope="session")
def run(tmp_path_factory):
    """A tiny Climber trained for one epoch on a MovieLens-format log (label rule action>=4, one scenario)."""
    from climber.data.datasets import load_dataset
    from climber.data.prepare import prepare

    root = tmp_path_factory.mktemp("served")
    rng = np.random.default_rng(0)
    lines = []
    for u in range(1, USERS + 1):
        ts = 880_000_000 + np.cumsum(rng.integers(1, 5000, EVENTS_PER_USER))
        for item, rating, t in zip(rng.choice(ITEMS, EVENTS_PER_USER, replace=False) + 1,
                                   rng.integers(1, 6, EVENTS_PER_USER), ts):
            lines.append(f"{u}\t{item}\t{rating}\t{t}")
    (root / "raw").mkdir()
    (root / "raw" / "u.data").write_text("\n".join(lines) + "\n")
    prepare(load_dataset("movielens-100k", root / "raw"), root / "data")
    return train_tiny(root / "data", root / "run")


def offline_probabilities(run, user: str, history: list[dict], candidates: list, ts: int) -> np.ndarray:
    """sigmoid(model(batch)) for the batch the training pipeline (``collate``) builds for these candidates
    after ``history`` (raw events as the service returns them)."""
    from climber.eval.evaluate import load_run_model

    from climber.config import load_yaml

    model, _ = load_run_model(run)
    data = Path(load_yaml(run / "config.yaml")["data"])
    vocab = {c: dict(pl.read_parquet(data / "vocab" / f"{c}.parquet").select("raw", "id").iter_rows())
             for c in ("user", "item", "action", "scenario")}
    n, C = len(history), len(candidates)
    column = lambda c, extra: np.array([vocab[c].get(e[c], 0) for e in history] + extra, dtype=np.int64)  # noqa: E731
    events = UserEvents(
        offsets=np.array([0, n + C]), user=np.array([vocab["user"][user]]),
        item=column("item", [vocab["item"].get(str(c), 0) for c in candidates]),
        action=column("action", [1] * C), scenario=column("scenario", [1] * C),
        ts=np.array([e["ts"] for e in history] + [ts] * C, dtype=np.int64),
        label=np.array([e["label"] for e in history] + [0] * C, dtype=np.int64),
        split=np.zeros(n + C, dtype=np.int8))
    rows = Rows(user=np.array([0]), cut=np.array([n]), start=np.array([n]), count=np.array([C]))
    batch = collate(events, rows, resolve(model.strategies(), model.info.actions, model.info.scenarios))
    with torch.no_grad():
        return torch.sigmoid(model(batch)[0].double()).numpy()


def score(url, user, candidates, ts, **kw):
    r = httpx.post(url + "/v1/score", json={"user": user, "candidates": candidates, "ts": ts}, **kw)
    assert r.status_code == 200, r.text
    return r.json()
