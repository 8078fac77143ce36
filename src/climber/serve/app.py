"""HTTP scoring service: FastAPI over the KV-cached engine and the SQLite history store.

    POST /v1/score                {user, candidates, scenario?, ts?, context?, candidate_context?,
                                  user_features?} -> scores in request order + ranked list
    POST /v1/events               {user, events: [{item, action, ts, scenario?, label?, context?}]} -> stored
                                  durably, the user's cached K/V extended
    GET  /v1/users/{user}/history the stored events, oldest first
    GET  /healthz                 liveness and what is served
    GET  /metrics                 Prometheus text: requests, latency histograms, cache and batch figures

Ids are the raw ids of the source data (strings, or integers read as their decimal string), with
surrounding whitespace stripped as prepare strips it. Unknown user: an empty history (dense id 0).
Unknown item: the out-of-vocabulary id 0, listed in the reply.

Features (a model trained on data with them; docs/data.md): ``context`` {ctx_*: text, num_*: number}
of the candidates (``candidate_context``: one object per candidate, over the shared one) and of each
event; ``user_features`` {user_*: text, or a list of texts for a bag} in place of the stored profile (the
checkpoint's) for this request. A value the train split did not hold is unknown (id 0), as in prepare; a
missing ctx_* is unknown, a missing num_* is filled by the data's --fill rule (422 without one); ctx_*
columns prepare derived from ts (--derive) are computed from the candidate's or event's ts. A feature
the model was not trained with is a 422 naming it.
Every request that touches the model or the store runs on one worker thread, in arrival order; with
dynamic batching, score requests that wait together run as one padded forward (``Engine.score_many``;
see ``Batcher``).
"""

import asyncio
import hashlib
import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import orjson
import polars as pl
import torch
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, StrictStr, StringConstraints

from climber.data.prepare import derived_columns
from climber.data.schema import DERIVABLE, DataError, check_epoch
from climber.serve.engine import Engine, RequestFeatures, UserCache, UserHistory
from climber.serve.store import Event, HistoryStore


class Rejected(Exception):
    """A request the service refuses: HTTP ``status`` (4xx) with a message saying what is wrong."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# Surrounding whitespace is stripped, as `climber data prepare` strips it from the ids of the source data
# (" 196" is user "196"); nothing left is refused, as prepare refuses an empty id. Pydantic refuses
# lone surrogates.
Text = Annotated[StrictStr, StringConstraints(strip_whitespace=True, min_length=1, max_length=256)]
RawId = Text | StrictInt  # a raw id of the source data; an integer means its decimal string


def _seconds(ts: int) -> int:
    """A request's ts, refused when it is after the year 3000 in seconds (milliseconds sent by mistake)."""
    try:
        check_epoch(ts, "s", f"ts {ts}", "send seconds since the epoch")
    except DataError as e:
        raise ValueError(str(e)) from None  # pydantic: a 422 naming the field
    return ts


Ts = Annotated[StrictInt, Field(ge=0), AfterValidator(_seconds)]
Context = dict[Text, Text | StrictInt | float]  # ctx_* -> its value, num_* -> a number


class EventIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    item: RawId
    action: RawId
    ts: Ts
    scenario: Text | None = Field(None, description="default: the data's only scenario")
    label: Literal[0, 1] | None = Field(None, description="default: the data's label rule applied to the action")
    context: Context | None = Field(None, description="the event's ctx_* and num_* values")


class HistoryEvent(BaseModel):
    item: str
    action: str
    scenario: str
    ts: int
    label: int
    context: dict


class ScoreReply(BaseModel):
    user: str
    known_user: bool
    history_length: int = Field(description="events the model reads for this user (after the engine's cut)")
    last_event_ts: int | None = Field(None, description="ts of the user's latest event the scores saw")
    scores: list[float] = Field(description="click probability per candidate, in request order")
    ranked: list[dict] = Field(description="[{item, score}] best first")
    unknown_items: list[str] = Field(description="candidates outside the model's vocabulary (scored as id 0)")


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    run: Text | None = Field(None, description="run dir to serve; default: the served one")


class EventsReply(BaseModel):
    user: str
    stored: int
    events_total: int
    unknown_items: list[str]


class Problem(BaseModel):
    detail: str = Field(description="what is wrong")


class FieldError(BaseModel):
    loc: list[str | int] = Field(description="where: body, path or query, then the field")
    msg: str
    type: str
    input: Any = Field(None, description="the offending value; longer than 100 characters of JSON: its start, "
                                         "as a string")
    ctx: dict | None = None


class Invalid(BaseModel):
    detail: str | list[FieldError] = Field(description="a message (a value the data does not know, or out of "
                                                       "order), or the errors of a request of the wrong shape")
    errors_not_listed: int | None = Field(None, description="validation errors beyond the 20 listed")


UNAUTHORIZED = {401: {"model": Problem, "description": "X-API-Key missing or wrong (when the service has a key)"}}
TOO_LARGE = {413: {"model": Problem, "description": "request body over the service's limit (--max-body-kb)"}}
INVALID = {422: {"model": Invalid, "description": "the request is malformed or names what the data does not know"}}
BUSY = {503: {"model": Problem, "description": "the queue is full (--max-queue): retry after Retry-After seconds"},
        504: {"model": Problem, "description": "not answered within --timeout-ms; nothing was done"}}
