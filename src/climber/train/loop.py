"""The training loop: AdamW, warmup + cosine, clipping, early stopping on a val figure (``train.select``), exact resume.

Run dir::

    config.yaml          the resolved config (model, model_config, train) and the data dir
    fingerprint.json     the prepared data's fingerprint
    epochs.jsonl         one JSON line per epoch: train loss, val metrics, lr, seconds, samples/s
    checkpoints/last.safetensors   weights + optimizer + RNG + loop state after the last finished epoch
    checkpoints/best.safetensors   weights of the best val epoch (``train.select``: AUC, GAUC or LogLoss)
    metrics.json         best-val and last-epoch figures (val and test), written at the end
    predictions.parquet  test predictions of the best checkpoint: user, item, label, score, logit

Every random choice is a function of (seed, epoch) or of the checkpointed torch RNG, so a run resumed
after a kill reaches the same weights and figures as an uninterrupted one.

On several processes (torchrun; climber.train.distributed) each rank trains on its shards of the data
with B / W rows per step, evaluates its shards, and rank 0 writes the run dir; the checkpoints have the
one-process layout, so a run resumes with any number of processes.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import math
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F

from climber.config import ConfigError, RunConfig, save_yaml
from climber.data.loader import SampleLoader
from climber.data.prepare import load_manifest
from climber.data.schema import DataError
from climber.data.split import MIN_EVENTS
from climber.devices import check_precision, flushed_denormals, resolve_device
from climber.eval.evaluate import evaluate_predictions, predict, with_raw_ids
from climber.models import DataInfo, build_model
from climber.models.layers import ItemEmbedding, zero_id_tables
from climber.train import checkpoint, distributed
from climber.train.distributed import Dist, Parallel
from climber.train.optim import WeightAverage, lr_at, make_optimizer, set_lr, warmup_steps
from climber.train.progress import Progress


def masked_bce(logits: torch.Tensor, label: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy over real candidates. logits/label (B, C[, A]), mask (B, C) float."""
    loss = F.binary_cross_entropy_with_logits(logits, label, reduction="none")
    if loss.dim() == 3:  # one binary task per action: average them
        loss = loss.mean(dim=-1)
    return (loss * mask).sum() / mask.sum().clamp(min=1)


