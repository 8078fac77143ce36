"""The serving engine: KV-cached scores equal ``model(batch)`` for the batch the data pipeline builds
(Climber in every ablation and with every strategy kind, Transformer, HSTU), before and after appends,
with the incremental path taken where it should be; full recompute for the other models; the LRU store
bounded in bytes; errors on bad input."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch
from torch import nn

from climber.config import ConfigError
from climber.data.batch import Batch, Subsequence
from climber.data.samples import Rows, UserEvents, collate
from climber.data.schema import DataError
from climber.data.sequences import resolve
from climber.models import DataInfo, build_model
from climber.models.layers import ItemEmbedding, UserFeatures
from climber.serve.engine import Engine, RequestFeatures, UserHistory
from conftest import perturb_parameters, randomize_prior_tables

INFO = DataInfo(num_users=20, num_items=50, actions=("click", "like", "skip"), scenarios=("home", "search", "radio"),
                item_features=(("item_topic", 3),), item_bags=(("item_tags", 5, 3),),
                user_features=(("user_age", 4),), user_bags=(("user_likes", 6, 2),))

RECENT_POS = [{"name": "recent", "kind": "recency", "length": 5}, {"name": "pos", "kind": "positive", "length": 8}]
CLIMBER = dict(d_model=16, n_heads=2, n_layers=2, strategies=RECENT_POS)
EVERY_KIND = RECENT_POS + [
    {"name": "likes", "kind": "action", "values": ["like", "skip"], "length": 4},
    {"name": "search", "kind": "scenario", "values": ["search"], "length": 3},
    {"name": "hour", "kind": "window", "window_s": 150000, "length": 6},
]
CACHED = [  # (model, config): every Climber ablation, every strategy kind, the reference attention
    ("climber", {**CLIMBER, "use_atl": atl, "use_bgf": bgf, "use_mse": mse, "user_embedding": not mse,
                 "item_bias": bgf, "action_heads": atl, "dot_head": atl, "context_features": not atl,
                 "popularity_prior": mse, "popularity_count": mse and atl})
    for atl, bgf, mse in itertools.product([True, False], repeat=3)
] + [
    ("climber", {**CLIMBER, "strategies": EVERY_KIND, "attention": "reference", "context_features": True}),
    ("transformer", dict(d_model=16, n_heads=2, n_layers=2, max_len=8)),
    ("hstu", dict(d_model=16, n_heads=2, n_layers=2, max_len=8)),
    ("climber", {**CLIMBER, "attention_sink": True}),
    ("climber", {**CLIMBER, "use_temperature": False}),
    ("climber", {**CLIMBER, "use_relative_bias": False}),
    ("climber", {**CLIMBER, "match_bias": True}),
    ("climber", {**CLIMBER, "match_mask": True}),
]
FALLBACK = [
    ("din", dict(d_model=8, max_len=6, att_hidden=[12, 6], mlp_hidden=[16, 8])),
    ("rankmixer", dict(T=4, d_token=8, d_feature=6, n_layers=2, ffn_mult=2, max_len=6, recent_k=3)),
]
cached_case = pytest.mark.parametrize("name,cfg", CACHED, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CACHED)])


def close(a, b, tol=1e-5):
    return torch.allclose(a, b, atol=tol, rtol=tol)


def build(name: str, cfg: dict, seed: int = 0, info: DataInfo = INFO) -> nn.Module:
    """The tiny model with every parameter perturbed (non-trivial biases and temperatures), in eval mode;
    items get random topics and tag bags, users random ages and bags, some values unknown (0), and the
    popularity prior random tables."""
    torch.manual_seed(seed)
    model = build_model(name, cfg, info)
    for m in model.modules():
        if isinstance(m, (ItemEmbedding, UserFeatures)):
            m.feature_ids[1:] = torch.randint(0, 4, m.feature_ids[1:].shape)
            m.bag_ids[1:] = torch.randint(0, 5, m.bag_ids[1:].shape)
    return perturb_parameters(randomize_prior_tables(model), seed).eval()


def random_events(n: int, seed: int, user: int = 3, t0: int = 10**6, label=None) -> UserHistory:
    """n events from t0 on; time gaps from 0 s to a day (ties and many time buckets)."""
    rng = np.random.default_rng(seed)
    gaps = rng.choice([0, 1, 7, 60, 900, 3000, 20000, 86400], size=n)
    return UserHistory(
        user=user,
        item=rng.integers(1, INFO.num_items + 1, n),
        action=rng.integers(1, INFO.num_actions + 1, n),
        scenario=rng.integers(1, INFO.num_scenarios + 1, n),
        ts=t0 + np.cumsum(gaps),
        label=rng.integers(0, 2, n) if label is None else np.full(n, label),
    )


def random_candidates(C: int, seed: int, after: int):
    rng = np.random.default_rng(seed)
    return (rng.integers(1, INFO.num_items + 1, C), rng.integers(1, INFO.num_scenarios + 1, C),
            after + np.cumsum(rng.integers(0, 4000, C)))


def pipeline_batch(model, h: UserHistory, item, scenario, ts, pad: int = 0, features=None) -> Batch:
    """Written out: per strategy the most recent ``length`` events before the candidates that match it
    (window: within window_s of the first candidate), left-padded by ``pad`` more slots (at least one
    slot in all), with their ctx / num features where the history has some; the candidates in one row,
    with ``features``' ctx and num (its user features are not written out here)."""

    def matches(s, i: int) -> bool:
        return {
            "recency": True,
            "action": INFO.actions[h.action[i] - 1] in s.values,
            "scenario": INFO.scenarios[h.scenario[i] - 1] in s.values,
            "positive": h.label[i] == 1,
            "window": h.ts[i] >= ts[0] - s.window_s,
        }[s.kind]

    seqs = []
    for s in model.strategies():
        chosen = [i for i in range(len(h)) if matches(s, i)][-s.length:]
        L = max(1, len(chosen) + pad)
        fields = []
        for column in (h.item, h.action, h.scenario, h.ts, h.ctx, h.num):
            if column.ndim == 2 and not column.shape[1]:
                fields.append(None)
                continue
            t = torch.zeros(1, L, *column.shape[1:], dtype=torch.as_tensor(column).dtype)
            t[0, L - len(chosen):] = torch.as_tensor(column[chosen])
            fields.append(t)
        seqs.append(Subsequence(*fields[:4], mask=torch.arange(L)[None] >= L - len(chosen), ctx=fields[4],
                                num=fields[5]))
    C = len(item)
    given = features or RequestFeatures()
    return Batch(user=torch.tensor([h.user]), seqs=seqs, cand_item=torch.as_tensor(item)[None],
                 cand_scenario=torch.as_tensor(scenario)[None], cand_ts=torch.as_tensor(ts)[None],
                 cand_mask=torch.ones(1, C, dtype=torch.bool), label=torch.zeros(1, C),
                 cand_action=torch.zeros(1, C, dtype=torch.long),
                 cand_ctx=None if given.ctx is None else torch.as_tensor(given.ctx)[None],
                 cand_num=None if given.num is None else torch.as_tensor(given.num, dtype=torch.float32)[None])


