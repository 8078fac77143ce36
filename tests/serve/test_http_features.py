"""The service with features (issue 19): a model trained on a log with per-event context (a device, the
hour derived from ts, a price) and user features (an age, a bag of likes) scores a request's context and
user features exactly as the engine does with the ids mapped here independently (from the vocabulary
files and the clock), events keep their context through the store and a restart, and a feature the model
was not trained with is a 422 naming it."""

from __future__ import annotations

from datetime import datetime, timezone

import numpy as np
import polars as pl
import pytest
import torch
from fastapi.testclient import TestClient

from climber.serve.app import Service, create_app
from climber.serve.engine import Engine, RequestFeatures, UserHistory
from conftest import TINY, prepare_feature_log

T0 = 1_700_000_000 + 3_600 * 400  # after every event of the log


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from climber.config import resolve as resolve_config
    from climber.train.loop import Trainer

    root = tmp_path_factory.mktemp("served-features")
    data = prepare_feature_log(root)
    cfg = resolve_config("climber-tiny", None, TINY + ["train.epochs=1"])
    Trainer(root / "run", data, cfg, log=lambda *_: None, progress=False).fit()
    return root / "run", data


def client(run, store) -> TestClient:
    run_dir, data = run
    return TestClient(create_app(Service(run_dir, data, store, log=lambda *_: None), batch_window_ms=None))


def vocab(data, column: str) -> dict:
    return dict(pl.read_parquet(data / "vocab" / f"{column}.parquet").select("raw", "id").iter_rows())


def expected_scores(run, user: str, extra: list[dict], items: list[str], ts: int, device: list[str],
                    price: list[float], likes: list[str] | None = None) -> np.ndarray:
    """The engine's probabilities for the user's prepared events plus ``extra`` (raw events), the ids
    mapped from the vocabulary files and the hour from the clock (UTC), not by the service."""
    from climber.eval.evaluate import load_run_model

    run_dir, data = run
    engine = Engine(load_run_model(run_dir)[0])
    v = {c: vocab(data, c) for c in ("user", "item", "action", "scenario", "ctx_device", "ctx_hour", "user_likes")}
    hour = lambda t: v["ctx_hour"].get(str(datetime.fromtimestamp(t, timezone.utc).hour), 0)  # noqa: E731
    mine = pl.read_parquet(data / "events.parquet").filter(pl.col("user_raw") == user).sort("ts", "item")
    history = UserHistory(v["user"][user], *(mine[c].to_numpy() for c in ("item", "action", "scenario", "ts", "label")),
                          ctx=mine.select("ctx_device", "ctx_hour").to_numpy(), num=mine.select("num_price").to_numpy())
    if extra:
        history = history.concat(UserHistory(
            history.user, [v["item"].get(e["item"], 0) for e in extra], [v["action"][e["action"]] for e in extra],
            [1] * len(extra), [e["ts"] for e in extra], [int(int(e["action"]) >= 4) for e in extra],
            ctx=[[v["ctx_device"].get(e["context"]["ctx_device"], 0), hour(e["ts"])] for e in extra],
            num=[[e["context"]["num_price"]] for e in extra]))
    features = RequestFeatures(ctx=[[v["ctx_device"].get(d, 0), hour(ts)] for d in device], num=[[p] for p in price],
                               user=None if likes is None else {"user_likes": [v["user_likes"].get(x, 0) for x in likes]})
    logits = engine.score(engine.encode_user(history), [v["item"].get(i, 0) for i in items], [1] * len(items),
                          [ts] * len(items), features)
    return torch.sigmoid(logits.double()).numpy()


def test_scores_with_context_and_user_features_equal_the_engines_and_survive_a_restart(run, tmp_path):
    store = tmp_path / "history.sqlite"
    http = client(run, store)
    items, devices, prices = ["i1", "i4", "i7"], ["web", "tv", "phone"], [3.0, 1.5, 9.0]  # "phone": unseen, id 0
    body = {"user": "u3", "candidates": items, "ts": T0, "context": {"ctx_device": "web", "num_price": 3.0},
            "candidate_context": [{}, {"ctx_device": "tv", "num_price": 1.5}, {"ctx_device": "phone", "num_price": 9.0}]}
    got = http.post("/v1/score", json=body).json()["scores"]
    np.testing.assert_allclose(got, expected_scores(run, "u3", [], items, T0, devices, prices), rtol=1e-5)
    liked = http.post("/v1/score", json={**body, "user_features": {"user_likes": ["c"]}}).json()["scores"]
    np.testing.assert_allclose(liked, expected_scores(run, "u3", [], items, T0, devices, prices, likes=["c"]),
                               rtol=1e-5)
    assert not np.allclose(liked, got)  # u3's stored likes are a|b
    new = [{"item": "i2", "action": "5", "ts": T0 + 10, "context": {"ctx_device": "ios", "num_price": 4.5}},
           {"item": "i9", "action": "1", "ts": T0 + 7_200, "context": {"ctx_device": "tv", "num_price": 0.0}}]
    assert http.post("/v1/events", json={"user": "u3", "events": new}).status_code == 200
    stored = http.get("/v1/users/u3/history", params={"limit": 2}).json()
    assert [e["context"] for e in stored] == [e["context"] for e in new]
    later = {**body, "ts": T0 + 9_000}
    want = expected_scores(run, "u3", new, items, T0 + 9_000, devices, prices)
    np.testing.assert_allclose(http.post("/v1/score", json=later).json()["scores"], want, rtol=1e-5)
    http.close()
    again = client(run, store)  # a restart: the history, context included, comes from the store
    np.testing.assert_allclose(again.post("/v1/score", json=later).json()["scores"], want, rtol=1e-5)


@pytest.mark.parametrize("change,words", [
    ({"context": {"ctx_region": "eu", "num_price": 1.0}}, "'ctx_region' is not one the model was trained with"),
    ({"context": {"ctx_hour": "3", "num_price": 1.0}}, "ctx_hour is derived from ts"),
    ({"context": {"ctx_device": "web"}}, "num_price is required"),
    ({"context": {"num_price": "cheap"}}, "num_price must be a finite number"),
    ({"candidate_context": [{"num_price": 1.0}]}, "1 objects for 2 candidates"),
    ({"user_features": {"user_region": "eu"}}, "['user_region'] not among the features"),
    ({"user_features": {"user_age": ["1", "2"]}}, "user_features.user_age: one value expected"),
])
def test_features_the_model_does_not_know_get_a_422_naming_them(run, tmp_path, change, words):
    http = client(run, tmp_path / "history.sqlite")
    body = {"user": "u1", "candidates": ["i1", "i2"], "ts": T0, "context": {"num_price": 1.0}, **change}
    reply = http.post("/v1/score", json=body)
    assert reply.status_code == 422 and words in reply.json()["detail"], reply.json()
    event = {"item": "i1", "action": "4", "ts": T0, "context": {"ctx_os": "x", "num_price": 1.0}}
    reply = http.post("/v1/events", json={"user": "u1", "events": [event]})
    assert reply.status_code == 422 and "'ctx_os' is not one the model was trained with" in reply.json()["detail"]
    assert http.get("/v1/users/u1/history").json()[-1]["ts"] < T0  # nothing stored
