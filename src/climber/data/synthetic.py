"""Synthetic multi-behaviour, multi-scenario interaction logs whose true click probability is known.

Generative process (one user at a time in distribution, vectorised over a chunk of users):

- item i: topic ``topic[i]`` uniform over K topics (written as the item side feature ``item_topic``),
  quality ``q[i] ~ N(0, 0.5)``;
- user u: exposure preference ``pi_u ~ Dirichlet(0.3)``, event count uniform in [E/2, 3E/2],
  scenario mix ``~ Dirichlet(1, 1, 1)`` over home / search / radio;
- event t: scenario from the user's mix, topic k from ``0.8 pi_u + 0.2 uniform`` (restricted to
  topics that hold items), item uniform within topic k, ts strictly increasing;
- ``r = (pos[u,k] + 1) / (seen[u,k] + 2)`` over all earlier events of u (long range),
  ``m = 1`` if one of u's last 3 events was a positive in topic k (short range),
  ``logit = beta[s] * (4 (r - 0.5) + 1.5 m - 0.5) + q[i]``, ``p_true = sigmoid(logit)``,
  ``label ~ Bernoulli(p_true)``; action ``skip`` (label 0), else ``like`` (prob 0.3) or ``play``.

``p_true`` depends only on the user's past and fixed item / scenario parameters. Under the protocol a
model scoring val (test) candidates sees only the events before the split and the candidate itself: not
the labels of the split's earlier events, which move ``r`` and ``m``, and not the split's other events
either (candidates never see each other). The attainable optimum is therefore
``p_bayes = E[p_true | events before the split, the candidate, its index in the split]``, which the
generator estimates by simulating the split's earlier events forward from the state at the split: their
scenario, topic and item drawn afresh from the user's own mix, their labels from the generator's
dynamics. (Knowing the index is a little more than a model knows, so this is an upper bound of the
attainable.) ``p_bayes_split_items`` also knows the items and scenarios of the split's earlier events
(simulating only their labels): a model that saw the other candidates could approach it. On train
events, and on the first event of each split, all three equal ``p_true``. The manifest records the
AUC / GAUC / LogLoss of ``p_bayes`` on val and test under ``bayes`` (the ceiling of any model under the
protocol), of ``p_bayes_split_items`` under ``bayes_split_items`` and of ``p_true`` under ``oracle`` (it
knows the split's labels: not attainable).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from climber.data import readers
from climber.data.prepare import prepare, staging_dir
from climber.data.schema import DataError, LabelRule, RawSource
from climber.data.split import split_sizes
from climber.eval import metrics

GENERATOR_VERSION = 3
DEFAULTS = {"users": 2000, "events_per_user": 100, "items": 1000, "topics": 20, "seed": 0}  # quickstart size

SCENARIOS = ("home", "search", "radio")
BETA = (1.0, 2.5, 0.4)  # per scenario: how sharply interest decides a click
ACTIONS = ("skip", "play", "like")
LIKE_PROB = 0.3  # P(like | label 1); otherwise play
QUALITY_STD = 0.5
EXPOSURE_CONCENTRATION = 0.3  # Dirichlet parameter of a user's topic exposure
EXPLORATION = 0.2  # weight of the uniform part of the topic mixture
WINDOW = 3  # short-range memory: the last WINDOW events
TS_START = 1_600_000_000
TS_OFFSET_MAX = 365 * 86_400  # per-user start offset, seconds
GAP_MEAN = 3600.0  # mean of the exponential part of the gap between events, seconds
CHUNK_USERS = 20_000  # users generated and written at once
BAYES_SIMULATIONS = 512  # label paths per user to estimate p_bayes
BAYES_CHUNK_USERS = 1_000  # users simulated at once (memory: simulations x users x topics)

RAW_SCHEMA = pa.schema(
    [(c, pa.string()) for c in ("user", "item", "ts", "action", "scenario", "label", "item_topic")]
    + [(c, pa.float64()) for c in ("p_true", "p_bayes", "p_bayes_split_items")]
)


def item_params(items: int, topics: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The generator's item table: topic (items,) int64 in [0, topics) and quality (items,) float64."""
    rng = np.random.default_rng([seed, 0])
    topic = rng.integers(0, topics, size=items)
    quality = rng.normal(0.0, QUALITY_STD, size=items)
    return topic, quality


