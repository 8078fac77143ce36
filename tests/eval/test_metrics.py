"""Metrics against independent computations: scikit-learn, brute force pair counting, hand examples."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import log_loss, roc_auc_score

from climber.eval.metrics import (all_metrics, auc, auc_on_draws, gauc, gauc_on_draws, hit_ndcg_at_k, logloss,
                                  ranked_candidates, user_draws)

# candidates: (user in 0..4, label 0/1, score from a small set so that ties are common)
candidates = st.lists(st.tuples(st.integers(0, 4), st.integers(0, 1), st.integers(-3, 3)), min_size=1, max_size=60)


def pair_auc(y, s):
    """Brute force: P(score of a positive > score of a negative), ties count one half."""
    pos, neg = s[y == 1], s[y == 0]
    return np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])


@settings(max_examples=200, deadline=None)
@given(candidates)
def test_auc_and_gauc_match_independent_computations(rows):
    u, y, s = (np.array(c) for c in zip(*rows))
    s = s.astype(float)
    if len(set(y)) == 2:
        assert auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert auc(y, s) == pytest.approx(pair_auc(y, s), abs=1e-12)
    else:
        assert math.isnan(auc(y, s))
    per_user = [(pair_auc(y[u == k], s[u == k]), (u == k).sum()) for k in np.unique(u) if len(set(y[u == k])) == 2]
    if per_user:  # one-class users are left out, weights = the user's candidate count
        expected = sum(a * w for a, w in per_user) / sum(w for _, w in per_user)
        assert gauc(u, y, s) == pytest.approx(expected, abs=1e-12)
    else:
        assert math.isnan(gauc(u, y, s))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.floats(0, 1)), min_size=2, max_size=50))
def test_logloss_matches_sklearn_with_clipping(rows):
    y, p = (np.array(c, dtype=float) for c in zip(*rows))
    expected = log_loss(y, np.clip(p, 1e-7, 1 - 1e-7), labels=[0, 1])
    assert logloss(y, p) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_gauc_by_hand():
    users = [1, 1, 1, 2, 2, 3]  # user 3 has one candidate: left out
    labels = [1, 0, 0, 0, 1, 1]
    scores = [0.9, 0.5, 0.95, 0.1, 0.1, 0.3]  # user 1: AUC 1/2 (w 3); user 2: a tie, AUC 1/2 (w 2)
    assert gauc(users, labels, scores) == pytest.approx((0.5 * 3 + 0.5 * 2) / 5)


def test_hit_and_ndcg_by_hand():
    users = [7, 7, 7, 7, 8, 8, 9]
    labels = [0, 1, 0, 1, 1, 0, 0]  # user 9 has no positive: left out
    scores = [0.9, 0.8, 0.1, 0.2, 0.1, 0.5, 0.3]
    hr, ndcg = hit_ndcg_at_k(users, labels, scores, k=2)
    # user 7 ranks [0.9 (neg), 0.8 (pos)]: hit, DCG 1/log2(3), IDCG 1 + 1/log2(3)
    # user 8 ranks [0.5 (neg), 0.1 (pos)]: hit, DCG 1/log2(3), IDCG 1
    assert hr == pytest.approx(1.0)
    assert ndcg == pytest.approx(((1 / math.log2(3)) / (1 + 1 / math.log2(3)) + 1 / math.log2(3)) / 2)
    hr1, ndcg1 = hit_ndcg_at_k(users, labels, scores, k=1)
    assert hr1 == 0.0 and ndcg1 == 0.0
    assert ranked_candidates(users, labels) == (2, 3.0, 3.0)  # users 7 and 8 rank 4 and 2 candidates


def test_all_metrics_uses_sigmoid_of_logits():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    logits = rng.normal(size=300) + y
    users = rng.integers(0, 20, 300)
    m = all_metrics(users, y, logits)
    assert m["auc"] == pytest.approx(roc_auc_score(y, logits))
    assert m["logloss"] == pytest.approx(log_loss(y, 1 / (1 + np.exp(-logits))))
    assert m["candidates"] == 300 and {"hr@10", "ndcg@5"} <= set(m)


def test_bootstrap_figures_equal_the_metrics_on_the_resampled_users_written_out():
    """Each resample's GAUC and AUC equal :func:`gauc` / sklearn's AUC on a test set built by copying each
    user's candidates as often as the user was drawn (copies keep their user id, as a user's own AUC
    does not change with copies and its weight grows with them); ties and users with one label included."""
    rng = np.random.default_rng(1)
    users = rng.choice([7, 3, 11, 40, 5, 21], 90)
    labels = rng.integers(0, 2, 90)
    labels[users == 21] = 1  # a user GAUC skips
    scores = np.round(rng.normal(size=90) + labels, 1)
    inverse, counts = user_draws(users, 25, seed=3)
    assert counts.shape == (25, 6) and (counts.sum(axis=1) == 6).all() and counts.std() > 0
    by_gauc, by_auc = gauc_on_draws(users, labels, scores, counts), auc_on_draws(labels, scores, counts[:, inverse])
    for d in range(25):
        rows = np.concatenate([np.flatnonzero(inverse == u) for u in range(6) for _ in range(int(counts[d, u]))])
        assert by_gauc[d] == pytest.approx(gauc(users[rows], labels[rows], scores[rows]))
        assert by_auc[d] == pytest.approx(roc_auc_score(labels[rows], scores[rows]))
    ones = np.ones((1, 90))
    assert auc_on_draws(labels, scores, ones)[0] == pytest.approx(auc(labels, scores))