OUT_OF_ORDER = {409: {"model": Problem, "description": "an event older than the user's last stored one (or than "
                                                       "the event before it): nothing is stored"}}
OFFLINE_NOTE = ('<p style="font-family: sans-serif; margin: 1em">This page loads Swagger UI from cdn.jsdelivr.net. '
                'If it stays blank (no internet), the API is described by <a href="/openapi.json">/openapi.json</a> '
                "and in the README's \"Serving over HTTP\".</p>")


def request_models(max_candidates: int, max_events: int):
    """The request bodies, with the service's limits in their schema."""

    class ScoreRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        user: RawId
        candidates: list[RawId] = Field(min_length=1, max_length=max_candidates)
        scenario: Text | None = Field(None, description="default: the data's only scenario")
        ts: Ts | None = Field(None, description="request time in seconds; default: now (never before the "
                                                 "user's last event)")
        context: Context | None = Field(None, description="ctx_* / num_* values of every candidate")
        candidate_context: list[Context] | None = Field(None, description="one object per candidate, over "
                                                                         "`context`", max_length=max_candidates)
        user_features: dict[Text, Text | StrictInt | list[Text | StrictInt]] | None = Field(
            None, description="user_* values (a list for a bag) in place of the stored profile's")

    class EventsRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        user: RawId
        events: list[EventIn] = Field(min_length=1, max_length=max_events)

    return ScoreRequest, EventsRequest


def default_store_path(run_dir: Path, data_dir: Path) -> Path:
    """The history store without ``--store``: outside the run dir (a training artifact the service must
    not change), one per run and data (the store is seeded from the data):
    ``$XDG_STATE_HOME/climber/serve/<run dir name>-<hash of both paths>/history.sqlite``, where
    ``$XDG_STATE_HOME`` defaults to ``~/.local/state``."""
    state = os.environ.get("XDG_STATE_HOME", "")
    root = Path(state) if Path(state).is_absolute() else Path.home() / ".local" / "state"  # the XDG rule
    run_dir, data_dir = Path(run_dir).resolve(), Path(data_dir).resolve()
    key = hashlib.sha256(f"{run_dir}\n{data_dir}".encode()).hexdigest()[:12]
    return root / "climber" / "serve" / f"{run_dir.name}-{key}" / "history.sqlite"


@dataclass(frozen=True)
class Served:
    """What the service scores with: a run dir's model in its engine (with its own user caches)."""

    run_dir: Path
    model_name: str
    engine: Engine
    fingerprint: str  # sha256 of the served checkpoint file


