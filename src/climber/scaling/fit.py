"""``climber scale fit``: a saturating power law per model family through a sweep's points,

    y(C) = E + A * C ** (-alpha),   y = test LogLoss (or 1 - test AUC), C = training FLOPs,

with R² and a bootstrap confidence band. Seeds of one grid point (the same model, s, l, d) are averaged
first: the law is fitted through the points' means, and the fit reports the seed spread beside the
residual, so a low R² can be told apart from seed noise. It also reports what each axis buys
(:func:`axis_effects`): the change of y from one grid value of s, l or d to the next, the other two
held, so FLOPs that buy nothing (or cost quality) show up by axis. The fit is dependency-free: for a
fixed floor E the law is a straight line in log-log space (least squares), and E is searched on grids
below the smallest y, each finer around the best floor so far; the floor with the smallest squared
error in y wins.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from climber.config import ConfigError
from climber.scaling.sweep import load_rows

AXES = ("s", "l", "d")
METRICS = {"logloss": lambda r: r["test_logloss"], "auc": lambda r: 1.0 - r["test_auc"]}  # lower is better


def fit_power_law(flops, y, floors: int = 50) -> dict:
    """Least-squares E, A, alpha (alpha > 0: y falls with FLOPs) and R² of y against flops (>= 3 points)."""
    c, y = np.asarray(flops, dtype=float), np.asarray(y, dtype=float)
    if len(c) < 3 or len(np.unique(c)) < 2:
        raise ConfigError(f"scale fit: need at least 3 points at 2 or more FLOPs values, got {len(c)}")
    if np.any(c <= 0):
        raise ConfigError("scale fit: FLOPs must be positive")
    x = np.log(c)

    def at_floor(e: float) -> tuple[float, float, float, float]:  # (squared error, E, A, alpha)
        slope, intercept = np.polyfit(x, np.log(y - e), 1)
        pred = e + np.exp(intercept + slope * x)
        return float(np.sum((y - pred) ** 2)), e, float(np.exp(intercept)), float(-slope)

    lo, hi, best = 0.0, float(y.min()), None
    for _ in range(4):  # a grid of floors, then finer grids around the best one
        grid = np.linspace(lo, hi, floors, endpoint=False)
        best = min((at_floor(float(e)) for e in grid), key=lambda t: t[0])
        step = grid[1] - grid[0]
        lo, hi = max(0.0, best[1] - step), min(float(y.min()), best[1] + step)
    sse, e, a, alpha = best
    sst = float(np.sum((y - y.mean()) ** 2))
    return {"E": float(e), "A": a, "alpha": alpha, "r2": 1.0 - sse / sst if sst > 0 else 1.0, "points": len(c)}


def predict(fit: dict, flops) -> np.ndarray:
    return fit["E"] + fit["A"] * np.asarray(flops, dtype=float) ** (-fit["alpha"])


def bootstrap_band(flops, y, at, samples: int = 200, level: float = 0.9, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Pointwise ``level`` band of the fitted curve at FLOPs ``at``: refits on resampled points (a
    resample with fewer than 2 distinct FLOPs values is drawn again)."""
    c, y = np.asarray(flops, dtype=float), np.asarray(y, dtype=float)
    rng = np.random.default_rng(seed)
    curves = []
    while len(curves) < samples:
        idx = rng.integers(0, len(c), len(c))
        if len(np.unique(c[idx])) < 2:
            continue
        curves.append(predict(fit_power_law(c[idx], y[idx], floors=20), at))
    lo, hi = np.quantile(np.array(curves), [(1 - level) / 2, (1 + level) / 2], axis=0)
    return lo, hi


def seed_means(rows: list[dict], metric) -> list[dict]:
    """One point per grid point (model rows with the same s, l, d; a row without them stands alone):
    mean training FLOPs, mean and std over seeds of ``metric(row)``, and the number of seeds."""
    groups: dict = {}
    for k, r in enumerate(rows):
        key = tuple(r.get(a) for a in AXES)
        groups.setdefault(key if any(v is not None for v in key) else k, []).append(r)
    return [{**{a: g[0].get(a) for a in AXES}, "flops": float(np.mean([r["train_flops"] for r in g])),
             "y": float(np.mean([metric(r) for r in g])), "std": float(np.std([metric(r) for r in g])),
             "seeds": len(g)} for g in groups.values()]


def axis_effects(points: list[dict]) -> dict:
    """Per axis (s, l, d) of :func:`seed_means` points: every step from one point to the point with the
    next larger value of that axis and the same other two -> {"steps", "mean_change" of y, "worse" (steps
    where y rose), "flops_ratio" (geometric mean)}; axes with no such step are left out."""
    out = {}
    for a in AXES:
        steps = []
        for p in points:
            same = [q for q in points if q[a] is not None and p[a] is not None and q[a] > p[a]
                    and all(q[b] == p[b] for b in AXES if b != a)]
            if same:
                q = min(same, key=lambda q: q[a])
                steps.append((q["y"] - p["y"], q["flops"] / p["flops"]))
        if steps:
            change, ratio = np.array(steps).T
            out[a] = {"steps": len(steps), "mean_change": float(change.mean()), "worse": int((change > 0).sum()),
                      "flops_ratio": float(np.exp(np.log(ratio).mean()))}
    return out


def fit_sweep(sweep_dir: Path, metric: str = "logloss") -> dict:
    """Fit every model family of ``sweep_dir/sweep.json``; write ``fit.json`` beside it and return it."""
    if metric not in METRICS:
        raise ConfigError(f"scale fit: --metric must be one of {', '.join(METRICS)}, got {metric!r}")
    rows = load_rows(sweep_dir)
    fits = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        points = seed_means([r for r in rows if r["model"] == model], METRICS[metric])
        flops, y = np.array([p["flops"] for p in points]), np.array([p["y"] for p in points])
        fit = fit_power_law(flops, y)
        at = np.geomspace(flops.min(), flops.max(), 5)
        lo, hi = bootstrap_band(flops, y, at)
        residual = float(np.sqrt(np.mean((y - predict(fit, flops)) ** 2)))
        spread = [p["std"] for p in points if p["seeds"] > 1]
        fits[model] = {**fit, "seeds": max(p["seeds"] for p in points), "residual_rms": residual,
                       "seed_std": float(np.mean(spread)) if spread else None, "axes": axis_effects(points),
                       "band": {"flops": at.tolist(), "low": lo.tolist(), "high": hi.tolist(),
                                "fit": predict(fit, at).tolist()}}
    out = {"metric": "test LogLoss" if metric == "logloss" else "1 - test AUC", "law": "E + A * FLOPs^-alpha",
           "fits": fits}
    (Path(sweep_dir) / "fit.json").write_text(json.dumps(out, indent=2) + "\n")
    return out
