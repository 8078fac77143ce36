"""Metrics of docs/protocol.md: AUC (pooled), GAUC, LogLoss, HR@k, NDCG@k. Plain numpy, ties handled.

HR@k and NDCG@k rank each user's own candidates (that user's events of the split, a handful each), not
the catalogue: they are reported with how many candidates the ranked users have (``ranked_users``,
``candidates_per_user_mean`` / ``_median``); with ``k`` at or above a user's count, HR@k is 1 for them.

AUC is the Mann-Whitney statistic with average ranks for tied scores (a tie counts one half).
"""

from __future__ import annotations

import numpy as np

EPS = 1e-7


def _average_ranks(groups: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """1-based ranks of scores within each group (ties get their mean rank); also the sort order."""
    order = np.lexsort((scores, groups))
    g, s = groups[order], scores[order]
    n = len(s)
    new_run = np.ones(n, dtype=bool)
    new_run[1:] = (g[1:] != g[:-1]) | (s[1:] != s[:-1])
    run_id = np.cumsum(new_run) - 1
    run_start = np.flatnonzero(new_run)
    run_end = np.append(run_start[1:], n)
    new_group = np.ones(n, dtype=bool)
    new_group[1:] = g[1:] != g[:-1]
    group_start = np.maximum.accumulate(np.where(new_group, np.arange(n), 0))
    # mean of positions run_start..run_end-1, relative to the group start, 1-based
    mean_pos = (run_start + run_end - 1) / 2.0
    ranks_sorted = mean_pos[run_id] - group_start + 1
    ranks = np.empty(n)
    ranks[order] = ranks_sorted
    return ranks, order


def _group_auc(groups: np.ndarray, labels: np.ndarray, scores: np.ndarray):
    """Per-group AUC, candidate counts and a mask of groups that hold both labels."""
    uniq, inv = np.unique(groups, return_inverse=True)
    ranks, _ = _average_ranks(inv, scores)
    pos = labels > 0.5
    n_pos = np.bincount(inv, weights=pos, minlength=len(uniq))
    n_all = np.bincount(inv, minlength=len(uniq)).astype(float)
    n_neg = n_all - n_pos
    rank_sum = np.bincount(inv, weights=ranks * pos, minlength=len(uniq))
    valid = (n_pos > 0) & (n_neg > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return auc, n_all, valid


def auc(labels, scores) -> float:
    """Pooled AUC. NaN when only one class is present."""
    labels, scores = np.asarray(labels, float), np.asarray(scores, float)
    a, _, valid = _group_auc(np.zeros(len(labels), dtype=np.int64), labels, scores)
    return float(a[0]) if valid[0] else float("nan")


def gauc(users, labels, scores) -> float:
    """sum_u w_u AUC_u / sum_u w_u over users with both labels; w_u = the user's candidate count."""
    a, w, valid = _group_auc(np.asarray(users), np.asarray(labels, float), np.asarray(scores, float))
    if not valid.any():
        return float("nan")
    return float(np.sum(a[valid] * w[valid]) / np.sum(w[valid]))


def logloss(labels, probs) -> float:
    """Mean binary cross-entropy with probabilities clipped to [1e-7, 1 - 1e-7]."""
    y = np.asarray(labels, float)
    p = np.clip(np.asarray(probs, float), EPS, 1 - EPS)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def hit_ndcg_at_k(users, labels, scores, k: int) -> tuple[float, float]:
    """HR@k and NDCG@k of the positives among each user's candidates, averaged over users with a positive.

    HR@k: 1 when at least one positive is in the user's top k. NDCG@k: binary gains, DCG@k / ideal DCG@k.
    Ties in score are broken by candidate order (stable), so results are deterministic.
    """
    users, labels, scores = np.asarray(users), np.asarray(labels, float), np.asarray(scores, float)
    order = np.lexsort((np.arange(len(scores)), -scores, users))
    u, y = users[order], labels[order] > 0.5
    start = np.r_[0, np.flatnonzero(u[1:] != u[:-1]) + 1]
    counts = np.diff(np.r_[start, len(u)])
    pos_in_user = np.arange(len(u)) - np.repeat(start, counts)
    top = pos_in_user < k
    gain = np.where(y & top, 1.0 / np.log2(pos_in_user + 2), 0.0)
    dcg = np.add.reduceat(gain, start)
    hits = np.add.reduceat((y & top).astype(float), start)
    n_pos = np.add.reduceat(y.astype(float), start)
    ideal = np.array([np.sum(1.0 / np.log2(np.arange(min(int(p), k)) + 2)) for p in n_pos])
    has = n_pos > 0
    if not has.any():
        return float("nan"), float("nan")
    return float(np.mean(hits[has] > 0)), float(np.mean(dcg[has] / ideal[has]))


def ranked_candidates(users, labels) -> tuple[int, float, float]:
    """The users HR@k / NDCG@k average over (those with a positive) and the mean and median of their
    candidate counts: the length of the lists they rank."""
    users, positive = np.asarray(users), np.asarray(labels, float) > 0.5
    _, inv, counts = np.unique(users, return_inverse=True, return_counts=True)
    ranked = counts[np.bincount(inv, weights=positive, minlength=len(counts)) > 0]
    if not len(ranked):
        return 0, float("nan"), float("nan")
    return len(ranked), float(np.mean(ranked)), float(np.median(ranked))


def all_metrics(users, labels, scores_logit, ks=(5, 10)) -> dict[str, float]:
    """Every protocol metric from logits: AUC, GAUC, LogLoss (on sigmoid), HR@k and NDCG@k over each
    user's own candidates, with those candidates' count per user."""
    logits = np.asarray(scores_logit, float)
    probs = 1.0 / (1.0 + np.exp(-logits))
    out = {
        "auc": auc(labels, logits),
        "gauc": gauc(users, labels, logits),
        "logloss": logloss(labels, probs),
        "candidates": int(len(labels)),
        "positive_rate": float(np.mean(labels)) if len(labels) else float("nan"),
    }
    for k in ks:
        out[f"hr@{k}"], out[f"ndcg@{k}"] = hit_ndcg_at_k(users, labels, logits, k)
    out["ranked_users"], out["candidates_per_user_mean"], out["candidates_per_user_median"] = \
        ranked_candidates(users, labels)
    return out


def user_draws(users, draws: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``draws`` bootstrap resamples of the users: each candidate's user index (``inverse``, (n,)) and
    how often each user was drawn in each resample (``counts``, (draws, users)), users drawn with
    replacement as many times as there are users. A user drawn c times enters a metric as c copies of
    all its candidates, so every figure computed on a draw is that of a test set of whole users."""
    _, inverse = np.unique(np.asarray(users), return_inverse=True)
    n_users = int(inverse.max()) + 1 if len(inverse) else 0
    rng = np.random.default_rng(seed)
    counts = np.stack([np.bincount(rng.integers(0, n_users, n_users), minlength=n_users) for _ in range(draws)])
    return inverse, counts.astype(float)


def gauc_on_draws(users, labels, scores, counts: np.ndarray) -> np.ndarray:
    """GAUC (:func:`gauc`) of each resample of :func:`user_draws`: (draws,). A user's AUC does not change
    with copies of it; its weight, its candidate count, is multiplied by the times it was drawn."""
    a, w, valid = _group_auc(np.asarray(users), np.asarray(labels, float), np.asarray(scores, float))
    a, w = np.where(valid, a, 0.0), np.where(valid, w, 0.0)  # the users in np.unique order, as user_draws'
    return (counts @ (a * w)) / (counts @ w)


def auc_on_draws(labels, scores, weights: np.ndarray) -> np.ndarray:
    """Pooled AUC (:func:`auc`) of candidates counted ``weights`` (draws, n) times each (from
    :func:`user_draws`: ``counts[:, inverse]``): (draws,). The weighted Mann-Whitney statistic, a tie one
    half, computed over runs of tied scores."""
    labels, scores = np.asarray(labels, float), np.asarray(scores, float)
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])  # runs of tied scores
    w = weights[:, order]
    pos = np.add.reduceat(w * labels[order], starts, axis=1)  # (draws, runs)
    neg = np.add.reduceat(w * (1 - labels[order]), starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg  # negative weight under each run
    return np.sum(pos * (below + 0.5 * neg), axis=1) / (pos.sum(axis=1) * neg.sum(axis=1))
