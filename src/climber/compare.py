"""``climber compare``: train several models (or presets / ablations) over seeds on one prepared dir and
write a table of test AUC, GAUC and LogLoss as mean ± std, with time per epoch, parameters and forward
FLOPs per candidate (Markdown, CSV, JSON), and a bar chart (PNG).

Each (entry, seed) is a normal run dir ``OUT/<entry>/seed<k>``; finished runs are skipped and
interrupted ones resumed, so the command can be re-run after a kill.

An entry is ``NAME`` (a model or preset, or a YAML config file such as ``configs/tuned/din.yaml``) or
``LABEL=NAME:key=value:key=value`` (overrides), e.g. ``climber-noatl=climber:model.use_atl=false``.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from climber.config import load_yaml, resolve
from climber.data.prepare import load_manifest
from climber.data.synthetic import ceiling_text
from climber.models import DataInfo, build_model, flops_per_candidate

METRICS = ("auc", "gauc", "logloss")


@dataclass(frozen=True)
class Entry:
    label: str
    model: str
    overrides: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> "Entry":
        label, _, spec = text.partition("=") if "=" in text.split(":")[0] else ("", "", text)
        model, *overrides = spec.split(":")
        return cls(label or (Path(model).stem if model.endswith(".yaml") else model), model, tuple(overrides))

    def config(self, extra: list[str] = ()):
        """The resolved RunConfig: the model / preset or the YAML file, then the overrides, then ``extra``."""
        if self.model.endswith(".yaml"):
            return resolve(None, Path(self.model), [*self.overrides, *extra])
        return resolve(self.model, None, [*self.overrides, *extra])


def machine(configs: list | None = None) -> str:
    """The CPU, core count, torch version and threads: those the ``configs`` (resolved run configs) train
    with when given (a report over runs that were all done already would otherwise show this process's
    default), else this process's."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if configs:
        threads = "/".join(str(n) for n in sorted({c.train.threads or torch.get_num_threads() for c in configs}))
        return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {threads} threads per run"
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def run_all(data: Path, entries: list[Entry], seeds: int, out: Path, extra: list[str], log=print) -> list[dict]:
    results = []
    for entry in entries:
        for seed in range(seeds):
            run_dir = out / entry.label / f"seed{seed}"
            metrics = train_or_skip(run_dir, data, entry.config([*extra, f"train.seed={seed}"]),
                                    f"{entry.label} seed {seed}", log)
            results.append({"label": entry.label, "seed": seed, **metrics,
                            "flops_per_candidate": run_flops_per_candidate(run_dir, data)})
    return results


def run_flops_per_candidate(run_dir: Path, data: Path) -> float:
    """Forward FLOPs per candidate of the run's model (its resolved config.yaml) at full history
    lengths and ``train.candidates_per_row`` candidates."""
    cfg = load_yaml(run_dir / "config.yaml")
    net = build_model(cfg["model"], cfg["model_config"], DataInfo.from_prepared(data))
    return flops_per_candidate(net, cfg["train"]["candidates_per_row"])


EXECUTION_ONLY = {"threads", "workers", "device", "tensorboard", "eval_batch_size"}  # train.* keys that leave results alone


# train.* and model_config.* settings added after runs had been saved, whose default is not what a run did before the
# setting existed: a saved config without the key was trained with this value
BEFORE_THEY_EXISTED = {  # config section -> {setting: its behaviour before it existed}
    "train": {"item_vocab": "all", "item_rate_buckets": 0, "item_rate_min_events": 1, "item_dropout": 0.0,
              "embedding_decay": 0.0, "min_steps_per_epoch": 0, "lazy_embeddings": False, "select": "auc",
              "bucket": False, "id_init": "normal", "item_id_shrink": 0.0},
    "model_config": {"context_features": False, "dot_head": False, "popularity_prior": False,
                     "popularity_count": False, "popularity_fit": False},
}


