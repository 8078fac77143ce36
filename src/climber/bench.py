"""Throughput benchmarks on random inputs: training with "single user, single item" against "single user,
multiple items" rows, and (``climber.serve``) cached against full-recompute scoring.

Every figure is wall time on this machine, after warm-up steps, beside the analytic FLOPs of the work
(``model.flops``; training = 3 x forward) and the achieved fraction of the measured fp32 GEMM peak (MFU).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from climber.config import resolve
from climber.data.batch import Batch, Subsequence
from climber.models import DataInfo, SampleShape, build_model

INFO = DataInfo(num_users=1_000, num_items=2_000, actions=("skip", "play", "like"),
                scenarios=("home", "search", "radio"))  # small tables: the dense embedding gradients stay cheap


def gemm_peak(n: int = 1024, seconds: float = 1.0, device="cpu") -> float:
    """Measured fp32 FLOP/s of an n x n x n matmul on ``device`` (CPU: the current torch threads; best of
    repeated runs; 4096 x 4096 on CUDA)."""
    from climber.devices import resolve_device

    device = resolve_device(device)
    n = 4096 if device.type == "cuda" else n
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    best, end = min(_latencies(lambda: a @ b, 1)), time.perf_counter() + seconds  # one warm-up first
    while time.perf_counter() < end:
        best = min(best, *_latencies(lambda: a @ b, 1, warmup=0))
    return 2 * n**3 / best


def random_batch(lengths: tuple[int, ...], rows: int, candidates: int, seed: int = 0) -> Batch:
    """Full histories of ``lengths`` events per subsequence and ``candidates`` real candidates per row."""
    g = torch.Generator().manual_seed(seed)

    def ids(high, *shape):
        return torch.randint(1, high + 1, shape, generator=g)

    seqs = []
    for L in lengths:
        ts = 1_600_000_000 + torch.cumsum(ids(3600, rows, L), dim=1)
        seqs.append(Subsequence(ids(INFO.num_items, rows, L), ids(INFO.num_actions, rows, L),
                                ids(INFO.num_scenarios, rows, L), ts, torch.ones(rows, L, dtype=torch.bool)))
    last = torch.stack([s.ts[:, -1] for s in seqs], dim=1).amax(dim=1, keepdim=True)  # (rows, 1)
    return Batch(
        user=ids(INFO.num_users, rows),
        seqs=seqs,
        cand_item=ids(INFO.num_items, rows, candidates),
        cand_scenario=ids(INFO.num_scenarios, rows, candidates),
        cand_ts=last + torch.cumsum(ids(60, rows, candidates), dim=1),
        cand_mask=torch.ones(rows, candidates, dtype=torch.bool),
        label=(torch.rand(rows, candidates, generator=g) < 0.5).float(),
        cand_action=ids(INFO.num_actions, rows, candidates),
    )


CANDIDATE_FIELDS = ("cand_item", "cand_scenario", "cand_ts", "cand_mask", "label", "cand_action")


def single_item_rows(batch: Batch) -> Batch:
    """"Single user, single item": one row per candidate, the row's history repeated (C = 1)."""
    B, C = batch.cand_item.shape
    single = batch.take(torch.arange(B).repeat_interleave(C))  # (B * C) rows, each with all C candidates
    per_candidate = {f: getattr(batch, f).reshape(B * C, 1) for f in CANDIDATE_FIELDS}  # (B, C) -> (B * C, 1)
    return dataclasses.replace(single, **per_candidate)


def bench_model(model_name: str | None, overrides: list[str], length: int | None, device="cpu",
                config: Path | None = None) -> torch.nn.Module:
    """The preset of ``model_name`` (or the run config file ``config``) with every subsequence length set
    to ``length`` (None: as it is), on ``device`` (a name for climber.devices.resolve_device)."""
    from climber.devices import resolve_device

    cfg = resolve(model_name, config, overrides)
    model_cfg = dict(cfg.model_config)
    if length is not None and ("strategies" in model_cfg or cfg.model == "climber"):
        model = build_model(cfg.model, model_cfg, INFO)  # the preset's strategies, lengths replaced below
        model_cfg["strategies"] = [{**s.to_dict(), "length": length} for s in model.strategies()]
    elif length is not None:
        model_cfg["max_len"] = length
    return build_model(cfg.model, model_cfg, INFO).to(resolve_device(device))


