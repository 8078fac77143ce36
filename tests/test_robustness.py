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


def epochs_log(aucs, loglosses=None, steps_per_epoch=10):
    loglosses = loglosses or [0.5] * len(aucs)
    return [{"epoch": e, "step": (e + 1) * steps_per_epoch, "val": {"auc": a, "gauc": a - 0.1, "logloss": ll}}
            for e, (a, ll) in enumerate(zip(aucs, loglosses))]


def test_replay_selection_follows_the_training_loops_patience_and_warmup():
    from climber.robustness import replay_selection

    log = epochs_log([0.60, 0.70, 0.65, 0.66, 0.64, 0.90], [0.7, 0.6, 0.5, 0.55, 0.56, 0.57])
    assert replay_selection(log, "auc", patience=3, warmup=1)["epoch"] == 1  # stops before the late 0.90
    assert replay_selection(log, "auc", patience=4, warmup=1)["epoch"] == 5
    assert replay_selection(log, "auc", patience=3, warmup=30)["epoch"] == 5  # epoch 2 ends in the warmup
    assert replay_selection(log, "logloss", patience=3, warmup=1)["epoch"] == 2  # lower is better


def test_pair_classes_take_gauc_apart_by_the_items_train_events():
    """The pair classes' shares sum to 1 and their share-weighted accuracies to the GAUC of
    climber.eval.metrics; a pair's class is unordered, and a tie counts one half."""
    import numpy as np

    from climber.eval.metrics import gauc
    from climber.robustness import item_class, pair_classes

    rng = np.random.default_rng(0)
    users = rng.integers(0, 30, 400)
    clicks = rng.integers(0, 2, 400)
    logits = np.round(rng.normal(size=400) + clicks, 1)  # ties included
    classes = item_class(rng.choice([0, 3, 19, 20, 500], 400))
    parts = pair_classes(users, clicks, logits, classes)
    assert sum(share for _, share in parts.values()) == pytest.approx(1.0)
    assert sum(acc * share for acc, share in parts.values()) == pytest.approx(gauc(users, clicks, logits))
    one = pair_classes([1, 1, 1], [1, 0, 0], [0.5, 0.5, 0.9], item_class(np.array([0, 25, 0])))
    assert one["unseen-frequent"] == (0.5, 0.5) and one["unseen-unseen"] == (0.0, 0.5)
    assert np.isnan(one["rare-rare"][0])


def test_diagnose_separates_variance_from_a_missing_popularity_signal(tmp_path):
    """Two seeds whose logits are the truth plus and minus the same noise: each alone ranks poorly, their
    average perfectly. A third entry scores every candidate 0, so the floor's logit alone ranks it, and
    the items' train rates order each user's test labels."""
    import numpy as np

    from climber.config import save_yaml
    from climber.eval.metrics import gauc
    from climber.robustness import diagnose

    rng = np.random.default_rng(0)
    users, items = np.repeat(np.arange(1, 21), 6), np.tile(np.arange(1, 7), 20)
    labels = (items > 3).astype("int8")  # items 4..6 positive at test for every user
    train_items = np.repeat(np.arange(1, 7), [10, 10, 10, 15, 15, 15])  # items 4..6 more often
    train_labels = np.concatenate([np.zeros(30), np.ones(45)]).astype("int8")  # items 4..6 positive in train
    train_users = np.full(75, 99)
    train_users[0] = 1  # user 1 met item 1 in train: its first test candidate is a repeat
    (tmp_path / "data" / "m").mkdir(parents=True)
    pl.DataFrame({"user": np.concatenate([train_users, users]), "item": np.concatenate([train_items, items]),
                  "label": np.concatenate([train_labels, labels]),
                  "split": ["train"] * 75 + ["test"] * len(items)}).write_parquet(tmp_path / "data" / "m" / "events.parquet")
    truth, noise = labels * 2.0 - 1.0, rng.normal(0, 5, len(items))
    for label, logits in {"noisy": [truth + noise, truth - noise], "blank": [np.zeros(len(items))] * 2}.items():
        for seed, logit in enumerate(logits):
            run = tmp_path / "runs" / "m" / label / f"seed{seed}"
            run.mkdir(parents=True)
            pl.DataFrame({"user": users, "item": items, "label": labels, "logit": logit}).write_parquet(run / "predictions.parquet")
            save_yaml({"train": {"epochs": 6, "patience": 3, "select": "auc"}}, run / "config.yaml")
            (run / "epochs.jsonl").write_text("".join(json.dumps(e) + "\n" for e in epochs_log([0.6, 0.7, 0.65])))
    rows = {r["model"]: r for r in diagnose(tmp_path, ["noisy", "blank"], 2, members=["m"])}
    assert rows["noisy"]["test_gauc"] < 0.9 and rows["noisy"]["test_gauc_seed_average"] == 1.0
    assert rows["blank"]["test_gauc"] == 0.5 and rows["blank"]["test_gauc_plus_floor"] == 1.0
    assert rows["blank"]["test_gauc_plus_count"] == 1.0  # the positive items have more train events
    assert rows["noisy"]["val_gauc_own_select"] == pytest.approx(0.6)  # epoch 1's val AUC 0.7, minus 0.1
    # every item has 10 or 15 train events: all spread is on "rare" items; the blank seeds agree exactly
    assert rows["noisy"]["seed_spread_rare_items"] > 1 and rows["blank"]["seed_spread_rare_items"] == 0
    assert rows["noisy"]["seed_spread_frequent_items"] is None
    assert rows["noisy"]["repeat_fraction"] == rows["floor"]["repeat_fraction"] == pytest.approx(1 / len(items))
    assert rows["noisy"]["test_gauc_without_repeats"] == pytest.approx(
        np.mean([gauc(users[1:], labels[1:], lg[1:]) for lg in (truth + noise, truth - noise)]))
    assert rows["floor"]["test_gauc_without_repeats"] == 1.0 and rows["blank"]["test_gauc_without_repeats"] == 0.5
    # two entries; by pair class three rows; without repeats three
    assert (tmp_path / "diagnostics.md").read_text().count("| m |") == 8
    # every item has 10 or 15 train events (rare): the floor orders all pairs; the blank entry ties them all
    assert rows["floor"]["pairs"]["rare-rare"] == (1.0, 1.0) and rows["blank"]["pairs"]["rare-rare"] == (0.5, 1.0)
    (tmp_path / "runs" / "m" / "blank" / "seed1" / "predictions.parquet").unlink()
    with pytest.raises(ValueError, match="no finished run"):
        diagnose(tmp_path, ["blank"], 2, members=["m"])


