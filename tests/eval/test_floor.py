"""The no-training floor (climber.eval.floor) against a computation written out with plain Python."""

from __future__ import annotations

import json

import polars as pl
import pytest
from sklearn.metrics import roc_auc_score

from climber.cli import main
from climber.eval.floor import PRIOR_EVENTS, item_rate_floor


def test_floor_scores_items_by_their_smoothed_train_rate(tiny_synth, capsys):
    events = pl.read_parquet(tiny_synth / "events.parquet").to_dicts()
    train = [e for e in events if e["split"] == "train"]
    rate = sum(e["label"] for e in train) / len(train)
    counts = {}
    for e in train:
        pos, n = counts.get(e["item"], (0, 0))
        counts[e["item"]] = (pos + e["label"], n + 1)
    test = [e for e in events if e["split"] == "test"]
    scores = []
    for e in test:
        pos, n = counts.get(e["item"], (0, 0))
        scores.append((pos + PRIOR_EVENTS * rate) / (n + PRIOR_EVENTS))
    out = item_rate_floor(tiny_synth)
    assert out["candidates"] == len(test)
    assert out["metrics"]["auc"] == pytest.approx(roc_auc_score([e["label"] for e in test], scores), abs=1e-9)
    assert out["unseen_item_fraction"] == pytest.approx(sum(e["item"] not in counts for e in test) / len(test))
    own = {(e["user"], e["item"]) for e in train}
    repeats = [e["label"] for e in test if (e["user"], e["item"]) in own]
    assert repeats and out["repeat_fraction"] == pytest.approx(len(repeats) / len(test))
    assert out["repeat_positive_rate"] == pytest.approx(sum(repeats) / len(repeats))
    assert main(["floor", "--data", str(tiny_synth), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"]["auc"] == pytest.approx(out["metrics"]["auc"])
    with pytest.raises(ValueError, match="'dev' is not one of"):
        item_rate_floor(tiny_synth, "dev")
