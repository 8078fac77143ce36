"""``climber scale advise``: for a budget of forward FLOPs per candidate, the (s, l, d) a sweep's fitted
surface recommends, and the equal-FLOPs table around it (as the paper's Table 3).

The surface, per model family: test LogLoss ~ b0 + b1 log s + b2 log l + b3 log d + b4 log s log l
(least squares over the sweep's points; axes the sweep did not vary are left out). Candidates: s in
powers of two and l in 1, 2, 3, ... up to twice the sweep's largest, d among the sweep's values; the
ones whose analytic forward FLOPs per candidate are within ``tolerance`` of the budget form the
equal-FLOPs set. Outside the swept ranges the surface extrapolates, and the table says so.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from climber.compare import Entry
from climber.config import ConfigError
from climber.models import build_model, flops_per_candidate as model_flops_per_candidate
from climber.scaling.sweep import _INFO, load_rows, point_overrides

TERMS = (("s",), ("l",), ("d",), ("s", "l"))  # products of log axes in the surface, besides the constant


def _features(points: list[dict], axes: list[str]) -> np.ndarray:
    cols = [np.ones(len(points))]
    for term in TERMS:
        if all(a in axes for a in term):
            cols.append(np.prod([[np.log(p[a]) for p in points] for a in term], axis=0))
    return np.stack(cols, axis=1)


def flops_per_candidate(model: str, point: dict, candidates: int, blocks: str = "each") -> float:
    """``model``: a preset, a YAML config or a compare entry, as the sweep took it (``blocks`` likewise)."""
    cfg = Entry.parse(model).config(point_overrides(model, point, blocks))
    return model_flops_per_candidate(build_model(cfg.model, cfg.model_config, _INFO), candidates)


def advise(sweep_dir: Path, budget: float, model: str | None = None, tolerance: float = 0.15) -> dict:
    """The recommendation and the equal-FLOPs rows (predicted test LogLoss, best first)."""
    rows = load_rows(sweep_dir)
    model = model or rows[0]["model"]
    mine = [r for r in rows if r["model"] == model]
    if not mine:
        raise ConfigError(f"scale advise: no points of model {model!r} in {sweep_dir}")
    axes = [a for a in ("s", "l", "d") if a in mine[0] and len({r[a] for r in mine}) > 1]
    X = _features(mine, axes)
    if len(mine) < X.shape[1] + 1:
        raise ConfigError(f"scale advise: {len(mine)} points of {model} cannot fit {X.shape[1]} surface terms; "
                          "sweep more points")
    coef, *_ = np.linalg.lstsq(X, np.array([r["test_logloss"] for r in mine]), rcond=None)
    fixed = {a: mine[0][a] for a in ("s", "l", "d") if a in mine[0] and a not in axes}
    spec = mine[0].get("entry", model)  # what the sweep was given for this model (rows before seeds: the name)
    cpr = Entry.parse(spec).config().train.candidates_per_row  # the FLOPs per candidate of a training row
    top = {a: max(r[a] for r in mine) for a in axes}
    grid = {"s": [2**k for k in range(2, int(np.log2(2 * top["s"])) + 1)] if "s" in axes else [fixed.get("s")],
            "l": list(range(1, 2 * top["l"] + 1)) if "l" in axes else [fixed.get("l")],
            "d": sorted({r["d"] for r in mine}) if "d" in axes else [fixed.get("d")]}
    table = []
    for s in grid["s"]:
        for depth in grid["l"]:
            for d in grid["d"]:
                point = {k: v for k, v in (("s", s), ("l", depth), ("d", d)) if v is not None}
                flops = flops_per_candidate(spec, point, cpr, mine[0].get("blocks", "each"))
                if abs(flops / budget - 1) > tolerance:
                    continue
                inside = all(min(r[a] for r in mine) <= point[a] <= top[a] for a in axes)
                measured = [r["test_logloss"] for r in mine if all(r.get(a) == point[a] for a in point)]
                table.append({**point, "flops_per_candidate": flops,
                              "predicted_logloss": float((_features([point], axes) @ coef)[0]),
                              "measured_logloss": float(np.mean(measured)) if measured else None,  # over seeds
                              "inside_sweep": inside})
    if not table:
        raise ConfigError(f"scale advise: no (s, l, d) within {tolerance:.0%} of {budget:.3g} FLOPs per candidate; "
                          "try another budget or a larger --tolerance")
    table.sort(key=lambda r: r["predicted_logloss"])
    return {"model": model, "budget": budget, "tolerance": tolerance, "axes": axes, "surface": coef.tolist(),
            "recommended": table[0], "equal_flops": table}


def markdown(out: dict) -> str:
    head = (f"Budget {out['budget']:.3g} forward FLOPs per candidate (± {out['tolerance']:.0%}), model "
            f"{out['model']}: recommended " + ", ".join(f"{k} = {out['recommended'][k]}" for k in ("s", "l", "d")
                                                       if k in out["recommended"]) + "\n\n")
    lines = ["| s | l | d | FLOPs / candidate | predicted LogLoss | measured LogLoss | within the sweep |",
             "|---|---|---|---|---|---|---|"]
    for r in out["equal_flops"]:
        measured = f"{r['measured_logloss']:.4f}" if r["measured_logloss"] is not None else "-"
        lines.append(f"| {r.get('s', '-')} | {r.get('l', '-')} | {r.get('d', '-')} | {r['flops_per_candidate']:.3g} | "
                     f"{r['predicted_logloss']:.4f} | {measured} | {'yes' if r['inside_sweep'] else 'no (extrapolated)'} |")
    return head + "\n".join(lines) + "\n"
