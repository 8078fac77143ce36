"""The floor that needs no training (issue 21): every candidate of a split scored by its item's positive
rate in the train split, smoothed towards the train split's global rate,

    p(item) = (positives of item + PRIOR_EVENTS x global rate) / (events of item + PRIOR_EVENTS),

so an item unseen in train gets the global rate. A ranker's GAUC below this floor ranks a user's
candidates worse than their popularity does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from climber.data.samples import check_split
from climber.eval.metrics import all_metrics

PRIOR_EVENTS = 10.0  # weight of the global rate, in events


def item_train_rates(events: pl.DataFrame) -> tuple[pl.DataFrame, float]:
    """(item, events, rate) for each item of the train split of ``events`` (columns item, label, split),
    the rate smoothed as above; and the train split's global positive rate."""
    train = events.filter(pl.col("split") == "train")
    rate = float(train["label"].mean())
    per_item = train.group_by("item").agg(pl.col("label").sum().alias("positives"), pl.len().alias("events"))
    smoothed = (pl.col("positives") + PRIOR_EVENTS * rate) / (pl.col("events") + PRIOR_EVENTS)
    return per_item.select("item", "events", smoothed.alias("rate")), rate


def log_odds(p):
    """log(p / (1 - p)) of a probability or an array of them."""
    return np.log(p) - np.log1p(-p)


def with_floor_logits(candidates: pl.DataFrame, per_item: pl.DataFrame, rate: float) -> pl.DataFrame:
    """``candidates`` (an item column) with their item's train ``events`` (0 for an item unseen in train),
    smoothed ``rate`` (``per_item`` / ``rate`` of :func:`item_train_rates`; the global rate when unseen) and
    the floor's score, ``floor_logit``."""
    joined = candidates.join(per_item, on="item", how="left")
    joined = joined.with_columns(pl.col("events").fill_null(0), pl.col("rate").fill_null(rate))
    p = joined["rate"].to_numpy()
    return joined.with_columns(pl.Series("floor_logit", log_odds(p)))


def repeated_items(candidates: pl.DataFrame, events: pl.DataFrame) -> np.ndarray:
    """(candidates,) bool: whether a candidate's user has a train event of its item (``events``: user, item,
    split), an item the user meets again (none on a rating log, many on a click log)."""
    pair = (pl.col("user").cast(pl.Int64) * (int(events["item"].max()) + 1) + pl.col("item")).alias("pair")
    own = events.filter(pl.col("split") == "train").select(pair)["pair"]
    return candidates.select(pair.is_in(own.implode()))["pair"].to_numpy()


def item_rate_floor(prepared_dir: Path, split: str = "test") -> dict:
    """{"metrics": protocol metrics of the floor on ``split``, "candidates", "unseen_item_fraction":
    candidates whose item has no train event, "repeat_fraction": candidates whose item their own user
    has a train event of (a rating log has none; in a click log, items seen again), "repeat_positive_rate"
    and "other_positive_rate": the positive rate of those candidates and of the rest (None when there
    are none), "prior_events"}."""
    check_split(split)
    events = pl.read_parquet(Path(prepared_dir) / "events.parquet", columns=["user", "item", "label", "split"])
    cand = with_floor_logits(events.filter(pl.col("split") == split), *item_train_rates(events))
    repeat = pl.Series(repeated_items(cand, events))
    return {"metrics": all_metrics(cand["user"].to_numpy(), cand["label"].to_numpy(), cand["floor_logit"].to_numpy()),
            "candidates": cand.height, "unseen_item_fraction": float((cand["events"] == 0).mean()),
            "repeat_fraction": float(repeat.mean()), "repeat_positive_rate": cand.filter(repeat)["label"].mean(),
            "other_positive_rate": cand.filter(~repeat)["label"].mean(), "prior_events": PRIOR_EVENTS}
