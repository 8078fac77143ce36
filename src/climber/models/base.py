"""What every model config shares: dict round trip that rejects unknown keys, a type check of every
field, and field checks whose errors name the config class and the field."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from climber.config import ConfigError, check_types


@dataclass
class ModelConfig:
    def __post_init__(self):
        check_types(self, type(self).__name__)
        self.check()

    def check(self) -> None:
        """The model's own checks of its values (their types are checked before)."""

    @classmethod
    def from_dict(cls, d: dict):
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)

    def _at_least(self, minimum: float, *names: str) -> None:
        for name in names:
            if getattr(self, name) < minimum:
                raise ConfigError(f"{type(self).__name__}.{name}: must be >= {minimum}, got {getattr(self, name)}")

    def _popularity_needs_prior(self) -> None:
        """popularity_count is a second column of popularity_prior's term, popularity_fit its weights' start."""
        for name in ("popularity_count", "popularity_fit"):
            if getattr(self, name) and not self.popularity_prior:
                raise ConfigError(f"{type(self).__name__}.{name}: needs popularity_prior=true")

    def _dropout_in_range(self) -> None:
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{type(self).__name__}.dropout: must be in [0, 1), got {self.dropout}")

    def _layer_sizes(self, *names: str, nonempty: bool = False) -> None:
        """Lists of hidden sizes: each size >= 1 (and at least one size with ``nonempty``)."""
        for name in names:
            sizes = getattr(self, name)
            if (nonempty and not sizes) or any(s < 1 for s in sizes):
                need = "need at least one hidden size, each >= 1" if nonempty else "hidden sizes must be >= 1"
                raise ConfigError(f"{type(self).__name__}.{name}: {need}, got {sizes}")
