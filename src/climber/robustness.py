"""The robustness suite of issue 21 (design: docs/results/robustness.md): five data sets built from
sources on this machine, the no-training floor and ``climber compare`` on each, one table.

    climber robustness --out runs/robust --models climber,dlrm --seeds 3
    climber robustness --out runs/robust --models climber,dlrm --seeds 3 --diagnose   # no training

Members: ``ml100k-side`` (MovieLens-100k with its genre / decade side features), ``ml100k-ids`` (ids
only), ``ml100k-sparse`` (ids only, a random 70% of the users, every (user, item) pair re-mapped to one of
5 aliases of the item drawn at random: :func:`item_sparse`), ``taobao`` (the UserBehavior slice) and
``synth-sparse`` (a synthetic log of 20,000 items and 50 events per user). Prepared dirs and runs are
kept under OUT and skipped when present, so an interrupted suite resumes.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import polars as pl

from climber.compare import Entry, compare
from climber.config import ConfigError
from climber.data.schema import DataError, RawSource, feature_kind

MEMBERS = ("ml100k-side", "ml100k-ids", "ml100k-sparse", "taobao", "synth-sparse")
SPARSE = {"keep_users": 0.7, "aliases": 5, "seed": 0}
SYNTH_SPARSE = {"users": 2000, "events_per_user": 50, "items": 20000, "topics": 20, "seed": 0}


def ids_only(source: RawSource) -> RawSource:
    """``source`` without its features (the ``item_*``, ``user_*``, ``ctx_*`` and ``num_*`` columns)."""
    keep = [c for c in source.frame.collect_schema().names() if feature_kind(c) is None]
    return dataclasses.replace(source, name=f"{source.name} (ids only)", frame=source.frame.select(keep),
                               multi_columns=())


def item_features_only(source: RawSource) -> RawSource:
    """``source`` as the suite fixed ``ml100k-side`` (before issue 19): its item side features, each one
    value (MovieLens-100k's genre set as one value, not a bag), no user features."""
    keep = [c for c in source.frame.collect_schema().names() if feature_kind(c) in (None, "item")]
    return dataclasses.replace(source, frame=source.frame.select(keep), multi_columns=())


def item_sparse(source: RawSource, keep_users: float, aliases: int, seed: int) -> RawSource:
    """A random ``keep_users`` share of the users (sorted by raw id, then drawn), each (user, item) pair's
    item replaced by ``item#k``, k drawn uniformly from 0 .. aliases - 1 once per pair: as many events per
    kept user, the same sequences of tastes, ``aliases`` times sparser items."""
    frame = ids_only(source).frame.collect()
    rng = np.random.default_rng(seed)
    users = frame["user"].unique().sort()
    kept = users.filter(pl.Series(rng.random(len(users)) < keep_users))
    frame = frame.filter(pl.col("user").is_in(kept.implode()))
    pairs = frame.select("user", "item").unique().sort("user", "item")
    pairs = pairs.with_columns(pl.Series("alias", rng.integers(0, aliases, len(pairs))).cast(pl.Utf8))
    frame = (frame.join(pairs, on=["user", "item"], how="left")
             .with_columns((pl.col("item") + "#" + pl.col("alias")).alias("item")).drop("alias"))
    note = f"item-sparse: {keep_users:.0%} of users (seed {seed}), items split into {aliases} aliases per user pair"
    return dataclasses.replace(source, name=f"{source.name} (item-sparse)", frame=frame.lazy(),
                               notes=[*source.notes, note])


def build_member(name: str, out: Path, ml100k: Path, taobao: Path, log=print) -> Path:
    """The prepared dir of suite member ``name`` under ``out`` (built once)."""
    from climber.data.datasets import load_dataset
    from climber.data.prepare import prepare
    from climber.data.synthetic import synthesize

    if name not in MEMBERS:
        raise ConfigError(f"robustness: member {name!r} not one of {', '.join(MEMBERS)}")
    data = Path(out) / "data" / name
    if (data / "manifest.json").exists():
        return data
    log(f"[{name}] preparing {data}")
    if name == "synth-sparse":
        synthesize(data, **SYNTH_SPARSE, force=True, log=log)
        return data
    if name == "taobao":
        source = load_dataset("taobao-userbehavior", taobao)
    else:
        source = item_features_only(load_dataset("movielens-100k", ml100k))
        if name == "ml100k-ids":
            source = ids_only(source)
        elif name == "ml100k-sparse":
            source = item_sparse(source, **SPARSE)
    prepare(source, data, force=True, log=log)
    return data


def run_suite(out: Path, models: list[str], seeds: int, members=MEMBERS, ml100k: Path = Path("../shared/data/ml-100k"),
              taobao: Path = Path("../shared/data/taobao-userbehavior-sample"), extra: list[str] | None = None,
              command: str = "climber robustness", log=print) -> list[dict]:
    """Every member: its floor and ``compare`` of ``models`` over ``seeds``; writes OUT/robustness.{md,json}."""
    from climber.eval.floor import item_rate_floor

    out = Path(out)
    entries = [Entry.parse(m) for m in models]
    rows = []
    for name in members:
        try:
            data = build_member(name, out, ml100k, taobao, log)
        except DataError as e:
            raise DataError(f"robustness member {name}: {e}") from None
        floor = item_rate_floor(data)
        rows.append({"member": name, "model": "floor (item train positive rate)", "seeds": 0, **floor["metrics"],
                     "unseen_item_fraction": floor["unseen_item_fraction"], "repeat_fraction": floor["repeat_fraction"]})
        base = {e.label: e.model for e in entries}
        for r in compare(data, entries, seeds, out / "runs" / name, list(extra or []), command, log=log):
            rows.append({"member": name, "base": base[r["model"]], **r})
    ranks = rule_ranks(rows)
    (out / "robustness.json").write_text(json.dumps({"command": command, "rows": rows, "ranks": ranks}, indent=2) + "\n")
    (out / "robustness.md").write_text(markdown(rows) + "\n" + ranks_markdown(ranks))
    return rows


def rule_ranks(rows: list[dict]) -> list[dict]:
    """The rule of docs/results/robustness.md: within each member, the variants of one base model ranked
    by mean val GAUC (1 = best; ties share the better rank), then per variant its mean rank over the
    members and its mean val AUC rank (the tie-break). Sorted best first within each base model; test
    figures play no part."""
    def ranked(values: dict) -> dict:
        return {k: 1 + sum(other > v for other in values.values()) for k, v in values.items()}

    per = {}  # (base, label) -> {"gauc": [ranks], "auc": [ranks]}
    for base in dict.fromkeys(r["base"] for r in rows if "base" in r):
        for member in dict.fromkeys(r["member"] for r in rows):
            mine = {r["model"]: r for r in rows if r.get("base") == base and r["member"] == member}
            for metric in ("gauc", "auc"):
                for label, k in ranked({m: r[f"val_{metric}"] for m, r in mine.items()}).items():
                    per.setdefault((base, label), {"gauc": [], "auc": []})[metric].append(k)
    out = [{"base": base, "model": label, "members": len(r["gauc"]), "mean_val_gauc_rank": float(np.mean(r["gauc"])),
            "mean_val_auc_rank": float(np.mean(r["auc"]))} for (base, label), r in per.items()]
    return sorted(out, key=lambda r: (r["base"], r["mean_val_gauc_rank"], r["mean_val_auc_rank"]))


def ranks_markdown(ranks: list[dict]) -> str:
    lines = ["| base model | variant | members | mean rank of val GAUC | mean rank of val AUC (tie-break) |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['base']} | {r['model']} | {r['members']} | {r['mean_val_gauc_rank']:.2f} | "
              f"{r['mean_val_auc_rank']:.2f} |" for r in ranks]
    return "\n".join(lines) + "\n"


def markdown(rows: list[dict]) -> str:
    lines = ["| member | model | seeds | test AUC | test GAUC | test LogLoss | val AUC | val GAUC |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def cell(m):
            return f"{r[m]:.4f}" + (f" ± {r[f'{m}_std']:.4f}" if f"{m}_std" in r else "")
        val = [f"{r[k]:.4f}" if k in r else "-" for k in ("val_auc", "val_gauc")]
        lines.append(f"| {r['member']} | {r['model']} | {r['seeds']} | {cell('auc')} | {cell('gauc')} | "
                     f"{cell('logloss')} | {' | '.join(val)} |")
    return "\n".join(lines) + "\n"


def replay_selection(epochs: list[dict], select: str, patience: int, warmup: int) -> dict:
    """The epoch record of ``epochs`` (a run's epochs.jsonl) that ``train.select=select`` would have picked
    along the same logged trajectory, by the training loop's rule: stop after ``patience`` epochs without
    a better figure, an epoch that ends within the first ``warmup`` steps not counting."""
    from climber.train.loop import epochs_without_gain, selection_score

    best, bad = None, 0
    for record in epochs:
        if bad >= patience:
            break
        score = selection_score(record["val"], select)
        improved = best is None or score > best[0]
        if improved:
            best = (score, record)
        bad = epochs_without_gain(improved, record["step"], warmup, bad)
    if best is None:
        raise ConfigError("replay_selection: no epochs")
    return best[1]


def mean_or_none(values: np.ndarray) -> float | None:
    return float(values.mean()) if values.size else None


def spread_cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


ITEM_CLASSES = ("unseen", "rare", "frequent")  # an item's train events: 0, 1 to 19, 20 or more
PAIR_CLASSES = [(a, b) for i, a in enumerate(ITEM_CLASSES) for b in ITEM_CLASSES[i:]]


def item_class(train_events: np.ndarray) -> np.ndarray:
    """Index into ``ITEM_CLASSES`` of each candidate's item by its train events."""
    return np.where(train_events == 0, 0, np.where(train_events < 20, 1, 2))


def pair_classes(users, clicks, logits, classes) -> dict[str, tuple[float, float]]:
    """GAUC taken apart by the item classes of each (positive, negative) pair of a user's candidates
    (``classes``: :func:`item_class` of each candidate): {"rare-frequent": (accuracy, share), ...}, the
    pairs weighted as GAUC weighs them (user u's weight, its candidate count, spread evenly over its
    pairs; a tie counts one half), so that the sum over pair classes of share x accuracy is the GAUC."""
    users, clicks, logits, classes = map(np.asarray, (users, clicks, logits, classes))
    correct, weight = np.zeros((3, 3)), np.zeros((3, 3))
    order = np.argsort(users, kind="stable")
    bounds = np.flatnonzero(np.diff(users[order])) + 1
    for rows in np.split(order, bounds):
        pos, neg = rows[clicks[rows] == 1], rows[clicks[rows] == 0]
        if not len(pos) or not len(neg):
            continue
        diff = logits[pos][:, None] - logits[neg][None, :]  # (P, N)
        hit = (diff > 0) + 0.5 * (diff == 0)
        a, b = np.broadcast_arrays(classes[pos][:, None], classes[neg][None, :])
        low, high = np.minimum(a, b).ravel(), np.maximum(a, b).ravel()
        w = len(rows) / hit.size
        np.add.at(correct, (low, high), w * hit.ravel())
        np.add.at(weight, (low, high), w)
    total = weight.sum()
    return {f"{a}-{b}": (float(correct[i, j] / weight[i, j]) if weight[i, j] else float("nan"),
                         float(weight[i, j] / total) if total else float("nan"))
            for a, b in PAIR_CLASSES for i, j in [(ITEM_CLASSES.index(a), ITEM_CLASSES.index(b))]}


def finished_predictions(out: Path, member: str, labels: list[str], seeds: int, flag: str) -> dict[str, list]:
    """{label: [test predictions of seed 0, 1, ...]} of finished suite runs (no training), every one of the
    same candidates in the same order; a clear error naming ``flag`` when a run is missing."""
    runs = {label: [out / "runs" / member / label / f"seed{s}" for s in range(seeds)] for label in labels}
    missing = [str(r) for rs in runs.values() for r in rs if not (r / "predictions.parquet").exists()]
    if missing:
        raise ConfigError(f"robustness {flag}: no finished run at {', '.join(missing[:3])}"
                          f"{' ...' if len(missing) > 3 else ''}; run the suite first")
    preds = {label: [pl.read_parquet(r / "predictions.parquet") for r in rs] for label, rs in runs.items()}
    first = preds[labels[0]][0].select("user", "item")
    for label, ps in preds.items():
        if any(not p.select("user", "item").equals(first) for p in ps):
            raise ConfigError(f"robustness {flag}: {member} {label}: the runs scored different candidates")
    return preds


def scored_candidates(out: Path, member: str, labels: list[str], seeds: int, flag: str) -> tuple:
    """:func:`finished_predictions`, their candidates (in the runs' order) with their item's train events and
    the floor's score (``climber.eval.floor.with_floor_logits``), and the member's events (user, item,
    label, split)."""
    from climber.eval.floor import item_train_rates, with_floor_logits

    predictions = finished_predictions(out, member, labels, seeds, flag)
    events = pl.read_parquet(out / "data" / member / "events.parquet", columns=["user", "item", "label", "split"])
    return predictions, with_floor_logits(predictions[labels[0]][0], *item_train_rates(events)), events


COUNT_WEIGHT = 0.3  # --diagnose: an item's volume added to the logit, log1p(its train events) times this


def diagnose(out: Path, models: list[str], seeds: int, members=MEMBERS) -> list[dict]:
    """Where a model's test GAUC is lost, from runs already trained by :func:`run_suite` (no training):
    per member and entry, the mean test GAUC of one seed; of its logit plus the floor's logit (is a
    popularity signal missing?); plus ``COUNT_WEIGHT`` log1p(its item's train events) (is a volume
    signal missing?); of the seeds' logits averaged (how much is variance?); where the
    variance sits: the spread between seeds of each candidate's logit, centred within its user (what
    GAUC sees), averaged over candidates whose item has 1 to 19 train events and over those with 20 or
    more; and the val GAUC at the epoch the run picked against the one val LogLoss would have picked
    (replayed from the logs); and where within-user ranking is won or lost against the floor, the
    accuracy of each class of (positive, negative) pairs by their items' train events
    (:func:`pair_classes`, the seeds' mean; the floor's in a row of its own).
    Writes OUT/diagnostics.{md,json}."""
    from climber.config import TrainConfig, load_yaml
    from climber.eval.floor import repeated_items
    from climber.eval.metrics import all_metrics, gauc
    from climber.train.optim import warmup_steps

    out, rows, labels = Path(out), [], [Entry.parse(m).label for m in models]
    for member in members:
        predictions, scored, events = scored_candidates(out, member, labels, seeds, "--diagnose")
        user, clicks, floor = scored["user"].to_numpy(), scored["label"].to_numpy(), scored["floor_logit"].to_numpy()
        train_events = scored["events"].to_numpy()
        classes = item_class(train_events)
        other = ~repeated_items(scored, events)  # leaves out the items a user meets again

        def without_repeats(scores: list) -> float:
            return float(np.mean([gauc(user[other], clicks[other], s[other]) for s in scores]))

        floor_row = {"member": member, "model": "floor", "pairs": pair_classes(user, clicks, floor, classes),
                     "repeat_fraction": float(1 - other.mean()), "test_gauc": gauc(user, clicks, floor),
                     "test_gauc_without_repeats": without_repeats([floor])}
        for label in labels:
            runs = [out / "runs" / member / label / f"seed{s}" for s in range(seeds)]
            logits = [p["logit"].to_numpy() for p in predictions[label]]
            centred = pl.DataFrame({"user": user, **{f"s{k}": lg for k, lg in enumerate(logits)}}).select(
                pl.col(f"s{k}") - pl.col(f"s{k}").mean().over("user") for k in range(seeds)).to_numpy()
            spread = centred.std(axis=1)  # (candidates,) between the seeds
            pairs = [pair_classes(user, clicks, lg, classes) for lg in logits]
            picked = {"own": [], "logloss": []}
            for r in runs:
                tc = TrainConfig(**load_yaml(r / "config.yaml")["train"])
                epochs = [json.loads(line) for line in (r / "epochs.jsonl").read_text().splitlines() if line]
                warmup = warmup_steps(tc.epochs * epochs[0]["step"], tc)
                for key, select in (("own", tc.select), ("logloss", "logloss")):
                    picked[key].append(replay_selection(epochs, select, tc.patience, warmup)["val"]["gauc"])
            rows.append({"member": member, "model": label, "seeds": seeds,
                         "test_gauc": float(np.mean([all_metrics(user, clicks, lg)["gauc"] for lg in logits])),
                         "test_gauc_plus_floor": float(np.mean([all_metrics(user, clicks, lg + floor)["gauc"]
                                                                for lg in logits])),
                         "test_gauc_plus_count": float(np.mean([all_metrics(user, clicks, lg + COUNT_WEIGHT * np.log1p(
                             train_events))["gauc"] for lg in logits])),
                         "test_gauc_seed_average": float(all_metrics(user, clicks, np.mean(logits, axis=0))["gauc"]),
                         "repeat_fraction": float(1 - other.mean()), "test_gauc_without_repeats": without_repeats(logits),
                         "seed_spread_rare_items": mean_or_none(spread[classes == ITEM_CLASSES.index("rare")]),
                         "seed_spread_frequent_items": mean_or_none(spread[classes == ITEM_CLASSES.index("frequent")]),
                         "val_gauc_own_select": float(np.mean(picked["own"])),
                         "val_gauc_logloss_select": float(np.mean(picked["logloss"])),
                         "pairs": {k: (float(np.mean([p[k][0] for p in pairs])), pairs[0][k][1]) for k in pairs[0]}})
        rows.append(floor_row)
    lines = [f"| member | model | seeds | test GAUC, one seed | + floor logit | + {COUNT_WEIGHT} log1p(train events) | seeds' logits "
             "averaged | seed spread, items of 1-19 / 20+ train events | val GAUC, own pick | val GAUC, val LogLoss pick "
             "(replayed) |", "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['member']} | {r['model']} | {r['seeds']} | {r['test_gauc']:.4f} | {r['test_gauc_plus_floor']:.4f} | "
              f"{r['test_gauc_plus_count']:.4f} | "
              f"{r['test_gauc_seed_average']:.4f} | {spread_cell(r['seed_spread_rare_items'])} / "
              f"{spread_cell(r['seed_spread_frequent_items'])} | "
              f"{r['val_gauc_own_select']:.4f} | {r['val_gauc_logloss_select']:.4f} |" for r in rows if r["model"] != "floor"]
    names = [f"{a}-{b}" for a, b in PAIR_CLASSES]
    lines += ["", "Test GAUC by pair class: the accuracy of a user's (positive, negative) candidate pairs whose items "
              "are unseen (0 train events), rare (1-19) or frequent (20+), and (in brackets) the class's share of "
              "GAUC's weight", "", "| member | model | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    lines += [f"| {r['member']} | {r['model']} | " + " | ".join(
        "-" if np.isnan(r["pairs"][k][0]) else f"{r['pairs'][k][0]:.4f} ({r['pairs'][k][1]:.2f})" for k in names) + " |"
        for r in rows]
    lines += ["", "Test GAUC without the candidates whose item their own user has in train (items met again: none on "
              "a rating log)", "", "| member | model | share of such candidates | test GAUC | without them |",
              "|---|---|---|---|---|"]
    lines += [f"| {r['member']} | {r['model']} | {r['repeat_fraction']:.1%} | {r['test_gauc']:.4f} | "
              f"{r['test_gauc_without_repeats']:.4f} |" for r in rows]
    (out / "diagnostics.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / "diagnostics.md").write_text("\n".join(lines) + "\n")
    return rows


GAP_FIGURES = (("gauc", "floor", 0.01), ("gauc", "reference", 0.0), ("auc", "reference", 0.0))  # the issue's


def needed(threshold: float) -> str:
    return f"{threshold:+.2f}" if threshold else "0"


def verdict(point: float, low: float, high: float, threshold: float) -> str:
    """Whether a gap is above ``threshold``, and whether the test set's users can tell: "met" when its
    whole band is, "missed" when none of it is, else the point's side, "within noise"."""
    if low > threshold or high <= threshold:
        return "met" if low > threshold else "missed"
    return ("met" if point > threshold else "missed") + " (within noise)"


def gaps(out: Path, models: list[str], seeds: int, members=MEMBERS, draws: int = 1000, band: float = 0.9) -> list[dict]:
    """How sure the issue's figures are, from runs already trained by :func:`run_suite` (no training):
    per member, the first entry's test GAUC against the floor's (the figure asks for 0.01 more; a gap of
    exactly 0.01 counts as short) and its test GAUC and AUC against the second entry's (more), each as the seeds' mean gap and a ``band``
    interval from ``draws`` paired bootstrap resamples of the test users (:func:`climber.eval.metrics.user_draws`;
    the same users for both sides, each seed's figure on the resample, then the seeds' mean). The band
    is the spread that comes from which users happen to be in the test split; the seeds' own spread is
    the suite table's ±. Writes OUT/gaps.{md,json}."""
    from climber.eval.metrics import auc, auc_on_draws, gauc, gauc_on_draws, user_draws

    out, rows = Path(out), []
    labels = [Entry.parse(m).label for m in models]
    if len(labels) != 2:
        raise ConfigError(f"robustness --gaps: give two entries, the model and its reference (e.g. climber,dlrm), "
                          f"got {len(labels)}")
    for member in members:
        preds, scored, _ = scored_candidates(out, member, labels, seeds, "--gaps")
        users, clicks = scored["user"].to_numpy(), scored["label"].to_numpy()
        inverse, counts = user_draws(users, draws)
        weights = counts[:, inverse]  # (draws, candidates)
        positives, candidates = np.bincount(inverse, weights=clicks), np.bincount(inverse)
        both_labels = int(np.sum((positives > 0) & (positives < candidates)))  # the users GAUC averages over
        scores = {"model": [p["logit"].to_numpy() for p in preds[labels[0]]],
                  "reference": [p["logit"].to_numpy() for p in preds[labels[1]]],
                  "floor": [scored["floor_logit"].to_numpy()]}
        figures = {  # (metric, side) -> (the seeds' mean figure, its value on each resample)
            (metric, side): (np.mean([gauc(users, clicks, s) if metric == "gauc" else auc(clicks, s) for s in ss]),
                             np.mean([gauc_on_draws(users, clicks, s, counts) if metric == "gauc"
                                      else auc_on_draws(clicks, s, weights) for s in ss], axis=0))
            for metric in ("gauc", "auc") for side, ss in scores.items()}
        for metric, side, threshold in GAP_FIGURES:
            point = figures[metric, "model"][0] - figures[metric, side][0]
            low, high = np.quantile(figures[metric, "model"][1] - figures[metric, side][1], [(1 - band) / 2, (1 + band) / 2])
            rows.append({"member": member, "model": labels[0], "against": labels[1] if side == "reference" else "floor",
                         "metric": metric, "gap": float(point), "low": float(low), "high": float(high),
                         "threshold": threshold, "verdict": verdict(point, low, high, threshold),
                         "test_users": int(counts.shape[1]), "test_users_both_labels": both_labels, "draws": draws, "band": band, "seeds": seeds})
    lines = [f"| member | test users (with both labels) | figure | gap, {seeds} seeds' mean | {band:.0%} band over test users | needed | verdict |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['member']} | {r['test_users']} ({r['test_users_both_labels']}) | {r['model']} {r['metric'].upper()} - {r['against']}'s | "
              f"{r['gap']:+.4f} | {r['low']:+.4f} .. {r['high']:+.4f} | "
              f"> {needed(r['threshold'])} | {r['verdict']} |" for r in rows]
    (out / "gaps.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / "gaps.md").write_text("\n".join(lines) + "\n")
    return rows
