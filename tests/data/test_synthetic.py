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


@pytest.mark.parametrize("key,column", [("bayes", "p_bayes"), ("bayes_split_items", "p_bayes_split_items"),
                                        ("oracle", "p_true")])
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
    # more knowledge, lower LogLoss: the split's earlier labels (oracle), their items (split_items), neither
    for split in ("val", "test"):
        loglosses = [manifest[key][split]["logloss"] for key in ("oracle", "bayes_split_items", "bayes")]
        assert loglosses == sorted(loglosses) and len(set(loglosses)) == 3
    assert manifest["generator"]["seed"] == 7 and manifest["generator"]["version"] == synthetic.GENERATOR_VERSION


def test_labels_are_calibrated(data):
    _, events = data
    y, p = events["label"].to_numpy().astype(float), events["p_true"].to_numpy()
    std = np.sqrt(np.sum(p * (1 - p))) / len(p)
    assert abs(y.mean() - p.mean()) < 4 * std


def _p_true(beta, seen, pos, recent_positive, quality):
    """The generator's formula, written out: ``seen`` / ``pos`` the user's earlier events / positives in
    the topic, ``recent_positive`` whether one of the last 3 events was a positive in it."""
    r = (pos + 1) / (seen + 2)
    return 1 / (1 + np.exp(-(beta * (4 * (r - 0.5) + 1.5 * float(recent_positive) - 0.5) + quality)))