def _rate(flops: float, seconds: float, peak: float) -> dict:
    """Achieved FLOP/s of ``flops`` done in ``seconds``, and its fraction of the GEMM ``peak`` (MFU)."""
    return {"flop_per_s": flops / seconds, "mfu": flops / seconds / peak}


def _time_steps(step, steps: int, warmup: int) -> float:
    """Seconds per call of ``step`` (median of ``steps`` timed calls after ``warmup`` untimed ones)."""
    return _percentile(_latencies(step, steps, warmup), 0.5)


def bench_train(model_name: str = "climber", lengths=(64, 256, 512), candidates=(8, 64), rows: int = 2,
                steps: int = 3, warmup: int = 1, overrides: list[str] | None = None, compile: bool = False,
                peak: float | None = None, log=print, device="cpu", single: bool = True,
                config: Path | None = None) -> dict:
    """Forward + backward throughput (candidates scored per second) of the two sample forms over
    history length x candidates per user. A "multi" step is ``rows`` users x C candidates; the "single"
    step scores the same rows x C candidates as rows x C one-candidate rows (C times the history work:
    ``single=False`` times the multi form only, for sizing at long histories). With ``config`` (a run
    config file) and ``lengths=(None,)`` the model is timed as configured; "history" is then the sum of
    its subsequence lengths."""
    peak = peak or gemm_peak(device=device)
    results = []
    for L in lengths:
        model = bench_model(model_name, list(overrides or []), L, device, config).train()
        run = torch.compile(model, dynamic=False) if compile else model  # static: one graph per batch shape
        for C in candidates:
            lengths_of_blocks = tuple(s.length for s in model.strategies())
            batch = random_batch(lengths_of_blocks, rows, C).to(next(model.parameters()).device)
            entry = {"history": L or sum(lengths_of_blocks), "candidates": C, "rows": rows}
            forms = [("multi", batch, C)] + ([("single", single_item_rows(batch), 1)] if single else [])
            for form, b, shape in forms:
                def step():
                    model.zero_grad(set_to_none=True)
                    run(b)[b.cand_mask].sum().backward()

                seconds = _time_steps(step, steps, warmup)
                flops = 3 * model.flops(SampleShape(lengths_of_blocks, shape))
                flops *= b.cand_item.shape[0]
                entry[form] = {"samples_per_s": rows * C / seconds, "step_s": seconds, **_rate(flops, seconds, peak)}
            line = f"  history {entry['history']:5d}  candidates {C:4d}: multi {entry['multi']['samples_per_s']:9.0f}/s (MFU {entry['multi']['mfu']:.1%})"
            if single:
                entry["speedup"] = entry["multi"]["samples_per_s"] / entry["single"]["samples_per_s"]
                line += (f"  single {entry['single']['samples_per_s']:8.0f}/s (MFU {entry['single']['mfu']:.1%})"
                         f"  x{entry['speedup']:.1f}")
            log(line)
            results.append(entry)
    return {"benchmark": "train", "model": model_name or str(config), "overrides": list(overrides or []), "compile": compile,
            "threads": torch.get_num_threads(), "gemm_peak_flop_per_s": peak, "results": results}


def counted_flops(model: torch.nn.Module, fn) -> int:
    """FLOPs of ``fn()`` by FlopCounterMode (see ``count_flops``)."""
    return count_flops(model, fn)[0]


