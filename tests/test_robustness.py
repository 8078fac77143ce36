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


def test_rule_ranks_variants_by_val_gauc_within_each_member_then_averages():
    from climber.robustness import rule_ranks

    def row(member, model, gauc, auc, base="climber"):
        return {"member": member, "base": base, "model": model, "val_gauc": gauc, "val_auc": auc}

    rows = [{"member": "a", "model": "floor (item train positive rate)"},  # no base: not a variant
            row("a", "x", 0.60, 0.70), row("a", "y", 0.62, 0.69), row("a", "z", 0.61, 0.71),
            row("b", "x", 0.55, 0.70), row("b", "y", 0.54, 0.69), row("b", "z", 0.55, 0.60),
            row("a", "d", 0.90, 0.90, base="dlrm"), row("b", "d", 0.10, 0.10, base="dlrm")]
    ranks = {(r["base"], r["model"]): r for r in rule_ranks(rows)}
    # a: y 1, z 2, x 3; b: x and z tie at 1, y 3 -> x 2.0, y 2.0, z 1.5
    assert {k[1]: r["mean_val_gauc_rank"] for k, r in ranks.items() if k[0] == "climber"} == {"x": 2.0, "y": 2.0, "z": 1.5}
    assert ranks[("climber", "x")]["mean_val_auc_rank"] == 1.5  # a: z 1, x 2, y 3; b: x 1, y 2, z 3
    assert [r["model"] for r in rule_ranks(rows) if r["base"] == "climber"] == ["z", "x", "y"]  # x beats y on AUC rank
    assert ranks[("dlrm", "d")] == {"base": "dlrm", "model": "d", "members": 2, "mean_val_gauc_rank": 1.0,
                                    "mean_val_auc_rank": 1.0}