def config_differences(saved, wanted, key: str = "") -> list[str]:
    """Settings where a finished run's saved config (``config.yaml``, as a dict) differs from the one
    asked for, as "key: saved -> wanted". A train or model setting the saved file lacks (written before
    the setting existed) counts as the value it had then (``BEFORE_THEY_EXISTED``; settings whose default kept the
    earlier behaviour are not listed there and need no check); the execution-only train settings are
    left out."""
    if isinstance(saved, dict) and isinstance(wanted, dict):
        earlier = BEFORE_THEY_EXISTED.get(key, {})
        saved = {**{k: v for k, v in earlier.items() if k in wanted}, **saved}
        if key == "train" and saved.get("item_rate_buckets") == wanted.get("item_rate_buckets") == 0:  # moot: no rate
            saved, wanted = ({k: v for k, v in d.items() if k != "item_rate_min_events"} for d in (saved, wanted))
        return [d for k in saved.keys() & wanted.keys() if not (key == "train" and k in EXECUTION_ONLY)
                for d in config_differences(saved[k], wanted[k], f"{key}.{k}" if key else k)]
    if isinstance(saved, list) and isinstance(wanted, list) and len(saved) == len(wanted):  # e.g. strategies
        return [d for i, (a, b) in enumerate(zip(saved, wanted)) for d in config_differences(a, b, f"{key}[{i}]")]
    return [] if saved == wanted else [f"{key}: {saved!r} -> {wanted!r}"]


def train_or_skip(run_dir: Path, data: Path, cfg, name: str, log=print) -> dict:
    """metrics.json of ``run_dir``, training it first (or resuming an interrupted run) when it is missing.
    A finished run trained with other settings than ``cfg`` is refused, not reused."""
    from climber.config import ConfigError, load_yaml
    from climber.train.loop import Trainer

    if (run_dir / "metrics.json").exists():
        differences = config_differences(load_yaml(run_dir / "config.yaml"), cfg.to_dict())
        if differences:
            raise ConfigError(f"{run_dir} was trained with other settings ({'; '.join(sorted(differences)[:3])}): "
                              "delete it, or give the entry another name")
        log(f"[{name}] done already, skipped")
    else:
        log(f"[{name}] training -> {run_dir}")
        Trainer(run_dir, data, cfg, log=log, progress=False).fit(resume=True)
    return json.loads((run_dir / "metrics.json").read_text())


def summarise(results: list[dict]) -> list[dict]:
    rows = []
    for label in dict.fromkeys(r["label"] for r in results):
        rs = [r for r in results if r["label"] == label]
        row = {"model": label, "seeds": len(rs), "parameters": rs[0]["parameters"],
               "seconds_per_epoch": float(np.mean([r["seconds_per_epoch"] for r in rs])),
               "epochs": float(np.mean([r["epochs_run"] for r in rs])),
               "flops_per_candidate": float(np.mean([r["flops_per_candidate"] for r in rs]))}
        for m in METRICS:
            best = [r["best"]["test"][m] for r in rs]
            row[m], row[f"{m}_std"] = float(np.mean(best)), float(np.std(best))
            row[f"last_{m}"] = float(np.mean([r["last"]["test"][m] for r in rs]))
        for m in ("auc", "gauc"):  # what a choice between models or settings may look at
            row[f"val_{m}"] = float(np.mean([r["best"]["val"][m] for r in rs]))
        rows.append(row)
    return rows


def _mean_std(row: dict, metric: str) -> str:
    """"mean ± std" over the seeds; the mean alone for one seed (no spread measured)."""
    mean = f"{row[metric]:.4f}"
    return mean if row["seeds"] == 1 else f"{mean} ± {row[f'{metric}_std']:.4f}"


