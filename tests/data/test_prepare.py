"""prepare: ids, labels, the protocol split, the manifest, errors and atomicity."""

from __future__ import annotations

import json
import os
import stat
from dataclasses import replace
from datetime import datetime, timezone

import numpy as np
import polars as pl
import pytest

from climber.cli import main
from climber.data.prepare import fingerprint, prepare
from climber.data.readers import scan_table
from climber.data.schema import DataError, LabelRule, RawSource
from climber.data.split import split_sizes


def write_log(path, n_per_user, seed=0, actions=("pv", "cart", "fav", "buy")):
    """A random log with timestamp ties, users of many sizes, string ids, rows in random order."""
    rng = np.random.default_rng(seed)
    rows = []
    for u, n in enumerate(n_per_user):
        ts = np.sort(rng.integers(1000, 1000 + 3 * n, size=n))  # many ties
        for t in ts:
            rows.append((f"user{u}", f"it{rng.integers(0, 40)}", int(t), actions[rng.integers(len(actions))]))
    order = rng.permutation(len(rows))
    frame = pl.DataFrame([rows[i] for i in order], schema=["user", "item", "ts", "action"], orient="row")
    frame.write_csv(path)
    return frame


def source_of(path, rule="action in cart,fav,buy", **kw):
    return RawSource("test", scan_table(path, **kw), LabelRule.parse(rule), files=(path,))


@pytest.fixture
def prepared(tmp_path):
    sizes = [1, 5, 9, 10, 11, 19, 20, 21, 37, 100]
    raw = write_log(tmp_path / "log.csv", sizes)
    manifest = prepare(source_of(tmp_path / "log.csv"), tmp_path / "prep", log=lambda *_: None)
    events = pl.read_parquet(tmp_path / "prep" / "events.parquet")
    return raw, manifest, events, sizes