def count_flops(model: torch.nn.Module, fn) -> tuple[int, dict[str, int]]:
    """(total, per module) FLOPs of ``fn()`` by FlopCounterMode, with the model's attention on the
    reference path for the count (the counter has no formula for SDPA's CPU kernels). Per-module counts
    are inclusive (a module counts its children), keyed "<ModelClass>.<path>"."""
    from torch.utils.flop_counter import FlopCounterMode

    from climber.models.layers import Attention

    attentions = [m for m in model.modules() if isinstance(m, Attention)]
    impls = [m.impl for m in attentions]
    for m in attentions:
        m.impl = "reference"
    try:
        with FlopCounterMode(display=False) as counter, torch.inference_mode():
            fn()
    finally:
        for m, impl in zip(attentions, impls):
            m.impl = impl
    return counter.get_total_flops(), {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}


def _latencies(fn, requests: int, warmup: int = 1) -> list[float]:
    """Seconds of each of ``requests`` timed calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(requests):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # kernels are asynchronous: time them to the end
        out.append(time.perf_counter() - t0)
    return out


def _percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


PER_CANDIDATE_MAX_FLOPS = 5e11  # per request; above it the per-candidate baseline is not run (minutes each)


def per_candidate_scorer(model, batch: Batch, max_elements: int = 2**26):
    """A function scoring every candidate of ``batch`` as its own "single user, single item" row, in
    chunks of rows whose (tokens x tokens) attention matrices hold at most ``max_elements`` entries per
    head (2**26: 256 MB): the serving cost without the paper's mask (a request = C forwards)."""
    single = single_item_rows(batch)
    n = max(s.item.shape[1] for s in single.seqs) + 1
    chunk = max(1, max_elements // n**2)
    rows = single.cand_item.shape[0]

    def run():
        return torch.cat([model(single.take(slice(i, i + chunk))) for i in range(0, rows, chunk)])[:, 0]

    return run


def bench_serve(model_name: str = "climber", lengths=(256, 1024, 4096), candidates=(16, 128, 512),
                requests: int = 20, overrides: list[str] | None = None, peak: float | None = None, log=print,
                device="cpu") -> dict:
    """Latency per scoring request of one user with C candidates after L history events, three ways in
    the same run: from the engine's KV cache (``climber.serve.engine``); a full forward of the same
    "single user, multiple items" batch (history encoded again, candidates as extra tokens); and, where it
    takes at most PER_CANDIDATE_MAX_FLOPS, one "single user, single item" row per candidate (3 requests).
    Every strategy's length is set to L; the L events have random labels (a ``positive`` strategy
    selects about L / 2 of them). Encoding the cache is timed on its own (once per L)."""
    from climber.serve.engine import Engine, UserHistory

    peak = peak or gemm_peak(device=device)
    results = []
    for L in lengths:
        model = bench_model(model_name, list(overrides or []), L, device).eval()
        engine = Engine(model)
        g = torch.Generator().manual_seed(L)
        history = UserHistory(user=1, item=torch.randint(1, INFO.num_items + 1, (L,), generator=g),
                              action=torch.randint(1, INFO.num_actions + 1, (L,), generator=g),
                              scenario=torch.randint(1, INFO.num_scenarios + 1, (L,), generator=g),
                              ts=1_600_000_000 + torch.cumsum(torch.randint(1, 3600, (L,), generator=g), 0),
                              label=torch.randint(0, 2, (L,), generator=g))
        encode_s = _latencies(lambda: engine.encode_user(history), 3)
        cache = engine.encode_user(history)
        for C in candidates:
            item = torch.randint(1, INFO.num_items + 1, (C,), generator=g)
            scenario = torch.randint(1, INFO.num_scenarios + 1, (C,), generator=g)
            ts = int(history.ts[-1]) + torch.arange(1, C + 1)
            batch = engine.batch(history, item, scenario, ts)
            cached, full = (lambda: engine.score(cache, item, scenario, ts)), (lambda: model(batch))
            with torch.inference_mode():
                torch.testing.assert_close(cached(), full()[0], rtol=1e-4, atol=1e-4)  # the same scores
                entry = {"history": L, "candidates": C, "encode_ms": 1e3 * _percentile(encode_s, 0.5)}
                for name, fn in (("cached", cached), ("full", full)):
                    times = _latencies(fn, requests)
                    flops = counted_flops(model, fn)
                    p50 = _percentile(times, 0.5)
                    entry[name] = {"p50_ms": 1e3 * p50, "p99_ms": 1e3 * _percentile(times, 0.99),
                                   "flops": flops, **_rate(flops, p50, peak)}
                lengths_now = tuple(sq.item.shape[1] for sq in batch.seqs)
                flops = C * model.flops(SampleShape(lengths_now, 1))  # analytic: the counter would run it again
                if flops <= PER_CANDIDATE_MAX_FLOPS:
                    per_candidate = per_candidate_scorer(model, batch)
                    torch.testing.assert_close(per_candidate(), full()[0], rtol=1e-4, atol=1e-4)
                    times = _latencies(per_candidate, min(3, requests), warmup=0)
                    p50 = _percentile(times, 0.5)
                    entry["per_candidate"] = {"p50_ms": 1e3 * p50, "p99_ms": 1e3 * max(times), "flops": flops,
                                              **_rate(flops, p50, peak)}
            entry["speedup_p50"] = entry["full"]["p50_ms"] / entry["cached"]["p50_ms"]
            if "per_candidate" in entry:
                entry["speedup_vs_per_candidate_p50"] = entry["per_candidate"]["p50_ms"] / entry["cached"]["p50_ms"]
            log(f"  history {L:5d}  candidates {C:4d}: cached p50 {entry['cached']['p50_ms']:8.2f} ms "
                f"p99 {entry['cached']['p99_ms']:8.2f}  full p50 {entry['full']['p50_ms']:8.2f} ms "
                f"p99 {entry['full']['p99_ms']:8.2f}  x{entry['speedup_p50']:.1f}  (encode {entry['encode_ms']:.1f} ms)")
            results.append(entry)
    return {"benchmark": "serve", "model": model_name, "overrides": list(overrides or []), "requests": requests,
            "threads": torch.get_num_threads(), "gemm_peak_flop_per_s": peak, "results": results}



def markdown(out: dict) -> str:
    """The results of ``bench_train`` / ``bench_serve`` as a Markdown table, with the machine and the peak."""
    from climber.compare import machine

    head = (f"Model `{out['model']}` {' '.join(out['overrides'])}; machine: {machine()}; "
            f"measured fp32 GEMM peak {out['gemm_peak_flop_per_s'] / 1e9:.0f} GFLOP/s.\n\n")
    if out["benchmark"] == "train":
        lines = ["| history | candidates/user | multi samples/s | multi MFU | single samples/s | single MFU | speed-up |",
                 "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['history']} | {r['candidates']} | {r['multi']['samples_per_s']:,.0f} | {r['multi']['mfu']:.1%} | "
                  + (f"{r['single']['samples_per_s']:,.0f} | {r['single']['mfu']:.1%} | {r['speedup']:.1f}x |"
                     if "single" in r else "- | - | - |")
                  for r in out["results"]]
    else:
        lines = ["| history | candidates | cached p50 / p99 ms | full p50 / p99 ms | full / cached (p50) | FLOPs full / cached "
                 "| per-candidate p50 ms | per-candidate / cached | MFU cached / full | encode ms |",
                 "|---|---|---|---|---|---|---|---|---|---|"]
        for r in out["results"]:
            cached, full = r["cached"], r["full"]
            per_candidate = ("not run", "-")
            if "per_candidate" in r:
                per_candidate = (f"{r['per_candidate']['p50_ms']:.0f}", f"{r['speedup_vs_per_candidate_p50']:.0f}x")
            lines.append(
                f"| {r['history']} | {r['candidates']} | {cached['p50_ms']:.2f} / {cached['p99_ms']:.2f} | "
                f"{full['p50_ms']:.2f} / {full['p99_ms']:.2f} | {r['speedup_p50']:.1f}x | "
                f"{full['flops'] / cached['flops']:.1f}x | {per_candidate[0]} | {per_candidate[1]} | "
                f"{cached['mfu']:.1%} / {full['mfu']:.1%} | {r['encode_ms']:.1f} |")
    return head + "\n".join(lines) + "\n"
