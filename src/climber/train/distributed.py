"""Training on several processes: torchrun + DDP or FSDP over user-sharded Parquet (docs/distributed.md).

    torchrun --nproc-per-node 2 -m climber train --data DIR --out RUN ...   # or: climber train --nproc 2 ...

Rank r of W processes:

- data: the prepared events cut into K Parquet shards by a hash of the user (``climber data shard``,
  or automatically into the run dir); rank r reads shards r, r + W, r + 2W, ... Every epoch all ranks
  take the same number of steps (the smallest rank's count), so none waits for another at the end.
  Batch order is a function of (seed, epoch, shard), the same on every run with this seed and W.
- batch: ``train.batch_size`` B is the global batch; a rank takes B / W rows per step. Its mean loss
  is weighted by n_r W / N (n_r its candidates, N the step's over all ranks), so the average of the
  ranks' gradients (DDP's all-reduce) is the gradient of the mean loss over all N candidates: the
  single-process step on the same B rows.
- model: ``train.parallel`` "ddp" keeps a replica per rank; "fsdp" (FSDP2 ``fully_shard``) shards
  every parameter, its gradient and its optimizer state by rows over the ranks (each transformer
  layer / block is a unit, the rest belongs to the root). With ddp, ``train.shard_embedding_rows``
  splits the large embedding tables by rows (:class:`RowShardedEmbedding`), the rest stays replicated.
- checkpoints: the full state is gathered and rank 0 writes the one-process file format atomically,
  so a run resumes with any number of processes and ``load_run_model`` reads it as always.

One process (no torchrun) goes through the same code with every collective a no-op.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import shutil
import signal
import sys
import warnings
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterable, Iterator

import polars as pl
import torch
import torch.distributed as tdist
from torch import nn

from climber.config import ConfigError
from climber.data.batch import Batch
from climber.data.prepare import load_manifest, staging_dir
from climber.data.samples import COLUMNS
from climber.data.schema import DataError
from climber.devices import autocast

FAULT_ENV = "CLIMBER_FAULT"  # "RANK:STEP": that rank SIGKILLs itself after global step STEP (tests)


class DistributedError(RuntimeError):
    """A process of a distributed run failed; the message names which and what the run dir holds."""


# ---------------------------------------------------------------------------------------------- ranks


@dataclass(frozen=True)
class Dist:
    """This process's place in the job. Every collective below is a no-op when ``world`` is 1."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, *values: float) -> list[float]:
        """Each value summed over the ranks (float64, exact for counts below 2^53)."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        tdist.all_reduce(t)
        return t.tolist()

    def min_int(self, value: int) -> int:
        return self._reduce_int(value, tdist.ReduceOp.MIN)

    def max_int(self, value: int) -> int:
        return self._reduce_int(value, tdist.ReduceOp.MAX)

    def any(self, flag: bool) -> bool:
        return bool(self._reduce_int(int(flag), tdist.ReduceOp.MAX))

    def _reduce_int(self, value: int, op) -> int:
        if self.world == 1:
            return int(value)
        t = torch.tensor([int(value)], dtype=torch.int64, device=self.device)
        tdist.all_reduce(t, op=op)
        return int(t.item())

    def barrier(self) -> None:
        if self.world > 1:
            tdist.barrier()

    def gather(self, obj) -> list | None:
        """[obj of rank 0, obj of rank 1, ...] on rank 0, None elsewhere (objects are pickled in memory
        between the job's own processes, never read from files)."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world if self.main else None
        tdist.gather_object(obj, out, dst=0)
        return out

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]


def launched() -> bool:
    """True inside a process started by torchrun (or ``climber train --nproc``)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_from_env(timeout_minutes: float = 30.0) -> Dist:
    """Join the job torchrun started (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT in the environment):
    NCCL on CUDA (one GPU per local rank), gloo on CPU. Without torchrun, or with one process: Dist()."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device, backend = torch.device("cuda", local_rank), "nccl"
        torch.cuda.set_device(device)
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not tdist.is_initialized():
        tdist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes))
    return Dist(rank, world, local_rank, device)


