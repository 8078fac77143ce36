"""``climber bench http``: a bounded load on the real service over loopback, with and without dynamic
batching, in the same run.

Each mode starts ``climber serve`` in a subprocess (one shared history store, seeded once), sends a few
warm-up requests, then for each concurrency c sends ``requests`` score requests from c concurrent
clients: a random known user (seeded) and ``candidates`` random known items per request.
"""

from __future__ import annotations

import asyncio
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
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"climber serve exited with {proc.returncode}:\n{proc.stdout.read()}")
        try:
            if httpx.get(url + "/healthz", timeout=1.0).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"climber serve did not answer /healthz within {timeout_s:.0f} s")


async def _load(url: str, bodies: list[dict], concurrency: int) -> tuple[list[float], int, float]:
    """Send ``bodies`` from ``concurrency`` clients -> (latencies s of the 200s, errors, wall s)."""
    latencies, errors, next_body = [], 0, iter(bodies)
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60.0, limits=limits) as client:

        async def client_loop():
            nonlocal errors
            for body in next_body:
                start = time.perf_counter()
                try:
                    ok = (await client.post("/v1/score", json=body)).status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - start)
                else:
                    errors += 1

        start = time.perf_counter()
        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        return latencies, errors, time.perf_counter() - start


def bench_http(run: Path, requests: int = 2000, concurrency=(1, 4, 16, 32), candidates: int = 64,
               batch_window_ms: float = 2.0, seed: int = 0, log=print) -> dict:
    from climber.compare import machine
    from climber.config import load_yaml
    from climber.data.prepare import load_manifest

    run = Path(run)
    data = Path(load_yaml(run / "config.yaml")["data"])
    users = pl.read_parquet(data / "vocab" / "user.parquet")["raw"].to_list()
    items = pl.read_parquet(data / "vocab" / "item.parquet")["raw"].to_list()
    rng = np.random.default_rng(seed)
    bodies = [{"user": users[u], "candidates": [items[i] for i in rng.choice(len(items), candidates, replace=False)]}
              for u in rng.integers(0, len(users), requests)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "history.sqlite"
        modes = {"batched": ["--batch-window-ms", str(batch_window_ms)], "unbatched": ["--no-batching"]}
        for mode, flags in modes.items():
            proc, url = start_server(run, store, flags)
            try:
                asyncio.run(_load(url, bodies[:20], 1))  # warm-up
                for c in concurrency:
                    latencies, errors, wall = asyncio.run(_load(url, bodies, c))
                    ms = np.array(latencies) * 1000
                    row = {"mode": mode, "concurrency": c, "requests": requests, "candidates": candidates,
                           "errors": errors, "requests_per_s": round(requests / wall, 1),
                           "p50_ms": round(float(np.percentile(ms, 50)), 2) if len(ms) else None,
                           "p99_ms": round(float(np.percentile(ms, 99)), 2) if len(ms) else None}
                    rows.append(row)
                    log(f"{mode:9s} concurrency {c:3d}: {row['requests_per_s']:8.1f} req/s  p50 {row['p50_ms']} ms  "
                        f"p99 {row['p99_ms']} ms  errors {errors}")
            finally:
                proc.terminate()
                proc.wait(timeout=30)
    by = {(r["mode"], r["concurrency"]): r for r in rows}
    ratios = {c: round(by[("batched", c)]["requests_per_s"] / by[("unbatched", c)]["requests_per_s"], 2)
              for c in concurrency}
    return {"run": str(run), "data": str(data), "fingerprint": load_manifest(data)["fingerprint"]["sha256"],
            "machine": machine(), "batch_window_ms": batch_window_ms, "rows": rows,
            "throughput_ratio_batched_over_unbatched": ratios}


def markdown(out: dict) -> str:
    lines = ["| mode | concurrency | requests/s | p50 ms | p99 ms | errors |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['mode']} | {r['concurrency']} | {r['requests_per_s']} | {r['p50_ms']} | {r['p99_ms']} | "
              f"{r['errors']} |" for r in out["rows"]]
    ratios = ", ".join(f"c={c}: {v}x" for c, v in out["throughput_ratio_batched_over_unbatched"].items())
    return "\n".join(lines) + f"\n\nthroughput batched / unbatched: {ratios}\n"
