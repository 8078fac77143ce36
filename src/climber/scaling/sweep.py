"""``climber scale sweep``: train a grid of sequence length s x depth l x width d per model family and
collect one table (model, s, l, d, parameters, FLOPs, test AUC / LogLoss, wall time).

A model is a preset name or a YAML config file (as for ``climber compare``: ``LABEL=SPEC:key=value``
works too). Each point and seed is a normal run dir ``OUT/<label>/s<s>-l<l>-d<d>`` (seed 0) or
``...-seed<k>``: finished points are skipped and interrupted ones resumed. What s, l and d set in each model:

- s: ``max_len`` (the one history); for Climber every MSE subsequence's length (``blocks="each"``, the
  default) or the sum of their lengths, each block keeping its share (``blocks="total"``, for configs
  whose blocks differ by design, e.g. configs/lifelong/climber.yaml: the history read in all);
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

from climber.compare import Entry, machine, train_or_skip
from climber.config import ConfigError
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


def parse_grids(spec: str | list[str]) -> list[dict[str, list[int]]]:
    """Several grids whose points are swept together (their union): a list of grid strings, or one
    string with grids separated by "|" (e.g. "s=128,512;l=1,2;d=64 | s=128;l=1;d=16"); every grid
    sets the same axes."""
    texts = spec if isinstance(spec, list) else spec.split("|")
    grids = [parse_grid(t) for t in texts if t.strip()]
    if not grids:
        raise ConfigError("--grid: no grid given (e.g. \"s=64,128;l=1,2;d=64\")")
    if any(set(g) != set(grids[0]) for g in grids):
        raise ConfigError(f"--grid: the grids of a union must set the same axes, got {[sorted(g) for g in grids]}")
    return grids


def load_grid_preset(name: str) -> dict:
    """A grid preset: ``cpu`` / ``gpu`` (shipped in climber/presets/scaling) or a YAML file
    -> {"models": [...], "grid": "s=...;l=..." (or a list of them, their union), "set": [...], "seeds": N,
    "blocks": "each"}."""
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
    unknown = set(preset) - {"models", "grid", "set", "seeds", "blocks"}
    if (unknown or not isinstance(preset.get("models", []), list) or not isinstance(preset.get("set", []), list)
            or not isinstance(preset.get("grid", ""), (str, list))
            or not isinstance(preset.get("seeds", 1), int) or preset.get("blocks", "each") not in BLOCKS):
        raise ConfigError(f"--preset {name!r}: expected keys models (a list), grid (a string or a list), set (a list), "
                          f"seeds (an integer), blocks ({' or '.join(BLOCKS)}); got {preset}")
    return preset


BLOCKS = ("each", "total")  # what s sets in Climber's blocks (module docstring)


def point_overrides(model: str, point: dict[str, int], blocks: str = "each") -> list[str]:
    """The --set overrides that put ``model`` (a preset, a YAML file or an entry ``LABEL=SPEC:k=v``) at the
    grid point (keys s, l, d, any subset)."""
    if blocks not in BLOCKS:
        raise ConfigError(f"scale sweep: blocks must be one of {', '.join(BLOCKS)}, got {blocks!r}")
    cfg = Entry.parse(model).config()
    out = []
    if "s" in point:
        if cfg.model == "climber":
            strategies = build_model("climber", cfg.model_config, _INFO).strategies()
            total = sum(s.length for s in strategies) if blocks == "total" else None
            lengths = [max(1, round(s.length * point["s"] / total)) if total else point["s"] for s in strategies]
            out.append("model.strategies=" + json.dumps([{**s.to_dict(), "length": n} for s, n in zip(strategies, lengths)]))
        else:
            out.append(f"model.max_len={point['s']}")
    if "l" in point:
        if cfg.model not in DEPTH:
            raise ConfigError(f"scale sweep: model {model!r} has no depth setting; drop it or drop l from the grid")
        out.append(f"model.{DEPTH[cfg.model]}={point['l']}")
    if "d" in point:
        out.append(f"model.{WIDTH.get(cfg.model, 'd_model')}={point['d']}")
    return out


def sweep(data: Path, models: list[str], grids: list[dict[str, list[int]]], out: Path, extra: list[str], command: str,
          seeds: int = 1, blocks: str = "each", log=print) -> list[dict]:
    """Train every (model, point, seed) of the grids' union (``parse_grids``); write OUT/sweep.{md,json};
    returns the rows."""
    if seeds < 1:
        raise ConfigError(f"scale sweep: --seeds must be >= 1, got {seeds}")
    manifest = load_manifest(data)
    info = DataInfo.from_prepared(data)
    axes = [a for a in AXES if a in grids[0]]
    points = [dict(zip(axes, values)) for values in dict.fromkeys(  # the union, in order
        v for grid in grids for v in itertools.product(*(grid[a] for a in axes)))]
    total, rows, configs, t0 = len(models) * len(points) * seeds, [], [], time.time()
    for model in models:
        entry = Entry.parse(model)
        for point, seed in itertools.product(points, range(seeds)):
            name = ("-".join(f"{a}{point[a]}" for a in axes) or "preset") + (f"-seed{seed}" if seed else "")
            cfg = entry.config([*point_overrides(model, point, blocks), *extra, f"train.seed={seed}"])
            configs.append(cfg)
            log(f"[{len(rows) + 1}/{total}] {entry.label} {name} ({time.time() - t0:.0f}s so far)")
            m = train_or_skip(out / entry.label / name, data, cfg, f"{entry.label} {name}", log)
            net = build_model(cfg.model, cfg.model_config, info)
            per_candidate = flops_per_candidate(net, cfg.train.candidates_per_row)
            rows.append({"model": entry.label, "entry": model, "blocks": blocks, **point, "seed": seed,
                         "parameters": m["parameters"],
                         "forward_flops_per_candidate": per_candidate,
                         "train_flops": 3 * per_candidate * manifest["splits"]["train"]["rows"] * m["epochs_run"],
                         "test_auc": m["best"]["test"]["auc"], "test_logloss": m["best"]["test"]["logloss"],
                         "val_auc": m["best"]["val"]["auc"], "epochs": m["epochs_run"],
                         "wall_s": m["seconds_per_epoch"] * m["epochs_run"]})
    out.mkdir(parents=True, exist_ok=True)
    fp = manifest["fingerprint"]
    host = machine(configs)
    (out / "sweep.json").write_text(json.dumps({"fingerprint": fp, "machine": host, "command": command,
                                                 "grid": grids, "rows": rows}, indent=2) + "\n")
    (out / "sweep.md").write_text(f"Data: `{manifest['source']}` (fingerprint sha256 `{fp['sha256']}`)  \n"
                                  f"Machine: {host}  \nCommand: `{command}`\n\n" + markdown(rows, axes))
    log(markdown(rows, axes))
    return rows


def load_rows(sweep_dir: Path) -> list[dict]:
    """The rows of ``sweep_dir/sweep.json``; ConfigError when the sweep has not been run."""
    path = Path(sweep_dir) / "sweep.json"
    if not path.exists():
        raise ConfigError(f"{sweep_dir}: no sweep.json; run `climber scale sweep` first")
    return json.loads(path.read_text())["rows"]


def markdown(rows: list[dict], axes: list[str]) -> str:
    head = ("| model | " + " | ".join(axes) + " | seed | params | fwd FLOPs / candidate | train FLOPs | test AUC "
            "| test LogLoss | epochs | wall s |\n|" + "---|" * (len(axes) + 9) + "\n")
    return head + "".join(
        f"| {r['model']} | " + " | ".join(str(r[a]) for a in axes) + f" | {r.get('seed', 0)} | {r['parameters']:,} | "
        f"{r['forward_flops_per_candidate']:.3g} | {r['train_flops']:.3g} | {r['test_auc']:.4f} | "
        f"{r['test_logloss']:.4f} | {r['epochs']} | {r['wall_s']:.0f} |\n" for r in rows)