def test_split_sizes_follow_the_protocol_formula(prepared):
    raw, manifest, events, sizes = prepared
    per_user = events.group_by("user_raw").agg(
        pl.len().alias("n"),
        (pl.col("split") == "val").sum().alias("val"),
        (pl.col("split") == "test").sum().alias("test"),
    )
    for r in per_user.iter_rows(named=True):
        n = r["n"]
        expect = 0 if n < 10 else max(1, int(np.floor(0.1 * n)))  # written out, not via split_sizes
        assert (r["val"], r["test"]) == (expect, expect), r
    assert split_sizes(np.array([9, 10, 19, 20]))[1].tolist() == [0, 1, 1, 2]
    assert manifest["splits"]["test"]["rows"] == sum(0 if n < 10 else max(1, n // 10) for n in sizes)


def test_events_sorted_per_user_and_split_is_chronological(prepared):
    _, _, events, _ = prepared
    code = {"train": 0, "val": 1, "test": 2}
    for _, g in events.group_by("user", maintain_order=True):
        key = list(zip(g["ts"], g["item"]))
        assert key == sorted(key)  # stable (ts, item) order within a user
        codes = [code[s] for s in g["split"]]
        assert codes == sorted(codes)  # train, then val, then test
    assert events["user"].to_list() == sorted(events["user"].to_list())


def test_ids_are_dense_and_map_back_to_raw(prepared, tmp_path):
    raw, manifest, events, _ = prepared
    for col in ("user", "item", "action", "scenario"):
        vocab = pl.read_parquet(tmp_path / "prep" / "vocab" / f"{col}.parquet")
        assert vocab["id"].to_list() == list(range(1, vocab.height + 1))
        joined = events.select(col, f"{col}_raw").join(vocab, left_on=col, right_on="id")
        assert (joined[f"{col}_raw"] == joined["raw"]).all()
    assert manifest["users"] == raw["user"].n_unique()
    assert manifest["scenarios"] == ["default"]
    # label rule applied to the raw action
    assert (events["label"] == events["action_raw"].is_in(["cart", "fav", "buy"]).cast(pl.Int8)).all()
    # the multiset of raw events is preserved
    assert sorted(zip(events["user_raw"], events["item_raw"], events["ts"])) == sorted(
        zip(raw["user"], raw["item"], raw["ts"]))


def test_fingerprint_is_stable_and_sensitive(prepared, tmp_path):
    _, manifest, events, _ = prepared
    assert fingerprint(tmp_path / "prep" / "events.parquet") == manifest["fingerprint"]["sha256"]
    changed = events.with_columns(pl.when(pl.int_range(pl.len()) == 3).then(1 - pl.col("label"))
                                  .otherwise(pl.col("label")).alias("label"))
    changed.write_parquet(tmp_path / "changed.parquet")
    assert fingerprint(tmp_path / "changed.parquet") != manifest["fingerprint"]["sha256"]


def test_numeric_ids_get_numeric_order(tmp_path):
    pl.DataFrame({"user": ["10", "9", "10", "9"], "item": ["100", "20", "3", "20"], "ts": ["1", "1", "2", "2"],
                  "action": ["5", "1", "4", "3"]}).write_csv(tmp_path / "r.csv")
    prepare(source_of(tmp_path / "r.csv", "action>=4"), tmp_path / "p", log=lambda *_: None)
    items = pl.read_parquet(tmp_path / "p" / "vocab" / "item.parquet")
    assert items["raw"].to_list() == ["3", "20", "100"]
    ev = pl.read_parquet(tmp_path / "p" / "events.parquet")
    assert ev["label"].to_list() == [0, 0, 1, 1]  # user 9 first (numeric order), ratings 1,3 then 5,4


@pytest.mark.parametrize(
    "content, rule, match",
    [
        ("user,item,ts,action\n1,2,notatime,4\n", "action>=4", r"row 2, column 'ts'.*'notatime'"),
        ("user,item,ts,action\n1,2,3,4\n,2,3,4\n", "action>=4", r"row 3, column 'user'"),
        ("user,item,ts,action\n1,2,3,high\n", "action>=4", r"row 2, column 'action'.*number"),
        ("user,item,ts\n1,2,3\n", "action>=4", r"missing column 'action'"),
        ("user,item,ts,action\n", "action>=4", r"no events"),
    ],
)
def test_bad_input_names_file_row_and_column(tmp_path, content, rule, match):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(DataError, match=match) as e:
        prepare(source_of(path, rule), tmp_path / "out", log=lambda *_: None)
    assert "bad.csv" in str(e.value)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bad.csv"]  # no temp dir left behind


def test_unknown_action_value_is_an_error(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("user,item,ts,action\n1,2,3,pv\n1,3,4,clicked\n")
    src = RawSource("t", scan_table(path), LabelRule.parse("action in buy"), actions=("pv", "buy"), files=(path,))
    with pytest.raises(DataError, match=r"row 3, column 'action'.*'clicked'.*pv,buy"):
        prepare(src, tmp_path / "out", log=lambda *_: None)


def test_failure_midway_leaves_nothing_and_keeps_an_existing_output(tmp_path, monkeypatch):
    write_log(tmp_path / "log.csv", [12, 15])
    prepare(source_of(tmp_path / "log.csv"), tmp_path / "prep", log=lambda *_: None)
    before = (tmp_path / "prep" / "manifest.json").read_text()

    import climber.data.prepare as mod

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(mod, "fingerprint", boom)
    with pytest.raises(RuntimeError):
        prepare(source_of(tmp_path / "log.csv"), tmp_path / "prep", force=True, log=lambda *_: None)
    assert (tmp_path / "prep" / "manifest.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.csv", "prep"]
    with pytest.raises(DataError, match="already exists"):
        prepare(source_of(tmp_path / "log.csv"), tmp_path / "prep", log=lambda *_: None)


def test_cli_prepare_with_column_mapping_and_errors(tmp_path, capsys):
    pl.DataFrame({"userId": ["a", "a", "b"], "movieId": ["x", "y", "x"], "timestamp": ["5", "6", "7"],
                  "rating": ["4.5", "2", "3"]}).write_csv(tmp_path / "ratings.csv")
    rc = main(["data", "prepare", str(tmp_path / "ratings.csv"), "--out", str(tmp_path / "p"),
               "--columns", "user=userId,item=movieId,ts=timestamp,action=rating", "--label", "action>=4"])
    assert rc == 0
    m = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert (m["rows"], m["users"], m["items"], m["positive_rate"]) == (3, 2, 2, pytest.approx(1 / 3))
    rc = main(["data", "prepare", str(tmp_path / "ratings.csv"), "--out", str(tmp_path / "q"),
               "--columns", "user=nope", "--label", "action>=4"])
    err = capsys.readouterr().err
    assert rc == 2 and "column 'nope'" in err and "Traceback" not in err
    assert main(["data", "prepare", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "r")]) == 2


# ---------------------------------------------------------------- empty val and test


def test_a_log_of_short_users_warns_that_val_and_test_are_empty(tmp_path, capsys):
    write_log(tmp_path / "log.csv", [3, 9, 5])  # every user under 10 events: train only
    rc = main(["data", "prepare", str(tmp_path / "log.csv"), "--label", "action in cart,fav,buy",
               "--out", str(tmp_path / "p")])
    assert rc == 0
    warnings = json.loads((tmp_path / "p" / "manifest.json").read_text())["warnings"]
    assert len(warnings) == 1
    assert warnings[0].startswith("val and test are empty: no user has 10 or more events")
    out, err = capsys.readouterr()
    assert f"climber: warning: {warnings[0]}\n" in err
    assert "nan" not in out


def test_no_warning_when_users_reach_val_and_test(prepared):
    assert prepared[1]["warnings"] == []


# ---------------------------------------------------------------- output modes


@pytest.mark.parametrize("umask", [0o002, 0o027], ids=["umask-002", "umask-027"])
def test_prepared_and_shard_dirs_follow_the_umask(tmp_path, umask):
    from climber.train.distributed import write_shards

    write_log(tmp_path / "log.csv", [12, 15])
    old = os.umask(umask)
    try:
        prepare(source_of(tmp_path / "log.csv"), tmp_path / "prep", log=lambda *_: None)
        write_shards(tmp_path / "prep", tmp_path / "shards", 2, log=lambda *_: None)
    finally:
        os.umask(old)
    for folder in ("prep", "shards"):
        assert stat.S_IMODE((tmp_path / folder).stat().st_mode) == 0o777 & ~umask, folder


# ---------------------------------------------------------------- time stamps

T = 1_511_604_000  # 2017-11-25T10:00:00Z


def prepared_ts(tmp_path, texts: list[str], unit: str = "s") -> list[int]:
    """The prepared ts of one user's events whose ts column holds ``texts`` (item k has texts[k])."""
    path = tmp_path / "ts.csv"
    pl.DataFrame({"user": "u", "item": [f"i{k:02d}" for k in range(len(texts))], "ts": texts,
                  "action": "buy"}).write_csv(path)
    prepare(replace(source_of(path), ts_unit=unit), tmp_path / "out", log=lambda *_: None)
    return pl.read_parquet(tmp_path / "out" / "events.parquet").sort("item_raw")["ts"].to_list()


@pytest.mark.parametrize("text, unit", [
    ("{t}", "s"),
    ("{t}.75", "s"),  # float seconds: the fraction is dropped
    ("{t}999", "ms"),
    ("{t}123456", "us"),
    ("{t}000000001", "ns"),
    ("{iso}Z", "s"),
    ("{iso}.5", "s"),  # no offset: UTC
    ("{iso}+00:00", "ms"),  # the unit is for numbers only
])
def test_numeric_and_iso_time_stamps_become_utc_seconds(tmp_path, text, unit):
    seconds = [T + 61 * k for k in range(12)]
    iso = [datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S") for t in seconds]
    assert prepared_ts(tmp_path, [text.format(t=t, iso=i) for t, i in zip(seconds, iso)], unit) == seconds


@pytest.mark.parametrize("text, seconds", [
    ("2017-11-25T18:00:00+08:00", T),
    ("2017-11-25T04:30:00-05:30", T),
    ("2017-11-25 10:00:00", T),
    ("2017-11-25T10:00", T),
    ("2017-11-25", T - 10 * 3600),
    ("1511604000.0", T),
])
def test_iso_8601_layouts_and_offsets(tmp_path, text, seconds):
    assert prepared_ts(tmp_path, [text]) == [seconds]


@pytest.mark.parametrize("texts, unit, match", [
    ([str(T * 1000)], "s", r"got '1511604000000': after the year 3000 read as seconds since the epoch; "
                           r"milliseconds\? pass --ts-unit ms$"),
    ([str(T), str(T * 10**6)], "s", r"row 3, .*microseconds\? pass --ts-unit us$"),
    ([str(T * 10**9)], "ms", r"read as milliseconds since the epoch; nanoseconds\? pass --ts-unit ns$"),
    (["1e300"], "s", r"got '1e300': after the year 3000 .*; too large in any unit$"),
    (["2017-11-25T10:00:00Z", str(T)], "s",
     rf"row 3, column 'ts': got '{T}', expected an ISO 8601 date-time laid out like row 2's '2017-11-25T10:00:00Z'$"),
    ([str(T), "nan"], "s", r"row 3, column 'ts': got 'nan', expected seconds since the epoch"),
    (["25/11/2017"], "s", r"got '25/11/2017', expected seconds since the epoch \(a number; --ts-unit for ms, us, ns\) "
                          r"or an ISO 8601 date-time$"),
])
def test_time_stamps_in_a_finer_unit_or_no_known_form_are_refused(tmp_path, texts, unit, match):
    with pytest.raises(DataError, match=match):
        prepared_ts(tmp_path, texts, unit)
    assert not (tmp_path / "out").exists()


def test_cli_ts_unit_converts_and_the_error_names_it(tmp_path, capsys):
    pl.DataFrame({"user": "u", "item": ["a", "b"], "ts": [str(T * 1000), str(T * 1000 + 1500)],
                  "action": "5"}).write_csv(tmp_path / "ms.csv")
    argv = ["data", "prepare", str(tmp_path / "ms.csv"), "--label", "action>=4", "--out", str(tmp_path / "p")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "milliseconds? pass --ts-unit ms" in err
    assert main([*argv, "--ts-unit", "ms"]) == 0
    assert json.loads((tmp_path / "p" / "manifest.json").read_text())["ts_range"] == [T, T + 1]
    assert main(["data", "prepare", "movielens-100k", "--source", str(tmp_path), "--ts-unit", "ms",
                 "--out", str(tmp_path / "q")]) == 2
    assert "--ts-unit are for CSV/Parquet paths" in capsys.readouterr().err