def shutdown() -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def exit_finished_rank() -> None:
    """End a rank that finished (after ``shutdown``) with exit status 0, skipping interpreter teardown:
    there a thread that gloo (DDP or FSDP) leaves joinable intermittently aborts the process (SIGABRT),
    and the job is reported failed."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def rank_batch_size(global_batch: int, world: int) -> int:
    """Rows per rank and step: B / W; ConfigError when B does not split evenly."""
    if global_batch % world:
        raise ConfigError(f"train.batch_size {global_batch} is the global batch; it must split evenly over "
                          f"{world} processes (pick a multiple of {world})")
    return global_batch // world


def fault_point(dist: Dist, step: int) -> None:
    """Test hook: with CLIMBER_FAULT="RANK:STEP" that rank kills itself (SIGKILL) after global step STEP."""
    spec = os.environ.get(FAULT_ENV)
    if spec:
        rank, at = (int(x) for x in spec.split(":"))
        if rank == dist.rank and at == step:
            os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------------------------------------- data

SHARD_HASH = 2654435761  # Knuth's multiplicative hash: shard = (user * SHARD_HASH mod 2^32) mod K
SHARDS_FILE = "shards.json"


def shard_of(user: pl.Expr, shards: int) -> pl.Expr:
    """The shard (0 .. K - 1) of a dense user id: stable across runs, machines and library versions."""
    return (user.cast(pl.UInt64) * SHARD_HASH % (1 << 32)) % shards


def write_shards(data_dir: Path, out: Path, shards: int, *, force: bool = False, log=print) -> dict:
    """Cut the prepared events of ``data_dir`` into ``shards`` Parquet files by user (each file in the
    order of events.parquet, the columns samples read), written to a temp dir beside ``out`` and renamed.
    Returns the shard manifest (``shards.json``: files, rows and users per shard, data fingerprint)."""
    data_dir, out = Path(data_dir), Path(out)
    if shards < 1:
        raise ConfigError(f"--shards must be >= 1, got {shards}")
    manifest = load_manifest(data_dir)
    if out.exists() and not force:
        raise DataError(f"{out}: already exists (use --force to replace it)")
    tmp = staging_dir(out)
    try:
        events = pl.scan_parquet(data_dir / "events.parquet").select(COLUMNS)
        files, rows, users = [], [], []
        for k in range(shards):
            name = f"part-{k:05d}-of-{shards:05d}.parquet"
            events.filter(shard_of(pl.col("user"), shards) == k).sink_parquet(tmp / name, row_group_size=1 << 17)
            stats = pl.scan_parquet(tmp / name).select(pl.len(), pl.col("user").n_unique()).collect().row(0)
            files.append(name)
            rows.append(int(stats[0]))
            users.append(int(stats[1]))
            log(f"  shard {k}: {rows[-1]:,} events, {users[-1]:,} users")
        info = {"shards": shards, "hash": f"(user * {SHARD_HASH} mod 2^32) mod {shards}",
                "fingerprint": manifest["fingerprint"]["sha256"], "files": files, "rows": rows, "users": users}
        (tmp / SHARDS_FILE).write_text(json.dumps(info, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info


def read_shards(shard_dir: Path, data_dir: Path) -> dict:
    """The manifest of a shard dir, checked against the prepared data it must come from."""
    path = Path(shard_dir) / SHARDS_FILE
    if not path.exists():
        raise DataError(f"{shard_dir}: not a shard dir (no {SHARDS_FILE}); run `climber data shard` first")
    info = json.loads(path.read_text())
    if info["fingerprint"] != load_manifest(data_dir)["fingerprint"]["sha256"]:
        raise DataError(f"{shard_dir}: cut from other data than {data_dir} (fingerprint differs); "
                        f"re-run `climber data shard --data {data_dir}`")
    return info


def rank_shards(dist: Dist, data_dir: Path, shard_dir: Path | None, run_dir: Path, log=print) -> dict[int, Path]:
    """{shard number: file} that this rank reads: shards rank, rank + W, ... of ``shard_dir``; without
    one, rank 0 first cuts W shards into ``run_dir/shards-W`` (kept for a resume) while the others wait."""
    if shard_dir is None:
        shard_dir = Path(run_dir) / f"shards-{dist.world}"
        if dist.main:
            try:
                read_shards(shard_dir, data_dir)
            except DataError:
                log(f"cutting {data_dir} into {dist.world} shards by user: {shard_dir}")
                write_shards(data_dir, shard_dir, dist.world, force=True, log=log)
        dist.barrier()
    info = read_shards(shard_dir, data_dir)
    if info["shards"] < dist.world:
        raise ConfigError(f"{shard_dir}: {info['shards']} shards for {dist.world} processes; every process "
                          f"needs at least one (`climber data shard --shards {dist.world}` or a multiple)")
    if dist.main and info["shards"] % dist.world:
        log(f"note: {info['shards']} shards over {dist.world} processes: some read more shards than others")
    return {k: Path(shard_dir) / info["files"][k] for k in range(dist.rank, info["shards"], dist.world)}


# ---------------------------------------------------------------------------------------------- model


class Objective(nn.Module):
    """A model and its training loss as one module, so that DDP / FSDP wrap the whole training forward:
    ``forward(batch) -> scalar loss`` = ``loss_fn(model, batch)``."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, Batch], torch.Tensor]):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.loss_fn(self.model, batch)


