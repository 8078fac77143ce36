"""Distributed training on CPU with gloo: DDP / FSDP / row-sharded tables against one process, user
shards, checkpoints and resume across world sizes, and a killed rank.

Processes are spawned (torch.multiprocessing) on 127.0.0.1 with a free port, or launched through
``climber train --nproc`` (torchrun's launcher); one intra-op thread each.
"""

from __future__ import annotations

import copy
import functools
import itertools
import json
import os
import socket
import subprocess
import sys

import polars as pl
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch import nn

from climber.config import ConfigError, resolve
from climber.data.loader import SampleLoader
from climber.models import DataInfo, build_model
from climber.train import distributed
from climber.train.distributed import Dist, Parallel
from climber.train.loop import Trainer, training_loss
from climber.train.optim import make_optimizer
from conftest import TINY

GLOBAL_BATCH, STEPS = 16, 4
# After STEPS AdamW steps (lr 1e-3) parameters of W = 2 processes and of one agree to this absolute
# tolerance: the gradients are the same sums in another order (float32 rounding). Measured: 1.5e-7 for
# ddp, fsdp and ddp + row-sharded tables; a plain mean of the ranks' mean losses (no weighting by
# their candidates) is off by 4e-3, so the test tells the two apart.
PARAM_ATOL = 2e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist = distributed.init_from_env(timeout_minutes=2)
    try:
        fn(dist, *args)
    finally:
        distributed.shutdown()
    distributed.exit_finished_rank()


def spawn(fn, *args, world: int = 2) -> None:
    """fn(dist, *args) on ``world`` gloo processes; a failure in any of them fails the test."""
    mp.start_processes(_rank_main, args=(world, free_port(), fn, args), nprocs=world, start_method="spawn")


# ------------------------------------------------------------------ one process vs two


def _k_steps(dist: Dist, mode: str, data, out) -> None:
    """STEPS optimizer steps on the first STEPS global batches of GLOBAL_BATCH rows, this rank taking
    its B / W rows of each (split by row); rank 0 writes the full weights to ``out``."""
    cfg = resolve("climber-tiny", None, TINY + ["model.dropout=0", "train.grad_clip=0.05"])  # clipping active
    tc = cfg.train
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.model_config, DataInfo.from_prepared(data), prepared=data)
    loss_fn = functools.partial(training_loss, aux_weight=tc.aux_weight, rank_weight=tc.rank_weight)
    parallel = Parallel(model, dist, loss_fn, mode.split("+")[0], shard_embedding_rows=50 if "rows" in mode else 0)
    if "rows" in mode and dist.world > 1:
        assert set(parallel.sharded) == {"emb.item"}  # 61 rows; the others are small
    optimizer = make_optimizer(model, tc, row_tables=mode != "fsdp")  # fsdp's DTensor tables: AdamW's steps
    loader = SampleLoader(data, "train", model.strategies(), batch_size=GLOBAL_BATCH, candidates_per_row=8, seed=0)
    per_rank = GLOBAL_BATCH // dist.world
    for batch in itertools.islice(loader, STEPS):
        assert batch.user.shape[0] == GLOBAL_BATCH
        optimizer.zero_grad(set_to_none=True)
        parallel.backward(batch.take(slice(dist.rank * per_rank, (dist.rank + 1) * per_rank)))
        parallel.clip_grad_norm(tc.grad_clip)
        optimizer.step()
    state, _ = parallel.full_state(optimizer)
    if dist.main:
        save_file({k: v.contiguous() for k, v in state.items()}, str(out))


