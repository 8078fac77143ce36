"""The HTTP service, driven over loopback against the real server (``climber serve`` in a subprocess):
scores equal the offline model's for the same history (before and after events arrive), events survive
a kill -9, every bad input gets a 4xx and stores nothing, the API key guards, and random bodies drawn
against the OpenAPI schema never get a 5xx."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from urllib.parse import quote

import httpx
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from climber.serve.app import Batcher, Metrics
from climber.serve.loadtest import start_server
from served import EVENTS_PER_USER, offline_probabilities, run, score  # noqa: F401  (run: the fixture)

@pytest.fixture(scope="module")
def server(run, tmp_path_factory):
    # no deadline: on a loaded machine a 504 would fail checks that are about something else (deadlines:
    # test_operations.py)
    proc, url = start_server(run, tmp_path_factory.mktemp("store") / "history.sqlite", ["--timeout-ms", "0"])
    yield url
    proc.kill()
    proc.wait()


def test_scores_equal_the_offline_model_before_and_after_events(run, server):
    history = httpx.get(server + "/v1/users/3/history").json()
    assert len(history) == EVENTS_PER_USER  # seeded from the prepared data, every split
    last = history[-1]["ts"]
    candidates = [5, "7", 12, "no-such-item", 40]
    reply = score(server, "3", candidates, last + 60)
    assert reply["known_user"] and reply["unknown_items"] == ["no-such-item"]
    np.testing.assert_allclose(reply["scores"], offline_probabilities(run, "3", history, candidates, last + 60),
                               rtol=1e-5, atol=1e-6)
    assert [r["item"] for r in reply["ranked"]] == [str(candidates[i]) for i in np.argsort(-np.array(reply["scores"]),
                                                                                            kind="stable")]
    new = [{"item": 9, "action": 5, "ts": last + 100}, {"item": "11", "action": "2", "ts": last + 100},
           {"item": "brand-new", "action": 4, "ts": last + 200}]
    r = httpx.post(server + "/v1/events", json={"user": 3, "events": new})
    assert r.status_code == 200, r.text
    assert r.json() == {"user": "3", "stored": 3, "events_total": EVENTS_PER_USER + 3, "unknown_items": ["brand-new"]}
    history = httpx.get(server + "/v1/users/3/history").json()
    assert [(e["item"], e["label"]) for e in history[-3:]] == [("9", 1), ("11", 0), ("brand-new", 1)]  # action>=4
    reply = score(server, "3", candidates, last + 300)  # the cached K/V extended by the new events
    np.testing.assert_allclose(reply["scores"], offline_probabilities(run, "3", history, candidates, last + 300),
                               rtol=1e-5, atol=1e-6)


def test_a_new_user_starts_from_an_empty_history(server):
    reply = score(server, "stranger", [1, 2], 10**9)
    assert not reply["known_user"] and reply["history_length"] == 0 and len(reply["scores"]) == 2
    assert httpx.get(server + "/v1/users/stranger/history").json() == []


def test_acknowledged_events_survive_kill_9(run, tmp_path):
    store = tmp_path / "history.sqlite"
    proc, url = start_server(run, store)
    try:
        for i in range(3):
            r = httpx.post(url + "/v1/events", json={"user": "newcomer", "events": [
                {"item": 1 + i, "action": 5, "ts": 10**9 + i}]})
            assert r.status_code == 200, r.text
        before = score(url, "newcomer", [4, 8], 10**9 + 10)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    proc, url = start_server(run, store)
    try:
        history = httpx.get(url + "/v1/users/newcomer/history").json()
        assert [e["item"] for e in history] == ["1", "2", "3"]
        assert len(httpx.get(url + "/v1/users/3/history").json()) == EVENTS_PER_USER  # seeded once, not twice
        after = score(url, "newcomer", [4, 8], 10**9 + 10)
        np.testing.assert_allclose(after["scores"], before["scores"], rtol=1e-6)
    finally:
        proc.kill()
        proc.wait()


def test_ids_are_stripped_of_surrounding_whitespace_as_prepare_strips_them(server):
    history = httpx.get(server + "/v1/users/17/history").json()
    assert httpx.get(server + "/v1/users/%2017%20/history").json() == history
    ts = history[-1]["ts"] + 60
    padded = score(server, " 17 ", [" 5", "7\t", 12], ts)
    assert padded["user"] == "17" and padded["known_user"] and padded["unknown_items"] == []
    assert padded["scores"] == score(server, "17", [5, 7, 12], ts)["scores"]
    r = httpx.post(server + "/v1/events", json={"user": " spaced ", "events": [{"item": " 9 ", "action": " 5 ",
                                                                                 "ts": 10**9}]})
    assert r.status_code == 200, r.text
    assert [(e["item"], e["action"]) for e in httpx.get(server + "/v1/users/spaced/history").json()] == [("9", "5")]
    r = httpx.post(server + "/v1/score", json={"user": "  ", "candidates": [1]})  # nothing left: refused
    assert r.status_code == 422 and "user" in r.text


BAD = [  # (path, body or raw bytes, status, words in the message)
    ("/v1/score", b"{not json", 422, "JSON"),
    ("/v1/score", {"user": "3", "candidates": "5"}, 422, "list"),
    ("/v1/score", {"user": "3", "candidates": []}, 422, "at least 1"),
    ("/v1/score", {"user": "3", "candidates": list(range(1001))}, 422, "at most 1000"),
    ("/v1/score", {"user": 1.5, "candidates": [1]}, 422, "user"),
    ("/v1/score", b'{"user": "\\ud800", "candidates": [1]}', 422, "unicode"),
    ("/v1/score", {"user": "3", "candidates": [1], "scenario": "moon"}, 422, "unknown scenario"),
    ("/v1/score", {"user": "3", "candidates": [1], "ts": 5}, 422, "before the user's last event"),
    ("/v1/score", {"user": "3", "candidates": [1], "extra": 1}, 422, "extra"),
    ("/v1/events", {"user": "3", "events": [{"item": 1, "action": 9, "ts": 2 * 10**9}]}, 422, "unknown action"),
    ("/v1/events", {"user": "3", "events": [{"item": 1, "action": 5}]}, 422, "ts"),
    ("/v1/events", {"user": "3", "events": [{"item": 1, "action": 5, "ts": 2 * 10**9},
                                             {"item": 2, "action": 5, "ts": 2 * 10**9 - 1}]}, 409, "time order"),
    ("/v1/events", {"user": "3", "events": [{"item": 1, "action": 5, "ts": 5}]}, 409, "last stored event"),
    ("/v1/events", {"user": "3", "events": [{"item": 1, "action": 5, "ts": -1}]}, 422, "greater than or equal"),
    ("/v1/events", {"user": "3", "events": []}, 422, "at least 1"),
    ("/v1/events", b"x" * (2**20 + 1), 413, "limit"),
]


@pytest.mark.parametrize("path,body,status,words", BAD, ids=[f"{i}-{b[0]}" for i, b in enumerate(BAD)])
def test_bad_input_gets_a_4xx_saying_what_is_wrong_and_stores_nothing(server, path, body, status, words):
    before = httpx.get(server + "/v1/users/3/history").json()
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(server + path, **kw)
    assert r.status_code == status, r.text
    assert words.lower() in r.text.lower()
    assert httpx.get(server + "/v1/users/3/history").json() == before


@pytest.mark.parametrize("body,listed,not_listed", [
    ({"user": "3", "candidates": list(range(100_000))}, 1, 0),  # one error, whose input is the whole list
    ({"candidates": list(range(100_000))}, 2, 0),  # "user" missing: its input is the whole body
    ({"user": "3", "candidates": [1.5] * 1000}, 20, 1980),  # two errors per candidate
])
def test_a_validation_error_echoes_little_of_a_huge_body(server, body, listed, not_listed):
    r = httpx.post(server + "/v1/score", json=body)
    assert r.status_code == 422
    assert len(r.content) < 6000, len(r.content)
    reply = r.json()
    assert len(reply["detail"]) == listed and reply.get("errors_not_listed", 0) == not_listed
    assert all(len(json.dumps(e["input"])) < 200 for e in reply["detail"])
    assert reply["detail"][-1]["loc"][:2] == ["body", "candidates"]  # still names the offending field


def test_an_oversized_chunked_body_gets_413_like_one_with_a_content_length(server):
    def chunks(n):  # a body of n bytes from a generator: httpx sends it chunked, without a Content-Length
        head, tail = b'{"user": "3", "candidates": ["', b'"]}'
        body = head + b"1" * (n - len(head) - len(tail)) + tail
        return (body[i:i + 65536] for i in range(0, n, 65536))

    r = httpx.post(server + "/v1/score", content=chunks(2**20 + 1), headers={"content-type": "application/json"})
    sized = httpx.post(server + "/v1/score", content=b"x" * (2**20 + 1), headers={"content-type": "application/json"})
    assert "content-length" not in r.request.headers and r.request.headers["transfer-encoding"] == "chunked"
    assert (r.status_code, r.json()) == (413, sized.json())
    assert sized.status_code == 413 and "limit" in sized.json()["detail"]
    r = httpx.post(server + "/v1/score", content=chunks(2**20), headers={"content-type": "application/json"})
    assert r.status_code == 422 and "at most 256 characters" in r.text  # at the limit: read and parsed


def test_serving_a_run_leaves_its_run_dir_unchanged(run, tmp_path, monkeypatch):
    from climber.serve.app import default_store_path

    def files():
        return {p.relative_to(run): p.is_file() and p.read_bytes() for p in sorted(run.rglob("*"))}

    before = files()
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    proc, url = start_server(run, None)  # no --store
    try:
        r = httpx.post(url + "/v1/events", json={"user": "3", "events": [{"item": 1, "action": 5, "ts": 2 * 10**9}]})
        assert r.status_code == 200, r.text
        score(url, "3", [1, 2], None)
    finally:
        proc.kill()
        proc.wait()
    output = open(proc.log_path).read()
    assert files() == before
    store = default_store_path(run, run.parent / "data")
    assert store.is_relative_to(tmp_path / "state" / "climber" / "serve") and store.exists()
    assert f"store {store}" in output  # the startup line names it


def test_threads_sets_the_models_torch_threads_and_healthz_says_so(run, tmp_path, capsys):
    from climber.cli import main

    proc, url = start_server(run, tmp_path / "h.sqlite", ["--threads", "1"])
    try:
        assert httpx.get(url + "/healthz").json()["threads"] == 1
    finally:
        proc.kill()
        proc.wait()
    assert main(["serve", "--run", str(run), "--threads", "-1"]) == 2
    assert "--threads must be >= 0" in capsys.readouterr().err


def test_an_api_key_guards_everything_but_healthz(run, tmp_path):
    proc, url = start_server(run, tmp_path / "h.sqlite", env={"CLIMBER_API_KEY": "s3cret"})
    try:
        assert httpx.get(url + "/healthz").status_code == 200
        body = {"user": "3", "candidates": [1]}
        assert httpx.post(url + "/v1/score", json=body).status_code == 401
        assert httpx.post(url + "/v1/score", json=body, headers={"X-API-Key": "wrong"}).status_code == 401
        assert httpx.get(url + "/metrics").status_code == 401
        assert httpx.post(url + "/v1/score", json=body, headers={"X-API-Key": "s3cret"}).status_code == 200
    finally:
        proc.kill()
        proc.wait()


def test_the_openapi_document_lists_every_error_each_endpoint_can_give(server):
    spec = httpx.get(server + "/openapi.json").json()
    schemas = spec["components"]["schemas"]
    expected = {("/v1/score", "post"): {"200", "401", "413", "422", "503", "504"},
                ("/v1/events", "post"): {"200", "401", "409", "413", "422", "503", "504"},
                ("/v1/admin/reload", "post"): {"200", "401", "403", "409", "422"},
                ("/v1/users/{user}/history", "get"): {"200", "401", "422"},
                ("/metrics", "get"): {"200", "401"},
                ("/healthz", "get"): {"200"}}
    assert {(path, method) for path, ops in spec["paths"].items() for method in ops} == set(expected)
    for (path, method), codes in expected.items():
        op = spec["paths"][path][method]
        assert op["description"].strip(), path
        assert set(op["responses"]) == codes, path
        for code in codes - {"200"}:
            ref = op["responses"][code]["content"]["application/json"]["schema"]["$ref"]
            assert "detail" in schemas[ref.split("/")[-1]]["properties"], (path, code)
    assert "errors_not_listed" in schemas["Invalid"]["properties"]


def test_the_docs_page_says_where_to_look_when_its_assets_cannot_load(server):
    page = httpx.get(server + "/docs")
    assert page.status_code == 200 and "swagger-ui" in page.text
    assert '<a href="/openapi.json">/openapi.json</a>' in page.text.split("<script")[0]  # shown without scripts


def test_metrics_are_prometheus_text(server):
    from prometheus_client.parser import text_string_to_metric_families

    def samples():
        text = httpx.get(server + "/metrics").text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    key = ("climber_request_seconds_count", (("route", "/v1/score"), ("status", "200")))
    before = samples().get(key, 0.0)
    score(server, "3", [1, 2], None)
    after = samples()
    assert after[key] == before + 1
    assert after[("climber_queue_depth", ())] == 0 and ("climber_shed_total", ()) in after
    assert ("climber_cache_hit_rate", ()) in after and ("climber_score_batch_requests_count", ()) in after
    assert any(name == "climber_model_info" for name, _ in after)


@pytest.mark.parametrize("path, body, unit", [
    ("/v1/score", {"user": "3", "candidates": [1], "ts": 2 * 10**12}, "milliseconds"),
    ("/v1/events", {"user": "ms-user", "events": [{"item": 1, "action": 5, "ts": 2 * 10**15}]}, "microseconds"),
])
def test_time_stamps_in_a_finer_unit_than_seconds_are_refused(server, path, body, unit):
    """The check of `climber data prepare` (after the year 3000 in seconds): a 422 naming the likely unit."""
    r = httpx.post(server + path, json=body)
    assert r.status_code == 422, r.text
    assert f"after the year 3000 read as seconds since the epoch; {unit}? send seconds" in r.json()["detail"][0]["msg"]
    assert httpx.get(server + "/v1/users/ms-user/history").json() == []


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
                    max_leaves=10)


def bodies(schema: dict, components: dict):
    """Bodies near the schema (its properties with random or well-typed values) and random JSON."""
    if "$ref" in schema:
        schema = components[schema["$ref"].split("/")[-1]]
    if schema.get("type") == "object" and "properties" in schema:
        fields = {k: bodies(v, components) | JSON for k, v in schema["properties"].items()}
        return st.fixed_dictionaries({}, optional=fields) | JSON
    if schema.get("type") == "array":
        return st.lists(bodies(schema.get("items", {}), components), max_size=5)
    if "anyOf" in schema:
        return st.one_of(*(bodies(s, components) for s in schema["anyOf"]))
    return {"integer": st.integers(-5, 2**63) | st.sampled_from([0, 1, 3, 5, 2 * 10**9]),
            "string": st.text(max_size=300) | st.sampled_from(["3", "5", "default", "4"])}.get(schema.get("type"), JSON)


def test_random_bodies_against_the_openapi_schema_never_get_a_5xx(server):
    spec = httpx.get(server + "/openapi.json").json()
    components = spec["components"]["schemas"]
    posts = {p: ops["post"]["requestBody"]["content"]["application/json"]["schema"]
             for p, ops in spec["paths"].items() if "post" in ops}
    assert set(posts) == {"/v1/score", "/v1/events", "/v1/admin/reload"}  # without a key, reload is a 403
    client = httpx.Client(base_url=server, timeout=30)

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.data())
    def check(data):
        path = data.draw(st.sampled_from(sorted(posts)))
        body = data.draw(bodies(posts[path], components))
        # ensure_ascii: lone surrogates travel as \ud800 escapes
        r = client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
        assert r.status_code < 500, (path, body, r.text)
        user = data.draw(st.text(min_size=1, max_size=20))
        r = client.get(f"/v1/users/{quote(user, safe='')}/history")
        assert r.status_code < 500, (user, r.text)

    check()


def run_batcher(pending: int, n: int, window_s: float = 0.05, max_batch: int = 4, late: int = 0):
    """n score requests queued together (plus ``late`` more 10 ms later), ``pending`` in flight ->
    (each request's result, the batch sizes score_many saw)."""
    calls = []

    class FakeEngine:
        def score_many(self, requests):
            calls.append(len(requests))
            return [torch.tensor([float(r)]) for r in requests]

    engine = FakeEngine()

    async def main():
        async def run(fn, *args):
            return fn(*args)

        async def now(i):
            return await batcher.score(engine, i)

        async def later(i):
            await asyncio.sleep(0.01)
            return await now(i)

        batcher = Batcher(run, window_s=window_s, max_batch=max_batch, metrics=Metrics())
        batcher.pending = pending
        task = asyncio.create_task(batcher.serve_forever())
        out = await asyncio.gather(*(now(i) for i in range(n)), *(later(n + i) for i in range(late)))
        task.cancel()
        return [o.item() for o in out]

    return asyncio.run(main()), calls


def test_the_batcher_scores_requests_that_wait_together_in_one_call():
    out, calls = run_batcher(pending=6, n=6)
    assert out == [0, 1, 2, 3, 4, 5] and calls == [4, 2]  # each its own result; bounded by max_batch
    # a request in flight (pending) is waited for within the window; with none in flight, nobody waits
    assert run_batcher(pending=2, n=1, late=1, window_s=5.0) == ([0, 1], [2])
    assert run_batcher(pending=1, n=1, late=1, window_s=5.0) == ([0, 1], [1, 1])