class Parallel:
    """``model`` spread over the ranks of ``dist``: the training step, gradient clipping, lock-stepped
    evaluation batches, and the full (one-process layout) state for checkpoints."""

    def __init__(self, model: nn.Module, dist: Dist, loss_fn, strategy: str = "ddp", shard_embedding_rows: int = 0,
                 precision: str = "fp32"):
        self.model, self.dist, self.precision = model, dist, precision
        self.strategy = strategy if dist.world > 1 else "none"
        self.sharded: dict[str, RowShardedEmbedding] = {}  # module name -> table split by rows
        model.to(dist.device)
        objective = Objective(model, loss_fn)
        self.train_module: nn.Module = objective
        if self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            if shard_embedding_rows:
                self.sharded = shard_embeddings(model, dist, shard_embedding_rows)
            # each rank owns its rows of a sharded table: DDP must not average them
            DDP._set_params_and_buffers_to_ignore_for_model(objective, [f"model.{n}.weight" for n in self.sharded])
            # buffers are constant (item feature ids): synced once at start, not before every forward
            no_sync = {"forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters
                       else "broadcast_buffers": False}  # the name since torch 2.13, the one before
            self.train_module = DDP(objective, device_ids=[dist.device] if dist.device.type == "cuda" else None,
                                    **no_sync)
        elif self.strategy == "fsdp":
            if shard_embedding_rows:
                raise ConfigError("train.shard_embedding_rows is for train.parallel=ddp; fsdp already shards "
                                  "every table (set one or the other)")
            fully_shard_model(model, dist)
        elif self.strategy != "none":
            raise ConfigError(f"train.parallel must be 'ddp' or 'fsdp', got {strategy!r}")

    @property
    def splits_parameters(self) -> bool:
        """Whether parameters are split over the ranks (fsdp, row-sharded tables): no rank holds the whole
        weights, and a forward pass runs collectives, so every rank must make the same number of calls."""
        return self.strategy == "fsdp" or bool(self.sharded)

    # ------------------------------------------------------------------ training step

    def backward(self, batch: Batch) -> tuple[float, int]:
        """Forward + backward of this rank's rows of a global batch -> (its mean loss, its candidates).
        With W ranks the loss is weighted by n_r W / N, so the ranks' average gradient is the gradient
        of the mean loss over all N candidates of the step."""
        if self.dist.device.type != "cpu":
            batch = batch.to(self.dist.device)
        n = batch.num_candidates
        with autocast(self.dist.device, self.precision):
            loss = self.train_module(batch)
        if self.dist.world == 1:
            loss.backward()
        else:
            (loss * (n * self.dist.world / self.dist.sum(n)[0])).backward()
        return loss.item(), n

    def clip_grad_norm(self, max_norm: float) -> None:
        """``torch.nn.utils.clip_grad_norm_`` over the whole model: a sharded table's squared norm is
        summed over the ranks' rows first (DDP and FSDP gradients already are the full ones)."""
        if not self.sharded:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
            return
        def square(grads: list[torch.Tensor]) -> float:
            return sum(float(torch.linalg.vector_norm(g)) ** 2 for g in grads)

        mine = {id(m.weight) for m in self.sharded.values()}
        grads = [p.grad for p in self.model.parameters() if p.grad is not None and id(p) not in mine]
        rows = [m.weight.grad for m in self.sharded.values() if m.weight.grad is not None]
        total = math.sqrt(square(grads) + self.dist.sum(square(rows))[0])
        coef = min(1.0, max_norm / (total + 1e-6))
        for g in grads + rows:
            g.mul_(coef)

    def lockstep(self, batches: Iterable[Batch], count: int) -> Iterator[Batch]:
        """``batches`` (``count`` of them), then, when a forward runs collectives, empty batches (0 rows)
        until this rank has made as many forward calls as the rank with the most batches."""
        if not self.splits_parameters:
            yield from batches
            return
        total, seen, empty = self.dist.max_int(count), 0, None
        for batch in batches:
            seen += 1
            empty = batch.take(slice(0, 0)) if empty is None else empty
            yield batch
        if seen < total and empty is None:
            raise DataError(f"rank {self.dist.rank}: its shards hold no rows of this split; use fewer processes "
                            "or more shards")
        for _ in range(total - seen):
            yield empty

    # ------------------------------------------------------------------ full state

    def param_names(self, optimizer: torch.optim.Optimizer) -> list[str]:
        """The parameter name of each optimizer slot, in the order ``optimizer.state_dict()`` numbers them."""
        by_id = {id(p): name for name, p in self.model.named_parameters()}
        return [by_id[id(p)] for group in optimizer.param_groups for p in group["params"]]

    def full_state(self, optimizer: torch.optim.Optimizer | None = None) -> tuple[dict | None, dict | None]:
        """(model state, optimizer state) in the layout of one process (every table whole), on rank 0;
        other ranks may get None. A collective: every rank calls it."""
        if self.strategy == "fsdp":
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                                 get_optimizer_state_dict)

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            model_state = get_model_state_dict(self.model, options=options)
            if optimizer is None:
                return model_state, None
            by_name = get_optimizer_state_dict(self.model, optimizer, options=options)  # keyed by parameter name
            if not self.dist.main:
                return None, None
            return model_state, _rekey(by_name, {name: i for i, name in enumerate(self.param_names(optimizer))})
        model_state = dict(self.model.state_dict())
        for name, table in self.sharded.items():
            model_state[f"{name}.weight"] = table.gather_rows(table.weight.detach())
        if optimizer is None:
            return model_state, None
        return model_state, self._map_table_slots(optimizer, optimizer.state_dict(), RowShardedEmbedding.gather_rows)

    def load_full(self, model_state: dict, optimizer: torch.optim.Optimizer | None = None,
                  optim_state: dict | None = None) -> None:
        """Load a one-process state (:meth:`full_state`, or a checkpoint of any number of processes)."""
        if self.strategy == "fsdp":
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                                 set_optimizer_state_dict)

            options = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.model, model_state, options=options)
            if optimizer is not None:
                by_name = _rekey(optim_state, dict(enumerate(self.param_names(optimizer))))
                set_optimizer_state_dict(self.model, optimizer, by_name, options=options)
            return
        model_state = dict(model_state)
        for name, table in self.sharded.items():
            model_state[f"{name}.weight"] = table.my_rows(model_state[f"{name}.weight"])
        self.model.load_state_dict(model_state)
        if optimizer is not None:
            optimizer.load_state_dict(self._map_table_slots(optimizer, optim_state, RowShardedEmbedding.my_rows))

    def _map_table_slots(self, optimizer: torch.optim.Optimizer, optim_state: dict, fn) -> dict:
        """``optim_state`` with ``fn(table, tensor)`` applied to the per-row tensors (Adam's moments) of the
        row-sharded tables' slots, in slot order (the same on every rank: ``fn`` may be a collective)."""
        if not self.sharded:
            return optim_state
        tables = {f"{name}.weight": table for name, table in self.sharded.items()}
        names = self.param_names(optimizer)
        state = {}
        for slot in sorted(optim_state["state"]):
            table, s = tables.get(names[slot]), optim_state["state"][slot]
            state[slot] = s if table is None else {k: fn(table, v) if v.dim() else v for k, v in s.items()}
        return {**optim_state, "state": state}


