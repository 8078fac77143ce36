"""``climber bench http``: a bounded load on the real service over loopback, with and without dynamic
batching, in the same run.

Each mode starts ``climber serve`` in a subprocess (one shared history store, seeded once), sends every
request of the stream once as a warm-up (each user's cache then holds, as the in-process engine's does
when it is timed), then for each concurrency c sends the ``requests`` from c concurrent clients: score
requests of a random known user (seeded) with ``candidates`` random known items, and with ``mix`` a
share of events, each to a new user. The in-process column runs the same stream through the service in
this process (``Service.prepare_score`` and ``Engine.score_many``, ``Service.add_events``): score
requests alone, then the whole stream with scores in batches.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import polars as pl

from climber.config import ConfigError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run: Path, store: Path | None, extra: list[str] = (), env: dict | None = None,
                 timeout_s: float = 120.0) -> tuple[subprocess.Popen, str]:
    """``climber serve`` on a free loopback port (``store`` None: the service's default store) -> (process,
    base url) once /healthz answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "climber", "serve", "--run", str(run), "--port", str(port),
           *([] if store is None else ["--store", str(store)]), *extra]
    # the server's output goes to a file: a pipe nobody reads fills up and blocks the server
    log = tempfile.NamedTemporaryFile("w+", prefix="climber-serve-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})})
    proc.log_path = log.name
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"climber serve exited with {proc.returncode}:\n{Path(log.name).read_text()}")
        try:
            if httpx.get(url + "/healthz", timeout=1.0).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"climber serve did not answer /healthz within {timeout_s:.0f} s")


async def _post(connection: list, host: str, path: str, body: dict) -> int:
    """One HTTP/1.1 POST of ``body`` as JSON on ``connection`` ([reader, writer], kept alive unless the
    server closes it) -> the reply's status (its body is read and dropped)."""
    reader, writer = connection
    payload = json.dumps(body).encode()
    writer.write(f"POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
                 f"content-length: {len(payload)}\r\n\r\n".encode() + payload)
    status_line, *lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").strip().split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    await reader.readexactly(int(headers.get("content-length", 0)))
    if headers.get("connection", "").lower() == "close":
        writer.close()
        connection.clear()
    return int(status_line.split()[1])


async def _load(url: str, work: list[tuple[str, dict]], concurrency: int) -> tuple[dict, dict, float]:
    """Send ``work`` ((path, body) pairs) from ``concurrency`` clients, each on a keep-alive connection
    of its own -> (latencies s of the 2xx by path, status counts by path (0: no answer within 60 s),
    wall s). A bare asyncio client: httpx took 80% of a core at 64 clients and, on this 2-core machine,
    its own queueing put seconds on the p99 that the server never saw."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    latencies: dict = {}
    statuses: dict = {}
    next_item = iter(work)

    async def client_loop():
        connection = None
        for path, body in next_item:
            start = time.perf_counter()
            try:
                connection = connection or list(await asyncio.open_connection(host, int(port)))
                status = await asyncio.wait_for(_post(connection, host, path, body), 60.0)
            except (OSError, asyncio.IncompleteReadError, TimeoutError):
                status, connection = 0, None
            if status == 200:
                latencies.setdefault(path, []).append(time.perf_counter() - start)
            counts = statuses.setdefault(path, {})
            counts[status] = counts.get(status, 0) + 1
        if connection:
            connection[1].close()

    start = time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    return latencies, statuses, time.perf_counter() - start


def server_latency_buckets(url: str) -> dict:
    """The service's own latency histogram (arrival at the app to reply, /metrics): {(route, status):
    {bucket bound s: cumulative count}}."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in family.samples:
            if s.name == "climber_request_seconds_bucket":
                key = (s.labels["route"], s.labels["status"])
                out.setdefault(key, {})[float(s.labels["le"])] = s.value
    return out


def server_p99_bound_ms(before: dict, after: dict, route: str) -> float | None:
    """The smallest bucket bound (ms) under which 99% of ``route``'s answers between the two readings
    fall, as the server measured them (every status)."""
    counts: dict = {}
    for (r, _), buckets in after.items():
        if r == route:
            for bound, n in buckets.items():
                counts[bound] = counts.get(bound, 0) + n - before.get((r, _), {}).get(bound, 0)
    total = counts.get(float("inf"), 0)
    if not total:
        return None
    bound = min(b for b, n in counts.items() if n >= 0.99 * total)
    return bound * 1000 if bound != float("inf") else None


def _ms(seconds: list[float], q: float) -> float | None:
    return round(float(np.percentile(np.array(seconds) * 1000, q)), 2) if seconds else None