def logit_of(scenario: np.ndarray, r: np.ndarray, m: np.ndarray, quality: np.ndarray) -> np.ndarray:
    """True logit from scenario ids, topic positive rate r, short-range flag m (0/1) and item quality."""
    return np.asarray(BETA)[scenario] * (4.0 * (r - 0.5) + 1.5 * m - 0.5) + quality


def _event_counts(rng: np.random.Generator, users: int, events_per_user: int) -> np.ndarray:
    lo = max(2, round(events_per_user / 2))
    hi = max(lo, round(3 * events_per_user / 2))
    return rng.integers(lo, hi + 1, size=users)


def _cumulative(probs: np.ndarray) -> np.ndarray:
    """CDF along the last axis whose last entry is exactly 1, so ``(cdf < u).sum(-1)`` is in range for u in [0, 1)."""
    cdf = np.cumsum(probs, axis=-1)
    return cdf / cdf[..., -1:]


def _sample(cdf: np.ndarray, u: np.ndarray) -> np.ndarray:
    """One category per row of ``cdf`` (n, C) for uniforms ``u`` (..., n): (..., n)."""
    return (cdf < u[..., None]).sum(axis=-1)


class _Mix:
    """What a chunk's n users draw their events from: a scenario mix and a topic exposure per user,
    an item uniform within its topic."""

    def __init__(self, scenario_probs: np.ndarray, exposure: np.ndarray, topic: np.ndarray):
        self.count = np.bincount(topic, minlength=exposure.shape[1])  # items of each topic
        self.start = np.concatenate([[0], np.cumsum(self.count)[:-1]])  # topic k: items_by_topic[start[k]:][:count[k]]
        self.items_by_topic = np.argsort(topic, kind="stable")
        self.nonempty = np.flatnonzero(self.count > 0)  # topics that hold items
        self.scenario_cdf = _cumulative(scenario_probs)  # (n, 3)
        self.topic_cdf = _cumulative(exposure[:, self.nonempty])  # (n, K'): resampling away from empty topics

    def draw(self, rng: np.random.Generator, shape, users=slice(None)) -> tuple[np.ndarray, np.ndarray]:
        """Scenario ids and items, ``shape`` = (..., n') for the n' mix users ``users``."""
        s = _sample(self.scenario_cdf[users], rng.random(shape))
        k = self.nonempty[_sample(self.topic_cdf[users], rng.random(shape))]
        return s, self.items_by_topic[self.start[k] + rng.integers(0, self.count[k])]