def masked_pairwise(logits: torch.Tensor, label: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of log(1 + exp(-(s_i - s_j))) over the pairs (i positive, j negative) of real candidates in
    the same row (one user, so it targets within-user ranking: GAUC). logits/label/mask (B, C); 0 when
    the batch holds no such pair."""
    pos = label * mask  # (B, C)
    neg = (1 - label) * mask
    pairs = pos[:, :, None] * neg[:, None, :]  # (B, C, C): [b, i, j] = 1 where i positive, j negative
    loss = F.softplus(logits[:, None, :] - logits[:, :, None])  # [b, i, j] = log(1 + exp(s_j - s_i))
    return (loss * pairs).sum() / pairs.sum().clamp(min=1)


def training_loss(model: torch.nn.Module, batch, aux_weight: float, rank_weight: float = 0.0) -> torch.Tensor:
    """Click BCE, plus ``aux_weight`` x the per-action BCE when the model has multi-task action heads,
    plus ``rank_weight`` x the in-row pairwise ranking loss."""
    out = model.forward_tasks(batch) if hasattr(model, "forward_tasks") else {"click": model(batch)}
    mask = batch.cand_mask.float()
    loss = masked_bce(out["click"], batch.label, mask)
    if rank_weight:
        loss = loss + rank_weight * masked_pairwise(out["click"], batch.label, mask)
    if "action" in out:
        target = F.one_hot(batch.cand_action, out["action"].shape[-1] + 1)[..., 1:].float()  # id 0 = padding
        loss = loss + aux_weight * masked_bce(out["action"], target, mask)
    if hasattr(model, "aux_loss"):  # e.g. RankMixer's L1 penalty on its ReLU router gates
        loss = loss + model.aux_loss()
    return loss


def selection_score(val: dict, select: str) -> float:
    """The val figure ``train.select`` picks checkpoints by, signed so that higher is better."""
    return -val["logloss"] if select == "logloss" else val[select]


def epochs_without_gain(improved: bool, step: int, warmup: int, before: int) -> int:
    """The early-stopping count after an epoch that ended at ``step``: 0 when its val figure was the best
    so far, else one more than ``before``, except that an epoch ending within the lr ``warmup`` is no
    evidence and leaves the count as it was."""
    return 0 if improved else before + (step > warmup)


class Trainer:
    """``dist``: this process's rank in a torchrun job (default: the only process); ``shards``: a
    ``climber data shard`` dir for it (default: cut into the run dir when there are several processes)."""

    def __init__(self, run_dir: Path, data_dir: Path, cfg: RunConfig, log=print, progress: bool = True,
                 dist: Dist | None = None, shards: Path | None = None):
        self.run_dir, self.data_dir, self.cfg, self.log, self.progress = Path(run_dir), Path(data_dir), cfg, log, progress
        tc = cfg.train
        self.dist = dist = dist or Dist(device=resolve_device(tc.device))
        check_precision(tc.precision, dist.device)
        if tc.threads:
            torch.set_num_threads(tc.threads)
        torch.manual_seed(tc.seed)  # the same initial weights on every rank
        self.manifest = load_manifest(self.data_dir)
        self.info = DataInfo.from_prepared(self.data_dir, tc.item_rate_buckets)
        self.model = build_model(cfg.model, cfg.model_config, self.info, prepared=self.data_dir,
                                 item_vocab=tc.item_vocab, rate_min_events=tc.item_rate_min_events,
                                 rate_folds=tc.item_rate_folds, item_min_events=tc.item_min_events,
                                 item_id_shrink=tc.item_id_shrink)
        for module in self.model.modules():
            if isinstance(module, ItemEmbedding):
                module.id_dropout = tc.item_dropout
        if tc.id_init == "zero":
            zero_id_tables(self.model)
        self.n_params = sum(p.numel() for p in self.model.parameters())
        strategies = self.model.strategies()
        c = 1 if tc.mode == "single" else tc.candidates_per_row
        batch_size, files = tc.batch_size, None
        if dist.world > 1:
            batch_size = distributed.rank_batch_size(tc.batch_size, dist.world)
            files = distributed.rank_shards(dist, self.data_dir, shards, self.run_dir, log)
        feed = {"workers": tc.workers, "pin_memory": dist.device.type == "cuda"}  # collate processes; pinned for CUDA
        self.train_loader = SampleLoader(self.data_dir, "train", strategies, batch_size=batch_size, candidates_per_row=c,
                                         mode=tc.mode, seed=tc.seed, shards=files, bucket=tc.bucket, **feed)
        if tc.min_steps_per_epoch:
            rows_per_step = dist.min_int(self.train_loader.rows_per_step_for(tc.min_steps_per_epoch))
            if rows_per_step < batch_size:
                log(f"{len(self.train_loader)} steps an epoch at {batch_size} rows a step, under "
                    f"train.min_steps_per_epoch={tc.min_steps_per_epoch}: {rows_per_step} rows a step")
                self.train_loader.batch_size = rows_per_step
        self.eval_loaders = {
            split: SampleLoader(self.data_dir, split, strategies, batch_size=tc.eval_batch_size,
                                candidates_per_row=tc.candidates_per_row, mode="multi", seed=tc.seed, shards=files,
                                **feed)
            for split in ("val", "test")
        }
        for split, loader in self.eval_loaders.items():  # checked before anything is written or trained
            if not dist.max_int(len(loader)):
                raise DataError(f"{self.data_dir}: the {split} split has no events to evaluate on (users with fewer "
                                f"than {MIN_EVENTS} events are train only, docs/protocol.md); prepare a log with "
                                "longer user histories")
        loss_fn = functools.partial(training_loss, aux_weight=tc.aux_weight, rank_weight=tc.rank_weight)
        self.parallel = Parallel(self.model, dist, loss_fn, tc.parallel, tc.shard_embedding_rows, tc.precision)
        if tc.ema and self.parallel.splits_parameters:
            raise ConfigError("train.ema needs whole weights on every process: use train.parallel=ddp "
                              "without train.shard_embedding_rows")
        row_tables = self.parallel.strategy != "fsdp"
        if tc.lazy_embeddings and not row_tables:
            log("note: train.lazy_embeddings applies to whole or row-sharded tables; under fsdp the tables take AdamW steps")
        self.optimizer = make_optimizer(self.model, tc, row_tables)
        self.average = WeightAverage(self.model, tc.ema) if tc.ema else None
        self.total_steps = tc.epochs * dist.min_int(len(self.train_loader))
        if dist.rank:
            torch.manual_seed(tc.seed + dist.rank)  # dropout draws of its own

    # ------------------------------------------------------------------ state

    def _state_meta(self, epoch: int, step: int, best: dict, bad_epochs: int) -> dict:
        return {
            "model": self.cfg.model,
            "model_config": self.model.cfg.to_dict(),
            "data_info": self.info.to_dict(),
            "epoch": epoch,
            "step": step,
            "best": best,
            "bad_epochs": bad_epochs,
            "fingerprint": self.manifest["fingerprint"],
            "world_size": self.dist.world,
        }

    def _save(self, path: Path, meta: dict, resumable: bool = False) -> None:
        """Rank 0 writes the full state (+ optimizer, weight average and every rank's RNG when
        ``resumable``) gathered from all ranks; the others wait until the file is in place."""
        model_state, optim_state = self.parallel.full_state(self.optimizer if resumable else None)
        rng = self.dist.gather(torch.get_rng_state()) if resumable else None
        if self.dist.main:
            checkpoint.save_state(path, model_state, meta, optim_state, self.average if resumable else None, rng)
        self.dist.barrier()

    def _load(self, path: Path, resumable: bool = False, average: bool = False) -> dict:
        """Weights (+ optimizer, this rank's RNG and the weight average when ``resumable``; + the weight
        average alone with ``average``) from a checkpoint of any number of processes; returns its metadata."""
        state = checkpoint.read_state(path)
        self.parallel.load_full(state["model"], self.optimizer if resumable else None, state["optimizer"])
        if (resumable or average) and self.average is not None:
            self.average.shadow, self.average.updates = state["average"], state["meta"]["average_updates"]
        if resumable and self.dist.rank < len(state["rng"]):  # else: a rank the run did not have keeps its seed
            torch.set_rng_state(state["rng"][self.dist.rank])
        return state["meta"]

    def _evaluate(self, split: str) -> dict:
        """``evaluate_split`` over the ranks: each scores its shards, rank 0 gathers the predictions (in
        user order, as one process has them) and computes the metrics, which every rank gets.
        {"metrics", "predictions"}; the predictions on rank 0 only."""
        loader = self.eval_loaders[split]
        pred = predict(self.model, self.parallel.lockstep(loader, len(loader)))
        if self.dist.world == 1:
            return evaluate_predictions(pred)
        parts = self.dist.gather(pred)
        out = evaluate_predictions(pl.concat(parts).sort("user", maintain_order=True)) if self.dist.main else None
        metrics = self.dist.broadcast(out["metrics"] if out else None)
        return {"metrics": metrics, "predictions": out["predictions"] if out else None}

    def _write_run_files(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        resolved = self.cfg.to_dict()
        resolved["model_config"] = self.model.cfg.to_dict()
        resolved["data"] = str(self.data_dir.resolve())
        save_yaml(resolved, self.run_dir / "config.yaml")
        (self.run_dir / "fingerprint.json").write_text(json.dumps(self.manifest["fingerprint"], indent=2) + "\n")

    # ------------------------------------------------------------------ loop

    def fit(self, resume: bool = False, stop_after_epoch: int | None = None) -> dict:
        """Train to the end (or early stop). ``stop_after_epoch`` simulates a kill, for tests. Subnormal
        floats count as zero meanwhile (climber.devices.flushed_denormals)."""
        with flushed_denormals():
            return self._fit(resume, stop_after_epoch)

    def _fit(self, resume: bool, stop_after_epoch: int | None) -> dict:
        tc = self.cfg.train
        last = self.run_dir / "checkpoints" / "last.safetensors"
        start_epoch, step, best, bad_epochs = 0, 0, {"epoch": -1, "score": -math.inf}, 0
        if resume and last.exists():
            meta = checkpoint.read_meta(last)
            if meta["fingerprint"]["sha256"] != self.manifest["fingerprint"]["sha256"]:
                raise DataError(f"{last}: was trained on other data (fingerprint differs); cannot resume on {self.data_dir}")
            meta = self._load(last, resumable=True)
            start_epoch, step, best, bad_epochs = meta["epoch"] + 1, meta["step"], meta["best"], meta["bad_epochs"]
            self.log(f"resumed from epoch {meta['epoch']} (step {step})")
            if meta.get("world_size", 1) != self.dist.world:
                self.log(f"note: trained so far on {meta.get('world_size', 1)} process(es), now on {self.dist.world}: "
                         "from here on the batches follow the new count")
        elif resume:
            self.log(f"no checkpoint at {last}; starting fresh")
        if start_epoch == 0 and self.dist.main:
            self._write_run_files()
            (self.run_dir / "epochs.jsonl").write_text("")
        writer = self._tensorboard() if self.dist.main else None
        steps = self.dist.min_int(len(self.train_loader))
        self.log(f"model {self.cfg.model}: {self.n_params:,} parameters; {steps} steps/epoch"
                 + (f" on {self.dist.world} processes ({self.parallel.strategy})" if self.dist.world > 1 else ""))

        for epoch in range(start_epoch, tc.epochs):
            if bad_epochs >= tc.patience:
                break
            t0 = time.time()
            loss, samples, step, padding = self._train_epoch(epoch, step)
            train_s = time.time() - t0
            with self._averaged():
                val = self._evaluate("val")["metrics"]
            record = {"epoch": epoch, "step": step, "train_loss": loss, "lr": self.optimizer.param_groups[0]["lr"],
                      "train_seconds": round(train_s, 2), "samples_per_s": round(samples / max(train_s, 1e-9), 1),
                      "padding": round(padding, 4),
                      "epoch_seconds": round(time.time() - t0, 2), "world_size": self.dist.world, "val": val}
            score = selection_score(val, tc.select)
            improved = score > best["score"]
            bad_epochs = epochs_without_gain(improved, step, warmup_steps(self.total_steps, tc), bad_epochs)
            if improved:
                best = {"epoch": epoch, "score": score}
                with self._averaged():  # the weights that were evaluated
                    self._save(self.run_dir / "checkpoints" / "best.safetensors",
                               self._state_meta(epoch, step, best, bad_epochs))
            if self.dist.main:
                with open(self.run_dir / "epochs.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
            self._save(last, self._state_meta(epoch, step, best, bad_epochs), resumable=True)
            if writer is not None:
                writer.add_scalar("train/loss", loss, epoch)
                for k in ("auc", "gauc", "logloss"):
                    writer.add_scalar(f"val/{k}", val[k], epoch)
            self.log(f"epoch {epoch}: loss {loss:.4f}  val auc {val['auc']:.4f} gauc {val['gauc']:.4f} "
                     f"logloss {val['logloss']:.4f}  ({record['epoch_seconds']:.1f}s, {record['samples_per_s']:.0f} samples/s, "
                     f"padding {padding:.1%})"
                     + ("  *best" if best["epoch"] == epoch else ""))
            if stop_after_epoch is not None and epoch >= stop_after_epoch:
                raise KeyboardInterrupt(f"stopped after epoch {epoch} (simulated kill)")
        if writer is not None:
            writer.close()
        return self.finish()

    def _train_epoch(self, epoch: int, step: int) -> tuple[float, int, int, float]:
        """One epoch -> (mean train loss, candidates trained on, global step, padding fraction of the
        history token slots of its batches), summed over the ranks."""
        tc = self.cfg.train
        self.model.train()
        self.train_loader.set_epoch(epoch)
        steps = self.dist.min_int(len(self.train_loader))  # every rank takes as many steps as the one with fewest
        total_loss, total_n, padded, slots = 0.0, 0, 0, 0
        deadline = time.time() + tc.max_epoch_minutes * 60 if tc.max_epoch_minutes else None
        progress = Progress(f"epoch {epoch}", steps, self.progress)
        for batch in itertools.islice(self.train_loader, steps):
            set_lr(self.optimizer, lr_at(step, self.total_steps, tc))
            self.optimizer.zero_grad(set_to_none=True)
            batch_padded, batch_slots = batch.history_slots()
            padded, slots = padded + batch_padded, slots + batch_slots
            loss, n = self.parallel.backward(batch)
            if tc.grad_clip:
                self.parallel.clip_grad_norm(tc.grad_clip)
            self.optimizer.step()
            if self.average is not None:
                self.average.update(self.model)
            step += 1
            distributed.fault_point(self.dist, step)
            total_loss += loss * n
            total_n += n
            progress.step(total_loss / total_n, total_n * self.dist.world)  # samples: an estimate
            if deadline is not None and self.dist.any(time.time() > deadline):
                break
        progress.close()
        total_loss, total_n, padded, slots = self.dist.sum(total_loss, total_n, padded, slots)
        return total_loss / max(total_n, 1), int(total_n), step, padded / max(slots, 1)

    def _averaged(self):
        """Context in which the model holds its averaged weights (when train.ema is on)."""
        return self.average.applied(self.model) if self.average is not None else contextlib.nullcontext()

    def _tensorboard(self):
        if not self.cfg.train.tensorboard:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("train.tensorboard=true needs the tensorboard package: pip install tensorboard") from None
        return SummaryWriter(str(self.run_dir / "tensorboard"))

    # ------------------------------------------------------------------ end

    def finish(self) -> dict:
        """Test figures of the best-val and the last-epoch checkpoints; writes metrics.json + predictions
        (rank 0; every rank returns the metrics)."""
        last_meta = self._load(self.run_dir / "checkpoints" / "last.safetensors", average=True)
        with self._averaged():
            last_test = self._evaluate("test")
        best_meta = self._load(self.run_dir / "checkpoints" / "best.safetensors")
        best_test = self._evaluate("test")
        if not self.dist.main:
            return self.dist.broadcast(None)
        records = [json.loads(line) for line in open(self.run_dir / "epochs.jsonl")]
        with_raw_ids(best_test["predictions"], self.data_dir).write_parquet(self.run_dir / "predictions.parquet")
        metrics = {
            "model": self.cfg.model,
            "fingerprint": self.manifest["fingerprint"],
            "parameters": self.n_params,
            "epochs_run": len(records),
            "seconds_per_epoch": float(np.mean([r["epoch_seconds"] for r in records])),
            "train_seconds_per_epoch": float(np.mean([r["train_seconds"] for r in records])),
            "best": {"epoch": best_meta["epoch"], "val": next(r["val"] for r in records if r["epoch"] == best_meta["epoch"]),
                     "test": best_test["metrics"]},
            "last": {"epoch": last_meta["epoch"], "val": records[-1]["val"], "test": last_test["metrics"]},
        }
        (self.run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        b, la = metrics["best"]["test"], metrics["last"]["test"]
        self.log(f"test (best val epoch {best_meta['epoch']}): auc {b['auc']:.4f} gauc {b['gauc']:.4f} "
                 f"logloss {b['logloss']:.4f} | last epoch: auc {la['auc']:.4f} gauc {la['gauc']:.4f}")
        return self.dist.broadcast(metrics)