def model_fingerprint(run_dir: Path) -> str:
    """sha256 of the run's best checkpoint (what ``load_run_model`` serves)."""
    h = hashlib.sha256()
    with open(Path(run_dir) / "checkpoints" / "best.safetensors", "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def vocab_digest(data_dir: Path) -> str:
    """sha256 over a prepared dir's vocabularies (every vocab/*.parquet's raw -> id pairs, by name)."""
    h = hashlib.sha256()
    for path in sorted((Path(data_dir) / "vocab").glob("*.parquet")):
        h.update(path.stem.encode() + b"\0")
        for raw, i in pl.read_parquet(path).select("raw", "id").iter_rows():
            h.update(f"{raw}\t{i}\n".encode())
    return h.hexdigest()


class Service:
    """The model of a run dir, the vocabularies and label rule of its data, the engine and the store
    (``store_path``, default :func:`default_store_path`)."""

    def __init__(self, run_dir: Path, data_dir: Path | None = None, store_path: Path | None = None,
                 cache_bytes: int = 256 * 2**20, log=print, device="cpu"):
        from climber.config import load_yaml
        from climber.data.prepare import load_manifest
        from climber.data.schema import LabelRule
        from climber.eval.evaluate import load_run_model

        run_dir = Path(run_dir)
        model, meta = load_run_model(run_dir, device=device)
        data_dir = Path(data_dir or load_yaml(run_dir / "config.yaml")["data"])
        if not (data_dir / "manifest.json").exists():
            raise DataError(f"{data_dir}: no prepared data (its vocabularies map raw ids); pass --data DIR")
        if not model.info.matches(data_dir):
            raise DataError(f"{data_dir}: its vocabularies differ from the ones {run_dir} was trained on")
        self.data_dir, self.cache_bytes, self.device = data_dir, cache_bytes, device
        self.served = self._served(run_dir, model, meta)
        info, manifest = model.info, load_manifest(data_dir)
        self.ctx_columns = [c for c, _ in info.ctx_features]
        self.user_columns = [c for c, *_ in (*info.user_features, *info.user_bags)]
        self.bag_columns = {c for c, *_ in info.user_bags}
        self.numeric = {c: manifest["numeric_features"][c] for c, *_ in info.numeric_features}  # mean, std, fill
        derived = manifest.get("derived") or {"columns": [], "tz": "UTC"}
        self.derived = {column: key for key, column in DERIVABLE.items() if column in derived["columns"]}
        self.tz = derived["tz"]
        self.vocab = {col: dict(pl.read_parquet(data_dir / "vocab" / f"{col}.parquet").select("raw", "id").iter_rows())
                      for col in ("user", "item", "action", "scenario", *self.ctx_columns, *self.user_columns)}
        rule = LabelRule.parse(manifest["label_rule"])
        actions = list(self.vocab["action"])
        self.action_label = (None if rule.kind == "given" else dict(zip(  # raw action -> its label
            actions, pl.DataFrame({"action": actions}).select(rule.expr())[:, 0].cast(pl.Int64).to_list())))
        self.store = HistoryStore(Path(store_path or default_store_path(run_dir, data_dir)))
        seeded = self.store.seed(self._raw_events(), source=str(data_dir))
        if seeded is not None:
            log(f"history store {self.store.path}: seeded with {seeded:,} events of {data_dir}")

    def install(self, served: "Served") -> None:
        """Serve ``served`` from the next request on (the caller runs this on the model thread, between
        requests; a request prepared by the previous engine is scored by it)."""
        self.served = served

    @property
    def engine(self) -> Engine:
        return self.served.engine

    @property
    def run_dir(self) -> Path:
        return self.served.run_dir

    @property
    def model_name(self) -> str:
        return self.served.model_name

    def _served(self, run_dir: Path, model, meta: dict) -> "Served":
        """A loaded run's model in an engine of its own (empty user caches)."""
        return Served(run_dir, meta["model"], Engine(model, max_cache_bytes=self.cache_bytes), model_fingerprint(run_dir))

    def load(self, run_dir: Path) -> "Served":
        """A run dir to serve in place of the current one, checked compatible with the service: the same
        model inputs (DataInfo) and, from the data it was trained on, the same vocabularies and label rule
        as the served data, so raw ids, the store's events and labels mean the same; Rejected (409)
        saying what differs otherwise. Its user caches start empty (filled as users are scored)."""
        from climber.config import load_yaml
        from climber.data.prepare import load_manifest
        from climber.eval.evaluate import load_run_model

        run_dir = Path(run_dir)
        try:
            model, meta = load_run_model(run_dir, device=self.device)
            trained_on = Path(load_yaml(run_dir / "config.yaml")["data"])
        except (OSError, ValueError, KeyError) as err:  # ConfigError and DataError are ValueErrors
            raise Rejected(409, f"reload {run_dir}: cannot load it: {err}") from None
        if model.info != self.engine.info:
            raise Rejected(409, f"reload {run_dir}: its model reads other inputs (vocabulary sizes or features) "
                                f"than the served one: {model.info.to_dict()}")
        if not (trained_on / "manifest.json").exists():
            raise Rejected(409, f"reload {run_dir}: its data {trained_on} is not there to check its vocabularies")
        if vocab_digest(trained_on) != vocab_digest(self.data_dir):
            raise Rejected(409, f"reload {run_dir}: its data {trained_on} maps raw ids differently from the "
                                f"served data {self.data_dir}")
        rules = load_manifest(trained_on)["label_rule"], load_manifest(self.data_dir)["label_rule"]
        if rules[0] != rules[1]:
            raise Rejected(409, f"reload {run_dir}: its label rule {rules[0]!r} is not the served {rules[1]!r}")
        return self._served(run_dir, model, meta)

    def _raw_events(self) -> pl.DataFrame:
        """The prepared data's events (every split) with raw ids, for the store's first start; their
        context (ctx_* text, num_* numbers; not the columns derived from ts) as a JSON object."""
        given = [c for c in self.ctx_columns if c not in self.derived]
        events = pl.read_parquet(self.data_dir / "events.parquet", columns=[
            "user", "item", "action", "scenario", "ts", "label", *given, *self.numeric])
        for col in ("user", "item", "action", "scenario", *given):
            raw = pl.DataFrame({col: list(self.vocab[col].values()), "raw": list(self.vocab[col])},
                               schema={col: events.schema[col], "raw": pl.String})
            events = events.join(raw, on=col, how="left", maintain_order="left").drop(col).rename({"raw": col})
        context = [*given, *self.numeric]
        as_json = pl.struct(context).struct.json_encode() if context else pl.lit("{}")
        return events.select("user", "item", "action", "scenario", pl.col("ts").cast(pl.Int64),
                             pl.col("label").cast(pl.Int64), as_json.alias("context"))

    def context_features(self, contexts: list[dict], ts: list[int], where: str) -> tuple:
        """Raw context objects of n events or candidates (and their ts) -> (ctx (n, F_ctx) value ids,
        num (n, F_num) numbers), the model's columns in its order (see the module docstring)."""
        allowed = [c for c in self.ctx_columns if c not in self.derived] + list(self.numeric)
        for i, context in enumerate(contexts):
            for name, value in context.items():
                if name in self.derived:
                    raise Rejected(422, f"{where}[{i}].context: {name} is derived from ts (time zone {self.tz}); "
                                        "leave it out")
                if name not in allowed:
                    raise Rejected(422, f"{where}[{i}].context: feature {name!r} is not one the model was trained "
                                        f"with (its context features: {', '.join(allowed) or 'none'})")
                if name in self.numeric and (isinstance(value, str) or not np.isfinite(value)):
                    raise Rejected(422, f"{where}[{i}].context: {name} must be a finite number, got {value!r}")
        derived = (pl.DataFrame({"ts": ts}, schema={"ts": pl.Int64}).select(derived_columns(self.derived.values(), self.tz))
                   if self.derived else None)
        ctx = np.zeros((len(contexts), len(self.ctx_columns)), dtype=np.int64)
        for f, col in enumerate(self.ctx_columns):
            raw = derived[col].to_list() if col in self.derived else [c.get(col) for c in contexts]
            ctx[:, f] = [0 if v is None else self.vocab[col].get(str(v).strip(), 0) for v in raw]
        num = np.zeros((len(contexts), len(self.numeric)), dtype=np.float32)
        for f, (col, stats) in enumerate(self.numeric.items()):
            fill = {"zero": 0.0, "mean": stats["mean"]}.get(stats["fill"])
            for i, context in enumerate(contexts):
                if context.get(col) is None and fill is None:
                    raise Rejected(422, f"{where}[{i}].context: {col} is required (the data was prepared without "
                                        "--fill, so the model never saw it missing)")
                num[i, f] = fill if context.get(col) is None else context[col]
        return ctx, num

    def user_features(self, given: dict) -> dict:
        """Raw user_* values of a request -> the engine's dense ids (a list for a bag; unknown values 0)."""
        unknown = sorted(set(given) - set(self.user_columns))
        if unknown:
            raise Rejected(422, f"user_features: {unknown} not among the features the model was trained with "
                                f"({', '.join(self.user_columns) or 'none'})")
        out = {}
        for name, value in given.items():
            values = value if isinstance(value, list) else [value]
            if name not in self.bag_columns and len(values) != 1:
                raise Rejected(422, f"user_features.{name}: one value expected (it is not a bag)")
            ids = [self.vocab[name].get(str(v).strip(), 0) for v in values]
            out[name] = ids if name in self.bag_columns else ids[0]
        return out

    def scenario_id(self, scenario: str | None, where: str) -> tuple[str, int]:
        known = self.vocab["scenario"]
        if scenario is None:
            if len(known) != 1:
                raise Rejected(422, f"{where}: scenario is required (the data has several: {sorted(known)})")
            scenario = next(iter(known))
        if scenario not in known:
            raise Rejected(422, f"{where}: unknown scenario {scenario!r}; known: {sorted(known)[:20]}")
        return scenario, known[scenario]

    def dense_history(self, user_id: int, events: list[Event], context: tuple | None = None) -> UserHistory:
        """Raw events -> the engine's dense ids (unknown items: 0) and features (``context``: their
        ``context_features`` when already mapped)."""
        ids = lambda col: [self.vocab[col].get(getattr(e, col), 0) for e in events]  # noqa: E731
        ts = [e.ts for e in events]
        ctx, num = context or self.context_features([e.context for e in events], ts, "events")
        return UserHistory(user_id, ids("item"), ids("action"), ids("scenario"), ts, [e.label for e in events],
                           ctx, num)

    def cache(self, user: str, engine: Engine) -> tuple[UserCache, bool]:
        """The user's cache in ``engine`` (from its LRU, else encoded from the store) and whether the model
        knows the user."""
        cache = engine.store.get(user)
        if cache is None:
            events = self.store.history(user)
            cache = engine.encode_user(self.dense_history(self.vocab["user"].get(user, 0), events))
            engine.store.put(cache, key=user)
        return cache, user in self.vocab["user"]

    def prepare_score(self, user: str, candidates: list[str], scenario: str | None, ts: int | None,
                      context: dict | None = None, candidate_context: list[dict] | None = None,
                      user_features: dict | None = None):
        """-> the engine that scores it, the engine request (cache, item ids, scenario ids, ts, features)
        and the reply's facts."""
        engine = self.engine
        _, scenario_id = self.scenario_id(scenario, "score")
        if candidate_context is not None and len(candidate_context) != len(candidates):
            raise Rejected(422, f"candidate_context: {len(candidate_context)} objects for {len(candidates)} "
                                "candidates (one each)")
        cache, known = self.cache(user, engine)
        if ts is not None and ts < cache.last_ts:
            raise Rejected(422, f"score: ts {ts} is before the user's last event (ts {cache.last_ts})")
        when = max(cache.last_ts, int(time.time())) if ts is None else ts
        items = np.array([self.vocab["item"].get(c, 0) for c in candidates], dtype=np.int64)
        C = len(candidates)
        contexts = [{**(context or {}), **(candidate_context[i] if candidate_context else {})} for i in range(C)]
        ctx, num = self.context_features(contexts, [when] * C, "candidates")
        features = RequestFeatures(ctx, num, self.user_features(user_features or {}))
        request = (cache, items, np.full(C, scenario_id), np.full(C, when), features)
        return engine, request, {"user": user, "known_user": known, "history_length": len(cache.history),
                                 "last_event_ts": cache.last_ts or None,
                                 "unknown_items": [c for c, i in zip(candidates, items) if i == 0]}

    def add_events(self, user: str, events: list) -> dict:
        """Validate every event first (nothing is stored from a rejected request), store them durably,
        then extend the user's cache when it is held."""
        rows = []
        for i, e in enumerate(events):
            action = str(e.action)
            if action not in self.vocab["action"]:
                raise Rejected(422, f"events[{i}].action: unknown action {action!r}; known: "
                                    f"{sorted(self.vocab['action'])[:20]}")
            scenario, _ = self.scenario_id(e.scenario, f"events[{i}]")
            if e.label is None and self.action_label is None:
                raise Rejected(422, f"events[{i}].label: required (the data's label rule is 'label')")
            label = e.label if e.label is not None else self.action_label[action]
            rows.append(Event(str(e.item), action, scenario, e.ts, label, e.context or {}))
        context = self.context_features([r.context for r in rows], [r.ts for r in rows], "events")  # 422 before storing
        try:
            total = self.store.append(user, rows)
        except DataError as err:
            raise Rejected(409, str(err)) from None
        cache = self.engine.store.pop(user)
        if cache is not None:
            self.engine.store.put(self.engine.append(cache, self.dense_history(cache.user, rows, context)), key=user)
        return {"user": user, "stored": len(rows), "events_total": total,
                "unknown_items": sorted({r.item for r in rows if r.item not in self.vocab["item"]})}


class Metrics:
    """The service's Prometheus metrics (``prometheus_client``), in a registry of their own."""

    def __init__(self, service: "Service | None" = None):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        self.latency = Histogram("climber_request_seconds", "request latency by route and status",
                                 ["route", "status"], registry=r, buckets=LATENCY_BUCKETS)
        self.batch = Histogram("climber_score_batch_requests", "score requests per batched forward", registry=r,
                               buckets=BATCH_BUCKETS)
        self.queue = Gauge("climber_queue_depth", "requests admitted to the model thread, not yet answered",
                           registry=r)
        self.shed = Counter("climber_shed", "requests answered 503 at once: the queue was full (--max-queue)",
                            registry=r)
        self.expired = Counter("climber_expired", "requests answered 504: past their deadline (--timeout-ms) "
                               "before their work started, which was dropped", registry=r)
        self.events = Counter("climber_events_stored", "events stored (acknowledged)", registry=r)
        self.reloads = Counter("climber_reloads", "model reloads by result", ["result"], registry=r)
        if service is not None:
            caches = lambda: service.engine.store  # noqa: E731  (the user caches of the engine served now)
            for name, doc, read in (("climber_cache_hit_rate", "user cache hit rate", lambda: caches().hit_rate),
                                    ("climber_cache_users", "users in the K/V cache", lambda: len(caches())),
                                    ("climber_cache_bytes", "bytes of the K/V cache", lambda: caches().nbytes)):
                Gauge(name, doc, registry=r).set_function(read)
            self.model = Gauge("climber_model_info", "the served model (1)", ["run", "fingerprint"], registry=r)
            self.model.labels(str(service.run_dir), service.served.fingerprint).set(1)

    def observe(self, path: str, status: int, seconds: float) -> None:
        route = path if path in ROUTES else "/v1/users/{user}/history" if path.startswith("/v1/users/") else "other"
        self.latency.labels(route, str(status)).observe(seconds)

    def served(self, service: "Service") -> None:
        """The model info gauge after a reload: only the served model's labels."""
        self.model.clear()
        self.model.labels(str(service.run_dir), service.served.fingerprint).set(1)

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
ROUTES = ("/v1/score", "/v1/events", "/healthz", "/metrics", "/v1/admin/reload")


EXPIRED = object()  # what dropped work returns: its request's deadline passed before it started


class Ticket:
    """One piece of a request's work: it runs only if claimed before its deadline and before the request
    gave up on it (``drop``); once claimed, it runs to the end (events once being stored are stored)."""

    def __init__(self, deadline: float | None):
        self.deadline = deadline  # time.monotonic() seconds; None: no deadline
        self._lock = threading.Lock()
        self._state = "waiting"  # -> "started" | "dropped"

    def claim(self) -> bool:
        """True: the work may run (and now will); False: it was dropped or is past its deadline."""
        with self._lock:
            if self._state == "waiting" and (self.deadline is None or time.monotonic() < self.deadline):
                self._state = "started"
            elif self._state == "waiting":
                self._state = "dropped"
            return self._state == "started"

    def drop(self) -> bool:
        """True: the work had not started and now never will; False: it has started."""
        with self._lock:
            if self._state == "waiting":
                self._state = "dropped"
            return self._state == "dropped"


class Work:
    """The model thread: every piece of work that touches the model or the store runs on it, in arrival
    order. At most ``max_queue`` requests are admitted at once (the next gets 503 with Retry-After at
    once); each admitted request has ``timeout_s`` to be answered, after which it is answered 504 if its
    work has not started (the work is dropped)."""

    def __init__(self, max_queue: int, timeout_s: float | None, metrics: Metrics):
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="climber-model")
        self.max_queue, self.timeout_s, self.metrics = max_queue, timeout_s, metrics
        self.depth = 0
        metrics.queue.set_function(lambda: self.depth)  # read when scraped, not set twice a request

    @contextmanager
    def admitted(self, arrived: float | None = None):
        """One request's stay: 503 when the queue is full; yields its deadline (None: no timeout), counted
        from ``arrived`` (time.monotonic() when the app received it; default: now)."""
        if self.depth >= self.max_queue:
            self.metrics.shed.inc()
            raise Rejected(503, f"the service is at its queue limit ({self.max_queue} requests); retry shortly")
        self.depth += 1
        try:
            yield None if self.timeout_s is None else (arrived or time.monotonic()) + self.timeout_s
        finally:
            self.depth -= 1

    async def run(self, fn, *args, deadline: float | None = None):
        """``fn(*args)`` on the model thread; 504 (and ``fn`` never runs) when the deadline passes first."""
        ticket = Ticket(deadline)

        def job():
            return fn(*args) if ticket.claim() else EXPIRED

        return await self.wait(asyncio.get_running_loop().run_in_executor(self.executor, job), ticket)

    async def wait(self, future, ticket: Ticket):
        """The result of ``future`` (whose work ``ticket`` guards): 504 when the deadline passes before its
        work started; once started, its result even past the deadline."""
        try:
            if ticket.deadline is None:
                result = await future
            else:
                result = await asyncio.wait_for(asyncio.shield(future), max(0.0, ticket.deadline - time.monotonic()))
        except TimeoutError:
            if not ticket.drop():
                return await future  # started: its result, late
            result = EXPIRED
        if result is EXPIRED:
            self.metrics.expired.inc()
            raise Rejected(504, f"not answered within the deadline ({self.timeout_s * 1000:g} ms); its work was "
                                "dropped")
        return result