def in_process(run: Path, data: Path, work: list[tuple[str, dict]], store: Path, max_batch: int) -> dict:
    """The same request stream through the service in this process, no HTTP: each score request alone
    (``Service.prepare_score`` then ``Engine.score_many``: p50, p99), then the whole stream saturated
    (requests/s): score requests in batches of up to ``max_batch`` as the batched server forms them at
    most, each event request (``Service.add_events``) in its place in the stream."""
    from climber.serve.app import Service, request_models

    service = Service(run, data, store, log=lambda *_: None)
    events_model = request_models(1_000, 1_000)[1]
    one = lambda b: service.prepare_score(b["user"], b["candidates"], None, None)  # noqa: E731
    scores = [body for path, body in work if path == "/v1/score"]
    for b in scores:  # warm-up: every user's cache filled, as the servers' warm-up fills theirs
        engine, request, _ = one(b)
        engine.score_many([request])
    alone = []
    for b in scores:
        start = time.perf_counter()
        engine, request, _ = one(b)
        engine.score_many([request])
        alone.append(time.perf_counter() - start)
    batch: list[dict] = []

    def flush():
        if batch:
            prepared = [one(b) for b in batch]
            prepared[0][0].score_many([r for _, r, _ in prepared])
            batch.clear()

    start = time.perf_counter()
    for path, body in work:
        if path == "/v1/score":
            batch.append(body)
            if len(batch) == max_batch:
                flush()
        else:
            flush()
            service.add_events(body["user"], events_model.model_validate(body).events)
    flush()
    wall = time.perf_counter() - start
    service.store.close()
    return {"p50_ms": _ms(alone, 50), "p99_ms": _ms(alone, 99), "requests_per_s": round(len(work) / wall, 1)}


def parse_mix(text: str | None) -> dict[str, float]:
    """"score=0.8,events=0.2" -> {"score": 0.8, "events": 0.2}; None: scores only."""
    if not text:
        return {"score": 1.0}
    mix = {}
    for part in text.split(","):
        name, _, share = part.partition("=")
        if name.strip() not in ("score", "events"):
            raise ConfigError(f"--mix: {name.strip()!r} is not a route (score, events)")
        mix[name.strip()] = float(share)
    if abs(sum(mix.values()) - 1) > 1e-6 or min(mix.values()) < 0:
        raise ConfigError(f"--mix: the shares {mix} must be >= 0 and sum to 1")
    return mix


