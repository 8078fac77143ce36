"""Synthetic generator v4 (``climber data synth --kind lifelong``): lifelong music-streaming histories
whose true probability of the main label is known. Design: docs/benchmarks/lifelong.md.

Generative process (vectorised over a chunk of users; times in seconds):

- catalogue: G genres (24), A artists (~2,000) each in one genre (uniform, every genre at least one),
  I tracks each by one artist (every artist at least one). Artist popularity Zipf (exponent 1.0) over a
  random artist ranking; a track's popularity within its artist Zipf (1.0) over its rank there. Quality
  ``q[i] = N(0, 0.4) per track + N(0, 0.3) per artist``. Side features ``item_genre``, ``item_artist``.
- user u: history length lognormal (median M = 1,000, sigma 0.8) clipped to [M/5, 6M] (= [200, 6,000]
  at the default); long-term genre interest ``theta_u ~ Dirichlet(0.3)``; FAVOURITES favourite artists,
  each from a genre drawn from theta_u, by popularity within it; scenario mix ``Dirichlet(1, 1, 1)``
  over search / radio / daily_mix.
- drift: interest ``softmax(log theta_u + x_t)`` mixed with EXPLORATION uniform, ``x`` an
  Ornstein-Uhlenbeck walk per genre (time scale 90 days, stationary sd DRIFT_SD) updated at session
  starts; at each session start, with prob NEW_FAVOURITE, one favourite is replaced by a new artist.
- sessions: a new session starts with prob ``1/L_u`` at each event, ``L_u = n_u / SESSIONS_PER_YEAR``
  (a history spans about a year); gap before a session lognormal (median 20 h, sigma 1), within a
  session ``1 + Exp(180 s)`` (about 3 minutes). Each session has a mood genre drawn from the current
  interest and a seed artist drawn by popularity within the mood genre.
- event: scenario from the user's mix (per event). ``search``: with prob FAVOURITE_PICK a favourite
  artist, else genre from current interest and artist by popularity in it; ``radio``: with prob
  SEED_PICK the session's seed artist, else an artist by popularity in the mood genre; ``daily_mix``:
  the search or the radio rule, half and half. Track by popularity within the artist. Exposure does not
  depend on outcomes.
- utility of event t (state before t): ``U = AFFINITY_SCALE * (b_lt[s] * L + b_art[s] * R + b_sess[s] * S) + q[i]``
  (AFFINITY_SCALE 0.5) with
  ``L`` the long-term affinity: recency-weighted (half-life 60 days) average of the weights of u's
  earlier outcomes in i's genre, ``sum w e / (sum e + PRIOR_WEIGHT)`` with ``e = 2^(-age / 60 days)``
  (PRIOR_WEIGHT 1: an empty history averages to 0), weights skip -1, play 0.3, full_play 1, like 3,
  share 4; ``R`` the same over u's earlier events with i's artist; ``S`` the mean weight of the last
  (up to) 5 earlier events of the current session (0 at a session start). Betas (lt, artist, session):
  search (2.5, 2.5, 0.5), radio (0.5, 0.5, 2.5), daily_mix (1.5, 1.5, 1.5).
- outcome: ordered logit, ``U + Logistic(0, 1)`` against THRESHOLDS (play, full_play, like, share):
  ``P(outcome >= k) = sigmoid(U - c_k)``. Main label: full_play, like or share, so
  ``p_true = sigmoid(U - c_full_play)``. The affinities feed back into later outcomes, so the scale and
  the thresholds were set together (docs/benchmarks/lifelong.md, notes): at 200 users, median 1,000 events,
  45% labels, 5% likes, 2% shares, 31% skips.

Ceiling (as v3, ``climber.data.synthetic``): ``p_bayes = E[p_true | events before the split, the
candidate, its index in the split]``, estimated with BAYES_SIMULATIONS forward paths from the state at
the split: the split's earlier events get scenario, item and outcome drawn afresh. The paths keep the
user's latent context of the split (timeline and session boundaries, interest, favourites, mood, seed
artist, scenario mix), which a model only estimates, so like v3's index this is a little more than a
model knows: an upper bound of the attainable. Manifest: ``bayes`` (p_bayes), ``oracle`` (p_true).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from climber.data import readers
from climber.data.schema import DataError, LabelRule, RawSource
from climber.data.split import split_sizes
from climber.data.synthetic import TS_START, _bayes, _cumulative, _sample, prepare_generated

GENERATOR_VERSION = 4
DEFAULTS = {"users": 2000, "median_events": 1000, "items": 20_000, "artists": 2000, "genres": 24, "seed": 0}

SCENARIOS = ("search", "radio", "daily_mix")
OUTCOMES = ("skip", "play", "full_play", "like", "share")  # ordered; the action column
OUTCOME_WEIGHT = np.array([-1.0, 0.3, 1.0, 3.0, 4.0])  # per outcome, in the affinities
LABEL_FROM = 2  # outcome index >= LABEL_FROM: main label (full_play, like, share)
THRESHOLDS = np.array([-0.5, 0.8, 4.0, 6.3])  # c_play, c_full_play, c_like, c_share on the utility
BETA = np.array([[2.5, 2.5, 0.5],  # search: long-term, artist, session
                 [0.5, 0.5, 2.5],  # radio
                 [1.5, 1.5, 1.5]])  # daily_mix
LENGTH_SIGMA = 0.8  # lognormal sigma of history lengths
LENGTH_CLIP = (0.2, 6.0)  # clip bounds as multiples of the median: [200, 6000] at 1,000
INTEREST_CONCENTRATION = 0.3  # Dirichlet parameter of long-term genre interest
EXPLORATION = 0.05  # uniform weight in the current interest
DRIFT_TAU = 90 * 86_400.0  # s, time scale of the mean-reverting interest walk
DRIFT_SD = 1.0  # stationary sd of the walk, in log-interest units
FAVOURITES = 6  # favourite artist slots per user
NEW_FAVOURITE = 0.02  # prob per session that one favourite is replaced
FAVOURITE_PICK = 0.3  # search: prob the artist is a favourite
SEED_PICK = 0.5  # radio: prob the artist is the session's seed artist
ARTIST_QUALITY_STD, TRACK_QUALITY_STD = 0.3, 0.4
ZIPF = 1.0
SESSION_GAP_MEDIAN, SESSION_GAP_SIGMA = 20 * 3600.0, 1.0  # s, lognormal gap before a session
EVENT_GAP_MEAN = 180.0  # s, exponential part of the gap within a session
SESSIONS_PER_YEAR = 365 * 86_400 / (SESSION_GAP_MEDIAN * np.exp(SESSION_GAP_SIGMA ** 2 / 2))  # ~265
HALF_LIFE = 60 * 86_400.0  # s, recency weighting of the affinities
DECAY = np.log(2) / HALF_LIFE  # 1/s
PRIOR_WEIGHT = 1.0  # pseudo-weight at 0 in every affinity average
AFFINITY_SCALE = 0.5  # affinities (mean outcome weights, in [-1, 4]) enter the utility at half their value
SESSION_WINDOW = 5  # session state: the last 5 events of the session
TS_OFFSET_MAX = 365 * 86_400
CHUNK_USERS = 500  # users generated and written at once (memory: users x artists x 4 floats, twice)
BAYES_SIMULATIONS = 256  # forward paths per user for p_bayes
BAYES_CHUNK_USERS = 32  # users simulated at once (memory: paths x users x artists x 2 floats, 260 MB)
BAYES_BLOCK_STEPS = 64  # steps whose exposure is drawn at once (memory: steps x paths x users x genres bools, 13 MB;
# steps x paths x users int64s, 4 MB, a few)

RAW_SCHEMA = pa.schema(
    [(c, pa.string()) for c in ("user", "item", "ts", "action", "scenario", "item_genre", "item_artist")]
    + [(c, pa.float64()) for c in ("p_true", "p_bayes")]
)
LABEL_RULE = "action in " + ",".join(OUTCOMES[LABEL_FROM:])


class _Grouped:
    """Draw a member of a group by popularity: groups 0..g-1, each member in one group.
    ``draw(group, u)`` for uniforms u in [0, 1): member ids, same shape. Walker's alias method within each
    group (O(1) a draw): ``u * size`` picks a slot of the group, its fraction accepts the slot's member
    or the slot's alias."""

    def __init__(self, group_of: np.ndarray, weight: np.ndarray):
        self.order = np.argsort(group_of, kind="stable")  # members sorted by group; slots index this
        g, w = group_of[self.order], weight[self.order]
        self.size = np.bincount(g)  # members per group
        self.first = np.cumsum(self.size) - self.size  # the group's first slot
        scaled = (w * self.size[g] / np.bincount(g, weights=w)[g]).tolist()  # mean 1 within each group
        self.accept, self.alias = np.ones(len(g)), np.arange(len(g))
        for lo, n in zip(self.first.tolist(), self.size.tolist()):  # Vose's construction, one group
            small = [k for k in range(lo, lo + n) if scaled[k] < 1.0]
            large = [k for k in range(lo, lo + n) if scaled[k] >= 1.0]
            while small and large:
                k, big = small.pop(), large.pop()
                self.accept[k], self.alias[k] = scaled[k], big
                scaled[big] -= 1.0 - scaled[k]
                (small if scaled[big] < 1.0 else large).append(big)
            # what is left has weight 1 up to rounding: accept 1 (alias itself)

    def draw(self, group: np.ndarray, u: np.ndarray) -> np.ndarray:
        x = u * self.size[group]
        k = np.minimum(x.astype(np.int64), self.size[group] - 1)  # slot within the group
        slot = self.first[group] + k
        return self.order[np.where(x - k < self.accept[slot], slot, self.alias[slot])]