class Batcher:
    """Score requests run as one ``Engine.score_many`` on the model thread when they wait together: a
    batch takes whatever is queued, then waits (up to ``window_s`` after its first request, at most
    ``max_batch``) only while more score requests are in flight (``pending``: received, not yet
    answered), so a lone request never waits. A request past its deadline when its batch starts on the
    model thread is left out (504); requests prepared by different engines (a reload in between) run
    as one call per engine."""

    def __init__(self, run, window_s: float, max_batch: int, metrics: Metrics):
        self.run, self.window_s, self.max_batch, self.metrics = run, window_s, max_batch, metrics
        self.queue: asyncio.Queue = asyncio.Queue()
        self.pending = 0  # the score endpoint counts its requests in and out

    @contextmanager
    def counted(self):
        """One score request in flight, from its arrival to its answer (``pending``)."""
        self.pending += 1
        try:
            yield
        finally:
            self.pending -= 1

    def score(self, engine, request, ticket: Ticket | None = None) -> asyncio.Future:
        """(engine, request) -> a future of its logits; ``ticket``: its deadline guard."""
        done = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((engine, request, done, ticket or Ticket(None)))
        return done

    async def serve_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            waiting = [await self.queue.get()]
            deadline = loop.time() + self.window_s
            while len(waiting) < self.max_batch:
                if not self.queue.empty():
                    waiting.append(self.queue.get_nowait())
                    continue
                left = deadline - loop.time()
                if left <= 0 or len(waiting) >= self.pending:  # nobody else is on the way
                    break
                try:
                    waiting.append(await asyncio.wait_for(self.queue.get(), left))
                except TimeoutError:
                    break
            await self._run(waiting)

    async def _run(self, waiting: list) -> None:
        for engine in dict.fromkeys(w[0] for w in waiting):  # one call per engine, in arrival order
            group = [w for w in waiting if w[0] is engine]

            def job(group=group, engine=engine):  # on the model thread: a request past its deadline now is left out
                live = [w for w in group if w[3].claim()]
                return live, engine.score_many([w[1] for w in live]) if live else []

            try:
                live, results = await self.run(job)
            except Exception as err:  # every request of the call fails with it, the loop goes on
                live, results = group, [err] * len(group)
            if live:
                self.metrics.batch.observe(len(live))
            outcome = {id(w[2]): out for w, out in zip(live, results)}
            for _, _, done, _ in group:
                if not done.done():
                    out = outcome.get(id(done), EXPIRED)
                    done.set_exception(out) if isinstance(out, Exception) else done.set_result(out)