def bench_http(run: Path, requests: int = 2000, concurrency=(1, 4, 16, 32, 64), candidates: int = 64,
               batch_window_ms: float = 2.0, seed: int = 0, mix: str | None = None, max_queue: int = 256,
               timeout_ms: float = 2000.0, max_batch: int = 32, log=print) -> dict:
    from climber.compare import machine
    from climber.config import load_yaml
    from climber.data.prepare import load_manifest

    run = Path(run)
    data = Path(load_yaml(run / "config.yaml")["data"])
    users = pl.read_parquet(data / "vocab" / "user.parquet")["raw"].to_list()
    items = pl.read_parquet(data / "vocab" / "item.parquet")["raw"].to_list()
    actions = pl.read_parquet(data / "vocab" / "action.parquet")["raw"].to_list()
    shares = parse_mix(mix)
    rng = np.random.default_rng(seed)
    bodies = [{"user": users[u], "candidates": [items[i] for i in rng.choice(len(items), candidates, replace=False)]}
              for u in rng.integers(0, len(users), requests)]
    is_event = rng.random(requests) < shares.get("events", 0.0)
    ts = int(load_manifest(data)["ts_range"][1]) + 1
    rows, stored_check, answered = [], [], {}  # answered: (mode, c) -> 2xx of every route per second
    flags = ["--max-queue", str(max_queue), "--timeout-ms", str(timeout_ms), "--max-batch", str(max_batch)]

    def stream(tag: str) -> list[tuple[str, dict]]:  # each event: a new user of its own, so every one can be checked
        return [("/v1/events", {"user": f"bench-{tag}-{k}", "events": [{
            "item": body["candidates"][0], "action": actions[k % len(actions)], "ts": ts}]})
                if is_event[k] else ("/v1/score", body) for k, body in enumerate(bodies)]

    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "history.sqlite"
        reference = in_process(run, data, stream("in-process"), Path(tmp) / "in-process.sqlite", max_batch)
        log(f"in-process: score p50 {reference['p50_ms']} ms  p99 {reference['p99_ms']} ms  saturated "
            f"{reference['requests_per_s']} req/s (the whole stream, scores in batches of {max_batch})")
        modes = {"batched": ["--batch-window-ms", str(batch_window_ms)], "unbatched": ["--no-batching"]}
        for mode, mode_flags in modes.items():
            proc, url = start_server(run, store, [*flags, *mode_flags])
            try:
                # warm-up: every user of the stream scored once, so the server's caches are as warm as the
                # in-process engine's when it is timed
                asyncio.run(_load(url, [("/v1/score", b) for b in bodies], 8))
                for c in concurrency:
                    work = stream(f"{mode}-{c}")
                    before = server_latency_buckets(url)
                    latencies, statuses, wall = asyncio.run(_load(url, work, c))
                    after = server_latency_buckets(url)
                    acked = [body["user"] for (path, body) in work if path == "/v1/events"]
                    ok = statuses.get("/v1/events", {}).get(200, 0)
                    stored = sum(len(httpx.get(f"{url}/v1/users/{u}/history").json()) for u in acked)
                    stored_check.append({"mode": mode, "concurrency": c, "acknowledged": ok, "stored": stored})
                    answered[(mode, c)] = sum(counts.get(200, 0) for counts in statuses.values()) / wall
                    for path, counts in sorted(statuses.items()):
                        row = {"mode": mode, "concurrency": c, "route": path, "requests": sum(counts.values()),
                               "requests_per_s": round(sum(counts.values()) / wall, 1),
                               "p50_ms": _ms(latencies.get(path, []), 50), "p99_ms": _ms(latencies.get(path, []), 99),
                               "ok": counts.get(200, 0), "shed_503": counts.get(503, 0),
                               "expired_504": counts.get(504, 0),
                               "server_p99_at_most_ms": server_p99_bound_ms(before, after, path),
                               "errors": sum(n for s, n in counts.items() if s not in (200, 503, 504))}
                        rows.append(row)
                        log(f"{mode:9s} c={c:3d} {path:10s}: {row['requests_per_s']:7.1f} req/s  p50 {row['p50_ms']} ms"
                            f"  p99 {row['p99_ms']} ms (server: <= {row['server_p99_at_most_ms']} ms)  503 "
                            f"{row['shed_503']}  504 {row['expired_504']}  errors {row['errors']}")
                    if ok:
                        log(f"          events acknowledged {ok}, stored {stored}")
            finally:
                proc.terminate()
                proc.wait(timeout=60)
    score_rows = {(r["mode"], r["concurrency"]): r for r in rows if r["route"] == "/v1/score"}
    ratios = {c: round(score_rows[("batched", c)]["requests_per_s"] / score_rows[("unbatched", c)]["requests_per_s"], 2)
              for c in concurrency if ("batched", c) in score_rows and ("unbatched", c) in score_rows}
    lone = score_rows.get(("batched", concurrency[0]), {}).get("p50_ms")
    best = max((n for (m, _), n in answered.items() if m == "batched"), default=None)
    return {"run": str(run), "data": str(data), "fingerprint": load_manifest(data)["fingerprint"]["sha256"],
            "machine": machine(), "batch_window_ms": batch_window_ms, "max_batch": max_batch, "max_queue": max_queue,
            "timeout_ms": timeout_ms, "mix": shares, "in_process": reference, "rows": rows,
            "events_stored_check": stored_check,
            "http_p50_over_in_process_p50": None if lone is None else round(lone / reference["p50_ms"], 2),
            "saturated_http_answered_per_s": None if best is None else round(best, 1),
            "saturated_http_over_in_process": None if best is None else round(best / reference["requests_per_s"], 2),
            "throughput_ratio_batched_over_unbatched": ratios}


def markdown(out: dict) -> str:
    ref = out["in_process"]
    lines = [f"in-process (the same stream, no HTTP): a score request alone p50 {ref['p50_ms']} ms, p99 {ref['p99_ms']} "
             f"ms; the whole stream saturated {ref['requests_per_s']} requests/s (scores in batches of "
             f"{out['max_batch']})", "",
             "| mode | clients | route | requests/s | p50 ms | p99 ms | server p99 ms at most | 200 | 503 | 504 | errors |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['mode']} | {r['concurrency']} | {r['route']} | {r['requests_per_s']} | {r['p50_ms']} | "
              f"{r['p99_ms']} | {r['server_p99_at_most_ms']} | {r['ok']} | {r['shed_503']} | {r['expired_504']} | "
              f"{r['errors']} |" for r in out["rows"]]
    ratios = ", ".join(f"c={c}: {v}x" for c, v in out["throughput_ratio_batched_over_unbatched"].items())
    checks = "; ".join(f"{s['mode']} c={s['concurrency']}: {s['acknowledged']} acknowledged, {s['stored']} stored"
                       for s in out["events_stored_check"] if s["acknowledged"])
    return ("\n".join(lines) + f"\n\nHTTP p50 (one client, batched) / in-process p50: {out['http_p50_over_in_process_p50']}x;"
            f" saturated HTTP (batched, best level, 2xx of every route: {out['saturated_http_answered_per_s']}/s) / "
            f"in-process: {out['saturated_http_over_in_process']}x\n"
            f"throughput batched / unbatched: {ratios}\n" + (f"events: {checks}\n" if checks else ""))