@dataclass
class Catalogue:
    """The item table: genre_of_artist (A,), artist (I,) of each track, quality (I,), samplers."""

    genre_of_artist: np.ndarray
    artist: np.ndarray
    quality: np.ndarray
    artists_by_genre: _Grouped  # draw(genre, u) -> artist
    tracks_by_artist: _Grouped  # draw(artist, u) -> track

    @cached_property
    def genre(self) -> np.ndarray:  # (I,) genre of each track
        return self.genre_of_artist[self.artist]


def catalogue(items: int, artists: int, genres: int, seed: int) -> Catalogue:
    rng = np.random.default_rng([seed, 4, 0])
    genre_of_artist = np.concatenate([np.arange(genres), rng.integers(0, genres, artists - genres)])
    artist = np.concatenate([np.arange(artists), rng.integers(0, artists, items - artists)])
    artist_pop = 1.0 / (1 + rng.permutation(artists)) ** ZIPF  # Zipf over a random artist ranking
    # a track's rank within its artist: tracks of an artist in random order
    order = rng.permutation(items)
    order = order[np.argsort(artist[order], kind="stable")]
    first = np.searchsorted(artist[order], artist[order])
    rank = np.empty(items, np.int64)
    rank[order] = np.arange(items) - first
    track_pop = 1.0 / (1 + rank) ** ZIPF
    quality = rng.normal(0, TRACK_QUALITY_STD, items) + rng.normal(0, ARTIST_QUALITY_STD, artists)[artist]
    return Catalogue(genre_of_artist, artist, quality, _Grouped(genre_of_artist, artist_pop),
                     _Grouped(artist, track_pop))