def test_gaps_band_and_verdict_over_test_users(tmp_path):
    """A model that ranks every user's candidates perfectly against a reference that ties them all:
    GAUC +0.5 over the reference whichever users are drawn (met); the floor ranks them perfectly too,
    so the gap to it is 0 on every resample (missed). A reference that scored other candidates is refused."""
    import numpy as np

    from climber.robustness import gaps, verdict

    users, items = np.repeat(np.arange(1, 41), 6), np.tile(np.arange(1, 7), 40)
    labels = (items > 3).astype("int8")
    (tmp_path / "data" / "m").mkdir(parents=True)
    train_items = np.repeat(np.arange(1, 7), 10)
    pl.DataFrame({"user": np.concatenate([np.full(60, 99), users]), "item": np.concatenate([train_items, items]),
                  "label": np.concatenate([(train_items > 3), labels]).astype("int8"),
                  "split": ["train"] * 60 + ["test"] * len(items)}).write_parquet(tmp_path / "data" / "m" / "events.parquet")
    rng = np.random.default_rng(0)
    for label, logits in {"good": [labels + rng.uniform(0, 0.5, len(items)) for _ in range(2)],
                          "ref": [np.zeros(len(items))] * 2}.items():
        for seed, logit in enumerate(logits):
            (tmp_path / "runs" / "m" / label / f"seed{seed}").mkdir(parents=True)
            pl.DataFrame({"user": users, "item": items, "label": labels, "logit": logit}).write_parquet(
                tmp_path / "runs" / "m" / label / f"seed{seed}" / "predictions.parquet")
    rows = {(r["metric"], r["against"]): r for r in gaps(tmp_path, ["good", "ref"], 2, members=["m"], draws=200)}
    assert rows["gauc", "ref"]["gap"] == rows["gauc", "ref"]["low"] == rows["gauc", "ref"]["high"] == pytest.approx(0.5)
    assert rows["gauc", "ref"]["verdict"] == "met" and rows["gauc", "floor"]["verdict"] == "missed"
    assert rows["gauc", "floor"]["gap"] == pytest.approx(0.0) and rows["auc", "ref"]["gap"] == pytest.approx(0.5)
    assert rows["gauc", "ref"]["test_users"] == rows["gauc", "ref"]["test_users_both_labels"] == 40 and (tmp_path / "gaps.md").read_text().count("| m |") == 3
    assert verdict(0.02, -0.01, 0.05, 0.01) == "met (within noise)"
    assert verdict(0.0, -0.01, 0.05, 0.01) == "missed (within noise)"
    with pytest.raises(ValueError, match="give two entries"):
        gaps(tmp_path, ["good"], 2, members=["m"])
    pl.DataFrame({"user": users, "item": items[::-1], "label": labels, "logit": np.zeros(len(items))}).write_parquet(
        tmp_path / "runs" / "m" / "ref" / "seed1" / "predictions.parquet")
    with pytest.raises(ValueError, match="scored different candidates"):
        gaps(tmp_path, ["good", "ref"], 2, members=["m"])
