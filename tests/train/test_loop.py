"""Training end to end on a tiny synthetic log: run dir contents, exact resume, eval, CLI errors."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import torch
from sklearn.metrics import log_loss, roc_auc_score

from climber.cli import main
from climber.config import resolve
from climber.train.loop import Trainer, lr_at
from conftest import TINY


@pytest.fixture
def data(tiny_synth):
    return tiny_synth


def weights(run_dir, name="last"):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "checkpoints" / f"{name}.safetensors"))


def test_run_dir_holds_everything_and_figures_recompute(data, tmp_path):
    cfg = resolve("climber-tiny", None, TINY)
    trainer = Trainer(tmp_path / "run", data, cfg, log=lambda *_: None, progress=False)
    metrics = trainer.fit()
    run = tmp_path / "run"
    for name in ("config.yaml", "fingerprint.json", "epochs.jsonl", "metrics.json", "predictions.parquet",
                 "checkpoints/best.safetensors", "checkpoints/last.safetensors"):
        assert (run / name).exists(), name
    epochs = [json.loads(x) for x in (run / "epochs.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [0, 1, 2]
    for e in epochs:  # the history padding of the epoch's batches, recounted
        trainer.train_loader.set_epoch(e["epoch"])
        padded, slots = np.sum([b.history_slots() for b in trainer.train_loader], axis=0)
        assert e["padding"] == round(padded / slots, 4)
    assert metrics["best"]["epoch"] == int(np.argmax([e["val"]["auc"] for e in epochs]))
    pred = pl.read_parquet(run / "predictions.parquet")
    assert {"user", "item", "label", "score", "user_raw", "item_raw"} <= set(pred.columns)
    test_rows = json.loads((data / "manifest.json").read_text())["splits"]["test"]["rows"]
    assert pred.height == test_rows
    best = metrics["best"]["test"]
    assert best["auc"] == pytest.approx(roc_auc_score(pred["label"], pred["score"]), abs=1e-9)
    assert best["logloss"] == pytest.approx(log_loss(pred["label"], pred["score"].clip(1e-7, 1 - 1e-7)), abs=1e-9)
    assert json.loads((run / "fingerprint.json").read_text()) == metrics["fingerprint"]


@pytest.mark.parametrize("extra", [[], ["train.ema=0.9"], ["train.item_dropout=0.2"], ["train.lazy_embeddings=true"],
                                   ["train.id_init=zero", "train.embedding_lr_mult=4"],
                                   ["train.item_rate_buckets=8", "train.item_vocab=train", "train.select=gauc"],
                                   ["train.item_rate_buckets=8", "train.item_rate_folds=3", "train.item_rate_min_events=1"]])
def test_resume_after_kill_matches_uninterrupted_run(data, tmp_path, extra):
    cfg = resolve("climber-tiny", None, TINY + extra)
    full = Trainer(tmp_path / "full", data, cfg, log=lambda *_: None, progress=False).fit()
    with pytest.raises(KeyboardInterrupt):
        Trainer(tmp_path / "cut", data, cfg, log=lambda *_: None, progress=False).fit(stop_after_epoch=0)
    assert len((tmp_path / "cut" / "epochs.jsonl").read_text().splitlines()) == 1
    resumed = Trainer(tmp_path / "cut", data, cfg, log=lambda *_: None, progress=False).fit(resume=True)
    assert resumed["best"]["test"] == full["best"]["test"]
    assert resumed["last"]["test"] == full["last"]["test"]
    a, b = weights(tmp_path / "full"), weights(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_train_eval_and_errors(data, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--data", str(data), "--model", "climber-tiny", "--out", str(run), "--no-progress"]
    sets = [x for s in TINY[:1] + TINY[2:] for x in ("--set", s)] + ["--set", "train.epochs=1"]
    assert main(args + sets) == 0
    capsys.readouterr()
    assert main(["eval", "--run", str(run), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    best = json.loads((run / "metrics.json").read_text())["best"]["test"]
    assert out["metrics"]["auc"] == pytest.approx(best["auc"], abs=1e-12)
    assert out["bayes"] == json.loads((data / "manifest.json").read_text())["bayes"]["test"]  # synthetic: the ceiling
    assert main(["eval", "--run", str(run), "--split", "val"]) == 0
    val = json.loads((data / "manifest.json").read_text())["bayes"]["val"]["auc"]
    assert f"Bayes-optimal (attainable under the protocol): AUC {val:.4f}" in capsys.readouterr().out
    assert main(args + sets) == 2  # run dir exists, no --resume
    assert "use --resume" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "r2")]) == 2
    assert "not a prepared data dir" in capsys.readouterr().err
    assert main(args[:-3] + ["--out", str(tmp_path / "r3"), "--set", "train.bogus=1"]) == 2
    capsys.readouterr()
    if not torch.cuda.is_available():
        assert main(args[:-3] + ["--out", str(tmp_path / "r4"), "--device", "cuda"]) == 2
        assert capsys.readouterr().err.strip().endswith("no CUDA GPU is available (torch "
                                                        f"{torch.__version__}, CUDA build: no); use --device cpu or auto")
        assert not (tmp_path / "r4").exists()
    assert main(args[:-3] + ["--out", str(tmp_path / "r5"), "--device", "tpu"]) == 2
    assert "device must be auto, cpu, cuda, cuda:N or mps, got 'tpu'" in capsys.readouterr().err


def test_train_refuses_a_log_without_val_or_test_events_before_writing_a_run_dir(tmp_path, capsys):
    rng = np.random.default_rng(0)
    users = [f"u{u}" for u in range(30) for _ in range(6)]  # 6 events each: under the protocol's 10, train only
    log = tmp_path / "log.csv"
    pl.DataFrame({"user": users, "item": [f"i{i}" for i in rng.integers(0, 20, len(users))],
                  "ts": list(range(len(users))), "action": rng.integers(1, 6, len(users))}).write_csv(log)
    assert main(["data", "prepare", str(log), "--label", "action>=4", "--out", str(tmp_path / "d")]) == 0
    capsys.readouterr()
    run = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "d"), "--model", "climber-tiny", "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the val split has no events" in err
    assert not run.exists()


@pytest.mark.parametrize("failing_epoch", [0, 1])
def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_run_dir(data, tmp_path, monkeypatch, failing_epoch):
    train_epoch = Trainer._train_epoch

    def failing(self, epoch, step):
        if epoch == failing_epoch:
            raise RuntimeError("boom")
        return train_epoch(self, epoch, step)

    monkeypatch.setattr(Trainer, "_train_epoch", failing)
    run = tmp_path / "run"
    sets = [x for s in TINY + ["train.epochs=2"] for x in ("--set", s)]
    with pytest.raises(RuntimeError, match="boom"):  # not a user error: its traceback
        main(["train", "--data", str(data), "--model", "climber-tiny", "--out", str(run), "--no-progress", *sets])
    checkpointed = failing_epoch > 0
    assert run.exists() == checkpointed  # after a checkpoint the run dir is kept for --resume
    assert (run / "checkpoints" / "last.safetensors").exists() == checkpointed


@pytest.mark.parametrize("select", ["gauc", "logloss"])
def test_best_checkpoint_and_early_stop_follow_the_selected_val_figure(data, tmp_path, select):
    cfg = resolve("climber-tiny", None, TINY + ["train.epochs=4", "train.patience=1", f"train.select={select}"])
    metrics = Trainer(tmp_path / "run", data, cfg, log=lambda *_: None, progress=False).fit()
    val = [json.loads(x)["val"] for x in (tmp_path / "run" / "epochs.jsonl").read_text().splitlines()]
    score = [-v["logloss"] if select == "logloss" else v[select] for v in val]
    best = int(np.argmax(score))
    assert metrics["best"]["epoch"] == best
    assert len(val) == min(4, best + 2)  # patience 1: one epoch without a better figure, then stop


def test_epochs_that_end_in_the_lr_warmup_do_not_count_against_patience(data, tmp_path, monkeypatch):
    # 20 epochs: the warmup (capped at a tenth of the run) covers exactly the first two epochs' steps
    cfg = resolve("climber-tiny", None, TINY + ["train.epochs=20", "train.patience=1", "train.warmup_steps=100000"])
    trainer = Trainer(tmp_path / "run", data, cfg, log=lambda *_: None, progress=False)
    evaluate, calls = trainer._evaluate, []

    def worse_every_epoch(split):
        out = evaluate(split)
        if split == "val":
            calls.append(split)
            out["metrics"]["auc"] = 1.0 - 0.01 * len(calls)  # the first epoch stays the best
        return out

    monkeypatch.setattr(trainer, "_evaluate", worse_every_epoch)
    trainer.fit()
    epochs = [json.loads(x) for x in (tmp_path / "run" / "epochs.jsonl").read_text().splitlines()]
    steps_per_epoch = epochs[0]["step"]
    assert 20 * steps_per_epoch // 10 == 2 * steps_per_epoch  # epoch 1 ends on the warmup's last step
    # patience 1: epoch 1 (in the warmup) does not count, epoch 2 does, so the run stops after it
    assert [e["epoch"] for e in epochs] == [0, 1, 2]


def test_min_steps_per_epoch_takes_fewer_rows_a_step_and_keeps_every_row(data, tmp_path):
    from climber.config import ConfigError

    def trainer(extra):
        cfg = resolve("climber-tiny", None, TINY + extra)
        return Trainer(tmp_path / "_".join(extra), data, cfg, log=lambda *_: None, progress=False).train_loader

    def candidates(loader):
        return sorted((int(u), int(i)) for b in loader for u, row in zip(b.user, b.cand_item) for i in row[row > 0])

    wide = trainer(["train.batch_size=64"])
    assert len(wide) < 40  # the tiny log gives few steps at 64 rows
    narrow = trainer(["train.batch_size=64", "train.min_steps_per_epoch=40"])
    assert narrow.batch_size < 64 and len(narrow) >= 40
    assert candidates(narrow) == candidates(wide)  # the same candidates, in smaller batches
    assert trainer(["train.batch_size=64", f"train.min_steps_per_epoch={len(wide)}"]).batch_size == 64
    with pytest.raises(ConfigError, match="min_steps_per_epoch"):
        resolve("climber-tiny", None, ["train.min_steps_per_epoch=-1"])


def test_a_run_with_the_rate_feature_evaluates_and_serves_from_its_checkpoint(data, tmp_path, capsys):
    from climber.serve.app import Service

    run = tmp_path / "run"
    sets = [x for s in TINY + ["train.epochs=1", "train.item_rate_buckets=8"] for x in ("--set", s)]
    assert main(["train", "--data", str(data), "--model", "climber-tiny", "--out", str(run), "--no-progress", *sets]) == 0
    capsys.readouterr()
    assert main(["eval", "--run", str(run), "--json"]) == 0
    best = json.loads((run / "metrics.json").read_text())["best"]["test"]
    assert json.loads(capsys.readouterr().out)["metrics"]["auc"] == pytest.approx(best["auc"], abs=1e-12)
    service = Service(run, store_path=tmp_path / "store.sqlite", log=lambda *_: None)  # the vocabularies match
    assert service.engine.model.info.rate_buckets == 8


def test_embedding_decay_shrinks_the_rows_no_batch_looks_up(data):
    from climber.config import ConfigError
    from climber.models import DataInfo, build_model
    from climber.train.optim import make_optimizer

    cfg = resolve("climber-tiny", None, ["train.lr=0.01", "train.embedding_decay=2.0", "train.weight_decay=0.5"])
    model = build_model(cfg.model, cfg.model_config, DataInfo.from_prepared(data, 0))
    table = model.emb.item.weight
    optimizer = make_optimizer(model, cfg.train)
    groups = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert groups[id(table)] == 2.0 and groups[id(model.emb.action.weight)] == 2.0
    assert groups[id(model.click_out.weight)] == 0.5 and groups[id(model.click_out.bias)] == 0.0
    before = table.detach().clone()
    table.sum().backward()  # every row gets a gradient ...
    table.grad[5:] = 0  # ... but only rows 0..4 were looked up
    optimizer.step()
    assert torch.allclose(table[5:], before[5:] * (1 - 0.01 * 2.0))  # decoupled decay alone: lr x decay
    assert not torch.allclose(table[1:5], before[1:5] * (1 - 0.01 * 2.0))
    with pytest.raises(ConfigError, match="embedding_decay"):
        resolve("climber-tiny", None, ["train.embedding_decay=-1"])


def test_lazy_embedding_rows_match_adamw_when_every_row_is_looked_up_and_stay_put_otherwise():
    from climber.train.optim import LazyRowsAdamW

    torch.manual_seed(0)
    start, grads = torch.randn(6, 4), [torch.randn(6, 4) for _ in range(5)]

    def run(lazy: bool, row5_after_step0: bool):
        table = torch.nn.Parameter(start.clone())
        opt = LazyRowsAdamW([{"params": [table], "weight_decay": 0.0, "lazy_rows": lazy}], lr=0.1, betas=(0.9, 0.98))
        for t, g in enumerate(grads):
            table.grad = g.clone()
            if t and not row5_after_step0:
                table.grad[5] = 0  # row 5 not looked up after step 0
            opt.step()
            if t == 0:
                after_first = table.detach().clone()
        return table.detach(), after_first

    lazy_all, _ = run(True, True)
    dense_all, _ = run(False, True)
    assert torch.allclose(lazy_all, dense_all, atol=1e-6)  # every row every step: AdamW's steps exactly
    lazy, lazy_first = run(True, False)
    dense, dense_first = run(False, False)
    assert torch.allclose(lazy[:5], lazy_all[:5], atol=1e-6)  # the other rows do not notice
    # lazily row 5 moves once (lr a coordinate, Adam's first step on one gradient), then stays
    assert torch.allclose(lazy_first[5] - start[5], -0.1 * grads[0][5].sign(), atol=1e-6)
    assert torch.equal(lazy[5], lazy_first[5])
    assert (dense[5] - dense_first[5]).abs().min() > 0.1  # AdamW keeps moving it on the stale moments


def test_zero_id_init_leaves_rows_no_batch_looked_up_at_zero_and_tables_take_their_own_lr(data, tmp_path):
    from climber.config import ConfigError

    cfg = resolve("climber-tiny", None, TINY + ["train.id_init=zero", "train.embedding_lr_mult=4", "train.epochs=1", "train.item_dropout=0"])
    trainer = Trainer(tmp_path / "run", data, cfg, log=lambda *_: None, progress=False)
    table = trainer.model.emb.item.weight
    assert not table.any()  # the item ids start at zero ...
    assert trainer.model.emb.item.features[0].weight.abs().sum() > 0  # ... their side features do not
    looked_up = torch.zeros(table.shape[0], dtype=torch.bool)
    for batch in trainer.train_loader:
        for ids in (batch.cand_item, *(seq.item for seq in batch.seqs)):
            looked_up[trainer.model.emb.item.id_row[ids]] = True
    trainer.fit()
    rows = weights(tmp_path / "run")["model.emb.item.weight"].ne(0).any(dim=1)
    assert torch.equal(rows, looked_up & (torch.arange(len(looked_up)) > 0))  # lazy steps: only those rows move
    lrs = {g.get("lr_mult", 1.0): g["lr"] for g in trainer.optimizer.param_groups}
    assert lrs[4] == pytest.approx(4 * lrs[1.0])
    for bad in ("train.id_init=gauss", "train.embedding_lr_mult=0"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            resolve("climber-tiny", None, [bad])


def test_lr_schedule_warms_up_then_decays():
    cfg = resolve("climber-tiny", None, ["train.lr=0.01", "train.warmup_steps=10"]).train
    lrs = [lr_at(s, 100, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.001) and lrs[9] == pytest.approx(0.01)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(0.001, rel=0.01)
    short = [lr_at(s, 20, cfg) for s in range(20)]  # 20 steps in all: the warmup is cut to 2
    assert short[1] == pytest.approx(0.01) and max(short) == pytest.approx(0.01)


def test_kill_minus_nine_then_resume_gives_the_uninterrupted_figures(data, tmp_path):
    """A real SIGKILL of `climber train` mid-run; --resume continues from the last atomic checkpoint."""
    import os
    import signal
    import subprocess
    import sys
    import time

    sets = [x for s in TINY + ["train.epochs=8"] for x in ("--set", s)]

    def cmd(out, *extra):
        return [sys.executable, "-m", "climber", "train", "--data", str(data), "--model", "climber-tiny",
                "--out", str(out), "--no-progress", *sets, *extra]

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    assert subprocess.run(cmd(tmp_path / "full"), env=env, capture_output=True).returncode == 0
    proc = subprocess.Popen(cmd(tmp_path / "cut"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = tmp_path / "cut" / "epochs.jsonl"
    while proc.poll() is None and not (log.exists() and log.read_text().count("\n") >= 2):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp_path / "cut" / "metrics.json").exists()
    assert subprocess.run(cmd(tmp_path / "cut", "--resume"), env=env, capture_output=True).returncode == 0
    full = json.loads((tmp_path / "full" / "metrics.json").read_text())
    cut = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    assert cut["best"] == full["best"] and cut["last"] == full["last"]


def test_pairwise_loss_matches_brute_force():
    from climber.train.loop import masked_pairwise

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, generator=g)
    label = torch.tensor([[1, 0, 0, 1, 0], [1, 1, 1, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.float32)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 1, 0], [1, 1, 1, 0, 0]], dtype=torch.float32)
    terms = [np.log1p(np.exp(-(logits[b, i] - logits[b, j]).item()))
             for b in range(3) for i in range(5) for j in range(5)
             if mask[b, i] and mask[b, j] and label[b, i] == 1 and label[b, j] == 0]
    assert len(terms) == 2 * 2 + 2 * 1  # row 2 has no positive: no pairs
    assert masked_pairwise(logits, label, mask).item() == pytest.approx(np.mean(terms), rel=1e-6)
    assert masked_pairwise(logits, torch.zeros_like(label), mask).item() == 0.0
    with pytest.raises(Exception, match="rank_weight"):
        resolve("climber-tiny", None, ["train.rank_weight=-1"])