def history_lengths(rng: np.random.Generator, users: int, median: int) -> np.ndarray:
    lo, hi = max(2, round(LENGTH_CLIP[0] * median)), max(2, round(LENGTH_CLIP[1] * median))
    return np.clip(np.round(median * np.exp(rng.normal(0, LENGTH_SIGMA, users))), lo, hi).astype(np.int64)


def _draw_items(rng, cat: Catalogue, shape, scenario_cdf, interest, favourite, mood, seed_artist):
    """Scenario ids and tracks of events of shape (..., n) for n users whose context at the event is
    scenario_cdf (n, 3), interest (..., n, G) probabilities, favourite (..., n, F) artists, mood (..., n)
    genre and seed_artist (..., n), the context's leading axes broadcasting against ``shape``'s.
    Independent of outcomes."""
    s = _sample(scenario_cdf, rng.random(shape))  # shape
    radio = (s == 1) | ((s == 2) & (rng.random(shape) < 0.5))
    # the artist: radio keeps the session's seed artist with prob SEED_PICK, else draws one in the mood
    # genre; search keeps a favourite with prob FAVOURITE_PICK, else draws one in a genre of the interest
    slot = rng.integers(0, favourite.shape[-1], shape)
    fav = np.take_along_axis(np.broadcast_to(favourite, shape + favourite.shape[-1:]), slot[..., None], -1)[..., 0]
    kept = rng.random(shape) < np.where(radio, SEED_PICK, FAVOURITE_PICK)
    artist = np.where(radio, seed_artist, fav)  # shape
    genre = np.where(~kept & ~radio, _sample(_cumulative(interest), rng.random(shape)), mood)  # shape
    drawn = ~kept
    artist[drawn] = cat.artists_by_genre.draw(genre[drawn], rng.random(int(drawn.sum())))
    return s, cat.tracks_by_artist.draw(artist, rng.random(shape))


