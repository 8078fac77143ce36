"""Rows and collate: no leakage, coverage, padding, eval forms, against a prepared fixture with ts ties."""

from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from climber.data.prepare import load_manifest, prepare
from climber.data.readers import scan_table
from climber.data.samples import (
    SPLITS,
    Rows,
    UserEvents,
    collate,
    count_rows,
    make_rows,
)
from climber.data.schema import DataError, LabelRule, RawSource
from climber.data.sequences import Strategy, resolve, select

STRATEGIES = [
    Strategy("recent", "recency", 16),
    Strategy("liked", "action", 6, ("like", "play")),
    Strategy("search", "scenario", 8, ("search",)),
    Strategy("hour", "window", 12, window_s=5),
    Strategy("pos", "positive", 5),
]
MODES_AND_C = [("multi", 4), ("single", 1)]


def write_prepared(root: Path, users: int = 30, seed: int = 0) -> Path:
    """A prepared dir from a CSV with timestamp ties: users of 1..70 events (some too short for val/test)."""
    rng = np.random.default_rng(seed)
    lines = ["user,item,ts,action,scenario"]
    for u in range(users):
        n = int(rng.integers(1, 71))
        ts = 1_000 + np.cumsum(rng.integers(0, 3, size=n))  # gaps 0..2: many ties
        for t in rng.permutation(ts):  # file order is not time order
            action = rng.choice(["like", "play", "skip"])
            scenario = rng.choice(["home", "search"])
            lines.append(f"u{u},i{rng.integers(0, 25)},{t},{action},{scenario}")
    csv = root / "events.csv"
    csv.write_text("\n".join(lines) + "\n")
    rule = LabelRule.parse("action in like,play")
    prepare(RawSource("t", scan_table(csv), rule, files=(csv,)), root / "prep", log=lambda *_: None)
    return root / "prep"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    return write_prepared(tmp_path_factory.mktemp("samples"))


@pytest.fixture(scope="module")
def events(prepared) -> UserEvents:
    return UserEvents.from_table(pq.read_table(prepared / "events.parquet"))


@pytest.fixture(scope="module")
def resolved(prepared):
    manifest = load_manifest(prepared)
    return resolve(STRATEGIES, manifest["actions"], manifest["scenarios"])


def user_slice(events: UserEvents, u: int) -> SimpleNamespace:
    a, b = events.offsets[u], events.offsets[u + 1]
    return SimpleNamespace(**{k: getattr(events, k)[a:b] for k in ("action", "scenario", "ts", "label")})


def candidates(events: UserEvents, rows: Rows) -> np.ndarray:
    """Global positions of every candidate of ``rows``, in row order."""
    first = events.offsets[rows.user] + rows.start
    return np.concatenate([np.arange(f, f + c) for f, c in zip(first, rows.count)])


def test_from_polars_equals_from_arrow(prepared, events):
    again = UserEvents.from_table(pl.read_parquet(prepared / "events.parquet"))
    for name in ("offsets", "user", "item", "action", "scenario", "ts", "label", "split"):
        assert np.array_equal(getattr(again, name), getattr(events, name)), name
    assert events.num_users == 30 and events.offsets[-1] == len(events.ts)


def test_from_table_rejects_unsorted_events(prepared):
    table = pl.read_parquet(prepared / "events.parquet")
    with pytest.raises(DataError, match="not sorted by user"):
        UserEvents.from_table(table.sort("user", descending=True))
    with pytest.raises(DataError, match="ts goes back"):
        UserEvents.from_table(table.sort("user", "ts", descending=[False, True]))
    with pytest.raises(DataError, match="'dev'"):
        UserEvents.from_table(table.with_columns(pl.lit("dev").alias("split")))


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("mode, c", MODES_AND_C)
def test_no_leakage(events, resolved, split, mode, c):
    """History < cut <= candidates, history ts <= candidate ts, and history only from allowed splits."""
    rows = make_rows(events, split, c, mode, np.random.default_rng(0))
    assert len(rows) > 0
    first = events.offsets[rows.user]
    allowed = {"train": (0,), "val": (0,), "test": (0, 1)}[split]
    cands = np.split(candidates(events, rows), np.cumsum(rows.count)[:-1])
    assert all(events.split[p].tolist() == [SPLITS.index(split)] * len(p) for p in cands)
    for r in resolved:
        index, mask = events.selector(r).gather(first, first + rows.cut)
        for row in range(len(rows)):
            hist, cand = index[row][mask[row]], cands[row]
            assert np.all(hist < first[row] + rows.cut[row]) and first[row] + rows.cut[row] <= cand.min()
            assert np.all(hist >= first[row])  # the row's own user
            assert np.all(events.ts[hist] <= events.ts[cand].min())
            assert np.isin(events.split[hist], allowed).all()
            if split == "train":
                assert hist.size == 0 or hist.max() < cand.min()


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("mode, c", MODES_AND_C + [("multi", 7)])
def test_each_event_of_the_split_is_a_candidate_once(events, split, mode, c):
    for seed in (0, 1):
        rows = make_rows(events, split, c, mode, np.random.default_rng(seed))
        assert rows.count.min() >= 1 and rows.count.max() <= c
        got = np.sort(candidates(events, rows))
        assert np.array_equal(got, np.flatnonzero(events.split == SPLITS.index(split)))
        assert len(rows) == count_rows(events.split_counts(), split, c, mode, np.random.default_rng(seed))


