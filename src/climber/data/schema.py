"""Event schema, label rules and the one error type users see for bad data.

An event is ``(user, item, ts, action, scenario)`` plus optional side columns. Loaders hand
``prepare`` a :class:`RawSource`: a polars LazyFrame whose columns are all strings, so that
validation can name the file, row and column of the first bad value before anything is cast.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

EVENT_COLUMNS = ("user", "item", "ts", "action", "scenario")
REQUIRED_COLUMNS = ("user", "item", "ts", "action")
DEFAULT_SCENARIO = "default"
TS_UNITS = {"s": 1, "ms": 10**3, "us": 10**6, "ns": 10**9}  # --ts-unit: numeric ts values per second
TS_UNIT_NAMES = {"s": "seconds", "ms": "milliseconds", "us": "microseconds", "ns": "nanoseconds"}
YEAR_3000 = 32_503_680_000  # 3000-01-01T00:00:00Z in seconds since the epoch: later is taken for a unit mistake
ISO_LAYOUTS = ("%Y-%m-%dT%H:%M:%S%.f%#z", "%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%dT%H:%M%#z", "%Y-%m-%dT%H:%M", "%Y-%m-%d")
ROW_COLUMN = "__row"  # 1-based data-row number within the source file, for error messages
FILE_COLUMN = "__file"  # source file of the row, for error messages


class DataError(Exception):
    """A problem with input data that the user can fix; printed as one line, exit code 2."""


def check_epoch(value: float, unit: str, where: str, fix: str) -> None:
    """Refuse a numeric time stamp after the year 3000 read as ``unit`` since the epoch: it is in a finer
    unit (milliseconds, microseconds, nanoseconds), and read as it is every time bucket would be wrong.
    ``where`` starts the message (it names the value), ``fix`` ends it: ``{unit}`` in it becomes the
    unit that fits."""
    if value / TS_UNITS[unit] < YEAR_3000:
        return
    fits = [u for u, per in TS_UNITS.items() if value / per < YEAR_3000]
    guess = f"{TS_UNIT_NAMES[fits[0]]}? {fix.format(unit=fits[0])}" if fits else "too large in any unit"
    raise DataError(f"{where}: after the year 3000 read as {TS_UNIT_NAMES[unit]} since the epoch; {guess}")


def numeric_seconds(ts: pl.Expr, unit: str) -> pl.Expr:
    """Int64 seconds since the epoch from text holding an integer or decimal number of ``unit`` since
    the epoch (fractions of a second dropped: floor); null where the text holds no finite number."""
    per = TS_UNITS[unit]
    number = ts.cast(pl.Float64, strict=False)
    return pl.coalesce(ts.cast(pl.Int64, strict=False) // per,  # integers stay exact
                       pl.when(number.is_finite()).then((number / per).floor()).cast(pl.Int64, strict=False))


def iso_seconds(ts: pl.Expr, example: str) -> pl.Expr | None:
    """Int64 seconds since the epoch from ISO 8601 text laid out like ``example``: a date, or a date and
    a time to the minute or second (fraction optional, dropped), 'T' or a space between, UTC unless an
    offset (Z, +08:00, -0530) follows; null where a value has another layout. None when ``example`` is
    no such text. One layout a column: parsing costs about a microsecond a value and a layout tried."""
    for layout in ISO_LAYOUTS:
        if _iso(pl.Series([example]), layout).item() is not None:
            return _iso(ts, layout).dt.epoch("s")
    return None


def _iso(text, layout: str):
    """``text`` (a polars Expr or Series of strings) parsed as UTC date-times in ``layout``."""
    return text.str.replace(" ", "T").str.to_datetime(layout, strict=False, time_zone="UTC")


@dataclass(frozen=True)
class LabelRule:
    """Binary target of an event. Forms:

    - ``action>=4`` (also ``>``, ``<=``, ``<``, ``==``, ``!=``): numeric comparison of the action;
    - ``action in cart,fav,buy``: membership of the action in a set of values;
    - ``label``: the source carries a 0/1 ``label`` column (synthetic data).
    """

    kind: str  # "compare" | "in" | "given"
    op: str = ""
    threshold: float = 0.0
    values: tuple[str, ...] = ()

    _COMPARE = re.compile(r"^\s*action\s*(>=|<=|==|!=|>|<)\s*(-?[0-9.]+)\s*$")
    _IN = re.compile(r"^\s*action\s+in\s+(.+)$")

    @classmethod
    def parse(cls, text: str) -> "LabelRule":
        text = text.strip()
        if text == "label":
            return cls(kind="given")
        if m := cls._COMPARE.match(text):
            return cls(kind="compare", op=m.group(1), threshold=float(m.group(2)))
        if m := cls._IN.match(text):
            values = tuple(v.strip() for v in m.group(1).split(",") if v.strip())
            if values:
                return cls(kind="in", values=values)
        raise DataError(
            f"label rule {text!r} not understood: expected 'action>=4' (or >, <=, <, ==, !=), "
            "'action in a,b,c', or 'label'"
        )

    def __str__(self) -> str:
        if self.kind == "given":
            return "label"
        if self.kind == "in":
            return "action in " + ",".join(self.values)
        return f"action{self.op}{self.threshold:g}"

    @property
    def numeric(self) -> bool:
        return self.kind == "compare"

    def expr(self) -> pl.Expr:
        """A polars expression giving the Int8 label from the string columns of a RawSource."""
        if self.kind == "given":
            return pl.col("label").cast(pl.Int8)
        if self.kind == "in":
            return pl.col("action").is_in(list(self.values)).cast(pl.Int8)
        a = pl.col("action").cast(pl.Float64)
        t = self.threshold
        cmp = {">=": a >= t, ">": a > t, "<=": a <= t, "<": a < t, "==": a == t, "!=": a != t}[self.op]
        return cmp.cast(pl.Int8)


@dataclass
class RawSource:
    """What a loader returns: string-typed events plus what prepare needs to know about them.

    ``frame`` has at least the REQUIRED_COLUMNS, plus ROW_COLUMN and FILE_COLUMN for error messages,
    optionally ``scenario``, ``label`` and side columns (kept through prepare; by prefix, ``item_*``,
    ``user_*`` and ``ctx_*`` are categorical item, user and per-event features, ``num_*`` numeric
    per-event features, anything else an event column no model reads; docs/data.md). All data columns
    are Utf8.
    """

    name: str
    frame: pl.LazyFrame
    label_rule: LabelRule
    actions: tuple[str, ...] | None = None  # allowed action values; None = any
    numeric_columns: tuple[str, ...] = ()  # side columns to keep as Float64 rather than categories
    notes: list[str] = field(default_factory=list)  # e.g. "dropped 12 events outside the window"
    files: tuple[Path, ...] = ()
    ts_unit: str = "s"  # unit of numeric ts values (a key of TS_UNITS); prepare converts them to seconds
    multi_columns: tuple[str, ...] = ()  # item_* / user_* feature columns holding a bag of values
    multi_separator: str = "|"  # between the values of a multi_columns field
    derive: tuple[str, ...] = ()  # time context from ts: "hour" -> ctx_hour, "weekday" -> ctx_weekday
    tz: str = "UTC"  # the IANA time zone of ``derive``
    fill: str | None = None  # missing num_* values: None (an error), "zero" or "mean" (of the train split)


FEATURE_PREFIXES = ("item_", "user_", "ctx_")  # categorical features: per item, per user, per event
NUMERIC_PREFIX = "num_"  # numeric per-event features, standardised with train statistics
DERIVABLE = {"hour": "ctx_hour", "weekday": "ctx_weekday"}  # --derive NAME -> the ctx column it adds
FILLS = ("zero", "mean")  # --fill


def feature_kind(column: str) -> str | None:
    """"item", "user", "ctx" or "num" for a feature column (by its prefix); None for other columns."""
    for prefix in (*FEATURE_PREFIXES, NUMERIC_PREFIX):
        if column.startswith(prefix) and len(column) > len(prefix):
            return prefix[:-1]
    return None
