"""Feature columns through prepare (issue 19): user tables, bags, derived time context, numbers,
vocabularies of the train split only, and one-line errors for bad input."""

from __future__ import annotations

import datetime as dt
import json
import re
import zoneinfo

import numpy as np
import polars as pl
import pytest

from climber.cli import main
from conftest import SHARED_DATA

START = 1_700_000_000  # 2023-11-14T22:13:20Z


def write_log(path, users=12, events=15, price=lambda u, k: f"{(u * 7 + k) % 10}.5"):
    lines = ["uid,item,ts,action,item_tags,ctx_device,num_price"]
    for u in range(users):
        for k in range(events):
            tags = "|".join(["a", "b", "c", "d"][(u + k) % 4: (u + k) % 4 + 2]) or "a"
            device = "tv" if (u, k) == (0, events - 1) else ("ios" if k % 2 else "web")  # tv: in test only
            lines.append(f"u{u},i{(u * 3 + k) % 20},{START + u * 50_000 + k * 3_600},{1 + (u + k) % 5},{tags},"
                         f"{device},{price(u, k)}")
    path.write_text("\n".join(lines) + "\n")
    return path


def prepare(tmp_path, *extra, log=None):
    log = log or write_log(tmp_path / "log.csv")
    out = tmp_path / "prep"
    rc = main(["data", "prepare", str(log), "--columns", "user=uid", "--label", "action>=4", "--out", str(out),
               "--force", *extra])
    return rc, out


@pytest.fixture
def users_csv(tmp_path):
    path = tmp_path / "users.csv"  # u11 has no row: its features are unknown (0)
    path.write_text("id,age,user_gender\n" + "".join(f"u{u},{18 + u % 3},{'mf'[u % 2]}\n" for u in range(11)))
    return path


def test_features_are_mapped_from_train_vocabularies(tmp_path, users_csv):
    rc, out = prepare(tmp_path, "--user-table", str(users_csv), "--user-key", "id", "--multi", "item_tags",
                      "--derive", "hour,weekday", "--tz", "Asia/Shanghai")
    assert rc == 0
    events = pl.read_parquet(out / "events.parquet")
    raw = pl.read_csv(tmp_path / "log.csv", infer_schema=False)
    manifest = json.loads((out / "manifest.json").read_text())
    train = events.filter(pl.col("split") == "train")

    def vocab(col):
        v = pl.read_parquet(out / "vocab" / f"{col}.parquet")
        return dict(zip(v["raw"], v["id"]))

    # a value the train split never holds is unknown (0): the tv device appears in u0's test event only
    assert "tv" not in vocab("ctx_device") and manifest["side_columns"]["ctx_device"] == 2
    tv = events.filter((pl.col("user_raw") == "u0") & (pl.col("split") == "test")).sort("ts")["ctx_device"][-1]
    assert tv == 0 and set(train["ctx_device"]) == set(vocab("ctx_device").values())
    # the user table: every event of a user carries its row; a user without a row gets 0
    ages, genders = vocab("user_age"), vocab("user_gender")
    for u in (0, 4, 11):
        mine = events.filter(pl.col("user_raw") == f"u{u}")
        want = (ages[str(18 + u % 3)], genders["mf"[u % 2]]) if u < 11 else (0, 0)
        assert set(zip(mine["user_age"], mine["user_gender"])) == {want}
    # bags: each event's tags, as ids, in order
    tags = vocab("item_tags")
    by_key = dict(zip(zip(raw["uid"], raw["ts"].cast(pl.Int64)), raw["item_tags"]))
    for row in events.head(20).iter_rows(named=True):
        assert row["item_tags"] == [tags[t] for t in by_key[(row["user_raw"], row["ts"])].split("|")]
    assert manifest["multi_columns"] == {"item_tags": {"values": 4, "longest": 2}}
    # derived time context, against the standard library in the named zone
    hours, weekdays = {v: k for k, v in vocab("ctx_hour").items()}, {v: k for k, v in vocab("ctx_weekday").items()}
    zone = zoneinfo.ZoneInfo("Asia/Shanghai")
    for row in train.head(30).iter_rows(named=True):
        local = dt.datetime.fromtimestamp(row["ts"], zone)
        assert hours[row["ctx_hour"]] == str(local.hour)
        assert weekdays[row["ctx_weekday"]] == local.strftime("%a").lower()
    assert manifest["derived"] == {"columns": ["ctx_hour", "ctx_weekday"], "tz": "Asia/Shanghai"}
    # numbers: Float64, standardisation statistics of the train split alone
    prices = train["num_price"].to_numpy()
    stats = manifest["numeric_features"]["num_price"]
    assert stats["mean"] == pytest.approx(prices.mean()) and stats["std"] == pytest.approx(prices.std())
    assert stats["mean"] != pytest.approx(events["num_price"].to_numpy().mean())


