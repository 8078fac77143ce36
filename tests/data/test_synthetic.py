"""climber.data.synthetic: determinism, Bayes figures, calibration, the logit formula, split, cleanup."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from climber.data import synthetic
from climber.data.schema import DataError
from climber.data.split import split_sizes

SIZE = {"users": 300, "events_per_user": 60, "items": 400, "topics": 12}


def _quiet(*_):
    pass


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "d"
    manifest = synthetic.synthesize(out, **SIZE, seed=7, log=_quiet)
    events = pl.read_parquet(out / "events.parquet")
    return manifest, events


def test_determinism(data, tmp_path):
    manifest, _ = data
    same = synthetic.synthesize(tmp_path / "a", **SIZE, seed=7, log=_quiet)
    other = synthetic.synthesize(tmp_path / "b", **SIZE, seed=8, log=_quiet)
    assert same["fingerprint"]["sha256"] == manifest["fingerprint"]["sha256"]
    assert other["fingerprint"]["sha256"] != manifest["fingerprint"]["sha256"]
    assert same["bayes"] == manifest["bayes"]


@pytest.mark.parametrize("key,column", [("bayes", "p_bayes"), ("oracle", "p_true")])
def test_bayes_figures_match_sklearn(data, key, column):
    manifest, events = data
    for split in ("val", "test"):
        part = events.filter(pl.col("split") == split)
        y, p = part["label"].to_numpy(), part[column].to_numpy()
        bayes = manifest[key][split]
        assert bayes["candidates"] == len(y)
        assert bayes["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-9)
        assert bayes["logloss"] == pytest.approx(log_loss(y, np.clip(p, 1e-7, 1 - 1e-7)), abs=1e-9)
        per_user = [(len(g), roc_auc_score(g["label"], g[column]))
                    for _, g in part.group_by("user") if g["label"].n_unique() == 2]
        w, a = np.array(per_user).T
        assert bayes["gauc"] == pytest.approx(np.sum(w * a) / np.sum(w), abs=1e-9)
    assert 0.7 < manifest["bayes"]["test"]["auc"] < 0.95  # informative but not trivial
    # knowing the split's earlier labels helps: the oracle is above the attainable optimum
    assert manifest["oracle"]["test"]["auc"] > manifest["bayes"]["test"]["auc"]
    assert manifest["generator"]["seed"] == 7 and manifest["generator"]["version"] == synthetic.GENERATOR_VERSION


def test_labels_are_calibrated(data):
    _, events = data
    y, p = events["label"].to_numpy().astype(float), events["p_true"].to_numpy()
    std = np.sqrt(np.sum(p * (1 - p))) / len(p)
    assert abs(y.mean() - p.mean()) < 4 * std


def test_p_true_is_the_logit_formula_of_the_observable_past(data):
    """Recompute r (lifetime topic positive rate) and m (recent positive in topic) event by event."""
    _, events = data
    topic, quality = synthetic.item_params(SIZE["items"], SIZE["topics"], seed=7)
    beta = dict(zip(synthetic.SCENARIOS, synthetic.BETA))
    ev = events.sort("user", "ts")
    expected = np.empty(ev.height)
    seen, pos, recent, last_user = {}, {}, [], None
    for j, (user, item, scen, label) in enumerate(ev.select("user", "item_raw", "scenario_raw", "label").iter_rows()):
        if user != last_user:
            seen, pos, recent, last_user = {}, {}, [], user
        i = int(item[1:])
        k = int(topic[i])
        r = (pos.get(k, 0) + 1) / (seen.get(k, 0) + 2)
        m = float(any(kk == k and yy == 1 for kk, yy in recent[-3:]))
        logit = beta[scen] * (4 * (r - 0.5) + 1.5 * m - 0.5) + quality[i]
        expected[j] = 1 / (1 + np.exp(-logit))
        seen[k] = seen.get(k, 0) + 1
        pos[k] = pos.get(k, 0) + label
        recent.append((k, label))
    np.testing.assert_allclose(ev["p_true"].to_numpy(), expected, rtol=0, atol=1e-6)


def test_p_bayes_is_p_true_where_nothing_is_hidden(data):
    """On train events and on the first event of each split no label of the split is hidden yet."""
    _, events = data
    ev = events.sort("user", "ts").with_columns(pl.int_range(pl.len()).over("user", "split").alias("j"))
    known = ev.filter((pl.col("split") == "train") | (pl.col("j") == 0))
    np.testing.assert_allclose(known["p_bayes"].to_numpy(), known["p_true"].to_numpy(), rtol=0, atol=1e-12)
    hidden = ev.filter((pl.col("split") != "train") & (pl.col("j") > 0))
    # where an earlier split event shares the topic (or leaves the last-3 window) p_true moves
    assert np.mean(np.abs(hidden["p_bayes"].to_numpy() - hidden["p_true"].to_numpy()) > 1e-3) > 0.2


def test_p_bayes_matches_an_independent_simulation(data):
    """Re-estimate E[p_true | events before the split] for a few users with a plain per-user simulation
    (its own random stream, more paths) and compare within Monte Carlo error."""
    _, events = data
    topic, quality = synthetic.item_params(SIZE["items"], SIZE["topics"], seed=7)
    beta = dict(zip(synthetic.SCENARIOS, synthetic.BETA))
    rng = np.random.default_rng(123)
    ev = events.sort("user", "ts")
    users = ev.filter(pl.col("split") == "test")["user"].unique().sort()[:6]
    sims, worst = 2000, 0.0
    for user in users:
        rows = ev.filter(pl.col("user") == user).select("item_raw", "scenario_raw", "label", "split", "p_bayes").rows()
        past = [(int(topic[int(i[1:])]), y) for i, _, y, split, _ in rows if split != "test"]
        split_events = [(int(i[1:]), sc, pb) for i, sc, _, split, pb in rows if split == "test"]
        total = np.zeros(len(split_events))
        for _ in range(sims):
            hist = list(past)
            for j, (i, sc, _) in enumerate(split_events):
                k = int(topic[i])
                seen = sum(1 for kk, _ in hist if kk == k)
                pos = sum(y for kk, y in hist if kk == k)
                m = float(any(kk == k and y == 1 for kk, y in hist[-3:]))
                p = 1 / (1 + np.exp(-(beta[sc] * (4 * ((pos + 1) / (seen + 2) - 0.5) + 1.5 * m - 0.5) + quality[i])))
                total[j] += p
                hist.append((k, int(rng.random() < p)))
        worst = max(worst, np.max(np.abs(total / sims - np.array([pb for *_, pb in split_events]))))
    assert worst < 0.04  # standard error of the two estimates together is about 0.01


def test_scenarios_differ_in_temperature(data):
    _, events = data
    logit = events.select(pl.col("scenario_raw"), (pl.col("p_true") / (1 - pl.col("p_true"))).log().alias("z"))
    std = {s: logit.filter(pl.col("scenario_raw") == s)["z"].std() for s in synthetic.SCENARIOS}
    assert std["search"] > std["home"] > std["radio"]


def test_order_split_and_actions(data):
    manifest, events = data
    ev = events.sort("user", "ts")
    same_user = ev["user"].to_numpy()[1:] == ev["user"].to_numpy()[:-1]
    assert np.all(np.diff(ev["ts"].to_numpy())[same_user] > 0)
    per_user = ev.group_by("user").agg(
        pl.len().alias("n"), (pl.col("split") == "val").sum().alias("val"), (pl.col("split") == "test").sum().alias("test")
    )
    n_val, n_test = split_sizes(per_user["n"].to_numpy())
    np.testing.assert_array_equal(per_user["val"].to_numpy(), n_val)
    np.testing.assert_array_equal(per_user["test"].to_numpy(), n_test)
    lo, hi = SIZE["events_per_user"] // 2, 3 * SIZE["events_per_user"] // 2
    assert per_user["n"].min() >= lo and per_user["n"].max() <= hi
    assert manifest["users"] == SIZE["users"] and manifest["rows"] == ev.height
    assert ((ev["action_raw"] == "skip") == (ev["label"] == 0)).all()
    assert set(manifest["scenarios"]) == set(synthetic.SCENARIOS)


def test_existing_out_needs_force(tmp_path):
    out = tmp_path / "d"
    out.mkdir()
    with pytest.raises(DataError, match="already exists"):
        synthetic.synthesize(out, users=5, events_per_user=20, log=_quiet)
    assert list(tmp_path.iterdir()) == [out]


@pytest.mark.parametrize("where", ["generate", "prepare"])
def test_interrupted_run_leaves_nothing(tmp_path, monkeypatch, where):
    def boom(*args, **kwargs):
        raise RuntimeError("interrupted")

    if where == "generate":  # fail on the second chunk, after the first was written
        monkeypatch.setattr(synthetic, "CHUNK_USERS", 20)
        real, calls = synthetic._chunk, []

        def chunk(*args):
            calls.append(1)
            return boom() if len(calls) == 2 else real(*args)

        monkeypatch.setattr(synthetic, "_chunk", chunk)
    else:  # fail once events.parquet and the vocab are in prepare's temp dir
        monkeypatch.setattr(synthetic, "_bayes", boom)
    with pytest.raises(RuntimeError, match="interrupted"):
        synthetic.synthesize(tmp_path / "d", users=50, events_per_user=20, log=_quiet)
    assert list(tmp_path.iterdir()) == []