@pytest.mark.parametrize("mode", ["ddp", "fsdp", "ddp+rows"])
def test_two_processes_reach_the_parameters_of_one_with_the_same_global_batch(tiny_synth, tmp_path, mode):
    _k_steps(Dist(), mode, tiny_synth, tmp_path / "one.safetensors")
    spawn(_k_steps, mode, tiny_synth, tmp_path / "two.safetensors")
    one, two = load_file(str(tmp_path / "one.safetensors")), load_file(str(tmp_path / "two.safetensors"))
    assert one.keys() == two.keys()
    for k in one:
        assert one[k].shape == two[k].shape, k
        assert torch.allclose(one[k], two[k], rtol=0, atol=PARAM_ATOL), (k, (one[k] - two[k]).abs().max())
    torch.manual_seed(0)
    start = build_model("climber", resolve("climber-tiny", None, TINY).model_config, DataInfo.from_prepared(tiny_synth))
    moved = [k for k, v in start.state_dict().items() if v.numel() and (v - one[k]).abs().max() > 100 * PARAM_ATOL]
    assert len(moved) > len(one) // 2  # the weights compared are trained ones


# ------------------------------------------------------------------ row-sharded tables


def _lookups(dist: Dist, out) -> None:
    """A RowShardedEmbedding (plain table and ItemEmbedding with a side feature) against the whole table
    on the same ids: outputs equal; the rows' gradients equal those of the mean of the ranks' losses."""
    from climber.models.layers import ItemEmbedding

    torch.manual_seed(0)
    tables = {"plain": nn.Embedding(11, 3, padding_idx=0), "item": ItemEmbedding(12, 3, (("item_topic", 4),))}
    with torch.no_grad():
        tables["item"].feature_ids.copy_(torch.randint(0, 5, (13, 1)))
    for name, table in tables.items():
        whole = copy.deepcopy(table)  # the same weights, not sharded
        g = torch.Generator().manual_seed(1)
        ids = [torch.randint(0, table.num_embeddings, (n, 2), generator=g) for n in (5, 3)]  # (5, 2) and (3, 2)
        ids[0][0, 0], ids[1][0, 0] = 0, table.num_embeddings - 1  # the padding row; the last row (last shard)
        coef = [torch.randn(n, 2, 3, generator=g) for n in (5, 3)]
        sharded = distributed.shard_embeddings(nn.ModuleDict({"t": table}), dist, min_rows=1)["t"]
        assert sharded.weight.shape == (-(-table.num_embeddings // 2), 3)
        got = sharded(ids[dist.rank])
        assert torch.equal(got, whole(ids[dist.rank])), name
        (got * coef[dist.rank]).sum().backward()
        reference = sum((whole(i) * c).sum() for i, c in zip(ids, coef)) / dist.world
        reference.backward()
        full = sharded.gather_rows(sharded.weight.grad)
        assert torch.allclose(full, whole.weight.grad, atol=1e-6), name
        assert full[0].abs().sum() == 0  # the padding row gets no gradient
    if dist.main:
        out.write_text("ok")


def test_row_sharded_embedding_equals_nn_embedding(tmp_path):
    spawn(_lookups, tmp_path / "ok")
    assert (tmp_path / "ok").read_text() == "ok"


# ------------------------------------------------------------------ the trainer on two processes

MODES = {"ddp": ["train.ema=0.9"], "fsdp": ["train.parallel=fsdp"], "ddp+rows": ["train.shard_embedding_rows=50"]}


def _fit_cut_resume(dist: Dist, data, root, sets) -> None:
    """An uninterrupted run, and one stopped after epoch 0 then resumed: the same figures."""
    cfg = resolve("climber-tiny", None, TINY + ["train.epochs=2"] + sets)
    quiet = dict(log=lambda *_: None, progress=False, dist=dist)
    full = Trainer(root / "full", data, cfg, **quiet).fit()
    with pytest.raises(KeyboardInterrupt):
        Trainer(root / "cut", data, cfg, **quiet).fit(stop_after_epoch=0)
    resumed = Trainer(root / "cut", data, cfg, **quiet).fit(resume=True)
    assert resumed["best"] == full["best"] and resumed["last"] == full["last"]
    if dist.main:
        (root / "full.json").write_text(json.dumps(full))


@pytest.mark.parametrize("mode", list(MODES))
def test_two_process_run_resumes_exactly_and_writes_a_one_process_run_dir(tiny_synth, tmp_path, mode):
    from climber.eval.evaluate import evaluate_run, load_run_model

    spawn(_fit_cut_resume, tiny_synth, tmp_path, MODES[mode])
    full = tmp_path / "full"
    a = load_file(str(full / "checkpoints/last.safetensors"))
    b = load_file(str(tmp_path / "cut/checkpoints/last.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert {"rng.torch", "rng.torch.1"} <= a.keys()  # each rank's RNG, for an exact resume
    epochs = [json.loads(x) for x in (full / "epochs.jsonl").read_text().splitlines()]
    assert [e["world_size"] for e in epochs] == [2, 2]
    assert sorted(p.name for p in (full / "shards-2").iterdir()) == [
        "part-00000-of-00002.parquet", "part-00001-of-00002.parquet", "shards.json"]
    # the checkpoint is the one-process layout: whole tables, loadable as always
    model, meta = load_run_model(full)
    assert meta["world_size"] == 2 and model.emb.item.weight.shape[0] == model.info.num_items + 1
    # the ranks' gathered predictions are those of one process scoring the whole test split
    metrics = json.loads((tmp_path / "full.json").read_text())
    pred = pl.read_parquet(full / "predictions.parquet")
    assert pred.height == json.loads((tiny_synth / "manifest.json").read_text())["splits"]["test"]["rows"]
    assert pred["user"].is_sorted()
    one = evaluate_run(full, log=lambda *_: None)["metrics"]
    for k in ("auc", "gauc", "logloss", "candidates"):
        assert one[k] == pytest.approx(metrics["best"]["test"][k], abs=1e-6), k


# ------------------------------------------------------------------ shards


def test_data_shard_splits_users_into_disjoint_ordered_files(tiny_synth, tmp_path, capsys):
    from climber.cli import main

    assert main(["data", "shard", "--data", str(tiny_synth), "--shards", "3", "--out", str(tmp_path / "s")]) == 0
    assert "wrote 3 shards" in capsys.readouterr().out
    info = json.loads((tmp_path / "s" / "shards.json").read_text())
    parts = [pl.read_parquet(tmp_path / "s" / f) for f in info["files"]]
    events = pl.read_parquet(tiny_synth / "events.parquet")
    assert sum(p.height for p in parts) == events.height == sum(info["rows"])
    users = [set(p["user"]) for p in parts]
    assert all(not (users[i] & users[j]) for i in range(3) for j in range(i + 1, 3))
    for k, part in enumerate(parts):  # each shard: its users' events, in the order of events.parquet
        mine = events.filter(pl.col("user").is_in(list(users[k]))).select(part.columns)
        assert part.equals(mine)
        assert set(((part["user"].cast(pl.UInt64) * 2654435761) % 2**32 % 3).unique()) == {k}
    assert main(["data", "shard", "--data", str(tiny_synth), "--shards", "3", "--out", str(tmp_path / "s")]) == 2
    assert "already exists" in capsys.readouterr().err

    # a loader over every shard holds the candidates of the whole split
    strategies = build_model("climber", resolve("climber-tiny", None, TINY).model_config,
                             DataInfo.from_prepared(tiny_synth)).strategies()

    def candidates(**kw):
        loader = SampleLoader(tiny_synth, "val", strategies, batch_size=7, candidates_per_row=8, **kw)
        return sorted((int(u), int(i)) for b in loader for u, i, m in zip(
            b.user[:, None].expand_as(b.cand_mask).flatten(), b.cand_item.flatten(), b.cand_mask.flatten()) if m)

    every = {k: tmp_path / "s" / f for k, f in enumerate(info["files"])}
    assert candidates(shards=every) == candidates()

    # rank r of W reads shards r, r + W, ...; fewer shards than processes is an error
    assert distributed.rank_shards(Dist(1, 2), tiny_synth, tmp_path / "s", tmp_path) == {1: every[1]}
    with pytest.raises(ConfigError, match="3 shards for 4 processes"):
        distributed.rank_shards(Dist(0, 4), tiny_synth, tmp_path / "s", tmp_path)
    with pytest.raises(ConfigError, match="must split evenly over 3 processes"):
        distributed.rank_batch_size(16, 3)


# ------------------------------------------------------------------ a killed rank


def test_killed_rank_fails_the_job_and_the_run_resumes_on_one_process(tiny_synth, tmp_path):
    """`climber train --nproc 2`: rank 1 SIGKILLs itself in epoch 1; the job exits non-zero naming it,
    last.safetensors (epoch 0) loads, and --resume on one process finishes the run."""
    from climber.eval.evaluate import load_run_model

    shards = tmp_path / "shards"
    distributed.write_shards(tiny_synth, shards, 2, log=lambda *_: None)
    run = tmp_path / "run"
    sets = [x for s in TINY + ["train.epochs=3"] for x in ("--set", s)]
    cmd = [sys.executable, "-m", "climber", "train", "--data", str(tiny_synth), "--model", "climber-tiny",
           "--out", str(run), "--shards", str(shards), "--no-progress", *sets]
    strategies = build_model("climber", resolve("climber-tiny", None, TINY).model_config,
                             DataInfo.from_prepared(tiny_synth)).strategies()
    steps = min(len(SampleLoader(tiny_synth, "train", strategies, batch_size=8, candidates_per_row=8,
                                 shards={k: shards / f"part-0000{k}-of-00002.parquet"})) for k in (0, 1))
    env = {**os.environ, distributed.FAULT_ENV: f"1:{steps + 2}"}  # the third step of epoch 1
    proc = subprocess.run(cmd + ["--nproc", "2"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "climber: error: distributed training failed: rank 1" in proc.stderr
    assert "killed by SIGKILL" in proc.stderr and "epoch 0) is intact" in proc.stderr
    assert not (run / "metrics.json").exists()
    model, meta = load_run_model(run, "last")
    assert meta["epoch"] == 0 and meta["world_size"] == 2
    # a different world size: one process takes over from the two-process checkpoint
    proc = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    epochs = [json.loads(x) for x in (run / "epochs.jsonl").read_text().splitlines()]
    assert [(e["epoch"], e["world_size"]) for e in epochs] == [(0, 2), (1, 1), (2, 1)]
    assert json.loads((run / "metrics.json").read_text())["epochs_run"] == 3


def test_a_job_whose_rank_dies_before_the_first_checkpoint_leaves_no_run_dir(tiny_synth, tmp_path):
    run = tmp_path / "run"
    sets = [x for s in TINY + ["train.epochs=1"] for x in ("--set", s)]
    cmd = [sys.executable, "-m", "climber", "train", "--data", str(tiny_synth), "--model", "climber-tiny",
           "--out", str(run), "--no-progress", "--nproc", "2", *sets]
    env = {**os.environ, distributed.FAULT_ENV: "1:2"}  # rank 1, the second step of epoch 0
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "killed by SIGKILL" in proc.stderr and "no checkpoint was written yet" in proc.stderr
    assert not run.exists()


def test_a_finished_two_process_fsdp_job_exits_0(tiny_synth, tmp_path):
    """The whole `climber train --nproc 2` path with FSDP ends with exit 0 and a finished run dir (a
    finished rank intermittently aborted in interpreter teardown before ranks skipped it)."""
    sets = [x for s in TINY + ["train.epochs=2", "train.parallel=fsdp"] for x in ("--set", s)]
    cmd = [sys.executable, "-m", "climber", "train", "--data", str(tiny_synth), "--model", "climber-tiny",
           "--out", str(tmp_path / "run"), "--no-progress", "--nproc", "2", *sets]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["epochs_run"] == 2