def assert_scores_equal_the_model(engine, cache, h: UserHistory, seeds=(0, 1, 2), sizes=(1, 4, 7)):
    """Several candidate sets scored from one cache, each against model(batch) built from ``h``."""
    for seed, C in zip(seeds, sizes):
        item, scenario, ts = random_candidates(C, seed, after=int(h.ts[-1]) if len(h) else 10**6)
        got = engine.score(cache, item, scenario, ts)
        assert got.dtype == torch.float32 and got.shape == (C,)
        with torch.no_grad():
            want = engine.model(pipeline_batch(engine.model, h, item, scenario, ts, pad=seed))[0]
        assert close(got, want), (got, want)


def test_the_test_batch_is_the_pipelines():
    """pipeline_batch (pad=0) equals what climber.data.samples.collate builds for a cut after the history."""
    model = build("climber", {**CLIMBER, "strategies": EVERY_KIND})
    h = random_events(30, seed=4)
    item, scenario, ts = random_candidates(5, seed=0, after=int(h.ts[-1]))
    n, C = len(h), 5
    events = UserEvents(
        offsets=np.array([0, n + C]), user=np.array([h.user]),
        item=np.concatenate([h.item, item]), action=np.concatenate([h.action, np.ones(C, dtype=np.int64)]),
        scenario=np.concatenate([h.scenario, scenario]), ts=np.concatenate([h.ts, ts]),
        label=np.concatenate([h.label, np.zeros(C, dtype=np.int64)]), split=np.zeros(n + C, dtype=np.int8),
    )
    rows = Rows(user=np.array([0]), cut=np.array([n]), start=np.array([n]), count=np.array([C]))
    want = collate(events, rows, resolve(model.strategies(), INFO.actions, INFO.scenarios))
    got = pipeline_batch(model, h, item, scenario, ts)
    for a, b in zip(got.seqs, want.seqs):
        for f in ("item", "action", "scenario", "ts", "mask"):
            assert torch.equal(getattr(a, f), getattr(b, f)), f
    # length-bound strategies full, the window bound by time: the checks bite
    assert [s.mask.sum().item() for s in got.seqs] == [5, 8, 4, 3, 2]


