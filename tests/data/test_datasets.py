"""climber.data.datasets: every named loader on a fixture in its published format, real slices,
bad input and download().

Each fixture writer renders SCRIPT (or, for Spotify, sessions) into the data set's own file layout
and returns the events prepare must produce, written out by hand from the format's definition.
"""

from __future__ import annotations

import calendar
import fnmatch
import hashlib
import io
import json
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import polars as pl
import pytest

from climber.cli import main
from climber.data import datasets
from climber.data.datasets import DATASETS, Download, download, load_dataset
from climber.data.prepare import prepare
from climber.data.schema import DataError

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
DEFAULT = "default"  # the scenario of sources that have none
T0 = 1_511_539_200  # the first second of the Taobao window 2017-11-25 .. 2017-12-03 (UTC+8)
DAYS_9 = 777_600  # T0 + 9 days: the first second after the window


def _quiet(*_):
    pass


# (user, item, ts). User 1: 12 events (split 10/1/1); its last two share a second and are listed in
# reverse item order. User 2: 3 events (< 10: train only), out of order, after the Taobao window
# (the earliest at its first second).
USER1 = [(1, 100 + k, T0 + 60 * k) for k in range(10)] + [(1, 30, T0 + 900), (1, 4, T0 + 900)]
USER2 = [(2, 7, T0 + DAYS_9 + 4), (2, 8, T0 + DAYS_9), (2, 100, T0 + DAYS_9 + 2)]
SCRIPT = USER1[:5] + USER2 + USER1[5:]  # file order: users interleaved


@dataclass
class Fixture:
    rows: list[tuple]  # (user, item, ts, action, scenario, label) as prepare must keep them (raw values)
    rule: str
    notes: tuple[str, ...] = ()


def _write(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))


def _cycle(values, k):
    return values[k % len(values)]


def _rated(ratings, user=str, item=str) -> list[tuple[str, str, int, str]]:
    """SCRIPT with the k-th event rated ``ratings[k % len]``: (user, item, ts, rating) as text."""
    return [(user(u), item(i), ts, _cycle(ratings, k)) for k, (u, i, ts) in enumerate(SCRIPT)]


def _rated_fixture(rows) -> Fixture:
    return Fixture([(u, i, ts, r, DEFAULT, int(float(r) >= 4)) for u, i, ts, r in rows], "action>=4")


# ---------------------------------------------------------------- fixture writers, one per data set


def write_movielens_100k(root: Path) -> Fixture:
    rows = _rated(["1", "4", "3", "5", "2"])
    _write(root / "ml-100k" / "u.data", [f"{u}\t{i}\t{r}\t{ts}" for u, i, ts, r in rows])
    return _rated_fixture(rows)


def write_movielens_1m(root: Path) -> Fixture:
    rows = _rated(["5", "3", "4", "1", "2"])
    _write(root / "ml-1m" / "ratings.dat", [f"{u}::{i}::{r}::{ts}" for u, i, ts, r in rows])
    return _rated_fixture(rows)


ML_CSV_HEADER = "userId,movieId,rating,timestamp"


def write_movielens_csv(root: Path) -> Fixture:
    rows = _rated(["3.5", "4.0", "0.5", "4.5", "5.0", "3.0"])
    _write(root / "ratings.csv", [ML_CSV_HEADER, *(f"{u},{i},{r},{ts}" for u, i, ts, r in rows)])
    return _rated_fixture(rows)


def write_amazon_ratings(root: Path) -> Fixture:
    """2018 layout (item,user,rating,timestamp); both "4" and "4.0" forms of a rating."""
    rows = _rated(["5.0", "3.0", "4", "1.0", "4.0", "2"], user=lambda u: f"A{u:02d}RSDE90N6RSZF",
                  item=lambda i: f"B{i:09d}")
    _write(root / "Books.csv", [f"{i},{u},{r},{ts}" for u, i, ts, r in rows])
    return _rated_fixture(rows)


