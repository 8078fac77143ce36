"""The protocol split (PROTOCOL.md): per user, chronological, last 10% test, 10% before it val.

Users with fewer than MIN_EVENTS events go to train only. For a user with n events,
``n_test = n_val = max(1, floor(0.1 n))``.
"""

from __future__ import annotations

import numpy as np
import polars as pl

MIN_EVENTS = 10
FRACTION = 0.1


def split_sizes(n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n_val, n_test) per user for event counts ``n``: the formula of PROTOCOL.md, in one place."""
    n = np.asarray(n)
    k = np.maximum(1, np.floor(FRACTION * n).astype(np.int64))
    k = np.where(n < MIN_EVENTS, 0, k)
    return k, k


def assign_split(ordered: pl.LazyFrame) -> pl.LazyFrame:
    """Add ``split`` to events already sorted by (user, ts, item). Streams: only a per-user table is small."""
    indexed = ordered.with_row_index("__pos")
    per_user = indexed.group_by("user").agg(pl.len().alias("__n"), pl.col("__pos").min().alias("__start"))
    k = pl.max_horizontal(pl.lit(1), (pl.col("__n").cast(pl.Float64) * FRACTION).floor().cast(pl.Int64))
    per_user = per_user.with_columns(
        pl.when(pl.col("__n") < MIN_EVENTS).then(0).otherwise(k).alias("__k")
    )
    rank = pl.col("__pos").cast(pl.Int64) - pl.col("__start").cast(pl.Int64)
    n, kk = pl.col("__n").cast(pl.Int64), pl.col("__k")
    split = (
        pl.when(rank >= n - kk).then(pl.lit("test"))
        .when(rank >= n - 2 * kk).then(pl.lit("val"))
        .otherwise(pl.lit("train"))
    )
    return (
        indexed.join(per_user, on="user", how="left")
        .sort("__pos")
        .with_columns(split.alias("split"))
        .drop("__pos", "__n", "__start", "__k")
    )