def _p_true_after(beta, quality, history, k, i):
    """p_true of item i (topic k) after ``history`` [(topic, label), ...], oldest first."""
    seen, pos = sum(1 for kk, _ in history if kk == k), sum(y for kk, y in history if kk == k)
    return _p_true(beta, seen, pos, any(kk == k and y == 1 for kk, y in history[-3:]), quality[i])


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
        expected[j] = _p_true(beta[scen], seen.get(k, 0), pos.get(k, 0), any(kk == k and yy for kk, yy in recent[-3:]),
                              quality[i])
        seen[k] = seen.get(k, 0) + 1
        pos[k] = pos.get(k, 0) + label
        recent.append((k, label))
    np.testing.assert_allclose(ev["p_true"].to_numpy(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("column", ["p_bayes", "p_bayes_split_items"])
def test_p_bayes_is_p_true_where_nothing_is_hidden(data, column):
    """On train events and on the first event of each split no label of the split is hidden yet."""
    _, events = data
    ev = events.sort("user", "ts").with_columns(pl.int_range(pl.len()).over("user", "split").alias("j"))
    known = ev.filter((pl.col("split") == "train") | (pl.col("j") == 0))
    np.testing.assert_allclose(known[column].to_numpy(), known["p_true"].to_numpy(), rtol=0, atol=1e-12)
    hidden = ev.filter((pl.col("split") != "train") & (pl.col("j") > 0))
    # where an earlier split event shares the topic (or leaves the last-3 window) p_true moves
    assert np.mean(np.abs(hidden[column].to_numpy() - hidden["p_true"].to_numpy()) > 1e-3) > 0.2
    if column == "p_bayes":  # not knowing the earlier events' items is a different estimate from knowing them
        assert np.mean(np.abs(hidden[column].to_numpy() - hidden["p_bayes_split_items"].to_numpy()) > 1e-2) > 0.2


def test_p_bayes_split_items_matches_an_independent_simulation(data):
    """Re-estimate E[p_true | events before the split, the split's items] for a few users with a plain
    per-user simulation (its own random stream, more paths) and compare within Monte Carlo error."""
    _, events = data
    topic, quality = synthetic.item_params(SIZE["items"], SIZE["topics"], seed=7)
    beta = dict(zip(synthetic.SCENARIOS, synthetic.BETA))
    rng = np.random.default_rng(123)
    ev = events.sort("user", "ts")
    users = ev.filter(pl.col("split") == "test")["user"].unique().sort()[:6]
    sims, worst = 2000, 0.0
    for user in users:
        rows = ev.filter(pl.col("user") == user).select(
            "item_raw", "scenario_raw", "label", "split", "p_bayes_split_items").rows()
        past = [(int(topic[int(i[1:])]), y) for i, _, y, split, _ in rows if split != "test"]
        split_events = [(int(i[1:]), sc, pb) for i, sc, _, split, pb in rows if split == "test"]
        total = np.zeros(len(split_events))
        for _ in range(sims):
            hist = list(past)
            for j, (i, sc, _) in enumerate(split_events):
                p = _p_true_after(beta[sc], quality, hist, int(topic[i]), i)
                total[j] += p
                hist.append((int(topic[i]), int(rng.random() < p)))
        worst = max(worst, np.max(np.abs(total / sims - np.array([pb for *_, pb in split_events]))))
    assert worst < 0.04  # standard error of the two estimates together is about 0.01


def _small_split(seed):
    """A hand-made split of 3 users: item table (6 items, 3 topics), their mix, the state before the
    split (seen, pos, recent) and the split's J = 5 events (items, scenario ids)."""
    rng = np.random.default_rng(seed)
    topic, quality = np.array([0, 0, 1, 1, 2, 2]), np.array([0.3, -0.4, 0.0, 0.5, -0.2, 0.1])
    mix = synthetic._Mix(rng.dirichlet(np.ones(3), size=3), rng.dirichlet(np.ones(3), size=3), topic)
    seen = rng.integers(0, 6, size=(3, 3)).astype(np.int32)
    pos = (seen * rng.random((3, 3))).astype(np.int32)
    recent = np.array([[0, -1, 2], [-1, -1, -1], [1, 1, -1]])
    first = np.array([7, 3, 5])  # index of each user's first split event: sets its slot in ``recent``
    return topic, quality, mix, (seen, pos, recent), first, rng.integers(0, 6, (3, 5)), rng.integers(0, 3, (3, 5))


def test_p_bayes_matches_an_independent_simulation():
    """E[p_true | state at the split, the event, its index] with the split's earlier events unknown (drawn
    from the user's mix): the generator's estimate against a plain per-user simulation."""
    topic, quality, mix, (seen, pos, recent), first, items, scenarios = _small_split(0)
    got = synthetic._expected_p(np.random.default_rng(1), (seen, pos, recent), first, items, scenarios, topic,
                                quality, mix)
    rng, sims = np.random.default_rng(2), 3000

    def p_true(counts, window, i, s):  # counts {topic: [seen, pos]}, window: last 3 (topic if positive else -1)
        return _p_true(synthetic.BETA[s], *counts[topic[i]], topic[i] in window, quality[i])

    for u in range(3):
        for j in range(items.shape[1]):
            total = 0.0
            for _ in range(sims):
                counts = {k: [seen[u, k], pos[u, k]] for k in range(3)}
                window = [int(recent[u, (first[u] + t) % 3]) for t in range(3)]  # oldest first
                for _ in range(j):  # the split's earlier events, drawn from the user's mix
                    s = int(np.searchsorted(mix.scenario_cdf[u], rng.random(), side="right"))
                    k = int(mix.nonempty[np.searchsorted(mix.topic_cdf[u], rng.random(), side="right")])
                    i = int(rng.choice(np.flatnonzero(topic == k)))
                    y = int(rng.random() < p_true(counts, window, i, s))
                    counts[k][0] += 1
                    counts[k][1] += y
                    window = window[1:] + [k if y else -1]
                total += p_true(counts, window, items[u, j], scenarios[u, j])
            assert abs(total / sims - got[u, j]) < 0.03, (u, j)  # standard error about 0.006


def test_p_bayes_does_not_see_the_split_s_other_events():
    """Changing the split's earlier events changes ``p_bayes_split_items`` but not ``p_bayes`` of the last."""
    topic, quality, mix, state, first, items, scenarios = _small_split(3)
    other_items, other_scenarios = items.copy(), scenarios.copy()
    other_items[:, :-1], other_scenarios[:, :-1] = (other_items[:, :-1] + 2) % 6, (other_scenarios[:, :-1] + 1) % 3

    def last(earlier, i, s):
        return synthetic._expected_p(np.random.default_rng(5), state, first, i, s, topic, quality, earlier)[:, -1]

    np.testing.assert_array_equal(last(mix, items, scenarios), last(mix, other_items, other_scenarios))
    assert np.abs(last(None, items, scenarios) - last(None, other_items, other_scenarios)).max() > 0.01


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