@cached_case
def test_cached_scores_equal_the_model(name, cfg):
    engine = Engine(build(name, cfg))
    assert engine.caches_kv
    for n, seed in ((0, 0), (3, 1), (20, 2)):  # empty, short (no window full), long (every window full)
        h = random_events(n, seed=seed)
        cache = engine.encode_user(h)
        before = cache.nbytes
        assert_scores_equal_the_model(engine, cache, h)
        assert cache.nbytes == before  # scoring leaves the cache as it was


def test_scores_are_candidate_independent_and_a_cache_serves_many_calls():
    engine = Engine(build("climber", CLIMBER))
    cache = engine.encode_user(random_events(15, seed=0))
    item, scenario, ts = random_candidates(6, seed=3, after=2 * 10**6)
    together = engine.score(cache, item, scenario, ts)
    for c in range(6):
        assert close(engine.score(cache, item[c:c + 1], scenario[c:c + 1], ts[c:c + 1]), together[c:c + 1])
    assert engine.score(cache, [], [], []).shape == (0,)


def count_queries(monkeypatch, engine) -> list[int]:
    """Record the number of history query tokens of every ``encode`` step that ``engine`` runs."""
    seen: list[int] = []
    encode = engine.model.encode

    def counting(b, x, *args):
        seen.append(x.shape[1])
        return encode(b, x, *args)

    monkeypatch.setattr(engine.model, "encode", counting)
    return seen


@pytest.mark.parametrize("name,cfg", [CACHED[0], CACHED[7], CACHED[8], CACHED[9], CACHED[10], CACHED[-2], CACHED[-1]],
                         ids=["climber-atl-bgf-mse", "climber-plain", "climber-every-kind", "transformer", "hstu",
                              "climber-match-bias", "climber-match-mask"])
def test_append_extends_while_windows_are_not_full_and_recomputes_after(name, cfg, monkeypatch):
    """Start with 2 events; append 1 positive (every window still open), then 2 positives (recent and
    max_len windows full, not overflowing for Climber), then 1 negative (recent overflows; positive does
    not change), then 8 positives (every window overflows). Scores equal the full recomputation each time."""
    engine = Engine(build(name, cfg))
    seen = count_queries(monkeypatch, engine)
    h = random_events(2, seed=0, label=1)
    cache = engine.encode_user(h)
    extends = name != "transformer"  # its positions count back from the most recent event
    for step, (k, label) in enumerate([(1, 1), (2, 1), (1, 0), (8, 1)]):
        new = random_events(k, seed=10 + step, t0=int(h.ts[-1]), label=label)
        encoded, extended, seen[:] = engine.encoded_blocks, engine.extended_blocks, []
        cache = engine.append(cache, new)
        runs = list(seen)  # the number of tokens each block ran for the append
        counts = (engine.extended_blocks - extended, engine.encoded_blocks - encoded)
        h = h.concat(new)
        assert_scores_equal_the_model(engine, cache, h)
        assert close(engine.score(cache, [1, 2], [1, 3], [h.ts[-1], h.ts[-1] + 9]),
                     engine.score(engine.encode_user(h), [1, 2], [1, 3], [h.ts[-1], h.ts[-1] + 9]))
        if name != "climber" or cfg["strategies"] != RECENT_POS or not cfg.get("use_mse", True):
            continue  # the counts below are for the two blocks recent (5) and pos (8)
        if step in (0, 1):  # 3 then 5 events: both blocks extended by the k new tokens only
            assert counts == (2, 0)
            assert runs == [k, k]
        elif step == 2:  # a negative: recent drops its oldest event (recomputed), pos is unchanged
            assert counts == (0, 1)
            assert runs == [5]
        else:  # 8 more positives: both overflow
            assert counts == (0, 2)
            assert runs == [5, 8]
    if extends:
        assert engine.extended_blocks > 0
    else:
        assert engine.extended_blocks == 0
    assert len(cache.history) < len(h)  # events no strategy can select any more are dropped


