"""Score a split with a model and compute the protocol's metrics; evaluate a finished run dir."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import torch

from climber.config import ConfigError
from climber.data.schema import DataError
from climber.eval.metrics import all_metrics


@torch.no_grad()
def predict(model: torch.nn.Module, loader) -> pl.DataFrame:
    """Logits of every real candidate of ``loader``: user, item (dense ids), label, logit."""
    model.eval()
    device = next(model.parameters(), torch.empty(0)).device
    users, items, labels, logits = [], [], [], []
    for batch in loader:
        out = model(batch if device.type == "cpu" else batch.to(device)).cpu()  # (B, C)
        m = batch.cand_mask
        users.append(batch.user[:, None].expand_as(m)[m].numpy())
        items.append(batch.cand_item[m].numpy())
        labels.append(batch.label[m].numpy())
        logits.append(out[m].float().numpy())
    cat = (lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt))
    return pl.DataFrame({
        "user": cat(users, np.int64),
        "item": cat(items, np.int64),
        "label": cat(labels, np.int8),
        "logit": cat(logits, np.float64),
    })


def evaluate_split(model: torch.nn.Module, loader) -> dict:
    """{"metrics": AUC/GAUC/LogLoss/HR/NDCG, "predictions": DataFrame with score = sigmoid(logit)}."""
    return evaluate_predictions(predict(model, loader))


def evaluate_predictions(pred: pl.DataFrame) -> dict:
    """:func:`evaluate_split` of the frame of :func:`predict`."""
    metrics = all_metrics(pred["user"].to_numpy(), pred["label"].to_numpy(), pred["logit"].to_numpy())
    pred = pred.with_columns((1.0 / (1.0 + (-pl.col("logit")).exp())).alias("score"))
    return {"metrics": metrics, "predictions": pred}


def with_raw_ids(pred: pl.DataFrame, data_dir: Path) -> pl.DataFrame:
    """Add the original user/item ids from the prepared dir's vocab files."""
    for col in ("user", "item"):
        vocab = pl.read_parquet(Path(data_dir) / "vocab" / f"{col}.parquet").rename({"id": col, "raw": f"{col}_raw"})
        pred = pred.join(vocab.with_columns(pl.col(col).cast(pl.Int64)), on=col, how="left", maintain_order="left")
    return pred


def load_run_model(run_dir: Path, which: str = "best", device="cpu") -> tuple[torch.nn.Module, dict]:
    """The model of a run dir with the weights of its ``which`` ("best" | "last") checkpoint, in eval
    mode on ``device`` (a name for climber.devices.resolve_device, or a torch.device; the checkpoint holds
    CPU tensors, whatever device trained it), and the checkpoint's metadata (model, model_config,
    data_info, fingerprint, epoch)."""
    from climber.devices import resolve_device
    from climber.models import DataInfo, build_model
    from climber.train import checkpoint

    run_dir = Path(run_dir)
    ckpt = run_dir / "checkpoints" / f"{which}.safetensors"
    if not ckpt.exists():
        raise ConfigError(f"{run_dir}: no checkpoints/{which}.safetensors; is this a finished `climber train` run dir?")
    meta = checkpoint.read_meta(ckpt)
    model = build_model(meta["model"], meta["model_config"], DataInfo.from_dict(meta["data_info"]))
    checkpoint.load(ckpt, model)
    return model.to(resolve_device(device)).eval(), meta


def evaluate_run(run_dir: Path, data_dir: Path | None = None, split: str = "test", log=print, device="cpu") -> dict:
    """Load a run's best checkpoint onto ``device`` and evaluate it on ``split`` of ``data_dir`` (default:
    the run's data)."""
    from climber.config import load_yaml
    from climber.data.loader import SampleLoader
    from climber.data.prepare import load_manifest

    run_dir = Path(run_dir)
    model, meta = load_run_model(run_dir, device=device)
    cfg = load_yaml(run_dir / "config.yaml")
    data_dir = Path(data_dir or cfg["data"])
    manifest = load_manifest(data_dir)
    if not model.info.matches(data_dir):
        raise DataError(f"{data_dir}: its vocabularies differ from the ones {run_dir} was trained on")
    if manifest["fingerprint"]["sha256"] != meta["fingerprint"]["sha256"]:
        log(f"note: {data_dir} is not the data the run was trained on (fingerprint differs)")
    train = cfg.get("train", {})
    loader = SampleLoader(data_dir, split, model.strategies(), batch_size=train.get("eval_batch_size", 64),
                          candidates_per_row=train.get("candidates_per_row", 32), mode="multi")
    result = evaluate_split(model, loader)
    out = {"run": str(run_dir), "split": split, "epoch": meta["epoch"], "fingerprint": manifest["fingerprint"],
           "metrics": result["metrics"]}
    if "bayes" in manifest:  # synthetic data: the ceiling of any model under the protocol
        out["bayes"] = manifest["bayes"][split]
    (run_dir / f"eval-{split}.json").write_text(json.dumps(out, indent=2) + "\n")
    return out
