"""Inference engine with a multi-layer KV cache of each user's history (M-FALCON style serving).

    encode_user(history)       per strategy: select its events (as the data pipeline does for candidates
                               after the last event), run the block's layers over the HISTORY tokens only,
                               keep per layer their K and V (after LayerNorm + projection)   -> UserCache
    score(cache, candidates)   candidates are queries against [cached K/V ; their own K/V], never each
                               other; same bias, temperature, fusion and head as the forward -> logits (C,)
    append(cache, events)      the cache with newer events                                   -> UserCache

Why this is exact: under the "single user, multiple items" mask a history state depends neither on the
candidates nor on later events, and the relative position / time biases depend on differences only (a
history event at position i of its subsequence, every candidate at position n right after the last of
the n events), so neither left padding nor the number of candidates reaches a cached K or V.

What is cached (``Engine.caches_kv``):

- Climber (every ablation): per MSE block and per layer the K and V of the block's history tokens, plus
  their timestamps (keys of the relative time bias; positions are 0 .. n - 1). Candidates run every layer
  of every block as queries, then BGF (or mean) fusion and the heads, as ``Climber.forward_tasks``.
- Transformer, HSTU: the same for their one history (HSTU caches the K and V that its pointwise SiLU
  attention reads; U and Q belong to the queries).
- Any other model (dlrm, din, twin, wukong, rankmixer): no K/V. The cache holds the events; ``score``
  builds the pipeline's batch and calls ``model(batch)`` (full recompute).

What recomputes when:

- A strategy of kind ``window`` selects events within ``window_s`` of the first candidate's ts, so its
  block runs over its history at every ``score`` call (the other blocks stay cached).
- ``append``: while a strategy keeps every event it had (its window of ``length`` events is not full, or
  no new event matches it), only the new tokens run (queries = new tokens, keys = cached + new) or nothing
  does; once the oldest event drops out, every remaining state changes and that block is recomputed over
  its new selection. The Transformer recomputes on every append that reaches its history: its absolute
  positions count back from the most recent event, so every token moves.
- The cache keeps only the events some strategy can still select (a strategy's future selections come
  from its current one plus newer events), which bounds its size.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, fields, replace
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from climber.config import ConfigError
from climber.data.batch import Batch, Subsequence
from climber.data.schema import DataError
from climber.data.sequences import ResolvedStrategy, resolve, select
from climber.models.climber import Climber
from climber.models.hstu import HSTU
from climber.models.layers import UserFeatures
from climber.models.transformer import Transformer

EVENT_FIELDS = ("item", "action", "scenario", "ts", "label")
FEATURE_DTYPES = {"ctx": np.int64, "num": np.float32}  # per-event features: (n, F) arrays of ctx_* ids, num_* values
FEATURE_FIELDS = tuple(FEATURE_DTYPES)


def _ids(values, name: str) -> np.ndarray:
    """A 1-d int64 array from a tensor, array or list of integers; DataError naming ``name`` otherwise."""
    a = np.asarray(values.detach().cpu() if torch.is_tensor(values) else values)
    if a.ndim != 1:
        raise DataError(f"{name}: expected a 1-d sequence, got shape {a.shape}")
    if a.size and not (np.issubdtype(a.dtype, np.integer) or a.dtype == bool):
        raise DataError(f"{name}: expected integers, got dtype {a.dtype}")
    return a.astype(np.int64)


def _table(values, n: int, dtype, name: str) -> np.ndarray:
    """A (n, F) array of ``dtype`` from a tensor, array or nested list (None: no columns, (n, 0))."""
    if values is None:
        return np.zeros((n, 0), dtype=dtype)
    a = np.asarray(values.detach().cpu() if torch.is_tensor(values) else values)
    if a.ndim != 2:
        raise DataError(f"{name}: expected a 2-d (events x features) table, got shape {a.shape}")
    if a.size and dtype == np.int64 and not np.issubdtype(a.dtype, np.integer):
        raise DataError(f"{name}: expected integer value ids, got dtype {a.dtype}")
    return a.astype(dtype)


@dataclass
class UserHistory:
    """One user's events in time order, dense ids as in the prepared data; each field (n,) int64
    (given as tensors, arrays or lists), the per-event features (n, F)."""

    user: int  # dense user id (0: unknown user)
    item: np.ndarray
    action: np.ndarray
    scenario: np.ndarray
    ts: np.ndarray  # seconds, non-decreasing
    label: np.ndarray  # 0 / 1 (the ``positive`` strategy selects the 1s)
    ctx: np.ndarray | None = None  # (n, F_ctx) int64 ctx_* value ids (0: unknown), columns sorted by name
    num: np.ndarray | None = None  # (n, F_num) float32 num_* values (raw), columns sorted by name

    def __post_init__(self):
        self.user = int(self.user)
        for f in EVENT_FIELDS:
            setattr(self, f, _ids(getattr(self, f), f"history of user {self.user}: {f}"))
        for f, dtype in FEATURE_DTYPES.items():
            setattr(self, f, _table(getattr(self, f), len(self.ts), dtype, f"history of user {self.user}: {f}"))
        lengths = {f: len(getattr(self, f)) for f in EVENT_FIELDS + FEATURE_FIELDS}
        if len(set(lengths.values())) > 1:
            raise DataError(f"history of user {self.user}: fields have different lengths {lengths}")
        back = np.flatnonzero(np.diff(self.ts) < 0)
        if back.size:
            i = back[0] + 1
            raise DataError(f"history of user {self.user}: ts decreases at event {i} ({self.ts[i - 1]} -> "
                             f"{self.ts[i]}); events must be in time order")
        if not np.isin(self.label, (0, 1)).all():
            raise DataError(f"history of user {self.user}: label must be 0 or 1, got {sorted(set(self.label))}")

    def __len__(self) -> int:
        return len(self.ts)

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, f).nbytes for f in EVENT_FIELDS + FEATURE_FIELDS)

    def take(self, index: np.ndarray) -> "UserHistory":
        """The events at ``index`` (ascending positions)."""
        return UserHistory(self.user, *(getattr(self, f)[index] for f in EVENT_FIELDS + FEATURE_FIELDS))

    def concat(self, later: "UserHistory") -> "UserHistory":
        """These events followed by ``later``'s (DataError where the ts would go back)."""
        if later.ctx.shape[1] != self.ctx.shape[1] or later.num.shape[1] != self.num.shape[1]:
            raise DataError(f"history of user {self.user}: the new events have other feature columns "
                            f"({later.ctx.shape[1]} ctx, {later.num.shape[1]} num) than the cached ones "
                            f"({self.ctx.shape[1]}, {self.num.shape[1]})")
        return UserHistory(self.user, *(np.concatenate([getattr(self, f), getattr(later, f)])
                                        for f in EVENT_FIELDS + FEATURE_FIELDS))