def test_append_after_dropped_events_extends_and_events_no_strategy_selects_run_nothing(monkeypatch):
    engine = Engine(build("climber", {**CLIMBER, "strategies": [RECENT_POS[1]]}))  # positive (8) only
    seen = count_queries(monkeypatch, engine)
    h = random_events(10, seed=0, label=0)
    h.label[[2, 5, 7]] = 1
    cache = engine.encode_user(h)
    assert len(cache.history) == 3  # the negatives can never be selected: dropped
    seen[:] = []
    later = engine.append(cache, random_events(3, seed=1, t0=int(cache.last_ts), label=0))
    assert seen == [] and later.blocks[0].kv is cache.blocks[0].kv and len(later.history) == 3
    assert later.last_ts > cache.last_ts
    new = random_events(2, seed=2, t0=int(later.last_ts), label=1)
    extended = engine.extended_blocks
    latest = engine.append(later, new)
    assert seen == [2] and engine.extended_blocks == extended + 1  # positions of the kept events line up
    full = h.concat(random_events(3, seed=1, t0=int(cache.last_ts), label=0)).concat(new)
    assert_scores_equal_the_model(engine, latest, full)


@pytest.mark.parametrize("name,cfg", FALLBACK, ids=[n for n, _ in FALLBACK])
def test_other_models_are_served_by_full_recompute(name, cfg):
    engine = Engine(build(name, cfg))
    assert not engine.caches_kv
    h = random_events(10, seed=0)
    cache = engine.encode_user(h)
    assert all(b is None for b in cache.blocks)
    assert_scores_equal_the_model(engine, cache, h)
    new = random_events(3, seed=1, t0=int(h.ts[-1]))
    assert_scores_equal_the_model(engine, engine.append(cache, new), h.concat(new))
    with pytest.raises(ValueError, match="no KV-cached path"):
        Engine(build(name, cfg), fallback=False)


@pytest.mark.parametrize("name,cfg", CACHED + FALLBACK, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CACHED + FALLBACK)])
def test_requests_of_several_users_batched_into_one_forward_score_as_each_alone(name, cfg):
    """score_many (dynamic batching: histories left-padded, candidates right-padded) equals score per
    request, for users with no, short and long histories, and requests without candidates."""
    engine = Engine(build(name, cfg))
    requests = []
    for u, (n, C) in enumerate([(0, 3), (3, 7), (20, 1), (12, 0), (20, 5)]):
        h = random_events(n, seed=u, user=u + 1)
        requests.append((engine.encode_user(h), *random_candidates(C, seed=u, after=int(h.ts[-1]) if n else 10**6)))
    got = engine.score_many(requests)
    assert [len(g) for g in got] == [3, 7, 1, 0, 5]
    for g, request in zip(got, requests):
        assert close(g, engine.score(*request)), (g, engine.score(*request))
    assert engine.score_many([]) == []


def test_unknown_items_have_id_0_and_are_scored():
    engine = Engine(build("climber", CLIMBER))
    h = random_events(6, seed=0)
    h.item[2] = 0  # an event on an item the model has never seen
    cache = engine.encode_user(h)
    item, scenario, ts = random_candidates(3, seed=1, after=int(h.ts[-1]))
    item[1] = 0
    assert_scores_equal_the_model(engine, cache, h)
    assert torch.isfinite(engine.score(cache, item, scenario, ts)).all()