def write_taobao(root: Path) -> Fixture:
    behaviors = ["pv", "pv", "cart", "fav", "pv", "buy"]
    lines, rows = [], []
    for k, (u, i, ts) in enumerate(SCRIPT):
        b = _cycle(behaviors, k)
        lines.append(f"{u},{i},{i % 7},{b},{ts}")
        rows.append((str(u), str(i), ts, b, DEFAULT, int(b in ("cart", "fav", "buy"))))
    _write(root / "UserBehavior.csv", lines)
    return Fixture(rows, "action in cart,fav,buy", ("3 events outside 2017-11-25..2017-12-03 (UTC+8) kept",))


def idomaar(kind: str, ts: int, properties: str, user: int, objects: str) -> str:
    """One idomaar event line; ``objects`` is the JSON list of linked objects."""
    entities = f'{{"subjects":[{{"type":"user","id":{user}}}], "objects":{objects}}}'
    return f"{kind}\t{ts % 9973}\t{ts}\t{properties}\t{entities}"


def track(i: int) -> str:
    return f'[{{"type":"track","id":{i}}}]'


def write_30music(root: Path) -> Fixture:
    """relations/events.idomaar; playtime 30 is a play, 29 a skip; a non-play line is dropped."""
    playtimes = [193, 30, 29, 0, 250]
    lines, rows = [], []
    for k, (u, i, ts) in enumerate(SCRIPT):
        p = _cycle(playtimes, k)
        lines.append(idomaar("event.play" if k % 2 else "play", ts, f'{{"playtime":{p}}}', u, track(i)))
        rows.append((str(u), str(i), ts, "play" if p >= 30 else "skip", DEFAULT, int(p >= 30)))
    lines.insert(3, idomaar("event.love", T0, '{"value":"x"}', 1, track(5)))
    _write(root / "relations" / "events.idomaar", lines)
    return Fixture(rows, "action in play")


SPOTIFY_COLUMNS = {  # the MSSD log header, with a plausible value for each column
    "session_id": "0_00006f66-33e5-4de7-a324-2d18e439fc1e", "session_position": "1", "session_length": "12",
    "track_id_clean": "t_0479f24c-27d2-46d6-a00c-7ec928f2b539", "skip_1": "false", "skip_2": "false",
    "skip_3": "false", "not_skipped": "true", "context_switch": "0", "no_pause_before_play": "1",
    "short_pause_before_play": "0", "long_pause_before_play": "0", "hist_user_behavior_n_seekfwd": "0",
    "hist_user_behavior_n_seekback": "0", "hist_user_behavior_is_shuffle": "false", "hour_of_day": "23",
    "date": "2018-07-15", "premium": "true", "context_type": "editorial_playlist",
    "hist_user_behavior_reason_start": "trackdone", "hist_user_behavior_reason_end": "trackdone",
}
SPOTIFY_HEADER = ",".join(SPOTIFY_COLUMNS)
# action -> (skip_1, skip_2, skip_3): the flags nest (a skip before point 1 is one before point 2, ...)
SKIPS = {"complete": ("false", "false", "false"), "skip_1": ("true", "true", "true"),
         "skip_2": ("false", "true", "true"), "skip_3": ("false", "false", "true")}


def spotify_line(**values: str) -> str:
    return ",".join({**SPOTIFY_COLUMNS, **values}.values())


