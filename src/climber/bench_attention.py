"""Long histories: attention paths side by side in one run (``climber bench attention``).

For each history length and each path (default: the structured default against the dense oracle), one
training step (forward + backward of ``rows`` users x C candidates) or one forward, timed after a warm-up,
with its peak memory. Every measurement runs in a fresh process, so the peak resident set size (RSS) of
one cannot hide another's; ``step_peak_mb`` is how far the steps raised it above the process's peak after
the model and the batch were built (on CUDA: the peak of allocated memory over the steps). Every subsequence of the model is set to the history length. MFU is
the analytic FLOPs of the path (``model.flops``, training = 3 x forward) per second over the measured
fp32 GEMM peak.
"""

from __future__ import annotations

import multiprocessing
import resource

import torch

from climber.bench import _latencies, _percentile, bench_model, gemm_peak, random_batch
from climber.models import SampleShape

MODES = ("train", "forward")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def measure(job: dict) -> dict:
    """One (path, length) point in this process: {"seconds", "samples_per_s", "peak_rss_mb", "step_peak_mb",
    "flops"}."""
    torch.set_num_threads(job["threads"])
    model = bench_model(job["model"], [f"model.attention={job['attention']}", *job["overrides"]], job["length"],
                        job["device"])
    device = next(model.parameters()).device
    lengths = tuple(s.length for s in model.strategies())
    batch = random_batch(lengths, job["rows"], job["candidates"]).to(device)
    train = job["mode"] == "train"
    model.train(train)

    def step():
        if train:
            model.zero_grad(set_to_none=True)
            model(batch)[batch.cand_mask].sum().backward()
        else:
            with torch.inference_mode():
                model(batch)

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device) / 2**20 if cuda else _peak_rss_mb()
    seconds = _percentile(_latencies(step, job["steps"], warmup=1), 0.5)
    flops = (3 if train else 1) * job["rows"] * model.flops(SampleShape(lengths, job["candidates"]))
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else _peak_rss_mb()
    return {"seconds": seconds, "samples_per_s": job["rows"] * job["candidates"] / seconds,
            "peak_rss_mb": _peak_rss_mb(), "step_peak_mb": peak - before, "flops": flops}


def bench_attention(model_name: str = "climber", mode: str = "train", lengths=(512, 2048), candidates: int = 64,
                    rows: int = 8, paths=("structured", "dense"), steps: int = 3, threads: int = 0,
                    overrides: list[str] | None = None, peak: float | None = None, log=print, device="cpu") -> dict:
    """Each path at each length, in fresh processes, one at a time; ratios against the last path."""
    if mode not in MODES:
        raise ValueError(f"bench attention: mode {mode!r} not one of {', '.join(MODES)}")
    threads = threads or torch.get_num_threads()
    peak = peak or gemm_peak(device=device)
    spawn = multiprocessing.get_context("spawn")
    results = []
    for L in lengths:
        entry = {"history": L, "candidates": candidates, "rows": rows}
        for path in paths:
            job = {"model": model_name, "attention": path, "length": L, "candidates": candidates, "rows": rows,
                   "mode": mode, "steps": steps, "threads": threads, "overrides": list(overrides or []),
                   "device": str(device)}
            with spawn.Pool(1) as pool:
                r = pool.apply(measure, (job,))
            r["mfu"] = r["flops"] / r["seconds"] / peak
            entry[path] = r
            log(f"  history {L:5d} {path:>10}: {r['seconds'] * 1e3:9.1f} ms/step  {r['samples_per_s']:8.0f} samples/s  "
                f"MFU {r['mfu']:.1%}  peak RSS {r['peak_rss_mb']:7.0f} MB (+{r['step_peak_mb']:.0f} in the steps)")
        base = entry[paths[-1]]
        for path in paths[:-1]:
            entry[f"{path}_speedup"] = base["seconds"] / entry[path]["seconds"]
            entry[f"{path}_step_memory_ratio"] = entry[path]["step_peak_mb"] / max(base["step_peak_mb"], 1.0)
        results.append(entry)
    return {"benchmark": "attention", "model": model_name, "mode": mode, "paths": list(paths),
            "overrides": list(overrides or []), "threads": threads, "gemm_peak_flop_per_s": peak, "results": results}


def markdown(out: dict) -> str:
    from climber.compare import machine

    paths = out["paths"]
    head = (f"Model `{out['model']}` {' '.join(out['overrides'])}, {out['mode']} steps, {out['threads']} threads; "
            f"machine: {machine()}; measured fp32 GEMM peak {out['gemm_peak_flop_per_s'] / 1e9:.0f} GFLOP/s.\n\n")
    cols = [f"{p} ms / samples/s / MFU / step peak MB" for p in paths]
    lines = ["| history | candidates | rows | " + " | ".join(cols) + " | " +
             " | ".join(f"{p} speed-up, memory" for p in paths[:-1]) + " |",
             "|---" * (3 + len(paths) + len(paths) - 1) + "|"]
    for r in out["results"]:
        cells = [f"{r[p]['seconds'] * 1e3:.1f} / {r[p]['samples_per_s']:,.0f} / {r[p]['mfu']:.1%} / "
                 f"{r[p]['step_peak_mb']:.0f}" for p in paths]
        ratios = [f"{r[f'{p}_speedup']:.1f}x, {r[f'{p}_step_memory_ratio']:.2f}x" for p in paths[:-1]]
        lines.append(f"| {r['history']} | {r['candidates']} | {r['rows']} | " + " | ".join(cells + ratios) + " |")
    return head + "\n".join(lines) + "\n"
