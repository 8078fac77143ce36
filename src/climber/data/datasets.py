"""Named data sets: each reads the real published format from a local copy into a RawSource.

``load_dataset(name, source)`` finds the data set's files under ``source`` (a folder, or the data set's
file itself; without one it downloads them into a cache when a canonical URL exists), and returns
string-typed events with the data set's own label rule. Add a data set: write a loader function and
one line in ``DATASETS``.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import polars as pl

from climber.data.readers import join_user_table, scan_table
from climber.data.schema import FILE_COLUMN, ROW_COLUMN, DataError, LabelRule, RawSource


@dataclass(frozen=True)
class Download:
    """A published archive and the digests a download must match (docs/data.md says where each is from).

    ``md5``: the publisher's own checksum file; ``sha256``: recorded by others on copies that matched it.
    Neither, for an archive that changes over time (no fixed checksum exists)."""

    url: str
    sha256: str | None
    archive_member_dir: str = ""  # folder inside the zip that holds the files
    md5: str | None = None

    def mismatches(self, path: Path) -> list[str]:
        """'<digest> <got> (expected <want>)' for each recorded digest that ``path`` does not match."""
        expected = {name: value for name, value in (("sha256", self.sha256), ("md5", self.md5)) if value}
        if not expected:
            return []
        hashes = {name: hashlib.new(name, usedforsecurity=False) for name in expected}  # integrity, not secrecy
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                for h in hashes.values():
                    h.update(chunk)
        return [f"{name} {hashes[name].hexdigest()} (expected {value})"
                for name, value in expected.items() if hashes[name].hexdigest() != value]


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    files: tuple[str, ...]  # file names or glob patterns the loader reads (alternatives separated by '|')
    load: Callable[[Path], RawSource]
    description: str
    download: Download | None = None


def _glob(root: Path, pattern: str) -> list[Path]:
    """Files matching ``pattern`` in ``root``, else one level below (archives unpack into a folder); when
    ``root`` is a file, itself if its name matches."""
    if root.is_file():
        return [root] if fnmatch.fnmatch(root.name, pattern) else []
    return sorted(root.glob(pattern)) or sorted(root.glob(f"*/{pattern}"))


def _not_found(root: Path, what: str) -> DataError:
    if root.is_file():
        return DataError(f"{root}: expected a file named {what} (or the folder that holds it)")
    return DataError(f"{root}: no {what} found (looked in the folder and one level below)")


def _find(root: Path, name: str) -> Path:
    """The first file found for ``name`` (alternatives separated by '|')."""
    for alt in name.split("|"):
        if hits := _glob(root, alt):
            return hits[0]
    raise _not_found(root, name.replace("|", " or "))


def _find_all(root: Path, pattern: str) -> list[Path]:
    """Every file matching ``pattern``; at least one."""
    if hits := _glob(root, pattern):
        return hits
    raise _not_found(root, pattern)


def _scan_files(paths: list[Path], **kwargs) -> pl.LazyFrame:
    """``scan_table`` over files of one layout, concatenated lazily; rows keep their own file and line."""
    return pl.concat([scan_table(p, **kwargs) for p in paths])


def _or_raw(value: pl.Expr, *columns: str) -> pl.Expr:
    """``value`` as text; where it is null, the source fields as ``name=value`` text instead.

    For derived ts/action columns: validation then rejects the row showing what the file held.
    """
    template = " ".join(f"{c}={{}}" for c in columns)
    raw = pl.format(template, *(pl.col(c).fill_null("") for c in columns))
    return pl.coalesce(value.cast(pl.Utf8), raw)


def _rated(name: str, frame: pl.LazyFrame, files: tuple[Path, ...], actions=None) -> RawSource:
    """Explicit ratings: the event is positive when the rating is 4 or more (PROTOCOL.md)."""
    return RawSource(name=name, frame=frame, label_rule=LabelRule.parse("action>=4"),
                     actions=actions, files=files)


# ---------------------------------------------------------------- MovieLens

WHOLE_STARS = ("1", "2", "3", "4", "5")
HALF_STARS = tuple(f"{0.5 * k:.1f}" for k in range(1, 11))  # "0.5", "1.0", ..., "5.0" as written


ML100K_GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
                 "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
                 "War", "Western")  # the 19 flag columns of u.item, in order (u.genre)


def _movielens_100k(root: Path) -> RawSource:
    """``u.data`` ratings; item side features ``item_genres`` (the genre set, a bag: "Action|Thriller") and
    ``item_decade`` from ``u.item`` (original layout) or ``items.csv`` (``item_id,title,year,genres``)
    when one of them is beside it; user features from ``u.user`` when it is beside it
    (:func:`_movielens_100k_users`)."""
    path = _find(root, "u.data")
    frame = scan_table(path, names=["user", "item", "action", "ts"], separator="\t", has_header=False)
    items, files = _movielens_100k_items(path.parent), (path,)
    if items is not None:
        features = ["item_genres", "item_decade"]
        known = [pl.when(pl.col(c).is_null() | (pl.col(c) == "")).then(pl.lit("unknown")).otherwise(pl.col(c)).alias(c)
                 for c in features]
        frame = frame.join(items[0], on="item", how="left").with_columns(known)
        files += (items[1],)
    if (path.parent / "u.user").exists():
        frame = join_user_table(frame, _movielens_100k_users(path.parent / "u.user"))
        files += (path.parent / "u.user",)
    source = _rated("movielens-100k", frame, files, WHOLE_STARS)
    source.multi_columns = ("item_genres",) if items is not None else ()  # a film's genres: a bag
    return source


ML_AGE_BANDS = ((18, "under 18"), (25, "18-24"), (35, "25-34"), (45, "35-44"), (50, "45-49"), (56, "50-55"))  # else 56+


def _movielens_100k_users(path: Path) -> pl.LazyFrame:
    """``u.user`` (id|age|gender|occupation|zip) as user features: ``user_age`` (the age bands of
    MovieLens-1M), ``user_gender``, ``user_occupation``, ``user_zip`` (the first digit: a US region)."""
    raw = pl.scan_csv(path, separator="|", has_header=False, infer_schema=False, quote_char=None,
                      new_columns=["user", "age", "gender", "occupation", "zip"])
    age = pl.col("age").cast(pl.Int64, strict=False)
    band = pl.lit("56+")
    for upper, name in reversed(ML_AGE_BANDS):
        band = pl.when(age < upper).then(pl.lit(name)).otherwise(band)
    return raw.select("user", band.alias("user_age"), pl.col("gender").alias("user_gender"),
                      pl.col("occupation").alias("user_occupation"), pl.col("zip").str.slice(0, 1).alias("user_zip"))


def _movielens_100k_items(folder: Path) -> tuple[pl.LazyFrame, Path] | None:
    """(item, item_genres, item_decade) as strings, and the file read; None when no item file is there."""
    decade = lambda year: (year.cast(pl.Int64, strict=False) // 10 * 10).cast(pl.Utf8) + "s"  # noqa: E731
    if (folder / "items.csv").exists():
        path = folder / "items.csv"
        items = pl.scan_csv(path, infer_schema=False).select(
            pl.col("item_id").alias("item"), pl.col("genres").alias("item_genres"), decade(pl.col("year")).alias("item_decade"))
        return items, path
    if (folder / "u.item").exists():  # id|title|release date|video release date|IMDb URL|19 genre flags
        path = folder / "u.item"
        names = ["item", "title", "released", "video", "url", *ML100K_GENRES]
        raw = pl.scan_csv(path, separator="|", has_header=False, new_columns=names, infer_schema=False,
                          encoding="utf8-lossy", quote_char=None)
        genres = pl.concat_list([pl.when(pl.col(g) == "1").then(pl.lit(g)) for g in ML100K_GENRES]).list.drop_nulls()
        items = raw.select("item", genres.list.join("|").alias("item_genres"),
                           decade(pl.col("released").str.slice(-4)).alias("item_decade"))
        return items, path
    return None


def _movielens_1m(root: Path) -> RawSource:
    """``ratings.dat``: ``UserID::MovieID::Rating::Timestamp``.

    polars separators are one byte, so the line is split on ':' and the empty fields between each
    '::' pair are dropped (every field is an integer, so none holds a ':').
    """
    path = _find(root, "ratings.dat")
    names = ["user", "gap1", "item", "gap2", "action", "gap3", "ts"]
    frame = scan_table(path, names=names, separator=":", has_header=False)
    return _rated("movielens-1m", frame, (path,), WHOLE_STARS)


def _movielens_csv(root: Path, name: str) -> RawSource:
    """``ratings.csv``, header ``userId,movieId,rating,timestamp`` (20M, latest): half-star ratings."""
    path = _find(root, "ratings.csv")
    columns = {"user": "userId", "item": "movieId", "action": "rating", "ts": "timestamp"}
    return _rated(name, scan_table(path, columns=columns), (path,), HALF_STARS)


# ---------------------------------------------------------------- Amazon


def _amazon_ratings(root: Path) -> RawSource:
    """One Amazon review "ratings only" CSV, no header.

    The 2018 release (``Books.csv``) writes ``item,user,rating,timestamp``; the 2014 release
    (``ratings_Books.csv``) writes ``user,item,rating,timestamp``: told apart by the ``ratings_``
    prefix. Ratings appear as "5.0" (or "5"); any number is accepted, the label rule checks it.
    """
    paths = _find_all(root, "*.csv")
    if len(paths) > 1:
        raise DataError(
            f"{root}: several .csv files ({', '.join(p.name for p in paths)}); amazon-ratings reads "
            "one ratings-only file: pass that file"
        )
    path = paths[0]
    first = ["user", "item"] if path.name.startswith("ratings_") else ["item", "user"]
    frame = scan_table(path, names=[*first, "action", "ts"], has_header=False)
    return _rated("amazon-ratings", frame, (path,))


# ---------------------------------------------------------------- Taobao


TAOBAO_WINDOW = (1511539200, 1512316800)  # 2017-11-25 00:00 .. 2017-12-04 00:00 UTC+8 as published
TAOBAO_DAYS = "2017-11-25..2017-12-03"


def _taobao_userbehavior(root: Path) -> RawSource:
    """Headerless ``user,item,category,behavior,ts``.

    Events outside the published window are kept and counted in the notes (one streaming pass).
    """
    path = _find(root, "UserBehavior.csv")
    frame = scan_table(
        path, names=["user", "item", "item_category", "action", "ts"], has_header=False
    )
    ts = pl.col("ts").cast(pl.Int64, strict=False)
    lo, hi = TAOBAO_WINDOW
    outside = frame.select(((ts < lo) | (ts >= hi)).sum()).collect(engine="streaming").item()
    return RawSource(
        name="taobao-userbehavior",
        frame=frame,
        label_rule=LabelRule.parse("action in cart,fav,buy"),
        actions=("pv", "cart", "fav", "buy"),
        notes=[f"{outside:,} event{'' if outside == 1 else 's'} outside {TAOBAO_DAYS} (UTC+8) kept"],
        files=(path,),
    )


# ---------------------------------------------------------------- music

SKIP_FLAGS = ("skip_1", "skip_2", "skip_3")


def _spotify_mssd(root: Path) -> RawSource:
    """Spotify Music Streaming Sessions: every ``log_*.csv`` (e.g. under ``training_set/``).

    A session is a user, ``track_id_clean`` the item, ``context_type`` the scenario. The action is
    the earliest skip flag that is true (``skip_1`` < ``skip_2`` < ``skip_3``), else ``complete``;
    positive = not skipped before the skip_2 point (the challenge's target). ts = ``date`` (UTC
    midnight) + 3600 * ``hour_of_day`` + ``session_position``, so a session keeps its order.
    """
    paths = _find_all(root, "log_*.csv")
    kept = (*SKIP_FLAGS, "date", "hour_of_day", "session_position")
    columns = {"user": "session_id", "item": "track_id_clean", "scenario": "context_type",
               **{c: c for c in kept}}
    frame = _scan_files(paths, columns=columns)

    def flag(c: str) -> pl.Expr:
        return pl.col(c).str.to_lowercase()

    action = pl.when(pl.all_horizontal(flag(c) == "false" for c in SKIP_FLAGS)).then(pl.lit("complete"))
    for c in reversed(SKIP_FLAGS):  # the earliest true flag wins: it is applied last
        action = pl.when(flag(c) == "true").then(pl.lit(c)).otherwise(action)
    day = pl.col("date").str.to_date("%Y-%m-%d", strict=False).cast(pl.Int64) * 86400
    ts = (day + pl.col("hour_of_day").cast(pl.Int64, strict=False) * 3600
          + pl.col("session_position").cast(pl.Int64, strict=False))
    frame = frame.select(
        ROW_COLUMN, FILE_COLUMN, "user", "item", "scenario",
        _or_raw(ts, "date", "hour_of_day", "session_position").alias("ts"),
        _or_raw(action, *SKIP_FLAGS).alias("action"),
    )
    return RawSource(
        name="spotify-mssd",
        frame=frame,
        label_rule=LabelRule.parse("action in skip_3,complete"),
        actions=(*SKIP_FLAGS, "complete"),
        files=tuple(paths),
    )


PLAY_SECONDS = 30


def _thirty_music(root: Path) -> RawSource:
    """30Music idomaar events (``events.idomaar``, e.g. under ``relations/``), tab separated:

        event.play  12  1390009661  {"playtime":193}
            {"subjects":[{"type":"user","id":4}],"objects":[{"type":"track","id":9123}]}

    (type, id, timestamp, properties JSON, linked entities JSON; one event per line.)

    Play lines are kept (type ``event.play`` as published, or ``play``); user = first subject id,
    item = first object id. The action is ``play`` when playtime >= 30 seconds, else ``skip`` (a
    listen under 30 s counts as skipped, the scrobbling threshold); positive = ``play``. A line
    without a numeric playtime is rejected, naming the line.
    """
    paths = _find_all(root, "events*.idomaar")
    names = ["type", "id", "ts", "properties", "entities"]
    frame = _scan_files(paths, names=names, columns={c: c for c in ("type", "properties", "entities")},
                        separator="\t", has_header=False, quote_char=None)
    playtime = pl.col("properties").str.json_path_match("$.playtime").cast(pl.Float64, strict=False)
    action = (pl.when(playtime >= PLAY_SECONDS).then(pl.lit("play"))
              .when(playtime < PLAY_SECONDS).then(pl.lit("skip")))
    entity = pl.col("entities").str.json_path_match
    frame = frame.filter(pl.col("type").is_in(["event.play", "play"])).select(
        ROW_COLUMN, FILE_COLUMN,
        entity("$.subjects[0].id").alias("user"),
        entity("$.objects[0].id").alias("item"),
        "ts",
        _or_raw(action, "properties").alias("action"),
    )
    return RawSource(
        name="30music",
        frame=frame,
        label_rule=LabelRule.parse("action in play"),
        actions=("play", "skip"),
        files=tuple(paths),
    )


GROUPLENS = "https://files.grouplens.org/datasets/movielens"
# md5: GroupLens's checksum files (ml-100k.zip.md5 etc., "MD5 (ml-100k.zip) = ..."); sha256: TensorFlow Datasets'
# tensorflow_datasets/url_checksums/movielens.txt (commit 1c076ac3), recorded on downloads that matched those md5s.
# ml-latest is republished from time to time: no fixed checksum. Sources quoted in docs/data.md.

DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in [
        DatasetSpec("movielens-100k", ("u.data",), _movielens_100k, "MovieLens 100K ratings (u.data)",
                    Download(f"{GROUPLENS}/ml-100k.zip",
                             "50d2a982c66986937beb9ffb3aa76efe955bf3d5c6b761f4e3a7cd717c6a3229", "ml-100k",
                             md5="0e33842e24a9c977be4e0107933c0723")),
        DatasetSpec("movielens-1m", ("ratings.dat",), _movielens_1m, "MovieLens 1M ratings (ratings.dat)",
                    Download(f"{GROUPLENS}/ml-1m.zip",
                             "a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20", "ml-1m",
                             md5="c4d9eecfca2ab87c1945afe126590906")),
        DatasetSpec("movielens-20m", ("ratings.csv",), partial(_movielens_csv, name="movielens-20m"),
                    "MovieLens 20M ratings (ratings.csv, half stars)",
                    Download(f"{GROUPLENS}/ml-20m.zip",
                             "96f243c338a8665f6bcc89c53edf6ee39162a846940de6b7c8c48aeada765ff3", "ml-20m",
                             md5="cd245b17a1ae2cc31bb14903e1204af3")),
        DatasetSpec("movielens-latest", ("ratings.csv",), partial(_movielens_csv, name="movielens-latest"),
                    "MovieLens latest (full) ratings (ratings.csv, half stars)",
                    Download(f"{GROUPLENS}/ml-latest.zip", None, "ml-latest")),
        DatasetSpec("amazon-ratings", ("*.csv",), _amazon_ratings,
                    "Amazon reviews, one headerless ratings-only CSV (Books.csv or 2014 ratings_Books.csv)"),
        DatasetSpec("taobao-userbehavior", ("UserBehavior.csv",), _taobao_userbehavior,
                    "Taobao UserBehavior (headerless user,item,category,behavior,ts)"),
        DatasetSpec("spotify-mssd", ("log_*.csv",), _spotify_mssd,
                    "Spotify Music Streaming Sessions (log_*.csv; sessions as users, skips as actions)"),
        DatasetSpec("30music", ("events*.idomaar",), _thirty_music,
                    "30Music play events (idomaar events.idomaar; play >= 30 s)"),
    ]
}


def cache_dir() -> Path:
    return Path(os.environ.get("CLIMBER_CACHE", Path.home() / ".cache" / "climber"))


def download(spec: DatasetSpec, dest: Path) -> Path:
    """Fetch and unpack ``spec.download`` into ``dest``, checked against its recorded digests (a mismatch
    deletes the archive); clear error when offline."""
    dl = spec.download
    if dl is None:
        raise DataError(f"{spec.name}: no public download; pass --source DIR with a local copy")
    dest.mkdir(parents=True, exist_ok=True)
    archive = dest / Path(dl.url).name
    if not archive.exists():
        tmp = archive.with_suffix(archive.suffix + ".part")
        try:
            with urllib.request.urlopen(dl.url, timeout=30) as r, open(tmp, "wb") as f:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
        except (urllib.error.URLError, OSError) as e:
            tmp.unlink(missing_ok=True)
            raise DataError(
                f"{spec.name}: could not download {dl.url} ({e}); offline? Download it yourself and pass --source DIR"
            ) from None
        os.replace(tmp, archive)
    if wrong := dl.mismatches(archive):
        archive.unlink()
        raise DataError(f"{archive}: corrupt or not the published file, deleted ({'; '.join(wrong)}); try again")
    if archive.suffix == ".zip":
        with zipfile.ZipFile(archive) as z:
            z.extractall(dest)
    return dest / dl.archive_member_dir if dl.archive_member_dir else dest


def load_dataset(name: str, source: Path | None = None) -> RawSource:
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; known: {', '.join(DATASETS)}")
    spec = DATASETS[name]
    if source is None:
        source = download(spec, cache_dir() / name)
    source = Path(source)
    if not source.exists():
        raise DataError(f"{source}: no such folder or file")
    return spec.load(source)
