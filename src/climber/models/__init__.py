"""Model registry. Every model: a ``@dataclass`` config, ``Model(cfg, info)``, ``strategies()``
(the MSE strategies its batches must carry), ``forward(batch) -> logits (B, C)`` and
``flops(shape) -> int`` (analytic forward FLOPs of one row). A new model is one file plus one line here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
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

    @property
    def num_actions(self) -> int:
        return len(self.actions)

    @property
    def num_scenarios(self) -> int:
        return len(self.scenarios)

    @classmethod
    def from_prepared(cls, prepared) -> "DataInfo":
        m = load_manifest(prepared)
        return cls(m["users"], m["items"], tuple(m["actions"]), tuple(m["scenarios"]))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class SampleShape:
    """The shape of one row: the length of each subsequence and the number of candidates."""

    lengths: tuple[int, ...]
    candidates: int


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


def build_model(name: str, cfg: Any, info: DataInfo) -> torch.nn.Module:
    cfg_cls, model_cls = _lookup(name)
    if isinstance(cfg, dict):
        cfg = cfg_cls.from_dict(cfg)
    return model_cls(cfg, info)