@dataclass
class RequestFeatures:
    """What a score request says besides its candidates, dense ids as in the prepared data.

    ctx (C, F_ctx) int64 / num (C, F_num) float32: each candidate's ctx_* value ids and num_* values (raw),
    columns sorted by name, as the model's ``info.ctx_features`` / ``info.numeric_features``; required when
    the model reads them. user: the user's user_* features given with the request, by name: a value id, or
    a list of them for a bag; a feature not named keeps the stored profile's value (the checkpoint's)."""

    ctx: np.ndarray | None = None
    num: np.ndarray | None = None
    user: dict | None = None


@dataclass(frozen=True)
class BlockCache:
    """One strategy's selected events and the per-layer K/V of their tokens (n of them)."""

    index: np.ndarray  # (n,) int64 ascending positions of the events in UserCache.history
    ts: torch.Tensor  # (1, n) int64 their ts: the keys of the relative time bias
    item: torch.Tensor  # (1, n) int64 their items: the keys of the side feature match bias
    kv: list  # per layer (k, v) of the n tokens, e.g. (1, H, n, dh) each

    @property
    def nbytes(self) -> int:
        return (self.index.nbytes + self.ts.nbytes + self.item.nbytes
                + sum(k.nbytes + v.nbytes for k, v in self.kv))