class State:
    """What p_true depends on, for users of leading shape B ((n,) or (paths, n)): recency-weighted sums
    per genre (B, G) and artist (B, A), kept as ``sum w e^(DECAY (t - t0))`` and ``sum e^(...)`` with
    t0 the user's first time stamp; the current session's last SESSION_WINDOW outcome weights (B, 5)."""

    def __init__(self, t0: np.ndarray, genres: int, artists: int, lead: tuple | None = None):
        lead = t0.shape if lead is None else lead
        self.t0 = np.broadcast_to(t0, lead)
        self.g_num, self.g_den = np.zeros(lead + (genres,)), np.zeros(lead + (genres,))
        self.a_num, self.a_den = np.zeros(lead + (artists,)), np.zeros(lead + (artists,))
        self.ring, self.count = np.zeros(lead + (SESSION_WINDOW,)), np.zeros(lead, np.int64)

    def take(self, rows, paths: int | None = None) -> "State":
        """The users ``rows`` (a copy); with ``paths``, repeated to shape (paths, len(rows))."""
        new = State.__new__(State)
        for name in ("t0", "g_num", "g_den", "a_num", "a_den", "ring", "count"):
            a = np.asarray(getattr(self, name))[rows]
            setattr(new, name, a.copy() if paths is None else np.repeat(a[None], paths, axis=0))
        return new

    def put(self, rows, other: "State") -> None:
        for name in ("g_num", "g_den", "a_num", "a_den", "ring", "count"):
            getattr(self, name)[rows] = getattr(other, name)

    def utility(self, ts, start, scenario, item, cat: Catalogue) -> np.ndarray:
        """True utility of events (shape B) at time ts, start True where the event opens a session."""
        e = np.exp(DECAY * (ts - self.t0)) * PRIOR_WEIGHT  # the prior's weight in the same units
        g, a = cat.genre[item], cat.artist[item]
        lt = _at(self.g_num, g) / (_at(self.g_den, g) + e)
        art = _at(self.a_num, a) / (_at(self.a_den, a) + e)
        sess = np.where(start, 0.0, self.ring.sum(-1) / np.maximum(np.minimum(self.count, SESSION_WINDOW), 1))
        b = BETA[scenario]  # (B, 3)
        return AFFINITY_SCALE * (b[..., 0] * lt + b[..., 1] * art + b[..., 2] * sess) + cat.quality[item]

    def update(self, ts, start, item, outcome, cat: Catalogue) -> None:
        """Add events (shape B) with their outcomes."""
        w, e = OUTCOME_WEIGHT[outcome], np.exp(DECAY * (ts - self.t0))
        g, a = cat.genre[item], cat.artist[item]
        for num, den, k in ((self.g_num, self.g_den, g), (self.a_num, self.a_den, a)):
            _add(num, k, w * e)
            _add(den, k, e)
        self.ring[start] = 0.0
        self.count[start] = 0
        self.ring.reshape(-1)[_flat(self.ring, self.count % SESSION_WINDOW)] = w
        self.count += 1


