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

from climber.config import ConfigError
from climber.data.prepare import load_manifest
from climber.data.schema import feature_kind


@dataclass(frozen=True)
class DataInfo:
    """What a model needs to know about the prepared data: vocabulary sizes (ids start at 1)."""

    num_users: int
    num_items: int
    actions: tuple[str, ...]  # raw action values; dense id = index + 1
    scenarios: tuple[str, ...]  # raw scenario values; dense id = index + 1
    item_features: tuple[tuple[str, int], ...] = ()  # categorical item side columns: (name, vocab size)
    item_bags: tuple[tuple[str, int, int], ...] = ()  # item_* bags of values: (name, vocab size, longest bag)
    user_features: tuple[tuple[str, int], ...] = ()  # categorical user_* columns: (name, vocab size)
    user_bags: tuple[tuple[str, int, int], ...] = ()  # user_* bags of values: (name, vocab size, longest bag)
    ctx_features: tuple[tuple[str, int], ...] = ()  # per-event categorical ctx_* columns: (name, vocab size)
    numeric_features: tuple[tuple[str, float, float], ...] = ()  # per-event num_* columns: (name, train mean, std)

    @property
    def num_actions(self) -> int:
        return len(self.actions)

    @property
    def num_scenarios(self) -> int:
        return len(self.scenarios)

    @classmethod
    def from_prepared(cls, prepared, item_rate_buckets: int = 0) -> "DataInfo":
        """With ``item_rate_buckets`` > 0, one more item feature: the item's train positive rate bucket
        (``RATE_FEATURE``, :func:`item_rate_buckets`)."""
        m = load_manifest(prepared)
        side, bags = sorted(m.get("side_columns", {}).items()), sorted(m.get("multi_columns", {}).items())

        def singles(kind):  # (name, vocab size) of the single-valued feature columns of ``kind``
            return tuple((c, n) for c, n in side if feature_kind(c) == kind)

        def bags_of(kind):  # (name, vocab size, longest bag) of the bag columns of ``kind``
            return tuple((c, b["values"], b["longest"]) for c, b in bags if feature_kind(c) == kind)

        features = singles("item") + (((RATE_FEATURE, item_rate_buckets),) if item_rate_buckets else ())
        return cls(m["users"], m["items"], tuple(m["actions"]), tuple(m["scenarios"]), features,
                   item_bags=bags_of("item"), user_features=singles("user"), user_bags=bags_of("user"),
                   ctx_features=singles("ctx"),
                   numeric_features=tuple((c, v["mean"], v["std"]) for c, v in sorted(m.get("numeric_features", {}).items())))

    @property
    def rate_buckets(self) -> int:
        """The buckets of the train-rate item feature (0 without it)."""
        return dict(self.item_features).get(RATE_FEATURE, 0)

    def matches(self, prepared) -> bool:
        """Whether ``prepared`` has the vocabularies this info was made from."""
        return DataInfo.from_prepared(prepared, self.rate_buckets) == self

    @classmethod
    def from_dict(cls, d: dict) -> "DataInfo":
        d = dict(d)
        d["actions"], d["scenarios"] = tuple(d["actions"]), tuple(d["scenarios"])
        for key in ("item_features", "item_bags", "user_features", "user_bags", "ctx_features", "numeric_features"):
            d[key] = tuple(tuple(x) for x in d.get(key, ()))
        return cls(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


RATE_FEATURE = "train_rate"  # the item feature of train.item_rate_buckets, computed from the train split


def train_events(prepared):
    """The train split's events of a prepared dir (columns user, item, label, split), read once for every
    table built from them (``climber.eval.floor.item_train_rates``, the out-of-fold tables,
    :func:`fit_prior_weights`)."""
    import polars as pl

    return (pl.read_parquet(Path(prepared) / "events.parquet", columns=["user", "item", "label", "split"])
            .filter(pl.col("split") == "train"))


def item_rate_buckets(rates, num_items: int, buckets: int, min_events: int = 1) -> torch.Tensor:
    """(num_items + 1,) int64 in 1 .. ``buckets``: each item's train positive rate (``rates``, from
    ``climber.eval.floor.item_train_rates``: smoothed towards the global rate), cut at the quantiles of
    the rates of the items with at least ``min_events`` train events; an item with fewer has the global
    rate. A popularity prior that an item shares with items of a similar rate, so its vector is trained
    on many events (row 0, padding, stays 0).

    Why ``min_events``: a training candidate's own label is part of its item's rate, and for an item of
    a few events the rate (so the bucket) is mostly those labels, a leak a model learns in training and
    finds absent at test time (measured: docs/results/robustness.md). :func:`fold_rate_buckets` closes
    the leak another way."""
    import numpy as np
    import polars as pl

    per_item, rate = rates
    per_item = per_item.filter(pl.col("events") >= min_events)
    values = np.full(num_items + 1, rate)
    values[per_item["item"].to_numpy()] = per_item["rate"].to_numpy()
    edges = np.quantile(per_item["rate"].to_numpy(), np.arange(1, buckets) / buckets) if per_item.height else []
    table = torch.from_numpy(np.searchsorted(edges, values, side="right").astype("int64") + 1)
    table[0] = 0
    return table


def fold_train_rates(events, folds: int) -> list:
    """``climber.eval.floor.item_train_rates`` of the train events (:func:`train_events`) of the users
    outside each fold k in 0 .. folds - 1 (:func:`climber.models.layers.fold_of`): the rates a training
    candidate of fold k may read, since no label of its user entered them."""
    import polars as pl

    from climber.eval.floor import item_train_rates
    from climber.models.layers import fold_of

    return [item_train_rates(events.filter(fold_of(pl.col("user"), folds) != k)) for k in range(folds)]


def fold_rate_buckets(events, num_items: int, buckets: int, min_events: int, folds: int) -> torch.Tensor:
    """(folds, num_items + 1) int64: ``train.item_rate_folds``, out-of-fold rate buckets. Row k is
    :func:`item_rate_buckets` of fold k's :func:`fold_train_rates`, its quantiles included, so a training
    candidate of a user in fold k is given a rate that no label of that user entered: no leak, whatever
    ``min_events``. Val, test and serving use the whole train split's table."""
    return torch.stack([item_rate_buckets(rates, num_items, buckets, min_events)
                        for rates in fold_train_rates(events, folds)])


PRIOR_FOLDS = 5  # out-of-fold tables of the popularity prior in training (as train.item_rate_folds=5)


def per_item_table(per_item, num_items: int, values) -> torch.Tensor:
    """(num_items + 1,) float32: ``values`` at the rows of ``per_item``'s items (``item_train_rates``' first
    part, in its order), 0 at every other row (items without a train event, padding)."""
    import numpy as np

    table = np.zeros(num_items + 1)
    table[per_item["item"].to_numpy()] = values
    return torch.from_numpy(table.astype("float32"))


def item_prior_logits(rates, num_items: int) -> torch.Tensor:
    """(num_items + 1,) float32: :class:`climber.models.layers.PopularityPrior`'s table, each item's
    smoothed train positive rate (``rates``, from ``climber.eval.floor.item_train_rates``) as log-odds
    minus the global rate's; 0 for an item without a train event (it has the global rate) and for padding."""
    from climber.eval.floor import log_odds

    per_item, rate = rates
    return per_item_table(per_item, num_items, log_odds(per_item["rate"].to_numpy()) - log_odds(rate))


def item_log_counts(rates, num_items: int, scale: float = 1.0) -> torch.Tensor:
    """(num_items + 1,) float32: log1p of each item's train events (``rates``, from
    ``climber.eval.floor.item_train_rates``) times ``scale``; 0 for an item without one and for padding."""
    import numpy as np

    per_item, _ = rates
    return per_item_table(per_item, num_items, np.log1p(per_item["events"].to_numpy() * scale))


def fold_prior_logits(events, num_items: int, folds: int = PRIOR_FOLDS) -> tuple[torch.Tensor, torch.Tensor]:
    """Two (folds, num_items + 1) float32 tables, the rows a training candidate of a user in fold k
    reads: :func:`item_prior_logits` and :func:`item_log_counts` of fold k's :func:`fold_train_rates`,
    the counts scaled by folds / (folds - 1) to the whole train split's size."""
    rates = fold_train_rates(events, folds)
    return (torch.stack([item_prior_logits(r, num_items) for r in rates]),
            torch.stack([item_log_counts(r, num_items, folds / (folds - 1)) for r in rates]))


FIT_PAIRS = 1 << 20  # (positive, negative) pairs of a user's train events that fit_prior_weights samples


def fit_prior_weights(events, columns: list[torch.Tensor], pairs: int = FIT_PAIRS, seed: int = 0) -> list[float]:
    """The start of :class:`~climber.models.layers.PopularityPrior`'s weights with ``popularity_fit``: the
    weights ``theta`` of its columns (``columns``: its out-of-fold tables, each (folds, num_items + 1), the
    rows a training candidate reads) that best rank each user's positive train events (``events``, from
    :func:`train_events`) above the negative ones, a conditional logistic fit: the mean over pairs of
    -log sigmoid(theta . (x_pos - x_neg)) is minimised by Newton's method (a 1e-4 ridge keeps it finite
    if the pairs are separable). The pairs are weighted as GAUC weighs them: ``pairs`` of them sampled
    (``seed``), a user with probability in proportion to its train events, then one of its positives and
    one of its negatives at random.
    Without a user with both labels the weights keep their start, 1 and 0."""
    import polars as pl

    from climber.models.layers import fold_of

    events = events.sort("user", "label")
    users = torch.from_numpy(events["user"].to_numpy().astype("int64"))
    items = torch.from_numpy(events["item"].to_numpy().astype("int64"))
    rows = fold_of(users, len(columns[0]))
    x = torch.stack([table[rows, items] for table in columns], dim=1).double()  # (E, k)
    per_user = (events.with_row_index("at").group_by("user", maintain_order=True)
                .agg(start=pl.col("at").first(), negatives=(pl.col("label") == 0).sum(), size=pl.len())
                .filter((pl.col("negatives") > 0) & (pl.col("negatives") < pl.col("size"))))
    theta = torch.tensor([1.0] + [0.0] * (len(columns) - 1), dtype=torch.float64)
    if not per_user.height:
        return theta.tolist()
    start, negatives, size = (torch.from_numpy(per_user[c].to_numpy().astype("int64")) for c in ("start", "negatives", "size"))
    generator = torch.Generator().manual_seed(seed)
    user = torch.multinomial(size.double(), pairs, replacement=True, generator=generator)  # (P,)
    # each user's events are sorted by label: its negatives first, then its positives
    negative = start[user] + (torch.rand(pairs, generator=generator, dtype=torch.float64) * negatives[user]).long()
    positive = (start[user] + negatives[user]
                + (torch.rand(pairs, generator=generator, dtype=torch.float64) * (size - negatives)[user]).long())
    diff = x[positive] - x[negative]  # (P, k)
    ridge = 1e-4 * torch.eye(len(columns), dtype=torch.float64)
    for _ in range(50):
        p = torch.sigmoid(-(diff @ theta))  # (P,): d/dz of -log sigmoid(z) is -p
        gradient = -(p[:, None] * diff).mean(0) + ridge @ theta
        hessian = torch.einsum("p,pi,pj->ij", p * (1 - p), diff, diff) / pairs + ridge
        step = torch.linalg.solve(hessian, gradient)
        theta = theta - step
        if step.abs().max() < 1e-8:
            break
    return theta.tolist()


def train_item_rows(rates, num_items: int, min_events: int = 1) -> torch.Tensor:
    """(num_items + 1,) int64: each item's own id when it has at least ``min_events`` train events
    (``rates``, from ``climber.eval.floor.item_train_rates``), else 0 (the unknown item)."""
    import polars as pl

    seen = torch.from_numpy(rates[0].filter(pl.col("events") >= min_events)["item"].to_numpy().astype("int64"))
    rows = torch.zeros(num_items + 1, dtype=torch.long)
    rows[seen] = seen
    return rows


def item_id_scales(rates, num_items: int, shrink: float) -> torch.Tensor:
    """(num_items + 1,) float32: ``train.item_id_shrink``, each item's id vector scale n / (n + ``shrink``),
    n its train events (``rates``, from ``climber.eval.floor.item_train_rates``); 0 for an item without
    one and for padding. An item's own vector counts as much as its evidence, as its train rate does in
    the floor's smoothing."""
    per_item, _ = rates
    events = per_item["events"].to_numpy()
    return per_item_table(per_item, num_items, events / (events + shrink))


def first_features(prepared, key: str, columns: list[str], bags: tuple, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each ``key`` id's (item's or user's) feature values, from its first event in the prepared data,
    in one read: (rows, F) int64 value ids of the single-valued ``columns``, and (rows, Fb, K) int64 bags
    of the bag columns ``bags`` ((name, vocab size, longest bag K), ...), right-padded with 0. Row 0 and
    ids never seen with a value are 0 (unknown) or an empty bag."""
    import polars as pl

    bag_columns = [c for c, *_ in bags]
    values = torch.zeros(rows, len(columns), dtype=torch.long)
    bag_ids = torch.zeros(rows, len(bags), max((k for *_, k in bags), default=0), dtype=torch.long)
    if not columns and not bags:
        return values, bag_ids
    first = (pl.scan_parquet(Path(prepared) / "events.parquet").select(key, *columns, *bag_columns)
             .group_by(key).agg(pl.col(c).first() for c in (*columns, *bag_columns)).collect())
    ids = torch.from_numpy(first[key].to_numpy().astype("int64"))
    if columns:
        values[ids] = torch.from_numpy(first.select(columns).fill_null(0).to_numpy().astype("int64"))
    for f, column in enumerate(bag_columns):  # one (id, position, value) row per bag element
        flat = (first.select(key, column).explode(column).drop_nulls(column)
                .with_columns(pl.int_range(pl.len()).over(key).alias("position")))
        at = [torch.from_numpy(flat[c].to_numpy().astype("int64")) for c in (key, "position", column)]
        bag_ids[at[0], f, at[1]] = at[2]
    return values, bag_ids


@dataclass(frozen=True)
class SampleShape:
    """The shape of one row: the length of each subsequence and the number of candidates."""

    lengths: tuple[int, ...]
    candidates: int


def flops_per_candidate(model, candidates: int) -> float:
    """Analytic forward FLOPs per candidate of ``model`` on a row with every subsequence at its full
    length and ``candidates`` candidates."""
    return model.flops(SampleShape(tuple(s.length for s in model.strategies()), candidates)) / candidates


def parameter_counts(model: torch.nn.Module) -> dict:
    """{"total", "embeddings" (in embedding tables: they grow with the vocabularies), "dense"}."""
    total = sum(p.numel() for p in model.parameters())
    emb = sum(p.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters(recurse=False))
    return {"total": total, "embeddings": emb, "dense": total - emb}


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
        raise ConfigError(f"unknown model {name!r}; known: {', '.join(REGISTRY)}")
    module, cfg_name, model_name = REGISTRY[name]
    mod = importlib.import_module(module)
    return getattr(mod, cfg_name), getattr(mod, model_name)


def build_model(name: str, cfg: Any, info: DataInfo, prepared=None, item_vocab: str = "all",
                rate_min_events: int = 1, rate_folds: int = 0, item_min_events: int = 1,
                item_id_shrink: float = 0.0) -> torch.nn.Module:
    """The model ``name`` with config ``cfg`` (dataclass or dict). With ``prepared`` (a prepared data
    dir) the item feature tables are filled from the data (``rate_min_events``: :func:`item_rate_buckets`;
    ``rate_folds`` > 0: the out-of-fold tables of training, :func:`fold_rate_buckets`), so are a
    :class:`~climber.models.layers.PopularityPrior`'s tables (:func:`item_prior_logits`,
    :func:`item_log_counts`, :func:`fold_prior_logits`), and with ``item_vocab="train"`` items with fewer
    than ``item_min_events`` train events (1: without one) embed as the unknown item
    (``ItemEmbedding.id_row``), and with ``item_id_shrink`` > 0 an item's id vector is scaled by its
    evidence (:func:`item_id_scales`, ``ItemEmbedding.id_scale``); without, the tables keep their
    defaults until a checkpoint is loaded."""
    from climber.eval.floor import item_train_rates
    from climber.models.layers import ItemEmbedding, PopularityPrior, UserFeatures

    cfg_cls, model_cls = _lookup(name)
    if isinstance(cfg, dict):
        cfg = cfg_cls.from_dict(cfg)
    model = model_cls(cfg, info)
    if prepared is None:
        return model
    priors = [m for m in model.modules() if isinstance(m, PopularityPrior)]
    events = train_events(prepared) if info.rate_buckets or item_vocab == "train" or priors or item_id_shrink else None
    rates = item_train_rates(events) if events is not None else None
    fold_logits, fold_log_counts = fold_prior_logits(events, info.num_items) if priors else (None, None)
    for prior in priors:
        prior.logits.copy_(item_prior_logits(rates, info.num_items))
        prior.fold_logits = fold_logits.to(prior.logits.device)
        if hasattr(prior, "count_weight"):
            prior.log_counts.copy_(item_log_counts(rates, info.num_items))
            prior.fold_log_counts = fold_log_counts.to(prior.logits.device)
        if prior.fit:
            weights = [prior.weight] + ([prior.count_weight] if hasattr(prior, "count_weight") else [])
            start = fit_prior_weights(events, [fold_logits, fold_log_counts][:len(weights)])
            with torch.no_grad():
                for weight, value in zip(weights, start):
                    weight.fill_(value)
    columns = [c for c, _ in info.item_features if c != RATE_FEATURE]  # the rate feature, last when present
    values, bags = first_features(prepared, "item", columns, info.item_bags, info.num_items + 1)
    tables = {"feature_ids": torch.cat([values, torch.zeros(info.num_items + 1, int(bool(info.rate_buckets)),
                                                            dtype=torch.long)], dim=1), "bag_ids": bags}
    if info.rate_buckets:  # DataInfo.from_prepared puts the rate feature last
        tables["feature_ids"][:, -1] = item_rate_buckets(rates, info.num_items, info.rate_buckets, rate_min_events)
        if rate_folds:
            tables["fold_rates"] = fold_rate_buckets(events, info.num_items, info.rate_buckets, rate_min_events, rate_folds)
    if item_vocab == "train":
        tables["id_row"] = train_item_rows(rates, info.num_items, item_min_events)
    if item_id_shrink:
        tables["id_scale"] = item_id_scales(rates, info.num_items, item_id_shrink)
    user_tables = dict(zip(("feature_ids", "bag_ids"), first_features(
        prepared, "user", [c for c, _ in info.user_features], info.user_bags, info.num_users + 1)))
    for module in model.modules():
        for kind, filled in ((ItemEmbedding, tables), (UserFeatures, user_tables)):
            if isinstance(module, kind):
                for buffer, table in filled.items():
                    if buffer == "fold_rates":  # not saved: its shape is the data's
                        module.fold_rates = table.to(module.fold_rates.device)
                    else:
                        getattr(module, buffer).copy_(table)
    return model
