"""Long histories: attention paths side by side in one run (``climber bench attention``).

For each history length, the paths (default: the structured default against the dense oracle) run one
training step each (forward + backward of ``rows`` users x C candidates) or one forward. Time: one
fresh process builds a model per path on the same batch and, after a warm-up step of each, times them in
turns, ``steps`` rounds (the median per path): a slow spell of a shared machine then slows every path
alike rather than one. Memory: one fresh process per path runs one step with glibc's
MALLOC_MMAP_THRESHOLD_=65536, so that freed tensors go back to the system at once and the peak resident
set size (RSS) follows the live tensors rather than the allocator's high-water mark (that allocator is
too slow to time with); ``step_peak_mb`` is the peak RSS of the step above the RSS just before it, with
the model and the batch built (on CUDA: the peak of allocated memory over the step). Every subsequence of the model is
set to the history length. MFU is the analytic FLOPs of the path (``model.flops``, training = 3 x
forward) per second over the measured fp32 GEMM peak.
"""

from __future__ import annotations

import multiprocessing
import os
import resource

import torch

from climber.bench import _latencies, _percentile, bench_model, gemm_peak, random_batch
from climber.config import ConfigError
from climber.devices import flushed_denormals
from climber.models import SampleShape

MODES = ("train", "forward")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def _rss_mb() -> float:
    """The resident set size now (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _step(job: dict, path: str):
    """(step function, its FLOPs, device) of ``path`` at the job's point."""
    model = bench_model(job["model"], [f"model.attention={path}", *job["overrides"]], job["length"], job["device"])
    device = next(model.parameters()).device
    lengths = tuple(s.length for s in model.strategies())
    batch = random_batch(lengths, job["rows"], job["candidates"]).to(device)
    train = job["mode"] == "train"
    model.train(train)

    def step():
        with flushed_denormals():
            if train:
                model.zero_grad(set_to_none=True)
                model(batch)[batch.cand_mask].sum().backward()
            else:
                with torch.inference_mode():
                    model(batch)

    flops = (3 if train else 1) * job["rows"] * model.flops(SampleShape(lengths, job["candidates"]))
    return step, flops, device


def time_paths(job: dict) -> dict:
    """{path: {"seconds", "flops"}}: the paths' steps timed in turns in this process."""
    torch.set_num_threads(job["threads"])
    steps = {path: _step(job, path) for path in job["paths"]}
    times = {path: [] for path in steps}
    for step, _, _ in steps.values():
        step()  # warm-up
    for _ in range(job["steps"]):
        for path, (step, _, _) in steps.items():
            times[path] += _latencies(step, 1, warmup=0)  # synchronised on CUDA
    return {path: {"seconds": _percentile(times[path], 0.5), "flops": steps[path][1]} for path in steps}


def peak_memory(job: dict) -> dict:
    """{"peak_rss_mb", "step_peak_mb"} of one step of ``job["path"]`` in this process."""
    torch.set_num_threads(job["threads"])
    step, _, device = _step(job, job["path"])
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device) / 2**20 if cuda else _rss_mb()
    step()
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else _peak_rss_mb()
    return {"peak_rss_mb": _peak_rss_mb(), "step_peak_mb": peak - before}


def _in_fresh_process(fn, job: dict, env: dict | None = None) -> dict:
    """fn(job) in a new (spawned) Python process, with ``env`` added to its environment."""
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            return pool.apply(fn, (job,))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v


def bench_attention(model_name: str = "climber", mode: str = "train", lengths=(512, 2048), candidates: int = 64,
                    rows: int = 8, paths=("structured", "dense"), steps: int = 3, threads: int = 0,
                    overrides: list[str] | None = None, peak: float | None = None, log=print, device="cpu") -> dict:
    """Each length's paths timed in turns in one fresh process, their memory in one process each; ratios
    against the last path."""
    if mode not in MODES:
        raise ConfigError(f"bench attention: mode {mode!r} not one of {', '.join(MODES)}")
    threads = threads or torch.get_num_threads()
    peak = peak or gemm_peak(device=device)
    results = []
    for L in lengths:
        entry = {"history": L, "candidates": candidates, "rows": rows}
        job = {"model": model_name, "length": L, "candidates": candidates, "rows": rows, "mode": mode,
               "steps": steps, "threads": threads, "overrides": list(overrides or []), "device": str(device),
               "paths": list(paths)}
        timed = _in_fresh_process(time_paths, job)
        for path in paths:
            r = timed[path]
            r.update(_in_fresh_process(peak_memory, {**job, "path": path}, env={"MALLOC_MMAP_THRESHOLD_": "65536"}))
            r["samples_per_s"] = rows * candidates / r["seconds"]
            r["mfu"] = r["flops"] / r["seconds"] / peak
            entry[path] = r
            log(f"  history {L:5d} {path:>10}: {r['seconds'] * 1e3:9.1f} ms/step  {r['samples_per_s']:8.0f} samples/s  "
                f"MFU {r['mfu']:.1%}  peak RSS {r['peak_rss_mb']:7.0f} MB (+{r['step_peak_mb']:.0f} in the step)")
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