def _chunk(rng: np.random.Generator, sim_rng: np.random.Generator, n_events: np.ndarray, topic: np.ndarray,
           quality: np.ndarray, topics: int):
    """Events of one chunk of users as (n, T) arrays, T = max events; entries past a user's count unused.
    ``rng`` draws the events, ``sim_rng`` the simulated paths behind ``p_bayes_split_items`` and ``p_bayes``."""
    n, T = len(n_events), int(n_events.max())
    n_val, n_test = split_sizes(n_events)
    split_start = {"val": n_events - n_test - n_val, "test": n_events - n_test}  # first event index of each split
    split_len = {"val": n_val, "test": n_test}
    # the state (seen, pos, recent) of each user just before its first val / test event
    snapshot = {name: (np.zeros((n, topics), np.int32), np.zeros((n, topics), np.int32),
                       np.full((n, WINDOW), -1, np.int64)) for name in split_start}
    rows = np.arange(n)
    pi = rng.dirichlet(np.full(topics, EXPOSURE_CONCENTRATION), size=n)  # (n, K)
    exposure = (1 - EXPLORATION) * pi + EXPLORATION / topics
    mix = _Mix(rng.dirichlet(np.ones(len(SCENARIOS)), size=n), exposure, topic)
    ts0 = TS_START + rng.integers(0, TS_OFFSET_MAX, size=n)

    seen = np.zeros((n, topics), dtype=np.int32)
    pos = np.zeros((n, topics), dtype=np.int32)
    recent = np.full((n, WINDOW), -1, dtype=np.int64)  # topic of each of the last WINDOW events if positive, else -1

    out_scenario = np.empty((n, T), dtype=np.int8)
    out_item = np.empty((n, T), dtype=np.int64)
    out_gap = np.empty((n, T), dtype=np.int64)
    out_label = np.empty((n, T), dtype=np.int8)
    out_action = np.empty((n, T), dtype=np.int8)
    out_p = np.empty((n, T), dtype=np.float64)
    for t in range(T):
        for name, first in split_start.items():
            at = np.flatnonzero((first == t) & (split_len[name] > 0))
            for saved, state in zip(snapshot[name], (seen, pos, recent)):
                saved[at] = state[at]
        s, item = mix.draw(rng, n)  # (n,) each
        k = topic[item]
        gap = 1 + np.floor(rng.exponential(GAP_MEAN, size=n)).astype(np.int64)  # seconds

        r = (pos[rows, k] + 1) / (seen[rows, k] + 2)
        m = (recent == k[:, None]).any(axis=1).astype(np.float64)
        p = 1.0 / (1.0 + np.exp(-logit_of(s, r, m, quality[item])))
        label = rng.random(n) < p
        like = label & (rng.random(n) < LIKE_PROB)

        seen[rows, k] += 1
        pos[rows, k] += label
        recent[:, t % WINDOW] = np.where(label, k, -1)

        out_scenario[:, t], out_item[:, t], out_gap[:, t] = s, item, gap
        out_label[:, t], out_p[:, t] = label, p
        out_action[:, t] = np.where(like, 2, label.astype(np.int8))  # index into ACTIONS
    out_ts = ts0[:, None] + np.cumsum(out_gap, axis=1)
    out_bayes, out_bayes_items = out_p.copy(), out_p.copy()
    for out, earlier in ((out_bayes_items, None), (out_bayes, mix)):
        for name, first in split_start.items():
            idx = first[:, None] + np.arange(int(split_len[name].max(initial=0)))  # (n, J)
            valid = idx < (first + split_len[name])[:, None]
            idx = np.minimum(idx, T - 1)
            split_items, split_scenarios = np.take_along_axis(out_item, idx, 1), np.take_along_axis(out_scenario, idx, 1)
            rows_, cols = np.nonzero(valid)
            expected = _expected_p(sim_rng, snapshot[name], first, split_items, split_scenarios, topic, quality, earlier)
            out[rows_, idx[rows_, cols]] = expected[rows_, cols]
    return out_scenario, out_item, out_ts, out_label, out_action, out_p, out_bayes, out_bayes_items


