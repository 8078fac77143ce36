"""``climber eval`` names HR@k / NDCG@k for what they are (a ranking of each user's own candidates) and
prints those candidates' count per user, checked against a count of the prepared data's split."""

from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import polars as pl
import pytest

from climber.cli import main
from conftest import TINY


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Climber-tiny after one epoch on a MovieLens-format log whose users have 10 to 60 events, so that
    their test candidates number 1 to 6."""
    from climber.config import resolve
    from climber.data.datasets import load_dataset
    from climber.data.prepare import prepare
    from climber.train.loop import Trainer

    root = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(0)
    lines = []
    for user, n in enumerate(rng.integers(10, 61, 40), start=1):
        ts = 880_000_000 + np.cumsum(rng.integers(1, 5000, n))
        for item, rating, t in zip(rng.choice(80, n, replace=False) + 1, rng.integers(1, 6, n), ts):
            lines.append(f"{user}\t{item}\t{rating}\t{t}")
    (root / "raw").mkdir()
    (root / "raw" / "u.data").write_text("\n".join(lines) + "\n")
    prepare(load_dataset("movielens-100k", root / "raw"), root / "data", log=lambda *_: None)
    cfg = resolve("climber-tiny", None, TINY + ["train.epochs=1"])
    Trainer(root / "run", root / "data", cfg, log=lambda *_: None, progress=False).fit()
    return root / "run"


def test_eval_prints_the_candidates_each_user_ranks(run, capsys):
    test = pl.read_parquet(run.parent / "data" / "events.parquet").filter(pl.col("split") == "test").to_dicts()
    with_positive = {e["user"] for e in test if e["label"] == 1}
    counts = list(Counter(e["user"] for e in test if e["user"] in with_positive).values())
    assert len(set(counts)) > 1  # the counts differ between users, so mean and median say something

    assert main(["eval", "--run", str(run)]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "HR@10" in x)
    assert "HR@10 over own candidates" in line and "NDCG@10 over own candidates" in line
    found = re.search(r"([\d.]+) candidates per user on average, median ([\d.]+), ([\d,]+) users with a positive",
                      line)
    assert found, line
    assert float(found[1]) == pytest.approx(np.mean(counts), abs=0.05)
    assert float(found[2]) == np.median(counts)
    assert int(found[3].replace(",", "")) == len(counts)

    assert main(["eval", "--run", str(run), "--json"]) == 0
    m = json.loads(capsys.readouterr().out)["metrics"]
    assert (m["ranked_users"], m["candidates_per_user_median"]) == (len(counts), np.median(counts))
    assert m["candidates_per_user_mean"] == pytest.approx(np.mean(counts))
    assert {"hr@5", "hr@10", "ndcg@5", "ndcg@10"} <= set(m)  # the keys readers use are kept
