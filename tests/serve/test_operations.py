"""The service under operations (issue 20): bounded admission (503 with Retry-After) and deadlines (504,
work dropped: a 504 event is never stored, a 2xx one always is), SIGTERM answers what is in flight and
exits 0 with every acknowledged event stored once, a score after an acknowledged event sees it, and a
model reload (endpoint or SIGHUP) swaps in a compatible run without a failed request and refuses an
incompatible one, saying why. Loopback only; bounded in count and time."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from climber.serve.app import Metrics, Rejected, Work, model_fingerprint
from climber.serve.loadtest import start_server
from served import offline_probabilities, run, score, train_tiny  # noqa: F401  (run: the fixture)

T0 = 990_000_000  # after every event of the served log


def test_work_sheds_past_its_queue_and_drops_work_whose_deadline_passed_before_it_started():
    ran = []

    async def main():
        metrics = Metrics()
        work = Work(max_queue=2, timeout_s=0.05, metrics=metrics)
        gate = threading.Event()
        with work.admitted() as first, work.admitted(time.monotonic() - 1.0) as second:
            assert second < first  # a deadline counts from arrival: this one arrived a second ago
            with pytest.raises(Rejected) as full:
                with work.admitted():
                    pass
            assert full.value.status == 503 and work.depth == 2
            assert metrics.registry.get_sample_value("climber_queue_depth") == 2  # the gauge reads the queue
            blocker = asyncio.create_task(work.run(lambda: gate.wait(5) and ran.append("started"), deadline=first))
            await asyncio.sleep(0.01)  # the blocker holds the model thread
            with pytest.raises(Rejected) as late:
                await work.run(ran.append, "dropped", deadline=second)
            assert late.value.status == 504
            gate.set()
            await blocker  # started before its deadline: it runs to the end and answers, late
        assert work.depth == 0 and metrics.registry.get_sample_value("climber_queue_depth") == 0
        work.executor.shutdown(wait=True)
        return metrics

    metrics = asyncio.run(main())
    assert ran == ["started"]  # the dropped work never ran
    assert metrics.shed._value.get() == 1 and metrics.expired._value.get() == 1


async def post_all(url: str, bodies: list[dict], path: str = "/v1/events") -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=httpx.Limits(max_connections=len(bodies))) as c:
        return await asyncio.gather(*(c.post(path, json=b) for b in bodies))


def test_a_tight_queue_and_deadline_store_an_event_exactly_when_it_is_acknowledged(run, tmp_path):
    proc, url = start_server(run, tmp_path / "history.sqlite", ["--max-queue", "6", "--timeout-ms", "15"])
    try:
        bodies = [{"user": f"burst{k}", "events": [{"item": "1", "action": "5", "ts": T0 + k}]} for k in range(60)]
        replies = asyncio.run(post_all(url, bodies))
        codes = [r.status_code for r in replies]
        assert set(codes) <= {200, 503, 504}, codes
        assert all(r.headers.get("retry-after") == "1" for r in replies if r.status_code == 503)
        for k, code in enumerate(codes):
            assert len(httpx.get(f"{url}/v1/users/burst{k}/history").json()) == (code == 200), (k, code)
        metrics = httpx.get(url + "/metrics").text
        assert f"climber_shed_total {float(codes.count(503))}" in metrics
        assert f"climber_expired_total {float(codes.count(504))}" in metrics
        assert f"climber_events_stored_total {float(codes.count(200))}" in metrics
    finally:
        proc.kill()
        proc.wait()


def test_sigterm_answers_requests_in_flight_exits_0_and_keeps_every_acknowledged_event_once(run, tmp_path):
    store = tmp_path / "history.sqlite"
    proc, url = start_server(run, store, ["--timeout-ms", "0"])
    acked: dict[str, list[int]] = {}

    async def client(k: int):
        user, mine = f"term{k}", acked.setdefault(f"term{k}", [])
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            for i in range(400):
                try:
                    r = await c.post("/v1/events", json={"user": user, "events": [{"item": "2", "action": "4",
                                                                                   "ts": T0 + i}]})
                except httpx.HTTPError:
                    return  # the server stopped accepting
                if r.status_code == 200:
                    mine.append(T0 + i)

    async def main():
        clients = asyncio.gather(*(client(k) for k in range(8)))
        await asyncio.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        await clients

    asyncio.run(main())
    assert proc.wait(timeout=60) == 0, open(proc.log_path).read()
    assert sum(map(len, acked.values())) > 0
    proc, url = start_server(run, store)
    try:
        for user, ts in acked.items():
            stored = [e["ts"] for e in httpx.get(f"{url}/v1/users/{user}/history").json()]
            assert len(stored) == len(set(stored)), user  # none stored twice
            assert set(ts) <= set(stored), user  # every acknowledged one stored
            assert len(stored) <= len(ts) + 1, user  # at most the one in flight when the connection dropped
    finally:
        proc.kill()
        proc.wait()


def test_a_score_sent_after_an_acknowledged_event_sees_it(run, tmp_path):
    proc, url = start_server(run, tmp_path / "history.sqlite", ["--timeout-ms", "0"])  # no 504 on a loaded machine

    async def client(k: int, c: httpx.AsyncClient):
        for i in range(4):
            ts = T0 + 100 * k + i
            r = await c.post("/v1/events", json={"user": str(k % 30 + 1), "events": [{"item": "3", "action": "5",
                                                                                      "ts": ts + 3_000 * k}]})
            assert r.status_code == 200, r.text
            reply = (await c.post("/v1/score", json={"user": str(k % 30 + 1), "candidates": ["1", "2"]})).json()
            assert reply["last_event_ts"] >= ts + 3_000 * k, (k, i, reply)

    async def main():
        # 120 events, each a durable SQLite commit on the one model thread: on a machine whose disk is busy
        # (trainings writing checkpoints) a request can wait long behind 30 others; this test is about
        # what a score sees, not how fast
        async with httpx.AsyncClient(base_url=url, timeout=180, limits=httpx.Limits(max_connections=32)) as c:
            await asyncio.gather(*(client(k, c) for k in range(30)))

    try:
        asyncio.run(main())
    finally:
        proc.kill()
        proc.wait()


def test_reload_swaps_a_compatible_run_without_a_failed_request_and_refuses_others_saying_why(run, tmp_path):
    from climber.data.datasets import load_dataset
    from climber.data.prepare import prepare
    from climber.data.schema import LabelRule
    from conftest import prepare_feature_log

    data = run.parent / "data"
    other = train_tiny(data, tmp_path / "other", seed=1)
    source = load_dataset("movielens-100k", run.parent / "raw")
    prepare(dataclasses.replace(source, label_rule=LabelRule.parse("action>=3")), tmp_path / "data3")
    other_rule = train_tiny(tmp_path / "data3", tmp_path / "rule3")
    other_inputs = train_tiny(prepare_feature_log(tmp_path), tmp_path / "features")
    key = {"X-API-Key": "k"}
    proc, url = start_server(run, tmp_path / "history.sqlite", ["--timeout-ms", "0"], env={"CLIMBER_API_KEY": "k"})
    try:
        assert httpx.get(url + "/healthz").json()["fingerprint"] == model_fingerprint(run)
        statuses = []

        async def scoring(stop: asyncio.Event):
            async with httpx.AsyncClient(base_url=url, timeout=30, headers=key) as c:
                while not stop.is_set():
                    statuses.append((await c.post("/v1/score", json={"user": "5", "candidates": ["1", "7"],
                                                                     "ts": T0})).status_code)

        async def main():
            stop = asyncio.Event()
            async def answered(n: int):  # scores answered, however slow the machine is (or the clients failed)
                while len(statuses) < n and not all(t.done() for t in clients):
                    await asyncio.sleep(0.01)

            clients = [asyncio.create_task(scoring(stop)) for _ in range(4)]
            await answered(6)
            async with httpx.AsyncClient(base_url=url, timeout=60, headers=key) as c:
                reply = await c.post("/v1/admin/reload", json={"run": str(other)})
            await answered(len(statuses) + 6)
            stop.set()
            await asyncio.gather(*clients)
            return reply

        reply = asyncio.run(main())
        assert reply.status_code == 200 and reply.json()["fingerprint"] == model_fingerprint(other), reply.text
        assert len(statuses) > 10 and set(statuses) == {200}
        health = httpx.get(url + "/healthz").json()
        assert health["run"] == str(other) and health["fingerprint"] == model_fingerprint(other)
        history = httpx.get(url + "/v1/users/5/history", headers=key).json()
        got = score(url, "5", ["1", "7"], T0, headers=key)["scores"]
        np.testing.assert_allclose(got, offline_probabilities(other, "5", history, ["1", "7"], T0), rtol=1e-5)
        assert not np.allclose(got, offline_probabilities(run, "5", history, ["1", "7"], T0), rtol=1e-5)
        for bad, words in ((other_rule, "label rule 'action>=3' is not the served 'action>=4'"),
                           (other_inputs, "reads other inputs"), (tmp_path / "nowhere", "cannot load it")):
            r = httpx.post(url + "/v1/admin/reload", json={"run": str(bad)}, headers=key)
            assert r.status_code == 409 and words in r.json()["detail"], r.text
        assert httpx.get(url + "/healthz").json()["run"] == str(other)  # a refusal changes nothing
        assert httpx.post(url + "/v1/admin/reload", json={}).status_code == 401
        os.kill(proc.pid, signal.SIGHUP)  # reloads the served run dir
        deadline = time.monotonic() + 30
        while 'climber_reloads_total{result="done"} 2.0' not in httpx.get(url + "/metrics", headers=key).text:
            assert time.monotonic() < deadline, "SIGHUP did not reload"
            time.sleep(0.1)
        assert httpx.get(url + "/healthz").json()["run"] == str(other)
    finally:
        proc.kill()
        proc.wait()


def test_without_an_api_key_the_admin_endpoint_is_refused(run, tmp_path):
    proc, url = start_server(run, tmp_path / "history.sqlite")
    try:
        r = httpx.post(url + "/v1/admin/reload", json={})
        assert r.status_code == 403 and "needs an API key" in r.json()["detail"]
    finally:
        proc.kill()
        proc.wait()


def test_the_mixed_load_bench_counts_every_route_and_finds_every_acknowledged_event_stored(run):
    from climber.serve.loadtest import bench_http, markdown, parse_mix

    out = bench_http(run, requests=40, concurrency=(1, 8), candidates=5, mix="score=0.7,events=0.3", log=lambda *_: None)
    assert {(r["mode"], r["concurrency"], r["route"]) for r in out["rows"]} == {
        (m, c, route) for m in ("batched", "unbatched") for c in (1, 8) for route in ("/v1/score", "/v1/events")}
    assert all(r["errors"] == 0 and r["ok"] + r["shed_503"] + r["expired_504"] == r["requests"] for r in out["rows"])
    assert all(0 < r["server_p99_at_most_ms"] <= 5000 for r in out["rows"])  # a bucket bound of the server's own
    assert sum(r["requests"] for r in out["rows"] if r["mode"] == "batched" and r["concurrency"] == 8) == 40
    checks = out["events_stored_check"]
    assert len(checks) == 4 and all(s["acknowledged"] == s["stored"] > 0 for s in checks)
    assert out["in_process"]["p50_ms"] > 0 and out["http_p50_over_in_process_p50"] > 0
    assert out["saturated_http_over_in_process"] == pytest.approx(
        out["saturated_http_answered_per_s"] / out["in_process"]["requests_per_s"], abs=0.01)
    assert "acknowledged" in markdown(out)
    assert parse_mix(None) == {"score": 1.0}
    for bad in ("score=0.5,events=0.2", "score=0.5,reload=0.5"):
        with pytest.raises(ValueError, match="--mix"):
            parse_mix(bad)


def test_the_in_process_column_runs_the_same_stream_and_stores_its_events_in_their_place(run, tmp_path):
    from climber.config import load_yaml
    from climber.serve.loadtest import in_process
    from climber.serve.store import HistoryStore

    data = Path(load_yaml(run / "config.yaml")["data"])
    T = 2_000_000_000
    work = [("/v1/score", {"user": "1", "candidates": ["3", "4"]}),
            ("/v1/events", {"user": "1", "events": [{"item": "5", "action": "4", "ts": T}]}),
            ("/v1/score", {"user": "2", "candidates": ["3"]}),
            ("/v1/events", {"user": "new", "events": [{"item": "6", "action": "1", "ts": T}]})]
    out = in_process(run, data, work, tmp_path / "h.sqlite", max_batch=2)
    assert out["requests_per_s"] > 0 and out["p50_ms"] > 0
    store = HistoryStore(tmp_path / "h.sqlite")
    try:
        assert store.history("new")[-1].item == "6" and store.history("1")[-1].ts == T
    finally:
        store.close()


def test_the_server_p99_bound_is_the_smallest_bucket_holding_99_percent_of_the_answers_between_readings():
    from climber.serve.loadtest import server_p99_bound_ms

    inf = float("inf")
    before = {("/v1/score", "200"): {0.1: 50, 1.0: 60, inf: 60}}
    after = {("/v1/score", "200"): {0.1: 50, 1.0: 158, inf: 160}, ("/v1/score", "504"): {0.1: 0, 1.0: 0, inf: 0},
             ("/v1/events", "200"): {0.1: 7, 1.0: 7, inf: 7}}
    assert server_p99_bound_ms(before, after, "/v1/score") is None  # 2 of the 100 new ones past 1 s: unbounded
    after[("/v1/score", "200")][1.0] = 159  # now 99 of 100 within 1 s, none within 0.1 s
    assert server_p99_bound_ms(before, after, "/v1/score") == 1000.0
    assert server_p99_bound_ms(before, after, "/v1/events") == 100.0
    assert server_p99_bound_ms(after, after, "/v1/score") is None  # nothing answered in between