def markdown(rows: list[dict]) -> str:
    head = ("| model | seeds | test AUC | test GAUC | test LogLoss | AUC (last epoch) | GAUC (last epoch) "
            "| s/epoch | epochs | params | MFLOPs / candidate |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
    body = "".join(
        f"| {r['model']} | {r['seeds']} | {_mean_std(r, 'auc')} | {_mean_std(r, 'gauc')} "
        f"| {_mean_std(r, 'logloss')} | {r['last_auc']:.4f} | {r['last_gauc']:.4f} "
        f"| {r['seconds_per_epoch']:.1f} | {r['epochs']:.1f} | {r['parameters']:,} | {r['flops_per_candidate'] / 1e6:.2f} |\n"
        for r in rows
    )
    return head + body


def ceiling_gaps(rows: list[dict], ceiling: dict) -> str:
    """Markdown table of each model's distance to the Bayes ceiling ``ceiling`` (a split's ``bayes``
    figures): ceiling minus mean test figure for AUC and GAUC, mean test figure minus ceiling for
    LogLoss (so every gap is >= 0 up to seed noise), and the share of the ceiling's lead over chance
    (AUC 0.5) the model reaches."""
    head = ("| model | AUC gap | GAUC gap | LogLoss gap | share of (ceiling AUC - 0.5) reached |\n"
            "|---|---|---|---|---|\n")
    return head + "".join(
        f"| {r['model']} | {ceiling['auc'] - r['auc']:.4f} | {ceiling['gauc'] - r['gauc']:.4f} "
        f"| {r['logloss'] - ceiling['logloss']:.4f} | {(r['auc'] - 0.5) / (ceiling['auc'] - 0.5):.0%} |\n"
        for r in rows)


def plot(rows: list[dict], path: Path, title: str, ceiling: dict | None = None) -> bool:
    """Bar chart of test AUC and GAUC (mean, std as error bars) per model, with the Bayes ceiling
    (a split's ``bayes`` figures) as a dashed line when given; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(max(6, 1.2 * len(rows) + 3), 4))
    names = [r["model"] for r in rows]
    for ax, m in zip(axes, ("auc", "gauc")):
        means, stds = [r[m] for r in rows], [r[f"{m}_std"] for r in rows]
        ax.bar(names, means, yerr=stds, capsize=4, color="#4c72b0")
        lo, hi = min(a - s for a, s in zip(means, stds)), max(a + s for a, s in zip(means, stds))
        if ceiling:
            ax.axhline(ceiling[m], color="#c44e52", linestyle="--", label="Bayes ceiling")
            ax.legend(loc="lower right")
            hi = max(hi, ceiling[m])
        ax.set_ylim(max(0.0, lo - 0.02), min(1.0, hi + 0.01))
        ax.set_title(f"test {m.upper()}")
        ax.tick_params(axis="x", rotation=45)
    fig.suptitle(f"{title}: mean ± std over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def compare(data: Path, entries: list[Entry], seeds: int, out: Path, extra: list[str], command: str,
            log=print) -> list[dict]:
    t0 = time.time()
    manifest = load_manifest(data)
    rows = summarise(run_all(data, entries, seeds, out, extra, log))
    out.mkdir(parents=True, exist_ok=True)
    host = machine([entry.config(extra) for entry in entries])
    fp = manifest["fingerprint"]
    header = (f"Data: `{manifest['source']}` ({fp['rows']:,} events, {fp['users']:,} users, {fp['items']:,} items; "
              f"fingerprint sha256 `{fp['sha256']}`)  \nMachine: {host}  \nCommand: `{command}`  \n"
              "Checkpoint chosen by best val AUC; test figures are mean ± std over seeds; the last-epoch "
              "columns are the means of the last epoch's test figures; MFLOPs / candidate is the analytic forward "
              "cost at full history lengths and train.candidates_per_row candidates per row.\n\n")
    if "bayes" in manifest:  # synthetic data: the ceiling of any model under the protocol
        header += f"Test {ceiling_text(manifest['bayes']['test'])}\n\n"
    table = markdown(rows)
    if "bayes" in manifest:
        table += "\nGap to the Bayes ceiling (test):\n\n" + ceiling_gaps(rows, manifest["bayes"]["test"])
    (out / "results.md").write_text(header + table)
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (out / "results.json").write_text(json.dumps({"fingerprint": fp, "machine": host, "command": command,
                                                   "bayes": manifest.get("bayes"), "rows": rows}, indent=2) + "\n")
    ceiling = manifest["bayes"]["test"] if "bayes" in manifest else None
    if not plot(rows, out / "results.png", f"{manifest['source']} ({fp['sha256'][:12]})", ceiling):
        log("matplotlib not installed: no results.png (pip install 'climber[plot]')")
    log(table)
    log(f"wrote {out}/results.{{md,csv,json}} in {time.time() - t0:.0f}s")
    return rows