def write_spotify(root: Path) -> Fixture:
    """Log files under training_set/, one per session and day, rows in reverse order. Session 0_a1
    (12 tracks) runs over midnight; session 0_b2 has 3 tracks."""
    sessions = {  # session -> (date, hour) per position
        "0_a1": [("2018-07-15", 23)] * 8 + [("2018-07-16", 0)] * 4,
        "0_b2": [("2018-07-20", 7)] * 3,
    }
    actions, contexts = list(SKIPS), ["editorial_playlist", "user_collection", "radio"]
    files: dict[str, list[str]] = {}
    rows = []
    for s, (session, slots) in enumerate(sessions.items()):
        for pos, (date, hour) in enumerate(slots, start=1):
            k = len(rows)
            action, context, track = _cycle(actions, k), _cycle(contexts, k), f"t_{k % 9:04x}-27d2"
            s1, s2, s3 = SKIPS[action]
            files.setdefault(f"log_{s}_{date.replace('-', '')}_000000000000.csv", []).insert(0, spotify_line(
                session_id=session, session_position=str(pos), session_length=str(len(slots)),
                track_id_clean=track, skip_1=s1, skip_2=s2, skip_3=s3,
                not_skipped="false" if s3 == "true" else "true", hour_of_day=str(hour), date=date,
                context_type=context))
            y, m, d = map(int, date.split("-"))
            ts = calendar.timegm((y, m, d, hour, 0, 0)) + pos
            rows.append((session, track, ts, action, context, int(action in ("skip_3", "complete"))))
    for name, lines in files.items():
        _write(root / "training_set" / name, [SPOTIFY_HEADER, *lines])
    return Fixture(rows, "action in skip_3,complete")


WRITERS = {
    "movielens-100k": write_movielens_100k,
    "movielens-1m": write_movielens_1m,
    "movielens-20m": write_movielens_csv,
    "movielens-latest": write_movielens_csv,
    "amazon-ratings": write_amazon_ratings,
    "taobao-userbehavior": write_taobao,
    "30music": write_30music,
    "spotify-mssd": write_spotify,
}


# ---------------------------------------------------------------- the expected split, by hand