def test_lru_store_is_bounded_in_bytes_and_evicts_the_least_recently_used():
    engine = Engine(build("climber", CLIMBER))
    caches = {u: engine.encode_user(random_events(10, seed=u, user=u, label=1)) for u in (1, 2, 3, 4)}
    size = caches[1].nbytes
    assert size > 0 and all(c.nbytes == size for c in caches.values())  # same lengths: same size
    engine = Engine(engine.model, max_cache_bytes=2 * size + size // 2)  # room for two
    engine.put(caches[1])
    engine.put(caches[2])
    assert engine.get(1) is caches[1]  # 1 is now more recent than 2
    engine.put(caches[3])  # evicts 2
    assert engine.store.nbytes == 2 * size <= engine.store.max_bytes
    assert engine.get(2) is None and engine.get(3) is caches[3] and engine.get(1) is caches[1]
    engine.put(caches[4])  # evicts 3, the least recently used
    assert 3 not in engine.store and 1 in engine.store and len(engine.store) == 2
    assert (engine.store.hits, engine.store.misses, engine.store.evictions) == (3, 1, 2)
    assert engine.store.hit_rate == 0.75
    engine.put(caches[1])  # a replacement is not counted twice
    assert engine.store.nbytes == 2 * size
    tiny = Engine(engine.model, max_cache_bytes=size - 1)
    tiny.put(caches[1])  # larger than the bound: not kept
    assert len(tiny.store) == 0 and tiny.store.nbytes == 0


def test_bad_input_is_a_data_error_saying_what_is_wrong():
    engine = Engine(build("climber", CLIMBER))
    h = random_events(5, seed=0)
    with pytest.raises(DataError, match="ts decreases at event 2"):
        UserHistory(1, [1, 2, 3], [1, 1, 1], [1, 1, 1], [10, 20, 15], [0, 1, 0])
    with pytest.raises(DataError, match="different lengths"):
        UserHistory(1, [1, 2, 3], [1, 1], [1, 1, 1], [10, 20, 30], [0, 1, 0])
    with pytest.raises(DataError, match="label must be 0 or 1"):
        UserHistory(1, [1], [1], [1], [10], [2])
    with pytest.raises(DataError, match="expected integers"):
        UserHistory(1, [1.5], [1], [1], [10], [0])
    with pytest.raises(DataError, match="item: id 51 outside"):
        engine.encode_user(UserHistory(1, [51], [1], [1], [10], [0]))
    cache = engine.encode_user(h)
    with pytest.raises(DataError, match="different lengths"):
        engine.score(cache, [1, 2], [1, 2], [h.ts[-1]])
    with pytest.raises(DataError, match="cand_scenario: id 0 outside"):
        engine.score(cache, [1], [0], [h.ts[-1]])
    with pytest.raises(DataError, match="before the user's last event"):
        engine.append(cache, random_events(2, seed=1, t0=int(h.ts[-1]) - 10**6))
    with pytest.raises(DataError, match="events of user 4 given to the cache of user 3"):
        engine.append(cache, random_events(2, seed=1, user=4, t0=int(h.ts[-1])))
    with pytest.raises(ConfigError, match="not a climber model"):
        Engine(nn.Linear(2, 2))


def test_a_trained_run_serves_its_offline_test_scores(tiny_synth, tmp_path):
    """Train a tiny Climber, load the run with load_run_model, and score each test user's candidates
    from the engine's cache of the events before the test split: the logits of predictions.parquet."""
    import polars as pl

    from climber.config import resolve as resolve_config
    from climber.eval.evaluate import load_run_model
    from climber.train.loop import Trainer
    from conftest import TINY

    cfg = resolve_config("climber-tiny", None, TINY + ["train.epochs=1"])
    Trainer(tmp_path / "run", tiny_synth, cfg, log=lambda *_: None, progress=False).fit()
    model, meta = load_run_model(tmp_path / "run")
    assert meta["model"] == "climber" and model.emb.item.feature_ids.any()  # item_topic came with the checkpoint
    engine = Engine(model)
    events = pl.read_parquet(tiny_synth / "events.parquet")
    offline = pl.read_parquet(tmp_path / "run" / "predictions.parquet")
    users = events.filter(pl.col("split") == "test")["user"].unique().sort()[:5]
    for user in users:
        mine = events.filter(pl.col("user") == user).sort("ts", "item")
        past, test = mine.filter(pl.col("split") != "test"), mine.filter(pl.col("split") == "test")
        cache = engine.encode_user(UserHistory(int(user), *(past[c].to_numpy() for c in
                                                             ("item", "action", "scenario", "ts", "label"))))
        scores = engine.score(cache, test["item"].to_numpy(), test["scenario"].to_numpy(), test["ts"].to_numpy())
        expected = offline.filter(pl.col("user") == user).sort("item")
        got = pl.DataFrame({"item": test["item"], "logit": scores.numpy()}).sort("item")
        assert got["item"].to_list() == expected["item"].to_list()
        np.testing.assert_allclose(got["logit"].to_numpy(), expected["logit"].to_numpy(), rtol=1e-5, atol=1e-5)


# --- per-event context, numbers and user features given with a request (issue 19) ---

INFO_FEATURES = dataclasses.replace(INFO, ctx_features=(("ctx_device", 3), ("ctx_hour", 24)),
                                    numeric_features=(("num_price", 5.0, 2.0),))
FEATURE_MODELS = [CACHED[0], CACHED[7], CACHED[8], CACHED[9], CACHED[10], *FALLBACK,
                  ("dlrm", dict(d_model=8, max_len=6)), ("twin", dict(d_model=8, max_len=6)),
                  ("wukong", dict(d_model=8, max_len=6))]
feature_case = pytest.mark.parametrize("name,cfg", FEATURE_MODELS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(FEATURE_MODELS)])