@dataclass(frozen=True)
class UserCache:
    """What the engine keeps of one user."""

    history: UserHistory  # the events some strategy can still select (older ones are dropped)
    last_ts: int  # ts of the user's latest event: appended events must not be earlier
    blocks: tuple  # per strategy a BlockCache, or None (kind window, or a model without K/V caching)

    @property
    def user(self) -> int:
        return self.history.user

    @property
    def nbytes(self) -> int:
        return self.history.nbytes + sum(b.nbytes for b in self.blocks if b is not None)


CACHED_MODELS = (Climber, Transformer, HSTU)  # models with the structured encode / score steps


def _pad(t: torch.Tensor, size: int, left: bool, dim: int = -1) -> torch.Tensor:
    """``t`` zero-padded along ``dim`` to ``size`` (on the left or on the right)."""
    n = t.shape[dim]
    if n == size:
        return t
    shape = list(t.shape)
    shape[dim] = size - n
    zeros = t.new_zeros(shape)
    return torch.cat([zeros, t] if left else [t, zeros], dim=dim)


def _stack(batches: list[Batch]) -> Batch:
    """One-row batches -> one batch: each subsequence left-padded, the candidates (and a given user's
    bags) right-padded, to the longest (the padding's masks are False; 0 is an empty bag slot)."""

    def joined(parts: list, left: bool):  # None: a feature the batches do not carry
        if parts[0] is None:
            return None
        shape = [max(t.shape[d] for t in parts) for d in range(1, parts[0].dim())]

        def fit(t):  # every dim after the row's to the longest; on the left only the history's dim 1
            for d, size in enumerate(shape, start=1):
                t = _pad(t, size, left=left and d == 1, dim=d)
            return t

        return torch.cat([fit(t) for t in parts])

    rows = {f.name: joined([getattr(b, f.name) for b in batches], left=False) for f in fields(Batch)
            if f.name not in ("user", "seqs")}
    seqs = [Subsequence(**{f.name: joined([getattr(b.seqs[k], f.name) for b in batches], left=True)
                           for f in fields(Subsequence)}) for k in range(len(batches[0].seqs))]
    return Batch(user=torch.cat([b.user for b in batches]), seqs=seqs, **rows)


