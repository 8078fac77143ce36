"""Validate a raw event log, map ids, apply the label rule and the protocol split, write a prepared dir.

Prepared dir layout (written to a temp dir beside ``out`` and renamed at the end):

    events.parquet   sorted by (user, ts, item); dense ids start at 1 (0 = padding / unknown)
                     user, item, action, scenario: Int32 dense ids; ts: Int64 seconds; label: Int8;
                     split: "train" | "val" | "test"; *_raw: the original values; side columns;
                     features (docs/data.md): item_* / user_* / ctx_* Int32 value ids (List[Int32] for
                     a bag), 0 = a value the train split does not hold; num_* Float64
    vocab/<col>.parquet   id (Int32), raw (Utf8) for user, item, action, scenario and categorical side
                     columns (features: the train split's values only)
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
import zoneinfo
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from climber.data.schema import (
    DEFAULT_SCENARIO,
    DERIVABLE,
    FILLS,
    FILE_COLUMN,
    REQUIRED_COLUMNS,
    ROW_COLUMN,
    YEAR_3000,
    DataError,
    RawSource,
    check_epoch,
    feature_kind,
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
    _check_features(frame, source, names, where)
    return frame.with_columns(derived_columns(source.derive, source.tz))


def _check_features(frame: pl.LazyFrame, source: RawSource, names: list[str], where: str) -> None:
    """The feature columns' own checks: bags only in item_* / user_* columns, numbers in num_* (a missing
    value only with ``fill``), derivable time context in a known time zone."""
    for col in source.multi_columns:
        if col not in names:
            raise DataError(f"{where}: --multi names {col!r}, which the log does not have")
        if feature_kind(col) not in ("item", "user"):
            raise DataError(f"--multi {col!r}: bags of values are for item_* and user_* feature columns")
    for col in (c for c in names if feature_kind(c) == "num"):
        text = pl.col(col).str.strip_chars()
        number = text.cast(pl.Float64, strict=False)
        _check(frame, number.is_null() & text.is_not_null() & (text != ""), col, "a number")
        if source.fill is None:
            _check(frame, text.is_null() | (text == "") | number.is_nan(), col,
                   "a number (missing: pass --fill zero or --fill mean)")
    unknown = [d for d in source.derive if d not in DERIVABLE]
    if unknown:
        raise DataError(f"--derive {','.join(unknown)}: can derive {', '.join(DERIVABLE)} from ts")
    if source.fill is not None and source.fill not in FILLS:
        raise DataError(f"--fill {source.fill!r}: expected one of {', '.join(FILLS)}")
    if source.derive:
        try:
            zoneinfo.ZoneInfo(source.tz)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise DataError(f"--tz {source.tz!r}: not a time zone name (e.g. UTC, Europe/Berlin, Asia/Shanghai)") from None
        taken = [DERIVABLE[d] for d in source.derive if DERIVABLE[d] in names]
        if taken:
            raise DataError(f"{where}: --derive would add {', '.join(taken)}, which the log already has")


WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def derived_columns(derive, tz: str) -> list[pl.Expr]:
    """The ctx_* columns of ``derive`` (names of DERIVABLE) in time zone ``tz``, as text like every raw
    column, from ts in seconds; what prepare adds and the service computes for requests and events."""
    local = pl.from_epoch(pl.col("ts"), "s").dt.replace_time_zone("UTC").dt.convert_time_zone(tz)
    exprs = {"hour": local.dt.hour().cast(pl.Utf8),
             "weekday": local.dt.weekday().replace_strict(range(1, 8), WEEKDAYS, return_dtype=pl.Utf8)}
    return [exprs[d].alias(DERIVABLE[d]) for d in derive]


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
    features = [c for c in side if feature_kind(c) in ("item", "user", "ctx")]
    numeric_features = [c for c in side if feature_kind(c) == "num"]
    categorical_side = [c for c in side if c not in (*source.numeric_columns, *features, *numeric_features)]

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
            *features, *numeric_features,
        )
        if features or numeric_features:
            events.sink_parquet(tmp / "events.raw.parquet", row_group_size=1 << 17)
            feature_info = _map_features(source, tmp, features, numeric_features, log)
            (tmp / "events.raw.parquet").unlink()
        else:
            events.sink_parquet(tmp / "events.parquet", row_group_size=1 << 17)
            feature_info = {}
        manifest = _manifest(source, tmp, vocabs, categorical_side)
        manifest["side_columns"].update(feature_info.get("side_columns", {}))
        manifest.update({k: v for k, v in feature_info.items() if k != "side_columns"})
        if extra is not None:
            manifest.update(extra(tmp))
        manifest["prepare_seconds"] = round(time.time() - t0, 2)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _map_features(source: RawSource, root: Path, features: list[str], numeric: list[str], log) -> dict:
    """events.raw.parquet (feature columns as text) -> events.parquet: each categorical feature as value
    ids (a list of them for a bag), from a vocabulary of the values the train split holds (any other
    value, and a missing one, is 0: unknown); each num_* as Float64, missing values filled. Writes
    vocab/<feature>.parquet; returns the manifest's feature entries."""
    raw = pl.scan_parquet(root / "events.raw.parquet")
    train = raw.filter(pl.col("split") == "train")
    sep = source.multi_separator
    mapped, single, multi = [], {}, {}
    for col in features:
        text = pl.col(col).str.strip_chars()
        if col in source.multi_columns:
            bag = text.str.split(sep).list.eval(pl.element().str.strip_chars()).list.eval(pl.element().filter(
                pl.element() != ""))  # the bag's values, empty ones left out; null for a missing field
            vocab = _vocab(train.select(bag.explode().alias(col)).drop_nulls(), col)
            ids = bag.list.eval(pl.element().replace_strict(vocab["raw"], vocab["id"], default=0,
                                                            return_dtype=pl.Int32)).fill_null([])
            multi[col] = vocab.height
        else:
            vocab = _vocab(train.filter(text.is_not_null() & (text != "")).select(text.alias(col)), col)
            ids = text.replace_strict(vocab["raw"], vocab["id"], default=0, return_dtype=pl.Int32)
            single[col] = vocab.height
        vocab.write_parquet(root / "vocab" / f"{col}.parquet")
        mapped.append(ids.alias(col))
        log(f"  vocab {col}: {vocab.height:,} values in train{' (bags)' if col in multi else ''}")
    stats = {}
    for col in numeric:
        number = pl.col(col).str.strip_chars().cast(pl.Float64, strict=False)
        number = pl.when(number.is_nan()).then(None).otherwise(number)
        row = train.select(number.mean().alias("mean"), number.std(ddof=0).alias("std")).collect().row(0, named=True)
        mean = row["mean"] if row["mean"] is not None else 0.0
        std = row["std"] if row["std"] else 1.0  # a constant (or empty) column: standardised to 0
        fill = {"zero": 0.0, "mean": mean}.get(source.fill, 0.0)  # without --fill validate refused gaps
        stats[col] = {"mean": mean, "std": std, "fill": source.fill}
        mapped.append(number.fill_null(fill).alias(col))
    raw.with_columns(mapped).sink_parquet(root / "events.parquet", row_group_size=1 << 17)
    out = {"side_columns": single}
    if multi:
        longest = pl.scan_parquet(root / "events.parquet").select(pl.col(c).list.len().max() for c in multi).collect()
        out["multi_columns"] = {c: {"values": n, "longest": int(longest[c][0] or 0)} for c, n in multi.items()}
        out["multi_separator"] = sep
    if stats:
        out["numeric_features"] = stats
    if source.derive:
        out["derived"] = {"columns": [DERIVABLE[d] for d in source.derive], "tz": source.tz}
    return out


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