def _flat(a, k):  # flat indices of a[..., k] per leading index, a contiguous (B, C), k (B,)
    return np.arange(k.size).reshape(k.shape) * a.shape[-1] + k


def _at(a, k):  # a[..., k] per leading index: (B, C), (B,) -> (B,)
    return a.reshape(-1)[_flat(a, k)]


def _add(a, k, v):  # a[..., k] += v per leading index (one index per row, so no repeats)
    a.reshape(-1)[_flat(a, k)] += v


def p_label(u: np.ndarray) -> np.ndarray:
    """P(main label) = P(outcome >= full_play) for utilities u."""
    return 1.0 / (1.0 + np.exp(THRESHOLDS[LABEL_FROM - 1] - u))


def draw_outcome(rng, u: np.ndarray) -> np.ndarray:
    """Ordered-logit outcome index (into OUTCOMES) for utilities u."""
    z = u + rng.logistic(size=u.shape)
    return np.searchsorted(THRESHOLDS, z)  # how many thresholds lie below z


def utilities(ts, start, scenario, item, outcome, t0, cat: Catalogue, genres: int, artists: int) -> np.ndarray:
    """Utilities (n, T) of given histories (n, T arrays) with given outcomes: each from the events before it."""
    state, out = State(np.asarray(t0, np.float64), genres, artists), np.empty(item.shape)
    for t in range(item.shape[1]):
        out[:, t] = state.utility(ts[:, t], start[:, t], scenario[:, t], item[:, t], cat)
        state.update(ts[:, t], start[:, t], item[:, t], outcome[:, t], cat)
    return out


def _context(rng, cat: Catalogue, n_events: np.ndarray, genres: int, record_from: np.ndarray):
    """Timeline, scenarios and tracks of a chunk's events (n, T), and each user's context at events
    t >= record_from (n,) (interest (n, R, G), favourites (n, R, F), mood and seed (n, R))."""
    n, T = len(n_events), int(n_events.max())
    R = int((n_events - record_from).max())
    theta = rng.dirichlet(np.full(genres, INTEREST_CONCENTRATION), size=n)  # (n, G)
    log_theta = np.log(np.maximum(theta, 1e-12))
    x = rng.normal(0, DRIFT_SD, (n, genres))  # the walk, stationary start
    scenario_cdf = _cumulative(rng.dirichlet(np.ones(len(SCENARIOS)), size=n))
    fav = cat.artists_by_genre.draw(_sample(_cumulative(theta), rng.random((FAVOURITES, n))).T,
                                    rng.random((n, FAVOURITES)))  # (n, F)
    p_start = np.minimum(1.0, SESSIONS_PER_YEAR / n_events)  # (n,)
    start = rng.random((n, T)) < p_start[:, None]
    start[:, 0] = True
    gap = np.where(start, np.exp(np.log(SESSION_GAP_MEDIAN) + rng.normal(0, SESSION_GAP_SIGMA, (n, T))),
                   rng.exponential(EVENT_GAP_MEAN, (n, T)))
    ts = TS_START + rng.integers(0, TS_OFFSET_MAX, n)[:, None] + np.cumsum(1 + np.floor(gap).astype(np.int64), 1)
    scenario, item = np.empty((n, T), np.int64), np.empty((n, T), np.int64)
    rec = {"interest": np.zeros((n, R, genres)), "favourite": np.zeros((n, R, FAVOURITES), np.int64),
           "mood": np.zeros((n, R), np.int64), "seed": np.zeros((n, R), np.int64)}
    mood, seed, last_start = np.zeros(n, np.int64), np.zeros(n, np.int64), ts[:, 0].astype(np.float64)
    for t in range(T):
        new = np.flatnonzero(start[:, t])  # users opening a session: walk, favourites, mood, seed
        if len(new):
            a = np.exp(-(ts[new, t] - last_start[new]) / DRIFT_TAU)[:, None]
            x[new] = a * x[new] + DRIFT_SD * np.sqrt(1 - a ** 2) * rng.normal(size=(len(new), genres))
            last_start[new] = ts[new, t]
            swap = new[rng.random(len(new)) < NEW_FAVOURITE]
        interest = np.exp(log_theta + x)
        interest = (1 - EXPLORATION) * interest / interest.sum(1, keepdims=True) + EXPLORATION / genres
        if len(new):
            cdf = _cumulative(interest[new])
            mood[new] = _sample(cdf, rng.random(len(new)))
            seed[new] = cat.artists_by_genre.draw(mood[new], rng.random(len(new)))
            if len(swap):
                g = _sample(_cumulative(interest[swap]), rng.random(len(swap)))
                fav[swap, rng.integers(0, FAVOURITES, len(swap))] = cat.artists_by_genre.draw(g, rng.random(len(swap)))
        scenario[:, t], item[:, t] = _draw_items(rng, cat, (n,), scenario_cdf, interest, fav, mood, seed)
        r = np.flatnonzero((t >= record_from) & (t < n_events))
        j = t - record_from[r]
        rec["interest"][r, j], rec["favourite"][r, j] = interest[r], fav[r]
        rec["mood"][r, j], rec["seed"][r, j] = mood[r], seed[r]
    return ts, start, scenario, item, scenario_cdf, rec


