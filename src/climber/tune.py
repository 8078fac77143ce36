"""``climber tune``: the same budget of trials for every model, chosen on val only.

Trial 0 is the entry as it is (its preset or config file); trials 1 .. N-1 draw ``train.lr``,
``model.dropout`` and ``train.weight_decay`` from ``SPACE`` with one random stream seeded by ``seed``,
so every model gets the same draws. Every trial trains with train.seed 0 and the same early stopping
(val AUC, ``train.patience``). The winner is the trial with the highest best-epoch val AUC (test
figures are never read); its resolved config goes to ``CONFIGS/<label>.yaml``, ready for
``climber compare --models CONFIGS/<label>.yaml,...``. Each trial is a normal run dir
``OUT/<label>/trial<k>``: finished trials are skipped, interrupted ones resumed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import yaml

from climber.compare import Entry, machine, train_or_skip
from climber.config import ConfigError
from climber.data.prepare import load_manifest
from climber.models import config_class

SPACE = {  # what a trial draws; every model of the registry has these settings
    "train.lr": (1e-4, 3e-3),  # log-uniform, two significant digits
    "model.dropout": (0.0, 0.1, 0.2, 0.3),
    "train.weight_decay": (0.0, 0.01, 0.1),
}


def draws(trials: int, seed: int = 0) -> list[list[str]]:
    """The overrides of each trial: [] (the entry as it is), then trials - 1 draws from SPACE."""
    if trials < 1:
        raise ConfigError(f"tune: --trials must be >= 1, got {trials}")
    rng = np.random.default_rng(seed)
    out: list[list[str]] = [[]]
    for _ in range(trials - 1):
        lo, hi = SPACE["train.lr"]
        lr = float(f"{math.exp(rng.uniform(math.log(lo), math.log(hi))):.2g}")
        dropout = SPACE["model.dropout"][rng.integers(len(SPACE["model.dropout"]))]
        decay = SPACE["train.weight_decay"][rng.integers(len(SPACE["train.weight_decay"]))]
        out.append([f"train.lr={lr}", f"model.dropout={dropout}", f"train.weight_decay={decay}"])
    return out


def tune(data: Path, entries: list[Entry], trials: int, out: Path, configs: Path, extra: list[str], command: str,
         seed: int = 0, log=print) -> list[dict]:
    """Run every entry's trials, save each winner's config, write OUT/tuning.{md,json}; returns the rows."""
    manifest = load_manifest(data)
    rows = []
    for entry in entries:
        results = []
        for k, overrides in enumerate(draws(trials, seed)):
            cfg = entry.config([*overrides, *extra])
            m = train_or_skip(out / entry.label / f"trial{k}", data, cfg, f"{entry.label} trial {k}", log)
            results.append({"model": entry.label, "trial": k, "overrides": overrides, "val_auc": m["best"]["val"]["auc"],
                            "best_epoch": m["best"]["epoch"], "seconds_per_epoch": m["seconds_per_epoch"],
                            "winner": False})
        best = max(results, key=lambda r: r["val_auc"])  # the first of equals: trial 0 wins ties
        best["winner"] = True
        _save_config(configs / f"{entry.label}.yaml", _full(entry.config([*best["overrides"], *extra])),
                     f"{command}\n# data fingerprint {manifest['fingerprint']['sha256']}; winner: trial {best['trial']} "
                     f"of {trials} ({' '.join(best['overrides']) or 'the preset as it is'}), val AUC {best['val_auc']:.4f}")
        rows += results
    out.mkdir(parents=True, exist_ok=True)
    fp = manifest["fingerprint"]
    host = machine([entry.config(extra) for entry in entries])
    (out / "tuning.json").write_text(json.dumps({"fingerprint": fp, "machine": host, "command": command,
                                                  "space": SPACE, "rows": rows}, indent=2) + "\n")
    (out / "tuning.md").write_text(f"Data: `{manifest['source']}` (fingerprint sha256 `{fp['sha256']}`)  \n"
                                   f"Machine: {host}  \nCommand: `{command}`\n\n" + markdown(rows))
    log(markdown(rows))
    log(f"wrote {out}/tuning.{{md,json}} and the winners' configs in {configs}")
    return rows


def _full(cfg) -> dict:
    """The RunConfig as a dict with every model setting written out (not only the preset's), as a run
    dir's config.yaml has it: the saved config does not change when a preset's defaults do."""
    d = cfg.to_dict()
    d["model_config"] = config_class(cfg.model).from_dict(cfg.model_config).to_dict()
    return d


def _save_config(path: Path, cfg: dict, comment: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# tuned by: {comment}\n" + yaml.safe_dump(cfg, sort_keys=False))


def markdown(rows: list[dict]) -> str:
    head = "| model | trial | overrides | best val AUC | best epoch | s/epoch | winner |\n|---|---|---|---|---|---|---|\n"
    return head + "".join(
        f"| {r['model']} | {r['trial']} | {' '.join(r['overrides']) or '(preset)'} | {r['val_auc']:.4f} "
        f"| {r['best_epoch']} | {r['seconds_per_epoch']:.1f} | {'yes' if r['winner'] else ''} |\n" for r in rows)
