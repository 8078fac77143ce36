"""Typed run configuration: model name + model config + training config; presets by name; YAML I/O.

A config file (and a preset in ``climber/presets/``) looks like::

    model: climber
    model_config: {d_model: 64, n_layers: 2}
    train: {epochs: 20, lr: 0.001}

``--set`` overrides use dotted keys: ``train.lr=3e-4``, ``model_config.d_model=128`` (``model.`` is
accepted as a short form of ``model_config.``).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A configuration the user can fix; printed as one line."""


def check_types(config, where: str) -> None:
    """ConfigError naming ``where.field``, the value and the expected type when a field of the dataclass
    instance ``config`` does not hold its annotated type: int (not bool), float (an int will do), bool,
    str, dict, list[T] (a list of T)."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if not _fits(value, hints[f.name]):
            raise ConfigError(f"{where}.{f.name}: expected {_describe(hints[f.name])}, got {value!r}")


def _fits(value, hint) -> bool:
    if typing.get_origin(hint) is list:
        (element,) = typing.get_args(hint)
        return isinstance(value, list) and all(_fits(v, element) for v in value)
    if hint in (int, float):  # a bool is an int to Python, never a number here
        return isinstance(value, int if hint is int else (int, float)) and not isinstance(value, bool)
    return isinstance(value, hint)


_TYPE_NAMES = {int: ("an integer", "integers"), float: ("a number", "numbers"), bool: ("true or false", "booleans"),
               str: ("a string", "strings"), dict: ("a mapping", "mappings")}  # type: (one, a list of them)


def _describe(hint) -> str:
    if typing.get_origin(hint) is list:
        return f"a list of {_TYPE_NAMES[typing.get_args(hint)[0]][1]}"
    return _TYPE_NAMES[hint][0]


PRECISIONS = ("fp32", "bf16")  # train.precision; climber.devices.check_precision checks the hardware
SELECT_METRICS = ("auc", "gauc", "logloss")  # train.select; logloss is better when lower
ITEM_VOCABS = ("all", "train")  # train.item_vocab
ID_INITS = ("normal", "zero")  # train.id_init


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 32  # rows (users) per step
    min_steps_per_epoch: int = 64  # fewer rows a step where batch_size would give an epoch fewer optimizer steps (0 = off); robustness suite
    candidates_per_row: int = 32  # C: candidates sharing one history ("single user, multiple items")
    mode: str = "multi"  # "multi" | "single" ("single user, single item", C = 1)
    lr: float = 1e-3
    weight_decay: float = 0.01
    embedding_decay: float = 1.0  # AdamW weight decay on the embedding tables (ids, side features, item bias); robustness suite
    lazy_embeddings: bool = True  # Adam steps on the tables move only the rows a batch looked up (climber.train.optim.LazyRowsAdamW); robustness suite
    embedding_lr_mult: float = 1.0  # the lookup tables' learning rate, as a multiple of lr; robustness suite
    id_init: str = "zero"  # item (and user) id tables start as: zero (a row holds only what its lookups taught it) | normal (N(0, 0.02), as the other tables); robustness suite
    warmup_steps: int = 100  # capped at a tenth of the run's steps
    grad_clip: float = 1.0
    ema: float = 0.0  # decay of an exponential moving average of the weights, used for eval (0 = off)
    aux_weight: float = 0.5  # weight of multi-task action-head losses (models with action heads)
    rank_weight: float = 0.0  # weight of a pairwise logistic loss between a row's positives and negatives
    seed: int = 0
    patience: int = 3  # epochs without a better val figure (``select``) before stopping; epochs that end in the lr warmup do not count
    select: str = "auc"  # the val figure that picks the best checkpoint and stops early: auc | gauc | logloss
    eval_batch_size: int = 64
    threads: int = 0  # torch intra-op threads; 0 = all cores
    device: str = "auto"  # auto (CUDA when available, else CPU) | cpu | cuda | cuda:N | mps; climber.devices
    precision: str = "fp32"  # fp32 | bf16 (autocast forward; refused on a CPU without native bf16)
    tensorboard: bool = False
    max_epoch_minutes: float = 0.0  # 0 = no limit; else stop training an epoch early after this long
    item_vocab: str = "train"  # item ids with rows of their own: all (every prepared id) | train (ids with a train event; others -> 0)
    item_min_events: int = 1  # with item_vocab=train: items with fewer train events share the unknown item's row (0) too
    item_id_shrink: float = 10.0  # > 0: an item's own id vector is scaled by n / (n + this), n its train events; 0 = off
    item_rate_buckets: int = 20  # > 0: each item's smoothed train positive rate, in this many quantile buckets, as an item feature
    item_rate_min_events: int = 20  # items with fewer train events get the global rate's bucket (their own labels would leak)
    item_rate_folds: int = 0  # >= 2: training candidates get their item's rate from the other folds' users (no own label); 0 = off
    item_dropout: float = 0.3  # in training, an item's own id vector -> 0 (unknown) with this probability; side features stay
    workers: int = -1  # processes collating batches beside training; 0 = none; -1 = auto (climber.data.loader.auto_workers)
    bucket: bool = True  # train batches of rows with similar history lengths: less padding, same rows per epoch
    # several processes (torchrun; docs/distributed.md): batch_size is the global batch, split over them
    parallel: str = "ddp"  # "ddp": a model replica per process | "fsdp": parameters, grads, optimizer state sharded
    shard_embedding_rows: int = 0  # ddp: split embedding tables of at least this many rows across processes (0 = off)

    def __post_init__(self):
        check_types(self, "train")
        if self.mode not in ("multi", "single"):
            raise ConfigError(f"train.mode must be 'multi' or 'single', got {self.mode!r}")
        if self.min_steps_per_epoch < 0:
            raise ConfigError(f"train.min_steps_per_epoch must be >= 0, got {self.min_steps_per_epoch}")
        for name in ("epochs", "batch_size", "candidates_per_row", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        if self.parallel not in ("ddp", "fsdp"):
            raise ConfigError(f"train.parallel must be 'ddp' or 'fsdp', got {self.parallel!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"train.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.select not in SELECT_METRICS:
            raise ConfigError(f"train.select must be one of {', '.join(SELECT_METRICS)}, got {self.select!r}")
        if self.item_vocab not in ITEM_VOCABS:
            raise ConfigError(f"train.item_vocab must be one of {', '.join(ITEM_VOCABS)}, got {self.item_vocab!r}")
        if self.id_init not in ID_INITS:
            raise ConfigError(f"train.id_init must be one of {', '.join(ID_INITS)}, got {self.id_init!r}")
        if self.embedding_lr_mult <= 0:
            raise ConfigError(f"train.embedding_lr_mult must be > 0, got {self.embedding_lr_mult}")
        if not 0.0 <= self.item_dropout < 1.0:
            raise ConfigError(f"train.item_dropout must be in [0, 1), got {self.item_dropout}")
        if self.workers < -1:
            raise ConfigError(f"train.workers must be >= 0 (or -1 for auto), got {self.workers}")
        if self.item_rate_buckets < 0:
            raise ConfigError(f"train.item_rate_buckets must be >= 0, got {self.item_rate_buckets}")
        if self.item_min_events < 1:
            raise ConfigError(f"train.item_min_events must be >= 1, got {self.item_min_events}")
        if self.item_min_events > 1 and self.item_vocab != "train":
            raise ConfigError(f"train.item_min_events={self.item_min_events} needs train.item_vocab=train")
        if self.item_id_shrink < 0:
            raise ConfigError(f"train.item_id_shrink must be >= 0 (0 = off), got {self.item_id_shrink}")
        if self.item_rate_min_events < 1:
            raise ConfigError(f"train.item_rate_min_events must be >= 1, got {self.item_rate_min_events}")
        if self.item_rate_folds == 1 or self.item_rate_folds < 0:
            raise ConfigError(f"train.item_rate_folds must be 0 (off) or >= 2, got {self.item_rate_folds}")
        if self.item_rate_folds and not self.item_rate_buckets:
            raise ConfigError("train.item_rate_folds needs the rate feature: set train.item_rate_buckets > 0")
        if self.shard_embedding_rows < 0:
            raise ConfigError(f"train.shard_embedding_rows must be >= 0, got {self.shard_embedding_rows}")
        for name in ("aux_weight", "rank_weight", "weight_decay", "embedding_decay"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class RunConfig:
    model: str = "climber"
    model_config: dict = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return {"model": self.model, "model_config": dict(self.model_config), "train": dataclasses.asdict(self.train)}

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        unknown = set(d) - {"model", "model_config", "train"}
        if unknown:
            raise ConfigError(f"unknown config sections {sorted(unknown)}; expected model, model_config, train")
        train = d.get("train") or {}
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        bad = set(train) - known
        if bad:
            raise ConfigError(f"unknown train settings {sorted(bad)}; known: {', '.join(sorted(known))}")
        return cls(model=d.get("model", "climber"), model_config=dict(d.get("model_config") or {}),
                   train=TrainConfig(**train))


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("climber.presets").iterdir() if p.name.endswith(".yaml"))


def load_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def load_preset(name: str) -> dict:
    path = resources.files("climber.presets") / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(preset_names())}")
    return yaml.safe_load(path.read_text())


def apply_overrides(d: dict, overrides: list[str]) -> dict:
    """Apply ``key.sub=value`` strings (values parsed as YAML scalars/lists) to a nested dict copy."""
    out = yaml.safe_load(yaml.safe_dump(d))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.lr=3e-4")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if parts[0] == "model" and len(parts) > 1:
            parts[0] = "model_config"
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {p} is not a section")
        node[parts[-1]] = _parse_value(value)
    return out


def _parse_value(text: str):
    """YAML scalar/list, but ``3e-4`` is a float (YAML 1.1 would read it as a string)."""
    try:
        return float(text) if any(c in text.lower() for c in ".e") and not text.isalpha() else int(text)
    except ValueError:
        return yaml.safe_load(text)


def resolve(model: str | None, config_file: Path | None, overrides: list[str]) -> RunConfig:
    """Preset (``--model`` as a preset name, or a model name's default preset) <- config file <- --set."""
    base = load_yaml(config_file) if config_file is not None else {}
    name = model or base.get("model") or "climber"
    preset_name = preset_of(name)
    preset = load_preset(preset_name) if preset_name else {"model": name}
    merged = _merge(preset, {k: v for k, v in base.items() if k != "model"})
    return RunConfig.from_dict(apply_overrides(merged, overrides))


DEFAULT_PRESETS = {"climber": "climber-small"}  # model name -> the preset `--model NAME` means (else NAME-default)


def preset_of(name: str) -> str | None:
    """The preset ``--model NAME`` starts from: NAME itself when it is a preset, else the model's default
    preset; None when there is none."""
    preset = name if name in preset_names() else DEFAULT_PRESETS.get(name, f"{name}-default")
    return preset if preset in preset_names() else None


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def save_yaml(d: dict, path: Path) -> None:
    Path(path).write_text(yaml.safe_dump(d, sort_keys=False))
