"""Durable history store of the HTTP service: every user's raw events in one SQLite file.

WAL journal with ``synchronous=FULL``: ``append`` returns only after its transaction is on disk, so an
acknowledged event survives a kill -9 of the server (and a power cut). Ids are kept raw (the strings
of the source data), so the store does not depend on a model's vocabularies; the service maps them to
dense ids when it loads a history.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from climber.data.schema import DataError

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    user TEXT NOT NULL,
    seq INTEGER NOT NULL,       -- 0, 1, ... per user, in arrival (= time) order
    item TEXT NOT NULL,
    action TEXT NOT NULL,
    scenario TEXT NOT NULL,
    ts INTEGER NOT NULL,        -- seconds
    label INTEGER NOT NULL,     -- 0 / 1 by the data's label rule
    context TEXT NOT NULL DEFAULT '{}',  -- JSON object: the event's ctx_* (text) and num_* (number) values
    PRIMARY KEY (user, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True)
class Event:
    item: str
    action: str
    scenario: str
    ts: int
    label: int
    context: dict = field(default_factory=dict)  # ctx_* -> text, num_* -> number; a missing one: not a key

    def row(self, user: str, seq: int) -> tuple:
        return (user, seq, self.item, self.action, self.scenario, self.ts, self.label,
                json.dumps(self.context, sort_keys=True))


class HistoryStore:
    """Users' events in time order; safe to share between threads (one connection behind a lock)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(events)")}
        if "context" not in columns:  # a store written before events had context (issue 19)
            self._db.execute("ALTER TABLE events ADD COLUMN context TEXT NOT NULL DEFAULT '{}'")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM events").fetchone()[0]

    def history(self, user: str, limit: int | None = None) -> list[Event]:
        """The user's events, oldest first (the most recent ``limit`` when given); [] for an unknown user."""
        with self._lock:
            rows = self._db.execute(
                "SELECT item, action, scenario, ts, label, context FROM events WHERE user = ? ORDER BY seq DESC LIMIT ?",
                (user, -1 if limit is None else limit)).fetchall()
        return [Event(*row[:5], json.loads(row[5])) for row in reversed(rows)]

    def last_ts(self, user: str) -> int | None:
        with self._lock:
            row = self._db.execute("SELECT ts FROM events WHERE user = ? ORDER BY seq DESC LIMIT 1", (user,)).fetchone()
        return None if row is None else row[0]

    def append(self, user: str, events: list[Event]) -> int:
        """Store ``events`` (in time order, none before the user's last stored one) in one durable
        transaction -> the user's number of events after it; DataError (nothing stored) otherwise."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                seq, last = self._db.execute(
                    "SELECT COUNT(*), MAX(ts) FROM events WHERE user = ?", (user,)).fetchone()
                for i, e in enumerate(events):
                    bound = last if i == 0 else events[i - 1].ts
                    if bound is not None and e.ts < bound:
                        what = "the user's last stored event" if i == 0 else f"event {i - 1} of this request"
                        raise DataError(f"events[{i}].ts = {e.ts} is before {what} (ts {bound}); "
                                         "events must arrive in time order")
                self._db.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                                     [e.row(user, seq + i) for i, e in enumerate(events)])
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return seq + len(events)

    def seed(self, frame: pl.DataFrame, source: str) -> int | None:
        """Bulk-load raw events (columns user, item, action, scenario: str; ts, label: int; context: str, a
        JSON object), each user's in (ts, row) order, once: the first call stores them and ``source`` in
        one transaction and returns the row count; later calls (the store was seeded) store nothing and
        return None."""
        frame = frame.sort("user", "ts", maintain_order=True).with_columns(
            pl.int_range(pl.len()).over("user").alias("seq"))
        columns = ("user", "seq", "item", "action", "scenario", "ts", "label", "context")
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            if self._db.execute("SELECT 1 FROM meta WHERE key = 'seeded_from'").fetchone():
                self._db.execute("ROLLBACK")
                return None
            self._db.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?)", frame.select(columns).iter_rows())
            self._db.execute("INSERT INTO meta VALUES ('seeded_from', ?)", (source,))
            self._db.execute("COMMIT")
        return frame.height
