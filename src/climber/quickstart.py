"""``climber quickstart``: data -> train -> eval -> a short report, offline, in a few minutes on 2 cores."""

from __future__ import annotations

import time
from pathlib import Path

from climber.config import resolve
from climber.data.prepare import load_manifest, prepare

# Embedded default: a small synthetic log with long-range dependence and a known Bayes ceiling.
SYNTH = {"users": 1500, "events_per_user": 80, "items": 500, "topics": 10, "seed": 0}
PRESET = "climber-tiny"
TRAIN = ["train.epochs=8", "train.patience=2"]


def quickstart(out: Path, dataset: str | None = None, source: Path | None = None, log=print) -> dict:
    from climber.train.loop import Trainer

    t0 = time.time()
    out = Path(out)
    data_dir = out / (dataset or "synthetic")
    if (data_dir / "manifest.json").exists():
        log(f"[1/3] using prepared data in {data_dir}")
    elif dataset is None:
        from climber.data.synthetic import synthesize

        log(f"[1/3] synthesising {SYNTH['users']} users x ~{SYNTH['events_per_user']} events -> {data_dir}")
        synthesize(data_dir, **SYNTH, log=log)
    else:
        from climber.data.datasets import load_dataset

        log(f"[1/3] preparing {dataset} -> {data_dir}")
        prepare(load_dataset(dataset, source), data_dir, log=log)
    manifest = load_manifest(data_dir)

    run_dir = out / f"run-{PRESET}"
    log(f"[2/3] training {PRESET} -> {run_dir}")
    cfg = resolve(PRESET, None, TRAIN)
    metrics = Trainer(run_dir, data_dir, cfg, log=log).fit(resume=True)

    log("[3/3] report")
    rows = [("climber (best val epoch)", metrics["best"]["test"]), ("climber (last epoch)", metrics["last"]["test"])]
    if "bayes" in manifest:
        rows.append(("Bayes-optimal (attainable under the protocol)", manifest["bayes"]["test"]))
    log(f"  data: {manifest['source']}  {manifest['rows']:,} events  fingerprint {manifest['fingerprint']['sha256'][:16]}")
    log(f"  {'':38s} {'AUC':>7s} {'GAUC':>7s} {'LogLoss':>8s}")
    for name, m in rows:
        log(f"  {name:38s} {m['auc']:7.4f} {m['gauc']:7.4f} {m['logloss']:8.4f}")
    log(f"  done in {time.time() - t0:.0f}s; run dir {run_dir} (metrics.json, predictions.parquet)")
    return metrics