def _chunk(rng, sim_rng, cat: Catalogue, n_events: np.ndarray, genres: int) -> dict:
    """Events of one chunk of users as (n, T) arrays (entries past a user's count unused), with p_true,
    p_bayes, and what the ceiling's test needs (context, the state at each split)."""
    n, T = len(n_events), int(n_events.max())
    artists = len(cat.genre_of_artist)
    n_val, n_test = split_sizes(n_events)
    first = {"val": n_events - n_test - n_val, "test": n_events - n_test}
    length = {"val": n_val, "test": n_test}
    ts, start, scenario, item, scenario_cdf, rec = _context(rng, cat, n_events, genres, first["val"])
    state = State(ts[:, 0].astype(np.float64) - 1, genres, artists)
    snapshot = {name: State(state.t0.copy(), genres, artists) for name in first}
    outcome, p = np.zeros((n, T), np.int64), np.empty((n, T))
    tsf = ts.astype(np.float64)
    for t in range(T):
        for name, f in first.items():
            at = np.flatnonzero((f == t) & (length[name] > 0))
            if len(at):
                snapshot[name].put(at, state.take(at))
        u = state.utility(tsf[:, t], start[:, t], scenario[:, t], item[:, t], cat)
        p[:, t], outcome[:, t] = p_label(u), draw_outcome(rng, u)
        state.update(tsf[:, t], start[:, t], item[:, t], outcome[:, t], cat)
    p_bayes = p.copy()
    for name, f in first.items():
        J = int(length[name].max(initial=0))
        if J == 0:
            continue
        idx = np.minimum(f[:, None] + np.arange(J), n_events[:, None] - 1)  # (n, J), past a user's split: its last
        ctx = {k: np.take_along_axis(v, np.minimum(idx - first["val"][:, None], v.shape[1] - 1).reshape(
            (n, J) + (1,) * (v.ndim - 2)), 1) for k, v in rec.items()}
        got = expected_p(sim_rng, cat, snapshot[name], tsf, start, scenario, item, idx, length[name],
                         scenario_cdf, ctx)
        valid = np.arange(J)[None] < length[name][:, None]
        r, c = np.nonzero(valid)
        p_bayes[r, idx[r, c]] = got[r, c]
    return {"ts": ts, "start": start, "scenario": scenario, "item": item, "outcome": outcome, "p_true": p,
            "p_bayes": p_bayes, "first": first, "length": length, "snapshot": snapshot,
            "scenario_cdf": scenario_cdf, "context": rec}