class LRUStore:
    """User caches by user id, bounded in bytes (``UserCache.nbytes``): putting one evicts the least
    recently used (got or put) until the total fits; a cache larger than the bound is not kept."""

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ConfigError(f"max_cache_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.nbytes = 0
        self.hits = self.misses = self.evictions = 0
        self._caches: OrderedDict[object, tuple[UserCache, int]] = OrderedDict()  # key -> (cache, its nbytes)

    def __len__(self) -> int:
        return len(self._caches)

    def __contains__(self, user: int) -> bool:
        return user in self._caches

    @property
    def hit_rate(self) -> float:
        return self.hits / max(1, self.hits + self.misses)

    def get(self, user) -> UserCache | None:
        """The user's cache (now the most recently used), or None; counts a hit or a miss."""
        if user not in self._caches:
            self.misses += 1
            return None
        self.hits += 1
        self._caches.move_to_end(user)
        return self._caches[user][0]

    def put(self, cache: UserCache, key=None) -> None:
        """Keep ``cache`` under ``key`` (default: its dense user id; a service keys by raw user id, as every
        unknown user shares dense id 0), replacing the previous one, then evict down to the bound."""
        key = cache.user if key is None else key
        self.pop(key)
        size = cache.nbytes
        if size > self.max_bytes:
            return
        self._caches[key] = (cache, size)
        self.nbytes += size
        while self.nbytes > self.max_bytes:
            _, (_, evicted) = self._caches.popitem(last=False)
            self.nbytes -= evicted
            self.evictions += 1

    def pop(self, user) -> UserCache | None:
        """Remove and return the user's cache (None when there is none); not a hit or a miss."""
        if user not in self._caches:
            return None
        cache, size = self._caches.pop(user)
        self.nbytes -= size
        return cache


class Engine:
    """Scores candidates of one user at a time from a cache of the user's history (see the module
    docstring); the model is put in eval mode and run under ``torch.inference_mode``."""

    def __init__(self, model: nn.Module, max_cache_bytes: int = 256 * 2**20, fallback: bool = True):
        """fallback: serve a model without a cached path by full recompute (False: ConfigError)."""
        cached = isinstance(model, CACHED_MODELS)
        name = type(model).__name__
        if not cached and not fallback:
            known = ", ".join(c.__name__ for c in CACHED_MODELS)
            raise ConfigError(f"{name} has no KV-cached path (models with one: {known}) and fallback=False")
        if not (hasattr(model, "strategies") and hasattr(model, "info")):
            raise ConfigError(f"{name} is not a climber model: the engine needs model.strategies() and model.info")
        self.model = model.eval()
        self.info = model.info
        self.profiles = next((m for m in model.modules() if isinstance(m, UserFeatures) and m), None)
        self._cached = cached
        self.strategies: list[ResolvedStrategy] = resolve(model.strategies(), self.info.actions, self.info.scenarios)
        self.device = next(model.parameters()).device
        self.store = LRUStore(max_cache_bytes)
        self.encoded_blocks = 0  # block caches computed over their whole selection
        self.extended_blocks = 0  # block caches extended by the new tokens only

    @property
    def caches_kv(self) -> bool:
        """True when the history's K/V are cached; False: full recompute at every score."""
        return self._cached

    def get(self, user: int) -> UserCache | None:
        return self.store.get(user)

    def put(self, cache: UserCache) -> None:
        self.store.put(cache)

    @torch.inference_mode()
    def encode_user(self, history: UserHistory) -> UserCache:
        """The cache of ``history`` (K/V of every cached block, see the module docstring)."""
        history = self._checked(history)
        last_ts = int(history.ts[-1]) if len(history) else 0
        return self._update(history, last_ts, None)

    @torch.inference_mode()
    def append(self, cache: UserCache, events: UserHistory) -> UserCache:
        """``cache`` with the newer ``events`` of the same user (ts not before the cache's last event);
        ``cache`` itself is left as it was."""
        if events.user != cache.user:
            raise DataError(f"append: events of user {events.user} given to the cache of user {cache.user}")
        events = self._checked(events)
        if not len(events):
            return cache
        if events.ts[0] < cache.last_ts:
            raise DataError(f"append: the first new event (ts {events.ts[0]}) is before the user's last event "
                             f"(ts {cache.last_ts}); events must be in time order")
        return self._update(cache.history.concat(events), int(events.ts[-1]), cache)

    @torch.inference_mode()
    def score(self, cache: UserCache, cand_item, cand_scenario, cand_ts,
              features: RequestFeatures | None = None) -> torch.Tensor:
        """Click logits (C,) float32, on the model's device, of C candidates of the cache's user (1-d
        integer tensors or arrays of equal length; ``features``: their context and the user's features
        given with the request); equal to ``model(batch)`` for the batch the data pipeline builds for
        these candidates after the cached history. The cache holds no request context: a history token
        is its event's own item, action, scenario and features."""
        return self.score_many([(cache, cand_item, cand_scenario, cand_ts, features)])[0]

    @torch.inference_mode()
    def score_many(self, requests: list) -> list[torch.Tensor]:
        """Several requests, each (cache, cand_item, cand_scenario, cand_ts[, features]), of any users, in
        one padded forward (dynamic batching) -> per request its logits (C_r,), equal to scoring each
        alone: histories are left-padded and candidates right-padded, and the padding is masked out."""
        out = [torch.zeros(0, device=self.device)] * len(requests)
        todo = [i for i, (_, item, *_) in enumerate(requests) if len(item)]
        if not todo:
            return out
        if not self._cached:
            batch = _stack([self.batch(requests[i][0].history, *requests[i][1:]) for i in todo])
            logits = self.model(batch).float()  # (R, C_max)
        else:
            batch = _stack([self._candidates(requests[i][0].user, *requests[i][1:]) for i in todo])  # (R, C_max)
            caches = [requests[i][0] for i in todo]
            cand = self.model.candidate_tokens(batch)  # (R, C_max, d)
            states = []
            for b, r in enumerate(self.strategies):
                blocks = [c.blocks[b] if c.blocks[b] is not None else  # kind window: depends on the first candidate
                          self._run_history(b, None, c.history, self._select(r, c.history, int(first)))
                          for c, first in zip(caches, batch.cand_ts[:, 0].tolist())]
                # left padding keeps every relative position: event i of n_r at n - n_r + i, candidates at n
                n = max(len(blk.index) for blk in blocks)
                real = torch.stack([_pad(torch.ones(len(blk.index), dtype=torch.bool, device=self.device), n, left=True)
                                    for blk in blocks])  # (R, n)
                ts, item = (torch.cat([_pad(getattr(blk, f), n, left=True) for blk in blocks]) for f in ("ts", "item"))
                kv = [tuple(torch.cat([_pad(blk.kv[layer][j], n, left=True, dim=2) for blk in blocks]) for j in (0, 1))
                      for layer in range(len(blocks[0].kv))]  # per layer (k, v), each (R, H, n, dh)
                states.append(self.model.score(b, cand, kv, self.model.keys(ts, item, real), batch))  # (R, C, d)
            logits = self.model.head_logits(states, batch).float()  # (R, C_max)
        for row, i in enumerate(todo):
            out[i] = logits[row, :len(requests[i][1])]
        return out

    def batch(self, history: UserHistory, cand_item, cand_scenario, cand_ts,
              features: RequestFeatures | None = None) -> Batch:
        """The one-row batch the data pipeline builds for these candidates after ``history``: what a full
        recompute scores (``model(batch)``)."""
        batch = self._candidates(history.user, cand_item, cand_scenario, cand_ts, features)
        first_ts = int(batch.cand_ts[0, 0]) if batch.cand_ts.shape[1] else int(history.ts[-1]) if len(history) else 0
        batch.seqs = [self._subsequence(history, self._select(r, history, first_ts), min_len=1)
                      for r in self.strategies]
        return batch

    def _update(self, history: UserHistory, last_ts: int, prev: UserCache | None) -> UserCache:
        """The cache of ``history`` (whose first events are ``prev.history``'s, when given): each block
        reused, extended by its new tokens, or encoded; then the events no strategy can select dropped."""
        n = len(history)
        keep, blocks = [], []
        for b, r in enumerate(self.strategies):
            if r.strategy.kind == "window":  # any of the last `length` events may fall into a window
                keep.append(np.arange(max(0, n - r.strategy.length), n))
                blocks.append(None)
                continue
            index = select(r, history, n)
            keep.append(index)
            old = None if prev is None else prev.blocks[b]
            if not self._cached:
                blocks.append(None)
            elif old is not None and len(old.index) == len(index) and np.array_equal(old.index, index):
                blocks.append(old)
            elif (old is not None and self.model.history_extends and len(old.index) < len(index)
                  and np.array_equal(old.index, index[: len(old.index)])):
                blocks.append(self._run_history(b, old, history, index))
                self.extended_blocks += 1
            else:
                blocks.append(self._run_history(b, None, history, index))
                self.encoded_blocks += 1
        kept = np.unique(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)
        blocks = [None if blk is None else replace(blk, index=np.searchsorted(kept, blk.index)) for blk in blocks]
        return UserCache(history.take(kept), last_ts, tuple(blocks))

    def _run_history(self, b: int, old: BlockCache | None, history: UserHistory, index: np.ndarray) -> BlockCache:
        """Block b's cache over the events ``index`` of ``history``: the tokens after ``old``'s (all of
        them when old is None) run as queries against old's K/V and their own."""
        P = 0 if old is None else len(old.index)
        new = self._subsequence(history, index[P:])  # (1, N)
        ts = new.ts if old is None else torch.cat([old.ts, new.ts], dim=1)  # (1, P + N)
        item = new.item if old is None else torch.cat([old.item, new.item], dim=1)  # (1, P + N)
        keys = self.model.keys(ts, item, torch.ones_like(ts, dtype=torch.bool))
        kv = self.model.encode(b, self.model.history_tokens(b, new), keys, new.scenario, None if old is None else old.kv)
        return BlockCache(index, ts, item, kv)

    def _select(self, r: ResolvedStrategy, history: UserHistory, first_ts: int) -> np.ndarray:
        """Positions in ``history`` that ``r`` selects for candidates from ``first_ts`` on."""
        if r.strategy.kind != "window":
            return select(r, history, len(history))
        # the window's bound is measured from the first candidate: the event at the cut
        with_cut = SimpleNamespace(**{f: np.append(getattr(history, f), 0) for f in ("action", "scenario", "label")},
                                   ts=np.append(history.ts, first_ts))
        return select(r, with_cut, len(history))

    def _subsequence(self, history: UserHistory, index: np.ndarray, min_len: int = 0) -> Subsequence:
        """The events ``index`` of ``history`` as a (1, L) Subsequence, L = max(len(index), min_len),
        left-padded."""
        pad = max(0, min_len - len(index))

        def column(f: str) -> torch.Tensor | None:  # (1, L) or (1, L, F); None: a feature the model lacks
            values = getattr(history, f)[index]
            if values.ndim == 2 and not values.shape[1]:
                return None
            values = np.concatenate([np.zeros((pad, *values.shape[1:]), dtype=values.dtype), values])
            return torch.from_numpy(values).to(self.device)[None]

        mask = torch.arange(pad + len(index), device=self.device)[None] >= pad
        return Subsequence(column("item"), column("action"), column("scenario"), column("ts"), mask,
                           ctx=column("ctx"), num=column("num"))

    def _candidates(self, user: int, cand_item, cand_scenario, cand_ts, features: RequestFeatures | None = None) -> Batch:
        """A one-row Batch of the candidates (no subsequences yet)."""
        given = {"cand_item": cand_item, "cand_scenario": cand_scenario, "cand_ts": cand_ts}
        arrays = {k: _ids(v, k) for k, v in given.items()}
        lengths = {k: len(v) for k, v in arrays.items()}
        if len(set(lengths.values())) > 1:
            raise DataError(f"candidates: cand_item, cand_scenario and cand_ts have different lengths {lengths}")
        self._check_range("cand_item", arrays["cand_item"], self.info.num_items, low=0)
        self._check_range("cand_scenario", arrays["cand_scenario"], self.info.num_scenarios)
        C = lengths["cand_item"]
        features = features or RequestFeatures()
        arrays["cand_ctx"] = self._features("candidates: ctx", "ctx", features.ctx, C)
        arrays["cand_num"] = self._features("candidates: num", "num", features.num, C)
        arrays["user_values"], arrays["user_bags"] = self._user_features(user, features.user or {})
        t = {k: None if v is None else torch.from_numpy(v).to(self.device)[None] for k, v in arrays.items()}
        return Batch(
            user=torch.tensor([user], device=self.device),
            seqs=[],
            cand_mask=torch.ones(1, C, dtype=torch.bool, device=self.device),
            label=torch.zeros(1, C, device=self.device),
            cand_action=torch.zeros(1, C, dtype=torch.long, device=self.device),
            **t,
        )

    def _features(self, name: str, kind: str, given, n: int) -> np.ndarray | None:
        """(n, F) ``kind`` "ctx" (value ids) or "num" (values) features of n events or candidates, checked
        against the model's; None where the model reads none of that kind."""
        expected = self.info.ctx_features if kind == "ctx" else self.info.numeric_features
        if not expected and (given is None or not np.size(given)):
            return None
        names = [c for c, *_ in expected]
        if given is None:
            raise DataError(f"{name}: the model reads {kind}_* features ({', '.join(names)}); give them, "
                            f"one row per {'candidate' if name.startswith('cand') else 'event'}")
        table = _table(given, n, FEATURE_DTYPES[kind], name)
        if table.shape != (n, len(names)):
            raise DataError(f"{name}: expected shape ({n}, {len(names)}) (columns {names}), got {table.shape}")
        if kind == "ctx":
            for f, (column, size) in enumerate(expected):
                self._check_range(f"{name} {column}", table[:, f], size, low=0)
        elif not np.isfinite(table).all():
            raise DataError(f"{name}: a num_* value is NaN or infinite")
        return table

    def _user_features(self, user: int, given: dict) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The user's feature value ids (F,) and bags (Fb, K): the stored profile (the checkpoint's tables;
        nothing for an unknown user), with the features ``given`` by name in place of stored ones. (None,
        None) for a model without user features."""
        singles, bags = dict(self.info.user_features), {c: n for c, n, _ in self.info.user_bags}
        unknown = sorted(set(given) - set(singles) - set(bags))
        if unknown:
            known = ", ".join([*singles, *bags]) or "none"
            raise DataError(f"user features {unknown}: the model was not trained with them (its user features: "
                            f"{known})")
        if self.profiles is None:
            return None, None
        row = user if user < self.profiles.feature_ids.shape[0] else 0
        values = self.profiles.feature_ids[row].cpu().numpy().copy()  # (F,)
        stored = self.profiles.bag_ids[row].cpu().numpy()  # (Fb, K)
        bag_rows = [stored[f][stored[f] > 0] for f in range(len(bags))]
        for name, value in given.items():
            ids = _ids(np.atleast_1d(value), f"user feature {name}")
            if name in singles:
                if ids.size != 1:
                    raise DataError(f"user feature {name}: one value expected (it is not a bag), got {ids.size}")
                f = list(singles).index(name)
                self._check_range(f"user feature {name}", ids, singles[name], low=0)
                values[f] = ids[0]
            else:
                self._check_range(f"user feature {name}", ids, bags[name], low=0)
                bag_rows[list(bags).index(name)] = ids[ids > 0]
        K = max([stored.shape[1], *(len(b) for b in bag_rows)])
        padded = np.zeros((len(bags), K), dtype=np.int64)
        for f, b in enumerate(bag_rows):
            padded[f, :len(b)] = b
        return values, padded

    def _checked(self, history: UserHistory) -> UserHistory:
        """``history``, checked against the model's vocabularies and features (DataError saying what is
        wrong); no events: with empty feature tables of the model's width."""
        if not 0 <= history.user <= self.info.num_users:
            raise DataError(f"user id {history.user} outside [0, {self.info.num_users}]")
        if not len(history):
            widths = (len(self.info.ctx_features), len(self.info.numeric_features))
            history = replace(history, **{f: np.zeros((0, w)) for f, w in zip(FEATURE_FIELDS, widths)})
        for f in FEATURE_FIELDS:
            self._features(f"history of user {history.user}: {f}", f, getattr(history, f), len(history))
        for f, size, low in (("item", self.info.num_items, 0), ("action", self.info.num_actions, 1),
                             ("scenario", self.info.num_scenarios, 1)):
            self._check_range(f"history of user {history.user}: {f}", getattr(history, f), size, low)
        return history

    @staticmethod
    def _check_range(name: str, ids: np.ndarray, size: int, low: int = 1) -> None:
        """Dense ids in [low, size]; items may be 0, the unknown (out-of-vocabulary) item."""
        bad = ids[(ids < low) | (ids > size)]
        if bad.size:
            raise DataError(f"{name}: id {bad[0]} outside [{low}, {size}] (dense ids of the model's data)")