def test_missing_numbers_are_refused_unless_filled(tmp_path, capsys):
    log = write_log(tmp_path / "log.csv", price=lambda u, k: "" if (u, k) == (2, 3) else f"{k}")
    rc, _ = prepare(tmp_path, log=log)
    err = capsys.readouterr().err
    assert rc == 2 and "row 35, column 'num_price'" in err and "--fill" in err and len(err.strip().splitlines()) == 1
    rc, out = prepare(tmp_path, "--fill", "mean", log=log)
    assert rc == 0
    events = pl.read_parquet(out / "events.parquet")
    filled = events.filter((pl.col("user_raw") == "u2") & (pl.col("ts") == START + 2 * 50_000 + 3 * 3_600))
    train = events.filter(pl.col("split") == "train")["num_price"].to_numpy()
    mean = json.loads((out / "manifest.json").read_text())["numeric_features"]["num_price"]["mean"]
    assert filled["num_price"].item() == pytest.approx(mean)  # the mean of the train values present
    assert mean == pytest.approx((train.sum() - mean) / (len(train) - 1))
    rc, out = prepare(tmp_path, "--fill", "zero", log=log)
    assert rc == 0 and 0.0 in pl.read_parquet(out / "events.parquet")["num_price"].to_list()


@pytest.mark.parametrize("extra, table, match", [
    (["--user-key", "id"], "id,age\nu1,20\nu2,30\nu1,40\n", r"user 'u1' appears more than once \(rows 2 and 4\)"),
    (["--user-key", "uid"], "id,age\nu1,20\n", "no column 'uid'"),
    (["--multi", "ctx_device"], None, "bags of values are for item_\\* and user_\\*"),
    (["--multi", "item_nope"], None, "does not have"),
    (["--derive", "hour,month"], None, "--derive month"),
    (["--derive", "hour", "--tz", "Mars/Olympus"], None, "not a time zone"),
    (["--user-key", "id"], None, "go with --user-table"),
    (["--drop", "user_*"], None, "--drop 'user_\\*': no feature column matches"),
])
def test_bad_feature_input_is_one_line_and_exit_2(tmp_path, capsys, extra, table, match):
    if table is not None:
        (tmp_path / "users.csv").write_text(table)
        extra = ["--user-table", str(tmp_path / "users.csv"), *extra]
    rc, _ = prepare(tmp_path, *extra)
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert re.search(match, err), err


def test_text_in_a_numeric_column_names_file_row_and_column(tmp_path, capsys):
    log = write_log(tmp_path / "log.csv", price=lambda u, k: "cheap" if (u, k) == (1, 0) else "1")
    rc, _ = prepare(tmp_path, log=log)
    err = capsys.readouterr().err
    assert rc == 2 and "log.csv: row 17, column 'num_price': got 'cheap', expected a number" in err


def test_a_log_without_features_prepares_as_before(tmp_path):
    log = tmp_path / "plain.csv"
    log.write_text("uid,item,ts,action\n" + "".join(f"u{u},i{k},{START + k},{k % 5 + 1}\n"
                                                    for u in range(3) for k in range(12)))
    rc, out = prepare(tmp_path, log=log)
    manifest = json.loads((out / "manifest.json").read_text())
    assert rc == 0 and manifest["side_columns"] == {} and "multi_columns" not in manifest
    assert np.array_equal(pl.read_parquet(out / "events.parquet").columns[:7],
                          ["user", "item", "ts", "action", "scenario", "label", "split"])


@pytest.mark.skipif(not (SHARED_DATA / "ml-100k" / "u.user").exists(), reason="MovieLens-100k not in ../shared/data")
def test_movielens_100k_genres_are_a_bag_and_u_user_gives_user_features(tmp_path):
    full, before = tmp_path / "full", tmp_path / "before"
    source = ["data", "prepare", "movielens-100k", "--source", str(SHARED_DATA / "ml-100k")]
    assert main([*source, "--out", str(full)]) == 0
    assert main([*source, "--out", str(before), "--drop", "user_*", "--single", "item_genres"]) == 0
    events = pl.read_parquet(full / "events.parquet")

    def raw(column, prepared=full):
        vocab = pl.read_parquet(prepared / "vocab" / f"{column}.parquet")
        return dict(zip(vocab["id"], vocab["raw"]))

    genres = raw("item_genres")
    toy_story = events.filter((pl.col("item_raw") == "1") & (pl.col("split") == "train"))["item_genres"][0]
    assert [genres[g] for g in toy_story] == ["Animation", "Children's", "Comedy"]
    first = events.filter(pl.col("user_raw").is_in(["1", "2"])).group_by("user_raw").agg(
        pl.col("user_age", "user_gender", "user_occupation", "user_zip").first()).sort("user_raw")
    ages, genders, jobs, zips = raw("user_age"), raw("user_gender"), raw("user_occupation"), raw("user_zip")
    got = [(ages[r["user_age"]], genders[r["user_gender"]], jobs[r["user_occupation"]], zips[r["user_zip"]])
           for r in first.iter_rows(named=True)]
    assert got == [("18-24", "M", "technician", "8"), ("50-55", "F", "other", "9")]  # u.user rows 1 and 2
    manifest = json.loads((before / "manifest.json").read_text())
    assert "multi_columns" not in manifest and not any(c.startswith("user_") for c in manifest["side_columns"])
    assert raw("item_genres", before)[pl.read_parquet(before / "events.parquet").filter(
        pl.col("item_raw") == "1")["item_genres"][0]] == "Animation|Children's|Comedy"  # one value: the set
    assert json.loads((full / "manifest.json").read_text())["fingerprint"] == manifest["fingerprint"]
