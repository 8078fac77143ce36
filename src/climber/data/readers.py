"""Read a delimited or Parquet file into a string-typed LazyFrame with row numbers for errors."""

from __future__ import annotations

import re
from pathlib import Path

import polars as pl

from climber.data.schema import FILE_COLUMN, REQUIRED_COLUMNS, ROW_COLUMN, DataError, feature_kind

SEPARATORS = {"tab": "\t", "comma": ",", "semicolon": ";", "pipe": "|", "space": " "}  # --separator names


def parse_column_map(text: str | None) -> dict[str, str]:
    """``"user=userId,item=movieId"`` -> ``{"user": "userId", "item": "movieId"}`` (target -> source)."""
    if not text:
        return {}
    mapping = {}
    for part in text.split(","):
        if "=" not in part:
            raise DataError(f"--columns entry {part!r} must look like target=source, e.g. user=userId")
        target, source = (s.strip() for s in part.split("=", 1))
        mapping[target] = source
    return mapping


def parse_separator(text: str) -> str:
    """``--separator``: one character (one byte), a name of SEPARATORS, or an escape (``\\t``, ``\\x01``)."""
    sep = SEPARATORS.get(text.lower(), text)
    if escape := re.fullmatch(r"\\(t|x[0-9a-fA-F]{2})", sep):
        sep = "\t" if escape[1] == "t" else chr(int(escape[1][1:], 16))
    if len(sep.encode()) != 1 or sep in "\r\n\"":
        raise DataError(f"--separator {text!r}: expected one character (one byte), an escape such as '\\t', "
                        f"or a name: {', '.join(SEPARATORS)}")
    return sep


def _separator_hint(header: list[str], separator: str) -> str:
    """'; try --separator NAME' when a header name holds another usual separator, else ''."""
    for name in ("tab", "semicolon", "pipe", "comma"):
        if SEPARATORS[name] != separator and any(SEPARATORS[name] in c for c in header):
            return f"; try --separator {name}"
    return ""


