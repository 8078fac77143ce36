"""Named data sets: each reads the real published format from a local copy into a RawSource.

``load_dataset(name, source_dir)`` finds the data set's files under ``source_dir`` (or downloads them
into a cache when a canonical URL exists), and returns string-typed events with the data set's own
label rule. Add a data set: write a loader function and one line in ``DATASETS``.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import polars as pl

from climber.data.readers import scan_table
from climber.data.schema import DataError, LabelRule, RawSource


@dataclass(frozen=True)
class Download:
    url: str
    sha256: str | None  # None: the publisher gives no fixed checksum
    archive_member_dir: str = ""  # folder inside the zip that holds the files


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    files: tuple[str, ...]  # file names the loader needs (any one of alternatives separated by '|')
    load: Callable[[Path], RawSource]
    description: str
    download: Download | None = None


def _find(root: Path, name: str) -> Path:
    """Find ``name`` in ``root`` or one level below (archives often unpack into a folder)."""
    for alt in name.split("|"):
        for cand in (root / alt, *sorted(root.glob(f"*/{alt}"))):
            if cand.exists():
                return cand
    raise DataError(f"{root}: {name} not found (looked in the folder and one level below)")


# ---------------------------------------------------------------- MovieLens


def _movielens_100k(root: Path) -> RawSource:
    path = _find(root, "u.data")
    frame = scan_table(path, names=["user", "item", "action", "ts"], separator="\t", has_header=False)
    return RawSource(
        name="movielens-100k",
        frame=frame,
        label_rule=LabelRule.parse("action>=4"),
        actions=("1", "2", "3", "4", "5"),
        files=(path,),
    )


# ---------------------------------------------------------------- Taobao


TAOBAO_WINDOW = (1511539200, 1512316800)  # 2017-11-25 00:00 .. 2017-12-04 00:00 UTC+8 as published


def _taobao_userbehavior(root: Path) -> RawSource:
    path = _find(root, "UserBehavior.csv")
    frame = scan_table(
        path, names=["user", "item", "item_category", "action", "ts"], has_header=False
    )
    return RawSource(
        name="taobao-userbehavior",
        frame=frame,
        label_rule=LabelRule.parse("action in cart,fav,buy"),
        actions=("pv", "cart", "fav", "buy"),
        files=(path,),
    )


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in [
        DatasetSpec("movielens-100k", ("u.data",), _movielens_100k, "MovieLens 100K ratings (u.data)",
                    Download("https://files.grouplens.org/datasets/movielens/ml-100k.zip", None, "ml-100k")),
        DatasetSpec("taobao-userbehavior", ("UserBehavior.csv",), _taobao_userbehavior,
                    "Taobao UserBehavior (headerless user,item,category,behavior,ts)"),
    ]
}


def cache_dir() -> Path:
    return Path(os.environ.get("CLIMBER_CACHE", Path.home() / ".cache" / "climber"))


def download(spec: DatasetSpec, dest: Path) -> Path:
    """Fetch and unpack ``spec.download`` into ``dest`` with a sha256 check; clear error when offline."""
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
    if dl.sha256:
        digest = hashlib.sha256(archive.read_bytes()).hexdigest()
        if digest != dl.sha256:
            archive.unlink()
            raise DataError(f"{archive}: sha256 {digest} does not match the expected {dl.sha256}; deleted, try again")
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
        raise DataError(f"{source}: folder not found")
    return spec.load(source)