def with_features(h: UserHistory, seed: int) -> UserHistory:
    """``h`` with random ctx ids (some unknown: 0) and prices."""
    rng = np.random.default_rng(seed)
    n = len(h)
    return dataclasses.replace(h, ctx=np.stack([rng.integers(0, 4, n), rng.integers(0, 25, n)], axis=1),
                               num=rng.normal(5, 2, (n, 1)))


def candidate_features(C: int, seed: int) -> RequestFeatures:
    rng = np.random.default_rng(seed)
    return RequestFeatures(ctx=np.stack([rng.integers(0, 4, C), rng.integers(0, 25, C)], axis=1),
                           num=rng.normal(5, 2, (C, 1)))


@feature_case
def test_features_reach_the_scores_which_equal_the_model_and_the_cache_holds_no_request_context(name, cfg):
    """Histories with per-event ctx / num, candidates with their own: scores equal model(batch) for the
    pipeline's batch, cached or recomputed, before and after an append. One cache serves requests of
    different contexts (its K/V are the same objects afterwards), and the context changes the scores."""
    engine = Engine(build(name, cfg, info=INFO_FEATURES))
    for n in (0, 3, 20):
        h = with_features(random_events(n, seed=n), seed=n)
        cache = engine.encode_user(h)
        blocks = [None if b is None else [t for kv in b.kv for t in kv] for b in cache.blocks]
        for seed, C in ((0, 1), (1, 4), (2, 7)):
            item, scenario, ts = random_candidates(C, seed, after=int(h.ts[-1]) if n else 10**6)
            for context in (candidate_features(C, seed), candidate_features(C, seed + 10)):
                got = engine.score(cache, item, scenario, ts, context)
                with torch.no_grad():
                    want = engine.model(pipeline_batch(engine.model, h, item, scenario, ts, pad=seed,
                                                       features=context))[0]
                assert close(got, want), (got, want)
            other = engine.score(cache, item, scenario, ts, candidate_features(C, seed + 10))
            assert not close(got, engine.score(cache, item, scenario, ts, candidate_features(C, seed))) or C == 0
            assert close(other, got)
        kept = [None if b is None else [t for kv in b.kv for t in kv] for b in cache.blocks]
        assert all(a is None or all(x is y for x, y in zip(a, b)) for a, b in zip(blocks, kept))
    new = with_features(random_events(4, seed=9, t0=int(h.ts[-1])), seed=9)
    latest, full = engine.append(cache, new), h.concat(new)
    item, scenario, ts = random_candidates(5, 3, after=int(full.ts[-1]))
    context = candidate_features(5, 3)
    with torch.no_grad():
        want = engine.model(pipeline_batch(engine.model, full, item, scenario, ts, features=context))[0]
    assert close(engine.score(latest, item, scenario, ts, context), want)