def test_train_runs_move_with_the_rng_and_start_at_offset_zero_without_one(events):
    def bounds(rng):
        rows = make_rows(events, "train", 4, "multi", rng)
        return set(zip(rows.user.tolist(), rows.start.tolist()))

    assert bounds(np.random.default_rng(0)) != bounds(np.random.default_rng(1))
    rows = make_rows(events, "train", 4, "multi", None)
    assert np.all(rows.start % 4 == 0) and np.array_equal(rows.cut, rows.start)


def test_eval_rows_share_the_cut_of_the_split(events):
    counts = events.split_counts()
    for split, base in (("val", counts[:, 0]), ("test", counts[:, 0] + counts[:, 1])):
        rows = make_rows(events, split, 3, "multi")
        assert np.array_equal(rows.cut, base[rows.user])
        assert set(rows.user.tolist()) == set(np.flatnonzero(counts[:, SPLITS.index(split)]).tolist())


def test_bad_split_or_mode_is_a_clear_error(events):
    with pytest.raises(ValueError, match="'dev' is not one of train, val, test"):
        make_rows(events, "dev", 4)
    with pytest.raises(ValueError, match="mode 'pairs'"):
        make_rows(events, "train", 4, "pairs")


def test_collate_pads_and_matches_select(events, resolved):
    rows = make_rows(events, "train", 4, "multi", np.random.default_rng(3))
    rows = rows.take(np.random.default_rng(4).permutation(len(rows))[:40])
    batch = collate(events, rows, resolved)
    B, C = len(rows), int(rows.count.max())
    assert batch.user.tolist() == events.user[rows.user].tolist()
    assert batch.cand_mask.shape == (B, C) and batch.cand_mask.sum(1).tolist() == rows.count.tolist()
    assert not batch.cand_mask[:, :-1].lt(batch.cand_mask[:, 1:]).any()  # right padding: True.. then False..
    for t in (batch.cand_item, batch.cand_scenario, batch.cand_ts, batch.label):
        assert (t[~batch.cand_mask] == 0).all()
    assert (batch.cand_item[batch.cand_mask] > 0).all()
    for r, seq in zip(resolved, batch.seqs):
        selected = [select(r, user_slice(events, u), cut) for u, cut in zip(rows.user, rows.cut)]
        assert seq.mask.shape == (B, max(1, max(map(len, selected))))
        assert seq.mask.shape[1] <= r.strategy.length
        assert not seq.mask[:, 1:].lt(seq.mask[:, :-1]).any()  # left padding: False.. then True..
        for t in (seq.item, seq.action, seq.scenario, seq.ts):
            assert (t[~seq.mask] == 0).all()
        for row, (u, pos) in enumerate(zip(rows.user, selected)):
            at = events.offsets[u] + pos
            assert seq.item[row][seq.mask[row]].tolist() == events.item[at].tolist()
            assert seq.ts[row][seq.mask[row]].tolist() == events.ts[at].tolist()
            assert seq.action[row][seq.mask[row]].tolist() == events.action[at].tolist()
    first = events.offsets[rows.user] + rows.start
    assert batch.label[0, : rows.count[0]].tolist() == events.label[first[0] : first[0] + rows.count[0]].tolist()


@pytest.mark.parametrize("split", ["val", "test"])
def test_single_and_multi_give_each_eval_candidate_the_same_history(events, resolved, split):
    def history_per_candidate(mode, c):
        rows = make_rows(events, split, c, mode)
        batch = collate(events, rows, resolved)
        out = Counter()
        for row in range(len(rows)):
            hist = tuple(tuple(s.item[row][s.mask[row]].tolist()) for s in batch.seqs)
            for j in range(int(rows.count[row])):
                out[(int(batch.user[row]), int(rows.start[row]) + j, hist)] += 1
        return out

    single = history_per_candidate("single", 1)
    assert single == history_per_candidate("multi", 5)
    assert sum(single.values()) == int((events.split == SPLITS.index(split)).sum())