def expected_p(rng, cat: Catalogue, state: State, ts, start, scenario, item, idx, length, scenario_cdf,
               ctx) -> np.ndarray:
    """E[p_true] of each split event (n, J) given the state at the split ``state`` (n users) and the event:
    the mean over BAYES_SIMULATIONS paths in which the split's earlier events get scenario and track
    drawn afresh from the user's context at them (``ctx``: interest (n, J, G), favourite (n, J, F), mood,
    seed (n, J)) and outcome from the dynamics. ``idx`` (n, J): the split events' indices into the (n, T)
    arrays ts (float s), start, scenario, item; ``length`` (n,): the split's length per user (entries past
    it are NaN). Exposure does not depend on outcomes, so a block of steps' scenarios and tracks are drawn
    at once for all paths."""
    n, J = idx.shape
    S, out = BAYES_SIMULATIONS, np.full((n, J), np.nan)
    take = lambda a: np.take_along_axis(a, idx, 1)  # noqa: E731 - (n, T) -> (n, J)
    ts, start, scenario, item = take(ts), take(start), take(scenario), take(item)
    by_length = np.argsort(-length, kind="stable")  # users simulated together end about together
    for lo in range(0, n, BAYES_CHUNK_USERS):
        part = np.sort(by_length[lo: lo + BAYES_CHUNK_USERS])  # n' users
        steps = int(length[part].max())
        paths = state.take(part, S)  # leading shape (S, n')
        shape = (S, len(part))
        for j in range(steps):
            tj, sj = np.broadcast_to(ts[part, j], shape), np.broadcast_to(start[part, j], shape)
            out[part, j] = p_label(paths.utility(tj, sj, np.broadcast_to(scenario[part, j], shape),
                                                 np.broadcast_to(item[part, j], shape), cat)).mean(0)
            if j == steps - 1:
                break
            k = j % BAYES_BLOCK_STEPS
            if k == 0:  # draw steps j .. j + K - 1 (K <= BAYES_BLOCK_STEPS, the last one simulated: steps - 2)
                block = slice(j, min(j + BAYES_BLOCK_STEPS, steps - 1))
                at = {c: np.moveaxis(v[part, block], 1, 0)[:, None] for c, v in ctx.items()}  # (K, 1, n', ...)
                s_block, i_block = _draw_items(rng, cat, (block.stop - j,) + shape, scenario_cdf[part],
                                               at["interest"], at["favourite"], at["mood"], at["seed"])  # (K, S, n')
            s, i = s_block[k], i_block[k]  # (S, n')
            paths.update(tj, sj, i, draw_outcome(rng, paths.utility(tj, sj, s, i, cat)), cat)
    return out


def _check(users, median_events, items, artists, genres) -> None:
    for name, value, least in (("users", users, 1), ("median_events", median_events, 10), ("genres", genres, 1)):
        if value < least:
            raise DataError(f"lifelong data: {name} must be at least {least}, got {value}")
    if artists < genres:
        raise DataError(f"lifelong data: artists ({artists}) must be at least genres ({genres}): each genre needs one")
    if items < artists:
        raise DataError(f"lifelong data: items ({items}) must be at least artists ({artists}): each artist needs a track")


