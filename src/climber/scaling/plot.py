"""``climber scale plot``: from a sweep folder, ``scaling.png`` (test AUC and test LogLoss against
training FLOPs, log x, one series per model; the fitted law and its band when ``fit.json`` holds a
LogLoss fit) and ``heatmap-<model>.png`` (test AUC over history length s x depth l, each cell
annotated with its training FLOPs; cells averaged over d)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from climber.config import ConfigError
from climber.scaling.sweep import load_rows


def plot_sweep(sweep_dir: Path) -> list[Path]:
    """Write the PNGs; returns their paths. ConfigError without sweep.json or without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("scale plot needs matplotlib: pip install 'climber[plot]'") from None
    sweep_dir = Path(sweep_dir)
    rows = load_rows(sweep_dir)
    fit_path = sweep_dir / "fit.json"
    fit = json.loads(fit_path.read_text()) if fit_path.exists() else None
    models = list(dict.fromkeys(r["model"] for r in rows))
    written = []

    fig, (ax_auc, ax_ll) = plt.subplots(1, 2, figsize=(11, 4))
    for model in models:
        mine = sorted((r for r in rows if r["model"] == model), key=lambda r: r["train_flops"])
        flops = [r["train_flops"] for r in mine]
        line = ax_auc.plot(flops, [r["test_auc"] for r in mine], "o", label=model)[0]
        ax_ll.plot(flops, [r["test_logloss"] for r in mine], "o", color=line.get_color(), label=model)
        if fit and fit["metric"] == "test LogLoss" and model in fit["fits"]:
            band = fit["fits"][model]["band"]
            ax_ll.plot(band["flops"], band["fit"], "-", color=line.get_color())
            ax_ll.fill_between(band["flops"], band["low"], band["high"], color=line.get_color(), alpha=0.15)
    for ax, name in ((ax_auc, "test AUC"), (ax_ll, "test LogLoss")):
        ax.set_xscale("log")
        ax.set_xlabel("training FLOPs")
        ax.set_ylabel(name)
        ax.legend()
    if fit and fit["metric"] == "test LogLoss":
        ax_ll.set_title("lines: fitted law, 90% band (fit.json)", fontsize=10)
    fig.tight_layout()
    written.append(sweep_dir / "scaling.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    for model in models:
        mine = [r for r in rows if r["model"] == model and "s" in r and "l" in r]
        if not mine:
            continue
        ss, ls = sorted({r["s"] for r in mine}), sorted({r["l"] for r in mine})
        auc, flops = np.full((len(ls), len(ss)), np.nan), np.full((len(ls), len(ss)), np.nan)
        for i, depth in enumerate(ls):
            for j, length in enumerate(ss):
                cell = [r for r in mine if r["s"] == length and r["l"] == depth]
                if cell:
                    auc[i, j] = np.mean([r["test_auc"] for r in cell])
                    flops[i, j] = np.mean([r["train_flops"] for r in cell])
        fig, ax = plt.subplots(figsize=(1.6 * len(ss) + 2, 1.2 * len(ls) + 1.5))
        image = ax.imshow(auc, origin="lower", cmap="viridis", aspect="auto")
        for i in range(len(ls)):
            for j in range(len(ss)):
                if not np.isnan(auc[i, j]):
                    ax.text(j, i, f"{auc[i, j]:.4f}\n{flops[i, j]:.2g}", ha="center", va="center", color="w", fontsize=8)
        ax.set_xticks(range(len(ss)), [str(v) for v in ss])
        ax.set_yticks(range(len(ls)), [str(v) for v in ls])
        ax.set_xlabel("history length s")
        ax.set_ylabel("depth l")
        ax.set_title(f"{model}: test AUC (and training FLOPs)")
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        written.append(sweep_dir / f"heatmap-{model}.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written