def _expected_p(rng: np.random.Generator, state, first: np.ndarray, item: np.ndarray, scenario: np.ndarray,
                topic: np.ndarray, quality: np.ndarray, earlier: _Mix | None) -> np.ndarray:
    """E[p_true] of each of a split's events given the events before the split and the event itself: the
    mean over BAYES_SIMULATIONS paths of the split's earlier events, whose labels are drawn from the
    generator's own dynamics. ``state`` = (seen, pos, recent) at the split; ``first`` (n,) the index of the
    split's first event; item / scenario (n, J) the split's events in order; ``topic`` / ``quality`` the
    item table. ``earlier`` None: the earlier events are the actual ones (only their labels are unknown);
    a mix: they are drawn afresh from it (the event does not see the others). Returns (n, J)."""
    n, J = item.shape
    out = np.empty((n, J))
    for lo in range(0, n, BAYES_CHUNK_USERS):
        part = slice(lo, min(lo + BAYES_CHUNK_USERS, n))
        size = part.stop - part.start  # n'
        rows = np.arange(size)[None]  # (1, n')
        paths = np.arange(BAYES_SIMULATIONS)[:, None]  # (S, 1)
        seen, pos, recent = (np.repeat(a[part][None], BAYES_SIMULATIONS, axis=0) for a in state)  # (S, n', .)

        def p_of(s, i):  # p_true of events (scenario s, item i), (S, n') or broadcastable, in the current state
            k = topic[i]
            r = (pos[paths, rows, k] + 1) / (seen[paths, rows, k] + 2)  # (S, n')
            m = (recent == k[..., None]).any(axis=2).astype(np.float64)
            return 1.0 / (1.0 + np.exp(-logit_of(s, r, m, quality[i])))

        for j in range(J):
            s, i = scenario[part, j][None], item[part, j][None]  # (1, n')
            out[part, j] = p_of(s, i).mean(axis=0)
            if earlier is not None:  # the next event as seen from a later one: unknown, drawn from the mix
                s, i = earlier.draw(rng, (BAYES_SIMULATIONS, size), part)
            label = rng.random((BAYES_SIMULATIONS, size)) < p_of(s, i)
            k = np.broadcast_to(topic[i], label.shape)
            seen[paths, rows, k] += 1
            pos[paths, rows, k] += label
            recent[:, rows[0], (first[part] + j) % WINDOW] = np.where(label, k, -1)
    return out


def _write_raw(path: Path, *, users: int, events_per_user: int, items: int, topics: int, seed: int, log) -> int:
    """Stream the raw log to ``path`` (Parquet, RAW_SCHEMA), CHUNK_USERS users at a time. Returns the row count."""
    topic, quality = item_params(items, topics, seed)
    n_events = _event_counts(np.random.default_rng([seed, 1]), users, events_per_user)
    item_names = pa.array([f"i{i}" for i in range(items)])
    topic_names = pa.array([f"t{k}" for k in range(topics)])
    scenario_names, action_names, label_names = pa.array(SCENARIOS), pa.array(ACTIONS), pa.array(["0", "1"])
    total, t0 = 0, time.time()
    with pq.ParquetWriter(path, RAW_SCHEMA) as writer:
        for first in range(0, users, CHUNK_USERS):
            ids = np.arange(first, min(first + CHUNK_USERS, users))
            rng, sim_rng = np.random.default_rng([seed, 2, first]), np.random.default_rng([seed, 3, first])
            counts = n_events[ids]
            scenario, item, ts, label, action, p, p_bayes, p_bayes_items = _chunk(
                rng, sim_rng, counts, topic, quality, topics)
            keep = np.arange(scenario.shape[1])[None, :] < counts[:, None]  # (n, T), row-major = user-contiguous
            user_names = pa.array([f"u{u}" for u in ids])
            table = pa.table(
                {
                    "user": user_names.take(np.repeat(np.arange(len(ids)), counts)),
                    "item": item_names.take(item[keep]),
                    "ts": pc.cast(pa.array(ts[keep]), pa.string()),
                    "action": action_names.take(action[keep]),
                    "scenario": scenario_names.take(scenario[keep]),
                    "label": label_names.take(label[keep]),
                    "item_topic": topic_names.take(topic[item[keep]]),
                    "p_true": p[keep],
                    "p_bayes": p_bayes[keep],
                    "p_bayes_split_items": p_bayes_items[keep],
                },
                schema=RAW_SCHEMA,
            )
            writer.write_table(table)
            total += table.num_rows
            elapsed = time.time() - t0
            log(f"  synth users {ids[-1] + 1:,}/{users:,}: {total:,} events, {total / max(elapsed, 1e-9):,.0f} events/s")
    return total