def _rekey(optim_state: dict, key: dict) -> dict:
    """An optimizer state with its slots renamed by ``key`` (slot number <-> parameter name)."""
    return {"state": {key[k]: s for k, s in optim_state["state"].items()},
            "param_groups": [{**g, "params": [key[p] for p in g["params"]]} for g in optim_state["param_groups"]]}


def fully_shard_model(model: nn.Module, dist: Dist) -> None:
    """FSDP2: every element of every nn.ModuleList (transformer layers, blocks; innermost first) is one
    unit, gathered for its own forward and backward only; the root holds the rest (embedding tables,
    fusion, heads). ``forward_tasks`` is registered, so it gathers like ``forward``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    # our models never change a module's output in place, which is what this warning is about
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(dist.device.type, (dist.world,))
    for module in reversed(list(model.modules())):  # modules() is pre-order: reversed, children come first
        if isinstance(module, nn.ModuleList):
            for unit in module:
                fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if hasattr(model, "forward_tasks"):
        register_fsdp_forward_method(model, "forward_tasks")


# ---------------------------------------------------------------------------------------------- embeddings


class RowShardedEmbedding(nn.Embedding):
    """An embedding table split by rows over the ranks; the plain-PyTorch stand-in for TorchRec's
    sharded tables. Rank r holds rows [r R, (r + 1) R) as its ``weight`` (R, d), R = ceil(rows / W)
    (the last shard padded with rows no id reaches), so each rank stores 1 / W of the table and of its
    optimizer state. Made by :func:`shard_embeddings` from a whole table (a subclass keeps its own
    forward, e.g. ItemEmbedding's side features, which calls this lookup through ``super().forward``).

    A lookup is a collective (every rank calls it the same number of times): the ranks' ids are
    all-gathered, each rank looks up the rows it owns (zeros for the others) and an all-to-all returns
    to every rank the rows of its own ids, summed over owners (one owner each, so the sum is exact).
    Backward all-gathers the output gradients; each owner adds those of its rows, divided by W: DDP
    averages the replicated parameters' gradients over the ranks, and this gives the rows the same mean.
    Traffic per lookup: W x (ids of the largest rank) x d values per rank, whatever the table size.
    """

    dist: Dist
    row_start: int  # first row held here
    rows_per_rank: int  # R

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # ids (...) int64 -> (..., d)
        return _ShardedLookup.apply(self.weight, ids.reshape(-1), self).reshape(*ids.shape, self.embedding_dim)

    def my_rows(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's R rows of a whole (rows, ...) tensor (zero padded past the end)."""
        part = full[self.row_start : self.row_start + self.rows_per_rank]
        pad = self.rows_per_rank - part.shape[0]
        return torch.cat([part, part.new_zeros(pad, *part.shape[1:])]) if pad else part.clone()

    def gather_rows(self, part: torch.Tensor) -> torch.Tensor:
        """The whole (rows, ...) tensor from every rank's (R, ...) part (a collective)."""
        parts = [torch.empty_like(part) for _ in range(self.dist.world)]
        tdist.all_gather(parts, part.contiguous())
        return torch.cat(parts)[: self.num_embeddings].cpu()


class _ShardedLookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: torch.Tensor, ids: torch.Tensor, table: RowShardedEmbedding) -> torch.Tensor:
        # weight (R, d) this rank's rows; ids (n,) this rank's lookups -> (n, d)
        world, d = table.dist.world, weight.shape[1]
        counts = [torch.zeros(1, dtype=torch.int64, device=ids.device) for _ in range(world)]
        tdist.all_gather(counts, torch.tensor([ids.numel()], device=ids.device))
        n_max = max(int(c) for c in counts)
        padded = torch.full((n_max,), -1, dtype=ids.dtype, device=ids.device)  # -1: no lookup
        padded[: ids.numel()] = ids
        every = [torch.empty_like(padded) for _ in range(world)]
        tdist.all_gather(every, padded)
        every = torch.stack(every)  # (W, n_max): the ids of every rank
        local = every - table.row_start  # (W, n_max) row in this shard
        mine = (every >= 0) & (local >= 0) & (local < table.rows_per_rank)  # (W, n_max) owned here
        found = weight.new_zeros(world, n_max, d)
        found[mine] = weight[local[mine]]  # (W, n_max, d): rank s's lookups, rows owned here
        received = torch.empty_like(found)
        tdist.all_to_all_single(received.view(world * n_max, d), found.view(world * n_max, d))
        ctx.table, ctx.n, ctx.shape = table, ids.numel(), weight.shape
        keep = mine if table.padding_idx is None else mine & (every != table.padding_idx)  # padding gets no grad
        ctx.save_for_backward(local, keep)
        return received.sum(dim=0)[: ids.numel()]  # (n, d): from each owner, its rows of my ids

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # grad (n, d) of this rank's lookups -> (R, d) of this rank's rows
        local, keep = ctx.saved_tensors
        world, n_max = local.shape
        padded = grad.new_zeros(n_max, grad.shape[1])
        padded[: ctx.n] = grad
        every = [torch.empty_like(padded) for _ in range(world)]
        tdist.all_gather(every, padded.contiguous())
        every = torch.stack(every)  # (W, n_max, d)
        out = grad.new_zeros(ctx.shape).index_add_(0, local[keep], every[keep])
        return out / world, None, None


