"""Checkpoints: one safetensors file holding weights (and, for resumable ones, optimizer and RNG state),
with the model name, configs and loop state as JSON in the file's metadata. Written to a temp file and
``os.replace``d, so a kill never leaves a torn checkpoint. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from climber.data.schema import DataError

FORMAT = "climber-checkpoint-1"


def save(path: Path, model: torch.nn.Module, meta: dict, optimizer: torch.optim.Optimizer | None = None,
         average=None) -> None:
    """Write ``model`` weights (+ optimizer state and torch RNG when ``optimizer`` is given, + the weight
    average when ``average`` is given) atomically."""
    save_state(path, model.state_dict(), meta, optimizer.state_dict() if optimizer is not None else None,
               average, [torch.get_rng_state()] if optimizer is not None else None)


def save_state(path: Path, model_state: dict, meta: dict, optim_state: dict | None = None, average=None,
               rng_states: list[torch.Tensor] | None = None) -> None:
    """:func:`save` from state dicts: ``model_state`` (name -> tensor), ``optim_state`` in the layout of
    ``torch.optim.Optimizer.state_dict()`` and the torch RNG state of each process (rank 0 first), so a
    distributed run's rank 0 can write the full state it gathered (climber.train.distributed)."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model_state.items()}
    meta = dict(meta)
    if average is not None:
        tensors.update({f"average.{k}": v.cpu().contiguous() for k, v in average.shadow.items()})
        meta["average_updates"] = average.updates
    if optim_state is not None:
        scalars = {}
        for pid, pstate in optim_state["state"].items():
            for k, v in pstate.items():
                if torch.is_tensor(v) and v.dim() > 0:
                    tensors[f"optim.{pid}.{k}"] = v.cpu().contiguous()
                else:
                    scalars[f"{pid}.{k}"] = float(v)
        meta["optimizer"] = {"param_groups": optim_state["param_groups"], "scalars": scalars}
    for rank, rng in enumerate(rng_states or []):  # rank 0 keeps the single-process name
        tensors["rng.torch" if rank == 0 else f"rng.torch.{rank}"] = rng
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": FORMAT, "meta": json.dumps(meta)})
    os.replace(tmp, path)


def read_meta(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        md = f.metadata() or {}
    if md.get("format") != FORMAT:
        raise DataError(f"{path}: not a climber checkpoint (format {md.get('format')!r})")
    return json.loads(md["meta"])


def read_state(path: Path) -> dict:
    """Everything in a checkpoint: {"meta", "model" (name -> tensor), "optimizer" (an optimizer
    state_dict, or None), "average" (name -> tensor, or None), "rng" (per rank, rank 0 first)}."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    meta = read_meta(path)
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        out = {"meta": meta, "model": {k[6:]: f.get_tensor(k) for k in keys if k.startswith("model.")},
               "optimizer": None, "average": None, "rng": []}
        if "average_updates" in meta:
            out["average"] = {k[8:]: f.get_tensor(k) for k in keys if k.startswith("average.")}
        if "optimizer" in meta:
            state: dict = {}
            for k in keys:
                if k.startswith("optim."):
                    _, pid, name = k.split(".", 2)
                    state.setdefault(int(pid), {})[name] = f.get_tensor(k)
            for key, v in meta["optimizer"]["scalars"].items():
                pid, name = key.split(".", 1)
                state.setdefault(int(pid), {})[name] = torch.tensor(v)
            out["optimizer"] = {"state": state, "param_groups": meta["optimizer"]["param_groups"]}
        rng = {0 if k == "rng.torch" else int(k.rsplit(".", 1)[1]): f.get_tensor(k)
               for k in keys if k.startswith("rng.torch")}
        out["rng"] = [rng[r] for r in sorted(rng)]
    return out


def load(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, average=None) -> dict:
    """Load weights into ``model`` (and optimizer + RNG state, weight average, when given); returns the metadata."""
    state = read_state(path)
    model.load_state_dict(state["model"])
    if average is not None:
        average.shadow, average.updates = state["average"], state["meta"]["average_updates"]
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"][0])
    return state["meta"]
