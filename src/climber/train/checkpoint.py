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

FORMAT = "climber-checkpoint-1"


def save(path: Path, model: torch.nn.Module, meta: dict, optimizer: torch.optim.Optimizer | None = None,
         average=None) -> None:
    """Write ``model`` weights (+ optimizer state and torch RNG when ``optimizer`` is given, + the weight
    average when ``average`` is given) atomically."""
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    meta = dict(meta)
    if average is not None:
        tensors.update({f"average.{k}": v.contiguous() for k, v in average.shadow.items()})
        meta["average_updates"] = average.updates
    if optimizer is not None:
        state = optimizer.state_dict()
        scalars = {}
        for pid, pstate in state["state"].items():
            for k, v in pstate.items():
                if torch.is_tensor(v) and v.dim() > 0:
                    tensors[f"optim.{pid}.{k}"] = v.contiguous()
                else:
                    scalars[f"{pid}.{k}"] = float(v)
        meta["optimizer"] = {"param_groups": state["param_groups"], "scalars": scalars}
        tensors["rng.torch"] = torch.get_rng_state()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": FORMAT, "meta": json.dumps(meta)})
    os.replace(tmp, path)


def read_meta(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        md = f.metadata() or {}
    if md.get("format") != FORMAT:
        raise ValueError(f"{path}: not a climber checkpoint (format {md.get('format')!r})")
    return json.loads(md["meta"])


def load(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, average=None) -> dict:
    """Load weights into ``model`` (and optimizer + RNG state, weight average, when given); returns the metadata."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    meta = read_meta(path)
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        weights = {k[6:]: f.get_tensor(k) for k in keys if k.startswith("model.")}
        model.load_state_dict(weights)
        if average is not None:
            average.shadow = {k[8:]: f.get_tensor(k) for k in keys if k.startswith("average.")}
            average.updates = meta["average_updates"]
        if optimizer is not None:
            opt_meta = meta["optimizer"]
            state: dict = {}
            for k in keys:
                if k.startswith("optim."):
                    _, pid, name = k.split(".", 2)
                    state.setdefault(int(pid), {})[name] = f.get_tensor(k)
            for key, v in opt_meta["scalars"].items():
                pid, name = key.split(".", 1)
                state.setdefault(int(pid), {})[name] = torch.tensor(v)
            optimizer.load_state_dict({"state": state, "param_groups": opt_meta["param_groups"]})
            torch.set_rng_state(f.get_tensor("rng.torch"))
    return meta
