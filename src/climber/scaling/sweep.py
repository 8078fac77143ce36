"""``climber scale sweep``: train a grid of sequence length s x depth l x width d per model family and
collect one table (model, s, l, d, parameters, FLOPs, test AUC / LogLoss, wall time).

Each point is a normal run dir ``OUT/<model>/s<s>-l<l>-d<d>``: finished points are skipped and
interrupted ones resumed. What s, l and d set in each model:

- s: every MSE subsequence's length (Climber), else ``max_len`` (the one history);
- l: ``n_layers`` (ATLs per block for Climber), ``n_cross`` for DLRM; DIN and TWIN have no depth;
- d: ``d_model``, ``d_token`` for RankMixer.

FLOPs: ``model.flops`` of a row with the run's candidates per row, divided by them (forward FLOPs per
candidate); training FLOPs = 3 x that x the train events x the epochs run.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

from climber.compare import machine, train_or_skip
from climber.config import ConfigError, resolve
from climber.data.prepare import load_manifest
from climber.models import DataInfo, build_model, flops_per_candidate

DEPTH = {"climber": "n_layers", "transformer": "n_layers", "hstu": "n_layers", "wukong": "n_layers",
         "rankmixer": "n_layers", "dlrm": "n_cross"}
WIDTH = {"rankmixer": "d_token"}  # the others: d_model
AXES = ("s", "l", "d")
_INFO = DataInfo(num_users=1, num_items=1, actions=("a",), scenarios=("s",))  # only to read a preset's strategies


def parse_grid(text: str) -> dict[str, list[int]]:
    """"s=64,128;l=1,2;d=64" -> {"s": [64, 128], "l": [1, 2], "d": [64]}; a missing axis keeps the preset's."""
    grid: dict[str, list[int]] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        axis, _, values = part.partition("=")
        axis = axis.strip()
        if axis not in AXES or not values:
            raise ConfigError(f"--grid: {part!r} is not one of s=..., l=..., d=... (e.g. \"s=64,128;l=1,2;d=64\")")
        try:
            grid[axis] = [int(v) for v in values.split(",")]
        except ValueError:
            raise ConfigError(f"--grid: {part!r}: values must be integers") from None
        if min(grid[axis]) < 1:
            raise ConfigError(f"--grid: {part!r}: values must be >= 1")
    return grid


def load_grid_preset(name: str) -> dict:
    """A grid preset: ``cpu`` / ``gpu`` (shipped in climber/presets/scaling) or a YAML file
    -> {"models": [...], "grid": "s=...;l=...", "set": [...]}."""
    from importlib import resources

    import yaml

    shipped = resources.files("climber") / "presets" / "scaling" / f"{name}.yaml"
    path = Path(name)
    if shipped.is_file():
        text = shipped.read_text()
    elif path.is_file():
        text = path.read_text()
    else:
        raise ConfigError(f"--preset {name!r}: neither a shipped grid preset (cpu, gpu) nor a YAML file")
    preset = yaml.safe_load(text) or {}
    unknown = set(preset) - {"models", "grid", "set"}
    if unknown or not isinstance(preset.get("models", []), list) or not isinstance(preset.get("set", []), list):
        raise ConfigError(f"--preset {name!r}: expected keys models (a list), grid (a string), set (a list); "
                          f"got {sorted(preset)}")
    return preset


def point_overrides(model: str, point: dict[str, int]) -> list[str]:
    """The --set overrides that put ``model``'s preset at the grid point (keys s, l, d, any subset)."""
    cfg = resolve(model, None, [])
    out = []
    if "s" in point:
        if cfg.model == "climber":
            strategies = build_model("climber", cfg.model_config, _INFO).strategies()
            out.append("model.strategies=" + json.dumps([{**s.to_dict(), "length": point["s"]} for s in strategies]))
        else:
            out.append(f"model.max_len={point['s']}")
    if "l" in point:
        if cfg.model not in DEPTH:
            raise ConfigError(f"scale sweep: model {model!r} has no depth setting; drop it or drop l from the grid")
        out.append(f"model.{DEPTH[cfg.model]}={point['l']}")
    if "d" in point:
        out.append(f"model.{WIDTH.get(cfg.model, 'd_model')}={point['d']}")
    return out


def sweep(data: Path, models: list[str], grid: dict[str, list[int]], out: Path, extra: list[str], command: str,
          log=print) -> list[dict]:
    """Train every (model, point) of the grid; write OUT/sweep.{md,json}; returns the rows."""
    manifest = load_manifest(data)
    info = DataInfo.from_prepared(data)
    axes = [a for a in AXES if a in grid]
    points = [dict(zip(axes, values)) for values in itertools.product(*(grid[a] for a in axes))]
    total, rows, t0 = len(models) * len(points), [], time.time()
    for model in models:
        for point in points:
            name = "-".join(f"{a}{point[a]}" for a in axes) or "preset"
            cfg = resolve(model, None, [*point_overrides(model, point), *extra])
            log(f"[{len(rows) + 1}/{total}] {model} {name} ({time.time() - t0:.0f}s so far)")
            m = train_or_skip(out / model / name, data, cfg, f"{model} {name}", log)
            net = build_model(cfg.model, cfg.model_config, info)
            per_candidate = flops_per_candidate(net, cfg.train.candidates_per_row)
            rows.append({"model": model, **point, "parameters": m["parameters"],
                         "forward_flops_per_candidate": per_candidate,
                         "train_flops": 3 * per_candidate * manifest["splits"]["train"]["rows"] * m["epochs_run"],
                         "test_auc": m["best"]["test"]["auc"], "test_logloss": m["best"]["test"]["logloss"],
                         "val_auc": m["best"]["val"]["auc"], "epochs": m["epochs_run"],
                         "wall_s": m["seconds_per_epoch"] * m["epochs_run"]})
    out.mkdir(parents=True, exist_ok=True)
    fp = manifest["fingerprint"]
    (out / "sweep.json").write_text(json.dumps({"fingerprint": fp, "machine": machine(), "command": command,
                                                 "grid": grid, "rows": rows}, indent=2) + "\n")
    (out / "sweep.md").write_text(f"Data: `{manifest['source']}` (fingerprint sha256 `{fp['sha256']}`)  \n"
                                  f"Machine: {machine()}  \nCommand: `{command}`\n\n" + markdown(rows, axes))
    log(markdown(rows, axes))
    return rows


def load_rows(sweep_dir: Path) -> list[dict]:
    """The rows of ``sweep_dir/sweep.json``; ConfigError when the sweep has not been run."""
    path = Path(sweep_dir) / "sweep.json"
    if not path.exists():
        raise ConfigError(f"{sweep_dir}: no sweep.json; run `climber scale sweep` first")
    return json.loads(path.read_text())["rows"]


def markdown(rows: list[dict], axes: list[str]) -> str:
    head = ("| model | " + " | ".join(axes) + " | params | fwd FLOPs / candidate | train FLOPs | test AUC "
            "| test LogLoss | epochs | wall s |\n|" + "---|" * (len(axes) + 8) + "\n")
    return head + "".join(
        f"| {r['model']} | " + " | ".join(str(r[a]) for a in axes) + f" | {r['parameters']:,} | "
        f"{r['forward_flops_per_candidate']:.3g} | {r['train_flops']:.3g} | {r['test_auc']:.4f} | "
        f"{r['test_logloss']:.4f} | {r['epochs']} | {r['wall_s']:.0f} |\n" for r in rows)