def scan_table(
    path: Path,
    *,
    columns: dict[str, str] | None = None,
    names: list[str] | None = None,
    separator: str = ",",
    has_header: bool = True,
    quote_char: str | None = '"',
) -> pl.LazyFrame:
    """Scan CSV/TSV/Parquet lazily; every data column as Utf8, renamed target <- source.

    ``names`` gives column names for a headerless file; ``quote_char=None`` reads quotes as plain
    text (fields holding JSON). ``columns`` maps our names (user, item, ts, action, scenario, ...)
    to the file's names; unmapped file columns whose name is already one of ours (or that start
    with a feature prefix: ``item_``, ``user_``, ``ctx_``, ``num_``) are kept as they are, others are dropped.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")
    if path.suffix == ".parquet":
        frame = pl.scan_parquet(path)
        file_columns = frame.collect_schema().names()
        frame = frame.with_row_index(ROW_COLUMN, offset=1)
    else:
        if has_header:
            header = pl.read_csv(
                path, separator=separator, n_rows=0, infer_schema=False, quote_char=quote_char
            ).columns
            expected = list(columns.values()) if columns else REQUIRED_COLUMNS
            missing = [c for c in expected if c not in header]
            if missing and (hint := _separator_hint(header, separator)):
                raise DataError(f"{path}: the header split on {separator!r} gives {', '.join(map(repr, header))}, "
                                f"without {', '.join(map(repr, missing))}{hint}")
        else:
            if names is None:
                raise DataError(f"{path}: a headerless file needs column names")
            header = names
        frame = pl.scan_csv(
            path,
            separator=separator,
            has_header=has_header,
            new_columns=None if has_header else names,
            infer_schema=False,
            quote_char=quote_char,
            row_index_name=ROW_COLUMN,
            row_index_offset=2 if has_header else 1,  # line number in the file
        )
        file_columns = header
    columns = dict(columns or {})
    for target, source in columns.items():
        if source not in file_columns:
            raise DataError(
                f"{path}: column {source!r} (for {target}) not found; the file has {', '.join(file_columns)}"
            )
    mapped_sources = set(columns.values())
    keep = {t: s for t, s in columns.items()}
    for c in file_columns:
        if c not in mapped_sources and c not in keep and (c in _KNOWN_TARGETS or feature_kind(c) is not None):
            keep[c] = c
    exprs = [pl.col(s).cast(pl.Utf8).alias(t) for t, s in keep.items()]
    return frame.select(
        pl.col(ROW_COLUMN).cast(pl.Int64), pl.lit(str(path)).alias(FILE_COLUMN), *exprs
    )


_KNOWN_TARGETS = {"user", "item", "ts", "action", "scenario", "label"}


def read_user_table(path: Path, key: str, separator: str = ",") -> pl.LazyFrame:
    """A user table (CSV/TSV/Parquet with a header, one row per user) as ``user`` + ``user_*`` text
    columns, to join on the events' raw user id: ``key`` is the user id column; every other column is a
    user feature, named ``user_<column>`` unless it already starts with ``user_``. A key given twice or
    empty is refused, naming the rows."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"--user-table {path}: file not found")
    if path.suffix == ".parquet":
        frame = pl.scan_parquet(path).with_row_index(ROW_COLUMN, offset=1)
    else:
        frame = pl.scan_csv(path, separator=separator, infer_schema=False, row_index_name=ROW_COLUMN,
                            row_index_offset=2)  # the file's line number
    columns = [c for c in frame.collect_schema().names() if c != ROW_COLUMN]
    if key not in columns:
        raise DataError(f"--user-table {path}: no column {key!r} (--user-key); the file has {', '.join(columns)}")
    frame = frame.select(pl.col(ROW_COLUMN), *[pl.col(c).cast(pl.Utf8).str.strip_chars() for c in columns])
    empty = frame.filter(pl.col(key).is_null() | (pl.col(key) == "")).select(ROW_COLUMN).head(1).collect()
    if empty.height:
        raise DataError(f"--user-table {path}: row {empty.item()}: empty user id in column {key!r}")
    twice = (frame.group_by(key).agg(pl.col(ROW_COLUMN).sort().head(2).alias("rows"), pl.len().alias("n"))
             .filter(pl.col("n") > 1).sort(pl.col("rows").list.first()).head(1).collect())
    if twice.height:
        rows = twice["rows"][0].to_list()
        raise DataError(f"--user-table {path}: user {twice[key][0]!r} appears more than once (rows {rows[0]} and "
                        f"{rows[1]}); one row per user")
    features = {c: c if c.startswith("user_") else f"user_{c}" for c in columns if c != key}
    return frame.select(pl.col(key).alias("user"), *[pl.col(c).alias(n) for c, n in features.items()])


def join_user_table(events: pl.LazyFrame, table: pl.LazyFrame) -> pl.LazyFrame:
    """``events`` with the user table's features (``read_user_table``) on each event; a user the table
    lacks gets nulls (the unknown value, 0, once prepared). A feature the events already have is refused."""
    have = set(events.collect_schema().names())
    both = [c for c in table.collect_schema().names() if c != "user" and c in have]
    if both:
        raise DataError(f"--user-table: the events already have {', '.join(both)}")
    return events.join(table, on="user", how="left", maintain_order="left")


def drop_columns(frame: pl.LazyFrame, patterns: list[str]) -> pl.LazyFrame:
    """``frame`` without the feature columns matching ``patterns`` (names or shell patterns: 'user_*').
    A pattern that matches no feature column is refused, naming those there are; the event columns
    (user, item, ts, ...) cannot be dropped."""
    import fnmatch

    features = [c for c in frame.collect_schema().names() if feature_kind(c) is not None]
    gone = set()
    for pattern in patterns:
        hits = fnmatch.filter(features, pattern)
        if not hits:
            raise DataError(f"--drop {pattern!r}: no feature column matches; the log has {', '.join(features) or 'none'}")
        gone.update(hits)
    return frame.drop(sorted(gone))