_SHARDED_TYPES: dict[type, type] = {nn.Embedding: RowShardedEmbedding}


def shard_embeddings(model: nn.Module, dist: Dist, min_rows: int) -> dict[str, RowShardedEmbedding]:
    """Turn every embedding table of at least ``min_rows`` rows into a :class:`RowShardedEmbedding` in
    place (the way ``torch.nn.utils.parametrize`` does: the module's class is swapped for a subclass and
    its ``weight`` for this rank's rows); returns them by module name. Needs identical weights on every
    rank (the same seed, or a loaded checkpoint)."""
    from climber.models.layers import ItemEmbedding

    out = {}
    for name, module in model.named_modules():
        if type(module) not in (nn.Embedding, ItemEmbedding) or module.num_embeddings < min_rows:
            continue
        if module.max_norm is not None or module.sparse:
            raise ConfigError(f"{name}: a table with max_norm or sparse gradients cannot be row-sharded")
        cls = type(module)
        if cls not in _SHARDED_TYPES:  # lookup order: cls.forward, then RowShardedEmbedding.forward
            _SHARDED_TYPES[cls] = type(f"RowSharded{cls.__name__}", (cls, RowShardedEmbedding), {})
        rows_per_rank = -(-module.num_embeddings // dist.world)
        module.__class__ = _SHARDED_TYPES[cls]
        module.dist, module.row_start, module.rows_per_rank = dist, dist.rank * rows_per_rank, rows_per_rank
        module.weight = nn.Parameter(module.my_rows(module.weight.detach()))
        out[name] = module
    return out


# ---------------------------------------------------------------------------------------------- launch


def launch(nproc: int, argv: list[str]) -> None:
    """``python -m climber ARGV`` on ``nproc`` processes of this machine, through torchrun's launcher
    (``--standalone``: a free port on localhost). DistributedError naming the first rank that failed."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc}", "--module", "climber", *argv])
    try:
        run(args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        how = (f"was killed by {failure.signal_name()}" if failure.exitcode < 0
               else f"exited with code {failure.exitcode}")
        raise DistributedError(f"distributed training failed: rank {rank} (pid {failure.pid}) {how}; "
                               "the other processes were stopped") from None
