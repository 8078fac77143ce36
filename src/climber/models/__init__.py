"""Model registry. Every model: a ``@dataclass`` config, ``Model(cfg, info)``, ``strategies()``
(the MSE strategies its batches must carry), ``forward(batch) -> logits (B, C)`` and
``flops(shape) -> int`` (analytic forward FLOPs of one row). A new model is one file plus one line here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from climber.data.prepare import load_manifest


@dataclass(frozen=True)
class DataInfo:
    """What a model needs to know about the prepared data: vocabulary sizes (ids start at 1)."""

    num_users: int
    num_items: int
    actions: tuple[str, ...]  # raw action values; dense id = index + 1
    scenarios: tuple[str, ...]  # raw scenario values; dense id = index + 1
    item_features: tuple[tuple[str, int], ...] = ()  # categorical item side columns: (name, vocab size)

    @property
    def num_actions(self) -> int:
        return len(self.actions)

    @property
    def num_scenarios(self) -> int:
        return len(self.scenarios)

    @classmethod
    def from_prepared(cls, prepared) -> "DataInfo":
        m = load_manifest(prepared)
        features = tuple((c, n) for c, n in sorted(m.get("side_columns", {}).items()) if c.startswith(ITEM_PREFIX))
        return cls(m["users"], m["items"], tuple(m["actions"]), tuple(m["scenarios"]), features)

    @classmethod
    def from_dict(cls, d: dict) -> "DataInfo":
        d = dict(d)
        d["actions"], d["scenarios"] = tuple(d["actions"]), tuple(d["scenarios"])
        d["item_features"] = tuple((c, n) for c, n in d.get("item_features", ()))
        return cls(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


ITEM_PREFIX = "item_"  # categorical side columns named item_* are item features (one value per item)


def item_feature_table(prepared, info: DataInfo) -> torch.Tensor:
    """(num_items + 1, F) int64: each item's value id of each item feature column (its first occurrence
    in the prepared events; 0 for row 0 and for items never seen with a value)."""
    import polars as pl

    columns = [c for c, _ in info.item_features]
    table = torch.zeros(info.num_items + 1, len(columns), dtype=torch.long)
    if columns:
        first = (pl.scan_parquet(Path(prepared) / "events.parquet").select("item", *columns)
                 .group_by("item").agg(pl.col(c).first() for c in columns).collect())
        ids = torch.from_numpy(first["item"].to_numpy().astype("int64"))
        values = first.select(columns).fill_null(0).to_numpy().astype("int64")
        table[ids] = torch.from_numpy(values)
    return table


@dataclass(frozen=True)
class SampleShape:
    """The shape of one row: the length of each subsequence and the number of candidates."""

    lengths: tuple[int, ...]
    candidates: int


def flops_per_candidate(model, candidates: int) -> float:
    """Analytic forward FLOPs per candidate of ``model`` on a row with every subsequence at its full
    length and ``candidates`` candidates."""
    return model.flops(SampleShape(tuple(s.length for s in model.strategies()), candidates)) / candidates


# name -> (module, config class, model class); imported on first use
REGISTRY: dict[str, tuple[str, str, str]] = {
    "climber": ("climber.models.climber", "ClimberConfig", "Climber"),
    "dlrm": ("climber.models.dlrm", "DLRMConfig", "DLRM"),
    "din": ("climber.models.din", "DINConfig", "DIN"),
    "twin": ("climber.models.twin", "TWINConfig", "TWIN"),
    "transformer": ("climber.models.transformer", "TransformerConfig", "Transformer"),
    "hstu": ("climber.models.hstu", "HSTUConfig", "HSTU"),
    "wukong": ("climber.models.wukong", "WukongConfig", "Wukong"),
    "rankmixer": ("climber.models.rankmixer", "RankMixerConfig", "RankMixer"),
}


def model_names() -> list[str]:
    return list(REGISTRY)


def config_class(name: str) -> type:
    return _lookup(name)[0]


def _lookup(name: str):
    import importlib

    if name not in REGISTRY:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(REGISTRY)}")
    module, cfg_name, model_name = REGISTRY[name]
    mod = importlib.import_module(module)
    return getattr(mod, cfg_name), getattr(mod, model_name)


def build_model(name: str, cfg: Any, info: DataInfo, prepared=None) -> torch.nn.Module:
    """The model ``name`` with config ``cfg`` (dataclass or dict). With ``prepared`` (a prepared data
    dir) the item feature tables are filled from the data; without, they stay 0 until a checkpoint
    is loaded."""
    from climber.models.layers import ItemEmbedding

    cfg_cls, model_cls = _lookup(name)
    if isinstance(cfg, dict):
        cfg = cfg_cls.from_dict(cfg)
    model = model_cls(cfg, info)
    if prepared is not None and info.item_features:
        table = item_feature_table(prepared, info)
        for module in model.modules():
            if isinstance(module, ItemEmbedding):
                module.feature_ids.copy_(table)
    return model