def ceiling_text(figures: dict) -> str:
    """One line for a split's ``bayes`` figures (the manifest's), as the CLI and compare print them."""
    return (f"Bayes-optimal (attainable under the protocol): AUC {figures['auc']:.4f}  GAUC {figures['gauc']:.4f}  "
            f"LogLoss {figures['logloss']:.4f}")


def _bayes(prepared: Path, column: str = "p_bayes") -> dict:
    """AUC / GAUC / LogLoss of ``column`` against the label, per evaluation split."""
    events = (
        pl.scan_parquet(prepared / "events.parquet")
        .filter(pl.col("split").is_in(["val", "test"]))
        .select("user", "split", "label", column)
        .collect()
    )
    out = {}
    for split in ("val", "test"):
        part = events.filter(pl.col("split") == split)
        users, y, p = part["user"].to_numpy(), part["label"].to_numpy(), part[column].to_numpy()
        out[split] = {
            "auc": metrics.auc(y, p),
            "gauc": metrics.gauc(users, y, p),
            "logloss": metrics.logloss(y, p),
            "candidates": int(len(y)),
        }
    return out


def synthesize(
    out: Path,
    *,
    users: int = DEFAULTS["users"],
    events_per_user: int = DEFAULTS["events_per_user"],
    items: int = DEFAULTS["items"],
    topics: int = DEFAULTS["topics"],
    seed: int = DEFAULTS["seed"],
    force: bool = False,
    log=print,
) -> dict:
    """Generate a synthetic log and prepare it into ``out``. Returns the manifest (with ``bayes`` figures)."""
    out = Path(out)
    for name, value in (("users", users), ("events_per_user", events_per_user), ("items", items), ("topics", topics)):
        if value < 1:
            raise DataError(f"synthetic data: {name} must be at least 1, got {value}")
    if out.exists() and not force:
        raise DataError(f"{out}: already exists (use --force to replace it)")
    generator = {
        "version": GENERATOR_VERSION,
        "seed": seed,
        "users": users,
        "events_per_user": events_per_user,
        "items": items,
        "topics": topics,
        "scenarios": list(SCENARIOS),
        "beta": dict(zip(SCENARIOS, BETA)),
        "like_prob": LIKE_PROB,
        "quality_std": QUALITY_STD,
        "exposure_concentration": EXPOSURE_CONCENTRATION,
        "exploration": EXPLORATION,
        "window": WINDOW,
        "gap_mean_s": GAP_MEAN,
        "chunk_users": CHUNK_USERS,
        "bayes_simulations": BAYES_SIMULATIONS,
    }
    log(f"synthesizing {users:,} users x ~{events_per_user} events (seed {seed}) -> {out}")

    def source(raw: Path) -> RawSource:
        return RawSource(name="synthetic", frame=readers.scan_table(raw, columns={c: c for c in RAW_SCHEMA.names}),
                         label_rule=LabelRule.parse("label"), actions=ACTIONS,
                         numeric_columns=("p_true", "p_bayes", "p_bayes_split_items"), files=(raw,))

    return prepare_generated(
        out, lambda raw: _write_raw(raw, users=users, events_per_user=events_per_user, items=items, topics=topics,
                                    seed=seed, log=log),
        source, lambda tmp: {"bayes": _bayes(tmp), "bayes_split_items": _bayes(tmp, "p_bayes_split_items"),
                             "oracle": _bayes(tmp, "p_true"), "generator": generator}, force, log)


def prepare_generated(out: Path, write_raw, source, extra, force: bool, log) -> dict:
    """Write a generated raw log with ``write_raw(path)`` into a hidden folder beside ``out``, prepare
    ``source(path)`` into ``out`` with the manifest entries ``extra(prepared tmp dir)``, and remove the
    raw log whatever happens."""
    raw_dir = staging_dir(out)
    try:
        raw = raw_dir / "events.parquet"
        write_raw(raw)
        return prepare(source(raw), out, force=force, log=log, extra=extra)
    finally:
        shutil.rmtree(raw_dir, ignore_errors=True)