def _write_raw(path: Path, *, users, median_events, items, artists, genres, seed, log) -> int:
    cat = catalogue(items, artists, genres, seed)
    n_events = history_lengths(np.random.default_rng([seed, 4, 1]), users, median_events)
    names = {"item": pa.array([f"i{i}" for i in range(items)]), "genre": pa.array([f"g{g}" for g in range(genres)]),
             "artist": pa.array([f"a{a}" for a in range(artists)])}
    total, t0 = 0, time.time()
    with pq.ParquetWriter(path, RAW_SCHEMA) as writer:
        for lo in range(0, users, CHUNK_USERS):
            ids = np.arange(lo, min(lo + CHUNK_USERS, users))
            counts = n_events[ids]
            c = _chunk(np.random.default_rng([seed, 4, 2, lo]), np.random.default_rng([seed, 4, 3, lo]), cat,
                       counts, genres)
            keep = np.arange(c["item"].shape[1])[None] < counts[:, None]  # (n, T), row-major = user-contiguous
            item = c["item"][keep]
            table = pa.table({
                "user": pa.array([f"u{u}" for u in ids]).take(np.repeat(np.arange(len(ids)), counts)),
                "item": names["item"].take(item),
                "ts": pc.cast(pa.array(c["ts"][keep]), pa.string()),
                "action": pa.array(OUTCOMES).take(c["outcome"][keep]),
                "scenario": pa.array(SCENARIOS).take(c["scenario"][keep]),
                "item_genre": names["genre"].take(cat.genre[item]),
                "item_artist": names["artist"].take(cat.artist[item]),
                "p_true": c["p_true"][keep],
                "p_bayes": c["p_bayes"][keep],
            }, schema=RAW_SCHEMA)
            writer.write_table(table)
            total += table.num_rows
            log(f"  synth users {ids[-1] + 1:,}/{users:,}: {total:,} events, "
                f"{total / max(time.time() - t0, 1e-9):,.0f} events/s")
    return total


def synthesize_lifelong(out: Path, *, users: int = DEFAULTS["users"], median_events: int = DEFAULTS["median_events"],
                        items: int = DEFAULTS["items"], artists: int = DEFAULTS["artists"],
                        genres: int = DEFAULTS["genres"], seed: int = DEFAULTS["seed"], force: bool = False,
                        log=print) -> dict:
    """Generate a lifelong log and prepare it into ``out``. Returns the manifest (with ``bayes``)."""
    out = Path(out)
    _check(users, median_events, items, artists, genres)
    if out.exists() and not force:
        raise DataError(f"{out}: already exists (use --force to replace it)")
    generator = {
        "version": GENERATOR_VERSION, "kind": "lifelong", "seed": seed, "users": users,
        "median_events": median_events, "items": items, "artists": artists, "genres": genres,
        "length_sigma": LENGTH_SIGMA, "length_clip": [max(2, round(b * median_events)) for b in LENGTH_CLIP],
        "scenarios": list(SCENARIOS), "outcomes": list(OUTCOMES), "outcome_weight": OUTCOME_WEIGHT.tolist(),
        "thresholds": THRESHOLDS.tolist(), "beta": {s: BETA[k].tolist() for k, s in enumerate(SCENARIOS)},
        "half_life_days": HALF_LIFE / 86_400, "drift_tau_days": DRIFT_TAU / 86_400, "drift_sd": DRIFT_SD,
        "session_gap_median_h": SESSION_GAP_MEDIAN / 3600, "event_gap_mean_s": EVENT_GAP_MEAN,
        "session_window": SESSION_WINDOW, "favourites": FAVOURITES, "chunk_users": CHUNK_USERS,
        "bayes_simulations": BAYES_SIMULATIONS,
    }
    log(f"synthesizing lifelong: {users:,} users x median {median_events} events (seed {seed}) -> {out}")

    def source(raw: Path) -> RawSource:
        return RawSource(name="synthetic-lifelong", frame=readers.scan_table(raw, columns={c: c for c in RAW_SCHEMA.names}),
                         label_rule=LabelRule.parse(LABEL_RULE), actions=OUTCOMES,
                         numeric_columns=("p_true", "p_bayes"), files=(raw,))

    return prepare_generated(
        out, lambda raw: _write_raw(raw, users=users, median_events=median_events, items=items, artists=artists,
                                    genres=genres, seed=seed, log=log),
        source, lambda tmp: {"bayes": _bayes(tmp), "oracle": _bayes(tmp, "p_true"), "generator": generator},
        force, log)
