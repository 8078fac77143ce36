"""The robustness suite's data constructions (climber.robustness): ids only, and item-sparse aliases."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from climber.data.schema import LabelRule, RawSource
from climber.robustness import build_member, ids_only, item_sparse

ML_100K = Path("/work/shared/data/ml-100k")


def source(users=50, items=30, seed=0) -> RawSource:
    import numpy as np

    rng = np.random.default_rng(seed)
    rows = [(f"u{u}", f"i{i}", str(1000 + t), str(int(rng.integers(1, 6))), "g")
            for u in range(users) for t, i in enumerate(rng.choice(items, 12, replace=False))]
    frame = pl.DataFrame(rows, schema=["user", "item", "ts", "action", "item_genre"], orient="row")
    return RawSource("toy", frame.lazy(), LabelRule.parse("action>=4"))


def test_ids_only_drops_item_side_features():
    assert ids_only(source()).frame.collect_schema().names() == ["user", "item", "ts", "action"]


def test_item_sparse_keeps_users_sequences_and_one_alias_per_pair():
    before = source().frame.collect()
    after = item_sparse(source(), keep_users=0.7, aliases=5, seed=3).frame.collect()
    kept = after["user"].unique()
    assert 0.5 < len(kept) / before["user"].n_unique() < 0.9
    original = before.filter(pl.col("user").is_in(kept.implode())).sort("user", "ts")
    after = after.sort("user", "ts")
    assert after.height == original.height  # every event of a kept user, in order
    base, alias = after["item"].str.split_exact("#", 1).struct.unnest().get_columns()
    assert (base == original["item"]).all() and set(alias.cast(int)) <= set(range(5))
    assert after.select("user", "item").n_unique() == original.select("user", "item").n_unique()
    assert after["item"].n_unique() > 2 * original["item"].n_unique()  # sparser items
    again = item_sparse(source(), keep_users=0.7, aliases=5, seed=3).frame.collect().sort("user", "ts")
    assert again.equals(after)  # deterministic per seed


@pytest.mark.skipif(not ML_100K.exists(), reason="MovieLens 100k not in /work/shared/data")
def test_ml100k_sparse_member_is_prepared_once(tmp_path):
    data = build_member("ml100k-sparse", tmp_path, ML_100K, Path("nope"), log=lambda *_: None)
    manifest = json.loads((data / "manifest.json").read_text())
    assert 60_000 < manifest["rows"] < 80_000 and manifest["items"] > 4_000
    assert not {"item_genres", "item_decade"} & set(pl.read_parquet(data / "events.parquet").columns)
    assert build_member("ml100k-sparse", tmp_path, Path("nope"), Path("nope")) == data  # kept, not rebuilt
    with pytest.raises(ValueError, match="not one of ml100k-side"):
        build_member("movielens", tmp_path, ML_100K, Path("nope"))