class Observe:
    """ASGI middleware: stamps each request's arrival (``request.state.arrived``, time.monotonic(): a
    deadline counts from it, body validation included) and records its latency by route and status
    when the reply's last byte is sent. Plain ASGI: Starlette's ``@app.middleware("http")`` ran every
    request through an extra task and memory stream, which took 15% of the event loop under load."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        scope.setdefault("state", {})["arrived"] = time.monotonic()
        status = 500

        async def observed(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                self.metrics.observe(scope["path"], status, time.perf_counter() - start)

        try:
            await self.app(scope, receive, observed)
        except Exception:  # answered 500 by the server-error middleware outside this one
            self.metrics.observe(scope["path"], 500, time.perf_counter() - start)
            raise


class BodyLimit:
    """ASGI middleware: 413 for a request body over ``max_bytes``, before anything parses it: at once by
    its Content-Length, else (a chunked upload) as soon as the bytes read pass the limit. The body is
    read whole (at most ``max_bytes``) and then handed on."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_bytes:
            return await self._reject(send)
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":  # the client left: nobody to answer
                return
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                return await self._reject(send)
            more = message.get("more_body", False)
        unread = [{"type": "http.request", "body": bytes(body), "more_body": False}]

        async def replay():
            return unread.pop() if unread else await receive()

        await self.app(scope, replay, send)

    async def _reject(self, send):
        response = JSONResponse({"detail": f"request body over the limit of {self.max_bytes} bytes"}, status_code=413)
        await response({"type": "http"}, None, send)


