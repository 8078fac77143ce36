"""climber.data.lifelong (generator v4): determinism, designed ranges, no leakage, side features, the
Bayes ceiling against a brute-force replay, the CLI."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from climber.data import lifelong as L
from climber.data.schema import DataError

SIZE = {"users": 20, "median_events": 60, "items": 300, "artists": 60, "genres": 8}


def _quiet(*_):
    pass


def _chunk(users=30, median=80, seed=0, genres=8):
    cat = L.catalogue(300, 60, genres, seed)
    n = L.history_lengths(np.random.default_rng([seed, 1]), users, median)
    return cat, n, L._chunk(np.random.default_rng([seed, 2]), np.random.default_rng([seed, 3]), cat, n, genres)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("lifelong") / "d"
    manifest = L.synthesize_lifelong(out, **SIZE, seed=5, log=_quiet)
    return manifest, pl.read_parquet(out / "events.parquet")


def test_determinism(data, tmp_path):
    manifest, _ = data
    same = L.synthesize_lifelong(tmp_path / "a", **SIZE, seed=5, log=_quiet)
    other = L.synthesize_lifelong(tmp_path / "b", **SIZE, seed=6, log=_quiet)
    assert same["fingerprint"]["sha256"] == manifest["fingerprint"]["sha256"]
    assert same["bayes"] == manifest["bayes"]
    assert other["fingerprint"]["sha256"] != manifest["fingerprint"]["sha256"]
    assert manifest["generator"]["version"] == 4 and manifest["label_rule"] == "action in full_play,like,share"
    for split in ("val", "test"):
        assert 0.5 < manifest["bayes"][split]["auc"] <= manifest["oracle"][split]["auc"] + 0.02


def test_history_lengths_in_the_designed_range():
    n = L.history_lengths(np.random.default_rng(0), 20_000, 1000)
    assert n.min() >= 200 and n.max() <= 6000
    assert 950 < np.median(n) < 1050
    # lognormal sigma 0.8: the quartiles sit at exp(+-0.674 * 0.8) of the median
    q1, q3 = np.quantile(n, [0.25, 0.75])
    assert q3 / q1 == pytest.approx(np.exp(2 * 0.674 * 0.8), rel=0.05)


def test_outcome_rates_in_the_designed_range():
    _, n, c = _chunk(users=60, median=150)
    keep = np.arange(c["item"].shape[1])[None] < n[:, None]
    rate = np.bincount(c["outcome"][keep], minlength=5) / keep.sum()
    like, share = rate[L.OUTCOMES.index("like")], rate[L.OUTCOMES.index("share")]
    assert 0.025 < like < 0.1 and 0.003 < share < 0.03, rate
    label = c["outcome"][keep] >= L.LABEL_FROM
    p = c["p_true"][keep]
    assert abs(label.mean() - p.mean()) < 4 * np.sqrt(np.sum(p * (1 - p))) / len(p)  # calibrated


def test_p_true_is_the_utility_of_the_past_only():
    """The utilities of a history recomputed from its outcomes give the generator's p_true, and changing
    the outcome of event t changes no utility up to t (only later ones)."""
    cat, n, c = _chunk(users=10, median=60)
    t0 = c["ts"][:, 0].astype(float) - 1
    args = (c["ts"].astype(float), c["start"], c["scenario"], c["item"])
    u = L.utilities(*args, c["outcome"], t0, cat, 8, 60)
    keep = np.arange(u.shape[1])[None] < n[:, None]
    np.testing.assert_allclose(L.p_label(u)[keep], c["p_true"][keep], atol=1e-12)
    t = int(n.min()) // 2
    changed = c["outcome"].copy()
    changed[:, t] = np.where(changed[:, t] == 4, 0, 4)  # share <-> something else
    v = L.utilities(*args, changed, t0, cat, 8, 60)
    np.testing.assert_array_equal(u[:, : t + 1], v[:, : t + 1])
    assert np.abs(u[:, t + 1:] - v[:, t + 1:])[keep[:, t + 1:]].max() > 1e-3


def test_side_features_constant_per_item(data):
    _, events = data
    per_item = events.group_by("item_raw").agg(pl.col("item_genre").n_unique().alias("g"),
                                               pl.col("item_artist").n_unique().alias("a"))
    assert per_item["g"].max() == 1 and per_item["a"].max() == 1
    assert events.group_by("item_artist").agg(pl.col("item_genre").n_unique())["item_genre"].max() == 1


def _brute_p(cat, ts, start, scenario, item, outcome, t):
    """p_true of event t from the plain definitions of docs/benchmarks/lifelong.md over events < t."""
    age = ts[t] - ts[:t]
    e = 2.0 ** (-age / L.HALF_LIFE)
    w = L.OUTCOME_WEIGHT[outcome[:t]]

    def average(same):
        return np.sum(w[same] * e[same]) / (np.sum(e[same]) + 1.0)

    lt = average(cat.genre[item[:t]] == cat.genre[item[t]])
    art = average(cat.artist[item[:t]] == cat.artist[item[t]])
    opened = np.flatnonzero(start[: t + 1]).max()  # the session of event t began here
    recent = w[opened:t][-5:]
    sess = recent.mean() if len(recent) else 0.0
    b = L.BETA[scenario[t]]
    util = L.AFFINITY_SCALE * (b[0] * lt + b[1] * art + b[2] * sess) + cat.quality[item[t]]
    return 1 / (1 + np.exp(L.THRESHOLDS[1] - util))


def test_p_bayes_matches_brute_force_replays():
    """For a few users, replay the test split many times: its earlier events get scenario and track from
    the generator's exposure sampler (outcome-free) at their context, outcomes from a plain ordered
    logit; average p_true of each candidate from the plain definitions; compare with p_bayes."""
    cat, n, c = _chunk(users=4, median=60, seed=1)
    rng, replays, worst = np.random.default_rng(99), 300, 0.0
    ts = c["ts"].astype(float)
    for u in range(len(n)):
        f, J = int(c["first"]["test"][u]), int(c["length"]["test"][u])
        total = np.zeros(J)
        for _ in range(replays):
            sc, it, out = c["scenario"][u, : n[u]].copy(), c["item"][u, : n[u]].copy(), c["outcome"][u, : n[u]].copy()
            for j in range(J):
                t = f + j
                candidate = np.r_[sc[:t], c["scenario"][u, t]], np.r_[it[:t], c["item"][u, t]]
                total[j] += _brute_p(cat, ts[u], c["start"][u], *candidate, out, t)
                r = t - int(c["first"]["val"][u])  # the context is recorded from the val split on
                ctx = c["context"]
                s, i = L._draw_items(rng, cat, (1,), c["scenario_cdf"][u: u + 1], ctx["interest"][u, r][None],
                                     ctx["favourite"][u, r][None], ctx["mood"][u, r][None], ctx["seed"][u, r][None])
                sc[t], it[t] = s[0], i[0]
                p = _brute_p(cat, ts[u], c["start"][u], sc[: t + 1], it[: t + 1], out, t)
                z = np.log(p / (1 - p)) + L.THRESHOLDS[1] + rng.logistic()  # the utility plus the noise
                out[t] = int((z > L.THRESHOLDS).sum())
        got = c["p_bayes"][u, f: f + J]
        worst = max(worst, np.abs(total / replays - got).max())
        assert got[0] == pytest.approx(c["p_true"][u, f], abs=1e-12)  # nothing hidden before the first
    assert worst < 0.05  # standard error of the two estimates together: about 0.01


def test_bad_parameters_are_one_line_errors(tmp_path):
    with pytest.raises(DataError, match="items .* must be at least artists"):
        L.synthesize_lifelong(tmp_path / "x", users=3, median_events=50, items=10, artists=20, genres=4, log=_quiet)
    with pytest.raises(DataError, match="users must be at least 1"):
        L.synthesize_lifelong(tmp_path / "x", users=0, log=_quiet)


def test_cli_writes_a_prepared_dir(tmp_path, capsys):
    from climber.cli import main

    out = tmp_path / "d"
    main(["data", "synth", "--kind", "lifelong", "--out", str(out), "--users", "20", "--median-events", "50",
          "--items", "200", "--artists", "40", "--genres", "6", "--seed", "3"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["users"] == 20 and set(manifest["side_columns"]) == {"item_genre", "item_artist"}
    assert set(manifest["bayes"]) == {"val", "test"} and manifest["generator"]["genres"] == 6
    assert "Bayes-optimal" in capsys.readouterr().out


def test_table2_configs_read_the_designed_history(tmp_path):
    """configs/lifelong: Climber's blocks sum to 2,000 events and each finds its events in the generated
    data (the scenario names match the generator's); every other model reads the 2,000 most recent."""
    from pathlib import Path

    from climber.config import resolve
    from climber.data.loader import SampleLoader
    from climber.models import DataInfo, build_model

    L.synthesize_lifelong(tmp_path / "d", **SIZE, seed=5, log=_quiet)
    info = DataInfo.from_prepared(tmp_path / "d", 0)
    configs = sorted(p for p in (Path(__file__).parents[2] / "configs" / "lifelong").glob("*.yaml")
                     if p.name != "scaling.yaml")  # the sweep's grid, not a model
    assert len(configs) == 9  # 8 models and the one-block (-MSE) Climber
    for path in configs:
        cfg = resolve(None, path, [])
        strategies = build_model(cfg.model, cfg.model_config, info).strategies()
        assert sum(s.length for s in strategies) == 2000, path.name
        assert (cfg.train.candidates_per_row, cfg.train.epochs, cfg.train.batch_size) == (256, 6, 4), path.name
        if path.name == "climber.yaml":
            batch = next(iter(SampleLoader(tmp_path / "d", "test", strategies, batch_size=SIZE["users"],
                                           candidates_per_row=8)))
            for s, seq in zip(strategies, batch.seqs):
                assert seq.mask.any(), s.name  # every block gets events


def test_the_scaling_grid_sweeps_the_tuned_configs_over_two_decades_and_more():
    """configs/lifelong/scaling.yaml: the three families at their tuned configs, s the history read in
    all (Climber's blocks keep their shares of 2,000), at least 2 decades of forward FLOPs each."""
    import itertools
    import math
    from pathlib import Path

    from climber.compare import Entry
    from climber.models import DataInfo, build_model, flops_per_candidate
    from climber.scaling.sweep import load_grid_preset, parse_grids, point_overrides

    root = Path(__file__).parents[2]
    preset = load_grid_preset(str(root / "configs" / "lifelong" / "scaling.yaml"))
    assert preset["blocks"] == "total" and preset["seeds"] >= 2 and "train.epochs=1" in preset["set"]
    grids = parse_grids(preset["grid"])
    points = [dict(zip("sld", v)) for v in dict.fromkeys(
        v for g in grids for v in itertools.product(g["s"], g["l"], g["d"]))]
    assert max(p["s"] for p in points) == 2048 and max(p["l"] for p in points) == 8
    info = DataInfo(num_users=10, num_items=100, actions=("skip", "play", "full", "like", "share"),
                    scenarios=("search", "radio", "daily_mix"))
    for model in preset["models"]:
        spec = str(root / model)
        flops = []
        for p in points:
            cfg = Entry.parse(spec).config(point_overrides(spec, p, preset["blocks"]))
            net = build_model(cfg.model, cfg.model_config, info)
            if cfg.model == "climber":
                assert abs(sum(s.length for s in net.strategies()) - p["s"]) <= len(net.strategies()), p
            flops.append(flops_per_candidate(net, cfg.train.candidates_per_row))
        assert math.log10(max(flops) / min(flops)) >= 2, model