@feature_case
def test_user_features_given_with_a_request_replace_the_stored_profile(name, cfg):
    """Scores with user features given by name equal the scores of the same model whose stored profile
    holds those values; a feature not named keeps its stored value; batched with requests that give
    none, each scores as alone; the cached history is the same for every request."""
    model = build(name, cfg, info=INFO_FEATURES)
    engine = Engine(model)
    h = with_features(random_events(12, seed=1), seed=1)
    cache = engine.encode_user(h)
    item, scenario, ts = random_candidates(6, 0, after=int(h.ts[-1]))
    context = candidate_features(6, 0)
    stored = engine.score(cache, item, scenario, ts, context)
    given = dataclasses.replace(context, user={"user_likes": [2, 5, 6, 1]})  # longer than the stored bags
    got = engine.score(cache, item, scenario, ts, given)
    assert not close(got, stored)
    profiled = build(name, cfg, info=INFO_FEATURES)
    profiles = engine.profiles
    twin_profiles = Engine(profiled).profiles
    with torch.no_grad():  # the request's bag as the stored one: the table is widened to hold it
        twin_profiles.bag_ids = torch.nn.functional.pad(profiles.bag_ids, (0, 2)).clone()
        twin_profiles.bag_ids[h.user, 0] = torch.tensor([2, 5, 6, 1, 0, 0])[:twin_profiles.bag_ids.shape[2]]
    twin = Engine(profiled)
    assert close(twin.score(twin.encode_user(h), item, scenario, ts, context), got)
    age = int(profiles.feature_ids[h.user, 0]) + 1  # another age than the stored one
    both = dataclasses.replace(context, user={"user_likes": [2, 5, 6, 1], "user_age": age})
    assert not close(engine.score(cache, item, scenario, ts, both), got)
    other = random_events(5, seed=2, user=7)
    requests = [(cache, item, scenario, ts, given), (engine.encode_user(with_features(other, 2)), item[:3],
                                                     scenario[:3], ts[:3], candidate_features(3, 1)),
                (cache, item, scenario, ts, both)]
    for g, request in zip(engine.score_many(requests), requests):
        assert close(g, engine.score(*request))


def test_bad_features_are_a_data_error_saying_what_is_wrong():
    engine = Engine(build("climber", CLIMBER, info=INFO_FEATURES))
    h = with_features(random_events(5, seed=0), seed=0)
    cache = engine.encode_user(h)
    item, scenario, ts = random_candidates(2, 0, after=int(h.ts[-1]))
    context = candidate_features(2, 0)
    with pytest.raises(DataError, match=r"reads ctx_\* features \(ctx_device, ctx_hour\)"):
        engine.score(cache, item, scenario, ts)
    with pytest.raises(DataError, match=r"expected shape \(2, 1\)"):
        engine.score(cache, item, scenario, ts, dataclasses.replace(context, num=np.ones((2, 2))))
    with pytest.raises(DataError, match="ctx_hour: id 25 outside"):
        engine.score(cache, item, scenario, ts, dataclasses.replace(context, ctx=np.array([[1, 25], [1, 1]])))
    with pytest.raises(DataError, match="NaN or infinite"):
        engine.score(cache, item, scenario, ts, dataclasses.replace(context, num=np.array([[1.0], [np.nan]])))
    with pytest.raises(DataError, match=r"user features \['user_region'\]: the model was not trained with them"):
        engine.score(cache, item, scenario, ts, dataclasses.replace(context, user={"user_region": 1}))
    with pytest.raises(DataError, match="one value expected"):
        engine.score(cache, item, scenario, ts, dataclasses.replace(context, user={"user_age": [1, 2]}))
    with pytest.raises(DataError, match=r"ctx: expected shape \(3, 2\)"):
        engine.encode_user(random_events(3, seed=0))  # a history without its features
    with pytest.raises(DataError, match=r"ctx: expected shape \(2, 2\)"):
        engine.append(cache, random_events(2, seed=1, t0=int(h.ts[-1])))
    with pytest.raises(DataError, match="other feature columns"):
        h.concat(random_events(2, seed=1, t0=int(h.ts[-1])))