MAX_ERRORS = 20  # validation errors listed in a 422 reply; the rest are counted
MAX_ECHO = 100  # characters of the offending value a validation error echoes


def _short(value):
    """A validation error's echo of the request: ``value``, or the start of its JSON text when that is
    longer than MAX_ECHO characters (a 100,000-candidate body must not come back whole)."""
    text = json.dumps(value, ensure_ascii=True, default=str)
    return value if len(text) <= MAX_ECHO else f"{text[:MAX_ECHO]}... ({len(text):,} characters)"


def create_app(service: Service, api_key: str | None = None, max_candidates: int = 1000, max_events: int = 1000,
               batch_window_ms: float | None = 2.0, max_batch: int = 32, max_body_bytes: int = 2**20,
               max_queue: int = 256, timeout_ms: float | None = 2000.0) -> FastAPI:
    """The FastAPI app. batch_window_ms None: no dynamic batching (one forward per request); timeout_ms
    None: no deadline."""
    metrics = Metrics(service)
    work = Work(max_queue, None if timeout_ms is None else timeout_ms / 1000, metrics)
    batcher = None if batch_window_ms is None else Batcher(work.run, batch_window_ms / 1000, max_batch, metrics)
    reloading = asyncio.Lock()

    async def reload(run_dir: Path) -> dict:
        """Load ``run_dir`` beside the served model (requests go on meanwhile), then swap on the model thread."""
        async with reloading:
            try:
                served = await asyncio.get_running_loop().run_in_executor(None, service.load, run_dir)
            except Rejected:
                metrics.reloads.labels("refused").inc()
                raise
            await work.run(service.install, served)
            metrics.served(service)
            metrics.reloads.labels("done").inc()
            return {"run": str(served.run_dir), "model": served.model_name, "fingerprint": served.fingerprint}

    @asynccontextmanager
    async def lifespan(app):
        loop = asyncio.get_running_loop()
        task = None if batcher is None else asyncio.create_task(batcher.serve_forever())
        hangups = []  # SIGHUP: reload the served run dir (its checkpoint may be newer)

        def on_hangup():
            hangups.append(asyncio.create_task(reload(service.run_dir)))
            hangups[-1].add_done_callback(lambda t: t.cancelled() or t.exception())  # a refusal is in /metrics

        if threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGHUP"):
            loop.add_signal_handler(signal.SIGHUP, on_hangup)
        yield
        # uvicorn has stopped accepting and answered every request in flight (SIGTERM, SIGINT)
        if task is not None:
            task.cancel()
        work.executor.shutdown(wait=True)
        service.store.close()

    app = FastAPI(title="climber scoring service", version="1", lifespan=lifespan,
                  description=__doc__.split("\n\n")[0], docs_url=None, redoc_url=None)
    ScoreRequest, EventsRequest = request_models(max_candidates, max_events)

    async def authorized(request: Request):
        if api_key is not None and request.headers.get("x-api-key") != api_key:
            raise HTTPException(401, "missing or wrong X-API-Key header")

    guards = [Depends(authorized)]
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)

    app.add_middleware(Observe, metrics=metrics)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError):
        errors = err.errors()
        content = {"detail": [{**e, "input": _short(e["input"])} if "input" in e else e for e in errors[:MAX_ERRORS]]}
        if len(errors) > MAX_ERRORS:
            content["errors_not_listed"] = len(errors) - MAX_ERRORS
        # ASCII-escaped: the echoed input may hold lone surrogates, which UTF-8 cannot encode
        body = json.dumps(jsonable_encoder(content), ensure_ascii=True, default=str)
        return Response(body, status_code=422, media_type="application/json")

    @app.exception_handler(Rejected)
    async def rejected(request: Request, err: Rejected):
        headers = {"Retry-After": "1"} if err.status == 503 else None
        return JSONResponse({"detail": str(err)}, status_code=err.status, headers=headers)

    @app.post("/v1/score", response_model=ScoreReply, dependencies=guards,
              responses={**UNAUTHORIZED, **TOO_LARGE, **INVALID, **BUSY})
    async def score(body: ScoreRequest, http: Request):
        """Click probabilities of the candidates for the user, after the user's stored history, in request
        order, and the candidates ranked best first. An unknown user scores from an empty history; unknown
        items score as the out-of-vocabulary item and are listed in `unknown_items`."""
        candidates = [str(c) for c in body.candidates]
        features = (body.scenario, body.ts, body.context, body.candidate_context, body.user_features)
        with work.admitted(http.state.arrived) as deadline, batcher.counted() if batcher else nullcontext():
            engine, request, reply = await work.run(service.prepare_score, str(body.user), candidates, *features,
                                                    deadline=deadline)
            if batcher is None:
                logits = (await work.run(engine.score_many, [request], deadline=deadline))[0]
                metrics.batch.observe(1)
            else:
                ticket = Ticket(deadline)
                logits = await work.wait(batcher.score(engine, request, ticket), ticket)
        if not bool(torch.isfinite(logits).all()):
            raise RuntimeError("the model gave a non-finite score")  # a 500: JSON cannot carry it
        scores = torch.sigmoid(logits.double()).tolist()
        order = sorted(range(len(scores)), key=lambda i: -scores[i])
        # a Response as is: FastAPI's re-validation of the reply against ScoreReply (which still documents
        # it) took longer than the model on 64 candidates; orjson: the json module's encoding of the 128
        # floats was the event loop's largest cost at 64 clients
        return Response(orjson.dumps({**reply, "scores": scores,
                                      "ranked": [{"item": candidates[i], "score": scores[i]} for i in order]}),
                        media_type="application/json")

    @app.post("/v1/events", response_model=EventsReply, dependencies=guards,
              responses={**UNAUTHORIZED, **OUT_OF_ORDER, **TOO_LARGE, **INVALID, **BUSY})
    async def events(body: EventsRequest, http: Request):
        """Store the user's new events (in time order, none before the user's last) durably, all or none,
        and extend the user's cached history. A label left out comes from the data's label rule. A 2xx
        means stored, a 504 not stored; a score request sent after the 2xx sees them."""
        with work.admitted(http.state.arrived) as deadline:
            reply = await work.run(service.add_events, str(body.user), body.events, deadline=deadline)
        metrics.events.inc(reply["stored"])
        return reply

    @app.get("/v1/users/{user}/history", response_model=list[HistoryEvent], dependencies=guards,
             responses={**UNAUTHORIZED, **INVALID})
    async def history(user: Text, limit: Annotated[int | None, Query(ge=1, le=100_000)] = None):
        """The user's stored events, oldest first (the most recent `limit` when given); [] for an unknown
        user."""
        events = await asyncio.get_running_loop().run_in_executor(None, service.store.history, user, limit)
        return [e.__dict__ for e in events]

    @app.post("/v1/admin/reload", dependencies=guards, responses={
        **UNAUTHORIZED, 403: {"model": Problem, "description": "the service has no API key, so no admin endpoint"},
        409: {"model": Problem, "description": "the run cannot be served in place of this one: why"}})
    async def admin_reload(body: ReloadRequest | None = None):
        """Serve another run dir (default: the served one again, e.g. after training went on in it) without
        a restart: it is loaded beside the served model, checked compatible (same model inputs, and its
        data's vocabularies and label rule), then swapped in between two requests; user caches refill as
        users are scored. Requests meanwhile are answered by the old or the new model. SIGHUP does the
        same for the served run dir."""
        if api_key is None:
            raise Rejected(403, "the admin endpoint needs an API key: start the service with $CLIMBER_API_KEY set "
                                "(or send SIGHUP to reload the served run dir)")
        return await reload(Path(body.run) if body and body.run else service.run_dir)

    @app.get("/healthz")
    async def healthz():
        """Liveness, and what is served: the model, its run dir and checkpoint fingerprint (sha256), whether
        it caches K/V, batching on or off, the queue. Needs no API key."""
        return {"status": "ok", "model": service.model_name, "run": str(service.run_dir),
                "fingerprint": service.served.fingerprint, "kv_cache": service.engine.caches_kv,
                "dynamic_batching": batcher is not None, "threads": torch.get_num_threads(), "queue_depth": work.depth,
                "max_queue": work.max_queue}

    # response_class Response (no media type): the 401's schema stays JSON, the 200 is declared as text
    @app.get("/metrics", response_class=Response, dependencies=guards,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}, **UNAUTHORIZED})
    async def prometheus():
        """Prometheus text (prometheus_client): latency histograms by route and status, score batch sizes,
        queue depth, shed (503) and expired (504) requests, events stored, the K/V cache's hit rate, users
        and bytes, reloads and the served model."""
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.text(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/docs", include_in_schema=False)
    async def docs():
        page = get_swagger_ui_html(openapi_url=app.openapi_url, title=f"{app.title}: Swagger UI")
        return HTMLResponse(page.body.decode().replace("<body>", f"<body>\n{OFFLINE_NOTE}", 1))

    return app


def serve(app: FastAPI, host: str, port: int, log_level: str = "warning") -> None:
    """Run ``app`` with uvicorn until SIGTERM or SIGINT: it stops accepting, answers every request in
    flight, runs the app's shutdown (the model thread drains, the store closes) and returns, so the
    process exits 0. (uvicorn alone re-raises the signal after its graceful shutdown, which makes the
    exit status that of a killed process.)"""
    import uvicorn

    class Server(uvicorn.Server):
        @contextmanager
        def capture_signals(self):
            with super().capture_signals():
                yield
                self._captured_signals.clear()  # handled: nothing to re-raise

    Server(uvicorn.Config(app, host=host, port=port, log_level=log_level)).run()