def with_splits(rows: list[tuple]) -> list[tuple]:
    """PROTOCOL.md: per user order by (ts, item), last 10% test, the 10% before val; < 10 events train."""
    numeric = all(r[1].isdigit() for r in rows)
    out = []
    for user in {r[0] for r in rows}:
        mine = sorted((r for r in rows if r[0] == user), key=lambda r: (r[2], int(r[1]) if numeric else r[1]))
        n = len(mine)
        k = 0 if n < 10 else max(1, n // 10)
        out += [(*r, s) for r, s in zip(mine, ["train"] * (n - 2 * k) + ["val"] * k + ["test"] * k)]
    return sorted(out)


def prepared_rows(out: Path) -> list[tuple]:
    cols = ["user_raw", "item_raw", "ts", "action_raw", "scenario_raw", "label", "split"]
    return sorted(pl.read_parquet(out / "events.parquet").select(cols).rows())


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_every_registered_data_set_has_a_fixture(name):
    assert name in WRITERS, f"{name}: add a fixture writer in its published format to WRITERS"


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_loader_round_trip(name, tmp_path):
    fixture = WRITERS[name](tmp_path / "src")
    manifest = prepare(load_dataset(name, tmp_path / "src"), tmp_path / "out", log=_quiet)
    assert prepared_rows(tmp_path / "out") == with_splits(fixture.rows)
    assert manifest["label_rule"] == fixture.rule
    assert manifest["source"] == name
    assert manifest["notes"] == list(fixture.notes)


def test_ties_order_by_item_not_file_order(tmp_path):
    write_movielens_100k(tmp_path / "src")
    prepare(load_dataset("movielens-100k", tmp_path / "src"), tmp_path / "out", log=_quiet)
    user1 = pl.read_parquet(tmp_path / "out" / "events.parquet").filter(pl.col("user_raw") == "1")
    assert user1.filter(pl.col("split") != "train")["item_raw"].to_list() == ["4", "30"]  # val, test


def test_amazon_2014_layout_has_the_user_first(tmp_path):
    _write(tmp_path / "ratings_Beauty.csv", ["A39HTATAQ9V7YF,0205616461,5.0,1369699200",
                                            "A3JM6GV9MNOF9X,0558925278,3.0,1355443200"])
    frame = load_dataset("amazon-ratings", tmp_path).frame.select("user", "item", "action", "ts").collect()
    assert frame.rows() == [("A39HTATAQ9V7YF", "0205616461", "5.0", "1369699200"),
                            ("A3JM6GV9MNOF9X", "0558925278", "3.0", "1355443200")]


def test_amazon_folder_with_several_csv_files(tmp_path):
    for name in ("Books.csv", "Beauty.csv"):
        _write(tmp_path / name, ["0001713353,A1C6M8LCIX4M6M,5.0,1123804800"])
    with pytest.raises(DataError, match="Beauty.csv, Books.csv.*one"):
        load_dataset("amazon-ratings", tmp_path)


def test_missing_files_name_what_was_looked_for(tmp_path):
    with pytest.raises(DataError, match="log_\\*.csv"):
        load_dataset("spotify-mssd", tmp_path)


def _main_file(name: str, folder: Path) -> Path:
    """The first file under ``folder`` whose name matches one of the data set's file patterns."""
    patterns = [alt for pattern in DATASETS[name].files for alt in pattern.split("|")]
    return next(p for p in sorted(folder.rglob("*")) if any(fnmatch.fnmatch(p.name, pat) for pat in patterns))


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_the_data_set_file_stands_for_itself(name, tmp_path):
    WRITERS[name](tmp_path / "src")
    path = _main_file(name, tmp_path / "src")
    assert load_dataset(name, path).files == (path,)  # that file, not its whole folder


def test_a_file_of_another_name_is_refused_naming_the_expected_one(tmp_path):
    write_taobao(tmp_path)
    _write(tmp_path / "Other.csv", ["1,2,3,pv,1511539200"])
    with pytest.raises(DataError, match=r"Other.csv: expected a file named UserBehavior.csv \(or the folder"):
        load_dataset("taobao-userbehavior", tmp_path / "Other.csv")


# ---------------------------------------------------------------- real data


def _shared(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} not present (the shared data folder beside the checkout)")
    return path


def test_real_movielens_100k(tmp_path):
    m = prepare(load_dataset("movielens-100k", _shared("ml-100k")), tmp_path / "out", log=_quiet)
    assert (m["rows"], m["users"], m["items"]) == (100_000, 943, 1_682)
    assert m["splits"]["test"]["rows"] == 9_596 and m["splits"]["val"]["rows"] == 9_596
    assert round(m["splits"]["test"]["positive_rate"], 3) == 0.470


def test_real_taobao_slice(tmp_path):
    source = load_dataset("taobao-userbehavior", _shared("taobao-userbehavior-sample"))
    m = prepare(source, tmp_path / "out", log=_quiet)
    assert (m["rows"], m["users"], m["items"]) == (4_321, 43, 3_276)
    assert m["notes"] == ["1 event outside 2017-11-25..2017-12-03 (UTC+8) kept"]  # ts 1505117799


@pytest.mark.parametrize("name,folder,file", [
    ("movielens-100k", "ml-100k", "u.data"),
    ("taobao-userbehavior", "taobao-userbehavior-sample", "UserBehavior.csv"),
])
def test_real_data_from_its_file_or_its_folder_prepares_the_same(name, folder, file, tmp_path):
    for source, out in ((_shared(folder), "from-folder"), (_shared(folder) / file, "from-file")):
        assert main(["data", "prepare", name, "--source", str(source), "--out", str(tmp_path / out)]) == 0
    m = [json.loads((tmp_path / out / "manifest.json").read_text()) for out in ("from-folder", "from-file")]
    assert m[0]["fingerprint"] == m[1]["fingerprint"]
    assert m[0]["side_columns"] == m[1]["side_columns"] != {}  # MovieLens' items.csv beside u.data is still read


# ---------------------------------------------------------------- bad input


U_DATA = ["1\t10\t4\t881250949", "1\t11\t3\t881250950", "2\t10\t5\t881250951", "2\t12\t1\t881250952"]


@pytest.mark.parametrize("lines,row,column,got", [
    (U_DATA[:2] + ["2\t10\t5\t8812509.5x"] + U_DATA[3:], 3, "ts", "'8812509.5x'"),
    (U_DATA[:1] + ["1\t11\t6\t881250950"] + U_DATA[2:], 2, "action", "'6'"),
    (U_DATA[:3] + ["\t12\t1\t881250952"], 4, "user", "None"),
])
def test_bad_value_names_file_row_and_column(tmp_path, lines, row, column, got):
    _write(tmp_path / "u.data", lines)
    with pytest.raises(DataError) as e:
        prepare(load_dataset("movielens-100k", tmp_path), tmp_path / "out", log=_quiet)
    msg = str(e.value)
    assert str(tmp_path / "u.data") in msg and f"row {row}," in msg and f"column {column!r}" in msg
    assert f"got {got}" in msg
    assert not (tmp_path / "out").exists()


def test_row_numbers_count_the_header_line(tmp_path):
    _write(tmp_path / "ratings.csv", [ML_CSV_HEADER, "1,2,3.5,1112486027", "1,3,4.0,later"])
    with pytest.raises(DataError, match=r"ratings.csv: row 3, column 'ts': got 'later'"):
        prepare(load_dataset("movielens-20m", tmp_path), tmp_path / "out", log=_quiet)


def test_empty_file_is_named(tmp_path):
    (tmp_path / "ratings.dat").write_text("")
    with pytest.raises(DataError, match=f"{tmp_path / 'ratings.dat'}: file is empty"):
        load_dataset("movielens-1m", tmp_path)


@pytest.mark.parametrize("line,column,got", [
    (spotify_line(date="2018-13-45"), "ts", "'date=2018-13-45 hour_of_day=23 session_position=1'"),
    (spotify_line(skip_1="maybe"), "action", "'skip_1=maybe skip_2=false skip_3=false'"),
])
def test_spotify_derived_columns_show_the_raw_fields(tmp_path, line, column, got):
    _write(tmp_path / "log_0.csv", [SPOTIFY_HEADER, spotify_line(), line])
    with pytest.raises(DataError) as e:
        prepare(load_dataset("spotify-mssd", tmp_path), tmp_path / "out", log=_quiet)
    assert f"{tmp_path / 'log_0.csv'}: row 3, column {column!r}: got {got}" in str(e.value)


@pytest.mark.parametrize("properties,objects,column,got", [
    ('{"playstart":0}', track(2), "action", "'properties={\"playstart\":0}'"),
    ('{"playtime":100}', "[[]]", "item", "None"),
])
def test_30music_bad_line_is_named(tmp_path, properties, objects, column, got):
    good = idomaar("event.play", T0, '{"playtime":193}', 1, track(3))
    _write(tmp_path / "events.idomaar", [good, good, idomaar("event.play", T0 + 1, properties, 1, objects)])
    with pytest.raises(DataError) as e:
        prepare(load_dataset("30music", tmp_path), tmp_path / "out", log=_quiet)
    assert f"{tmp_path / 'events.idomaar'}: row 3, column {column!r}: got {got}" in str(e.value)


# ---------------------------------------------------------------- download()


@pytest.fixture
def archive(tmp_path) -> Path:
    path = tmp_path / "web" / "ml-tiny.zip"
    path.parent.mkdir()
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("ml-tiny/u.data", "\n".join(U_DATA) + "\n")
    return path


def _spec(archive: Path, sha256: str | None, md5: str | None = None):
    return replace(DATASETS["movielens-100k"], download=Download(archive.as_uri(), sha256, "ml-tiny", md5))


def test_download_unpacks_into_the_cache(tmp_path, archive, monkeypatch):
    monkeypatch.setenv("CLIMBER_CACHE", str(tmp_path / "cache"))
    sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    monkeypatch.setitem(DATASETS, "movielens-100k", _spec(archive, sha))
    source = load_dataset("movielens-100k")  # no folder given: download
    assert source.files == (tmp_path / "cache" / "movielens-100k" / "ml-tiny" / "u.data",)
    assert source.frame.select("user").collect()["user"].to_list() == ["1", "1", "2", "2"]
    assert datasets.cache_dir() == tmp_path / "cache"


@pytest.mark.parametrize("wrong", ["sha256", "md5"])
def test_download_digest_mismatch_deletes_the_archive(tmp_path, archive, wrong):
    digests = {name: hashlib.new(name, archive.read_bytes()).hexdigest() for name in ("sha256", "md5")}
    digests[wrong] = "0" * len(digests[wrong])
    dest = tmp_path / "dest"
    with pytest.raises(DataError, match=f"corrupt.*deleted.*{wrong} [0-9a-f]+ \\(expected 0+\\)"):
        download(_spec(archive, **digests), dest)
    assert list(dest.iterdir()) == []  # the archive removed, nothing unpacked


@pytest.mark.parametrize("name", ["movielens-100k", "movielens-1m", "movielens-20m"])
def test_a_corrupted_download_of_a_published_archive_is_refused_and_removed(name, tmp_path, archive, monkeypatch):
    """The recorded digests of each fixed GroupLens release are checked: a well-formed zip with other bytes
    (a truncated, altered or substituted download) is refused, deleted and not unpacked."""
    monkeypatch.setenv("CLIMBER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(datasets.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(archive.read_bytes()))
    with pytest.raises(DataError, match="corrupt or not the published file, deleted"):
        load_dataset(name)
    assert list((tmp_path / "cache" / name).iterdir()) == []


def test_download_unreachable_url_says_use_source(tmp_path):
    spec = _spec(tmp_path / "nowhere" / "ml-tiny.zip", None)
    with pytest.raises(DataError, match="--source"):
        download(spec, tmp_path / "dest")
    assert not list((tmp_path / "dest").iterdir())  # no partial file left


@pytest.mark.parametrize("layout", ["u.item", "items.csv"])
def test_movielens_100k_item_features(tmp_path, layout):
    """Genres and decade join onto the ratings from either item file; items missing from it get 'unknown'."""
    fixture = write_movielens_100k(tmp_path / "src")
    folder = tmp_path / "src" / "ml-100k"
    items = sorted({i for _, i, *_ in fixture.rows}, key=int)
    flags = ["0"] * 19
    action_comedy = "|".join(["1" if k in (1, 5) else "0" for k in range(19)])
    if layout == "u.item":  # original layout, latin-1 titles
        lines = [f"{items[0]}|Café (1994)|01-Jan-1994||http://x|{action_comedy}".encode("latin-1"),
                 f"{items[1]}|Old|01-Jan-1931||http://y|{'|'.join(flags)}".encode("latin-1")]
        (folder / "u.item").write_bytes(b"\n".join(lines) + b"\n")
    else:
        _write(folder / "items.csv", ["item_id,title,year,genres", f'{items[0]},"Café, The",1994,Action|Comedy',
                                      f"{items[1]},Old,1931,"])
    prepare(load_dataset("movielens-100k", tmp_path / "src"), tmp_path / "out", log=_quiet)
    ev = pl.read_parquet(tmp_path / "out" / "events.parquet")
    vocab = {c: dict(pl.read_parquet(tmp_path / "out" / "vocab" / f"{c}.parquet").select("id", "raw").iter_rows())
             for c in ("item_genres", "item_decade")}
    want = {items[0]: ("Action|Comedy", "1990s"),
            items[1]: ("unknown", "1930s")}  # no genre flag set / an empty genres field
    for r in ev.iter_rows(named=True):
        genres, decade = want.get(r["item_raw"], ("unknown", "unknown"))
        for value, got in zip(genres.split("|"), r["item_genres"], strict=True):  # a bag of genres
            assert vocab["item_genres"][got] == value if got else value not in vocab["item_genres"].values()
        if r["item_decade"]:
            assert vocab["item_decade"][r["item_decade"]] == decade
        else:  # 0: a value no train event holds
            assert decade not in vocab["item_decade"].values()
    assert ev["item_decade"].n_unique() > 1  # values were mapped, not all unknown
    assert len(ev) == len(fixture.rows)
