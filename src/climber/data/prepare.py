"""Validate a raw event log, map ids, apply the label rule and the protocol split, write a prepared dir.

Prepared dir layout (written to a temp dir beside ``out`` and renamed at the end):

    events.parquet   sorted by (user, ts, item); dense ids start at 1 (0 = padding / unknown)
                     user, item, action, scenario: Int32 dense ids; ts: Int64 seconds; label: Int8;
                     split: "train" | "val" | "test"; *_raw: the original values; side columns
    vocab/<col>.parquet   id (Int32), raw (Utf8) for user, item, action, scenario and categorical side columns
    manifest.json    rows, users, items, positive rate, split sizes, label rule, fingerprint, ...
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import shutil
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from climber.data.schema import (
    DEFAULT_SCENARIO,
    FILE_COLUMN,
    REQUIRED_COLUMNS,
    ROW_COLUMN,
    YEAR_3000,
    DataError,
    RawSource,
    check_epoch,
    iso_seconds,
    numeric_seconds,
)
from climber.data.split import MIN_EVENTS, assign_split

PREPARED_VERSION = 1
ID_COLUMNS = ("user", "item", "action", "scenario")
FINGERPRINT_COLUMNS = ("user", "item", "ts", "action", "scenario", "label")
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


def _first_bad(frame: pl.LazyFrame, bad: pl.Expr, column: str) -> dict | None:
    rows = (
        frame.filter(bad)
        .select(FILE_COLUMN, ROW_COLUMN, pl.col(column).alias("value"))
        .head(1)
        .collect()
    )
    return rows.row(0, named=True) if rows.height else None


def _where(hit: dict, column: str) -> str:
    return f"{hit[FILE_COLUMN]}: row {hit[ROW_COLUMN]}, column {column!r}: got {hit['value']!r}"


def _check(frame: pl.LazyFrame, bad: pl.Expr, column: str, expected: str) -> None:
    hit = _first_bad(frame, bad, column)
    if hit is not None:
        raise DataError(f"{_where(hit, column)}, expected {expected}")


TS_EXPECTED = "seconds since the epoch (a number; --ts-unit for ms, us, ns) or an ISO 8601 date-time"


def _seconds(frame: pl.LazyFrame, unit: str) -> pl.Expr:
    """The ts column as Int64 seconds since the epoch, every value checked: numbers in ``unit`` since the
    epoch (before the year 3000), or else ISO 8601 text laid out like the first value that is no number."""
    ts = pl.col("ts")
    seconds = numeric_seconds(ts, unit)
    hit = _first_bad(frame, seconds.is_null() | (seconds >= YEAR_3000), "ts")
    if hit is None:  # all numbers: one pass
        return seconds
    number = pl.Series([hit["value"]]).cast(pl.Float64, strict=False).item()
    if number is not None and math.isfinite(number):  # a number, so one past the year 3000: refused
        check_epoch(number, unit, _where(hit, "ts"), "pass --ts-unit {unit}")
    iso = iso_seconds(ts, hit["value"])
    if iso is None:
        raise DataError(f"{_where(hit, 'ts')}, expected {TS_EXPECTED}")
    _check(frame, iso.is_null(), "ts", f"an ISO 8601 date-time laid out like row {hit[ROW_COLUMN]}'s {hit['value']!r}")
    return iso


def validate(source: RawSource) -> pl.LazyFrame:
    """Check the string-typed events; return them with ``scenario`` filled and ``ts`` as Int64 seconds.
    Raises DataError."""
    frame = source.frame
    names = frame.collect_schema().names()
    where = ", ".join(str(f) for f in source.files) or source.name
    for col in REQUIRED_COLUMNS:
        if col not in names:
            raise DataError(f"{where}: missing column {col!r}; have {', '.join(n for n in names if not n.startswith('__'))}")
    if source.label_rule.kind == "given" and "label" not in names:
        raise DataError(f"{where}: label rule 'label' needs a 'label' column")
    if "scenario" not in names:
        frame = frame.with_columns(pl.lit(DEFAULT_SCENARIO).alias("scenario"))
    frame = frame.with_columns(pl.col(c).str.strip_chars() for c in EVENT_STRING_COLUMNS)
    if frame.select(pl.len()).collect().item() == 0:
        raise DataError(f"{where}: no events (empty file)")
    for col in ("user", "item", "ts", "action", "scenario"):
        _check(frame, pl.col(col).is_null() | (pl.col(col) == ""), col, "a value (got null/empty)")
    frame = frame.with_columns(_seconds(frame, source.ts_unit).alias("ts"))
    if source.actions is not None:
        allowed = list(source.actions)
        _check(frame, ~pl.col("action").is_in(allowed), "action", "one of " + ",".join(allowed))
    if source.label_rule.numeric:
        _check(frame, pl.col("action").cast(pl.Float64, strict=False).is_null(), "action",
               f"a number (label rule {source.label_rule})")
    if source.label_rule.kind == "given":
        _check(frame, ~pl.col("label").is_in(["0", "1"]), "label", "0 or 1")
    for col in source.numeric_columns:
        _check(frame, pl.col(col).cast(pl.Float64, strict=False).is_null() & pl.col(col).is_not_null(),
               col, "a number")
    return frame


EVENT_STRING_COLUMNS = ("user", "item", "ts", "action", "scenario")


def _vocab(frame: pl.LazyFrame, column: str) -> pl.DataFrame:
    """Distinct values -> dense ids 1..n, in numeric order when every value is an integer."""
    values = frame.select(pl.col(column).unique()).collect(engine="streaming")[column]
    as_int = values.cast(pl.Int64, strict=False)
    order = as_int if as_int.null_count() == 0 else values
    vocab = pl.DataFrame({"raw": values, "key": order}).sort("key").drop("key")
    return vocab.with_columns(pl.int_range(1, vocab.height + 1, dtype=pl.Int32).alias("id")).select("id", "raw")


def fingerprint(events_path: Path) -> str:
    """sha256 over the prepared events (ids, ts, action, scenario, label, split) in file order."""
    h = hashlib.sha256()
    pf = pq.ParquetFile(events_path)
    for batch in pf.iter_batches(batch_size=1 << 20, columns=[*FINGERPRINT_COLUMNS, "split"]):
        cols = [batch.column(c).to_numpy().astype("<i8") for c in FINGERPRINT_COLUMNS]
        split = batch.column("split").to_pylist()
        cols.append(np.array([SPLIT_CODES[s] for s in split], dtype="<i8"))
        h.update(np.stack(cols, axis=1).tobytes())
    return h.hexdigest()


def prepare(source: RawSource, out: Path, *, force: bool = False, log=print, extra=None) -> dict:
    """Prepare ``source`` into ``out``. Returns the manifest. Nothing is left behind on failure.

    ``extra(tmp_dir) -> dict``, when given, is called once events.parquet is written; what it returns
    is merged into the manifest (synthetic data adds its Bayes ceiling this way).
    """
    out = Path(out)
    if out.exists() and not force:
        raise DataError(f"{out}: already exists (use --force to replace it)")
    t0 = time.time()
    frame = validate(source)
    side = [c for c in frame.collect_schema().names()
            if c not in (*EVENT_STRING_COLUMNS, "label", ROW_COLUMN, FILE_COLUMN)]
    categorical_side = [c for c in side if c not in source.numeric_columns]

    tmp = staging_dir(out)
    try:
        (tmp / "vocab").mkdir()
        vocabs = {}
        for col in (*ID_COLUMNS, *categorical_side):
            vocabs[col] = _vocab(frame, col)
            vocabs[col].write_parquet(tmp / "vocab" / f"{col}.parquet")
            log(f"  vocab {col}: {vocabs[col].height:,} values")

        mapped = frame.with_columns(
            source.label_rule.expr().alias("label"),
            *[pl.col(c).cast(pl.Float64) for c in source.numeric_columns],
        )
        for col, vocab in vocabs.items():
            mapped = mapped.rename({col: f"{col}_raw"}).join(
                vocab.lazy().rename({"raw": f"{col}_raw", "id": col}), on=f"{col}_raw", how="left"
            )
        ordered = mapped.sort(["user", "ts", "item", FILE_COLUMN, ROW_COLUMN])  # ties: file order
        events = assign_split(ordered).select(
            "user", "item", "ts", "action", "scenario", "label", "split",
            *[f"{c}_raw" for c in ID_COLUMNS],
            *[c for c in categorical_side],
            *source.numeric_columns,
        )
        events.sink_parquet(tmp / "events.parquet", row_group_size=1 << 17)
        manifest = _manifest(source, tmp, vocabs, categorical_side)
        if extra is not None:
            manifest.update(extra(tmp))
        manifest["prepare_seconds"] = round(time.time() - t0, 2)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _manifest(source: RawSource, root: Path, vocabs: dict, categorical_side: list[str]) -> dict:
    ev = pl.scan_parquet(root / "events.parquet")
    stats = ev.select(
        pl.len().alias("rows"),
        pl.col("label").mean().alias("positive_rate"),
        pl.col("ts").min().alias("ts_min"),
        pl.col("ts").max().alias("ts_max"),
    ).collect().row(0, named=True)
    per_split = (
        ev.group_by("split").agg(pl.len().alias("rows"), pl.col("label").mean().alias("positive_rate"),
                                 pl.col("user").n_unique().alias("users"))
        .collect().sort("split")
    )
    splits = {r["split"]: {k: r[k] for k in ("rows", "users", "positive_rate")} for r in per_split.iter_rows(named=True)}
    return {
        "version": PREPARED_VERSION,
        "source": source.name,
        "label_rule": str(source.label_rule),
        "rows": stats["rows"],
        "users": vocabs["user"].height,
        "items": vocabs["item"].height,
        "actions": vocabs["action"]["raw"].to_list(),
        "scenarios": vocabs["scenario"]["raw"].to_list(),
        "side_columns": {c: vocabs[c].height for c in categorical_side},
        "numeric_columns": list(source.numeric_columns),
        "positive_rate": stats["positive_rate"],
        "ts_range": [stats["ts_min"], stats["ts_max"]],
        "splits": splits,
        "fingerprint": {
            "rows": stats["rows"],
            "users": vocabs["user"].height,
            "items": vocabs["item"].height,
            "sha256": fingerprint(root / "events.parquet"),
        },
        "notes": list(source.notes),
        "warnings": _warnings(splits),
    }


def _warnings(splits: dict) -> list[str]:
    """What makes the prepared data unfit for training: empty val or test splits."""
    empty = [s for s in ("val", "test") if s not in splits]
    if not empty:
        return []
    return [f"{' and '.join(empty)} {'are' if len(empty) > 1 else 'is'} empty: no user has {MIN_EVENTS} or more "
            f"events, and the per-user chronological split (docs/protocol.md) puts a user with fewer in train "
            f"only; models can neither be selected nor evaluated on this data"]


def staging_dir(out: Path) -> Path:
    """A new empty folder beside ``out`` to write it in before renaming it into place. Made by mkdir,
    so its mode follows the umask like any other output (``tempfile.mkdtemp`` would make it 0o700)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{secrets.token_hex(6)}"
    tmp.mkdir()
    return tmp


def _replace_dir(tmp: Path, out: Path) -> None:
    if out.exists():
        trash = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, trash)
        os.replace(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out)


def load_manifest(prepared: Path) -> dict:
    path = Path(prepared) / "manifest.json"
    if not path.exists():
        raise DataError(f"{prepared}: not a prepared data dir (no manifest.json); run `climber data prepare` first")
    return json.loads(path.read_text())
