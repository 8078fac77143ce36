"""Batch builders of the model tests: random tiny batches in the real format (left-padded histories,
right-padded candidates) and the edits the checks make to them; plus a check that several model test
files share: history states are causal and ignore the candidates (Transformer, HSTU)."""

from __future__ import annotations

import dataclasses

import torch

from climber.data.batch import Batch, Subsequence
from climber.models import DataInfo

INFO = DataInfo(num_users=20, num_items=50, actions=("click", "like", "skip"), scenarios=("home", "search", "radio"))


def close(a, b, tol=1e-5):
    return torch.allclose(a, b, atol=tol, rtol=tol)


def make_batch(B=3, lengths=(5, 8), C=4, seed=0, full=False, hist_scenarios=(1, 3)) -> Batch:
    """Random ids; left-padded histories with strictly increasing ts; right-padded candidates after them."""
    g = torch.Generator().manual_seed(seed)

    def ri(lo, hi, shape):
        return torch.randint(lo, hi + 1, shape, generator=g)

    t0 = ri(10**6, 2 * 10**6, (B, 1))
    seqs = []
    for L in lengths:
        n_real = torch.full((B,), L) if full else ri(1, L, (B,))
        mask = torch.arange(L)[None] >= (L - n_real)[:, None]  # (B, L), padding on the left
        ts = t0 + torch.cumsum(ri(1, 5000, (B, L)), dim=1)
        item, action, scen = ri(1, INFO.num_items, (B, L)), ri(1, INFO.num_actions, (B, L)), ri(*hist_scenarios, (B, L))
        seqs.append(Subsequence(item * mask, action * mask, scen * mask, ts * mask, mask))
    last = torch.stack([s.ts.max(dim=1).values for s in seqs], dim=1).max(dim=1).values[:, None]  # (B, 1)
    n_c = torch.full((B,), C) if full else ri(1, C, (B,))
    cmask = torch.arange(C)[None] < n_c[:, None]  # (B, C), padding on the right
    cts = last + torch.cumsum(ri(1, 100, (B, C)), dim=1)
    return Batch(
        user=ri(1, INFO.num_users, (B,)),
        seqs=seqs,
        cand_item=ri(1, INFO.num_items, (B, C)) * cmask,
        cand_scenario=ri(1, INFO.num_scenarios, (B, C)) * cmask,
        cand_ts=cts * cmask,
        cand_mask=cmask,
        label=torch.zeros(B, C),
        cand_action=ri(1, INFO.num_actions, (B, C)) * cmask,
    )


def replace(batch: Batch, **kw) -> Batch:
    return dataclasses.replace(batch, **kw)


def pad_left(batch: Batch, extra: int) -> Batch:
    """Prepend `extra` padding events to every subsequence."""

    def pad(t):
        return torch.cat([torch.zeros(t.shape[0], extra, *t.shape[2:], dtype=t.dtype), t], dim=1)

    seqs = [s.apply(pad) for s in batch.seqs]
    return replace(batch, seqs=seqs)


def select_cands(batch: Batch, idx) -> Batch:
    """Keep candidate columns idx (a list; -1 = a padding column)."""

    def take(t):
        cols = [t[:, i] if i >= 0 else torch.zeros_like(t[:, 0]) for i in idx]
        return torch.stack(cols, dim=1)

    return replace(
        batch,
        cand_item=take(batch.cand_item),
        cand_scenario=take(batch.cand_scenario),
        cand_ts=take(batch.cand_ts),
        cand_mask=take(batch.cand_mask),
        label=take(batch.label),
        cand_action=take(batch.cand_action),
    )


def to_single_item_rows(batch: Batch) -> Batch:
    """"Single user, single item": one row per real candidate of ``batch``, holding that candidate's user
    and history and the candidate alone (C = 1), in row-major order of ``batch.cand_mask``."""
    rows, cols = batch.cand_mask.nonzero(as_tuple=True)
    single = batch.take(rows)
    take = {f: getattr(batch, f)[rows, cols][:, None] for f in ("cand_item", "cand_scenario", "cand_ts", "cand_mask",
                                                                 "label", "cand_action")}
    return replace(single, **take)


def with_empty_history(batch: Batch, row: int) -> Batch:
    """A copy of ``batch`` whose row ``row`` has no history event at all (in every subsequence)."""
    seqs = []
    for s in batch.seqs:
        keep = torch.ones_like(s.mask)
        keep[row] = False
        seqs.append(Subsequence(s.item * keep, s.action * keep, s.scenario * keep, s.ts * keep, s.mask & keep))
    return replace(batch, seqs=seqs)


def check_history_states(model, L: int) -> None:
    """hidden_states (B, L + C, d): the history part ignores the candidates, and a history state ignores
    later history events (what a KV cache of the history needs)."""
    model.eval()
    batch = make_batch(B=2, lengths=(L,), C=3, full=True)
    states = model.hidden_states(batch)
    assert states.shape == (2, L + 3, model.cfg.d_model)
    other = model.hidden_states(
        replace(batch, cand_item=batch.cand_item.flip(1), cand_scenario=batch.cand_scenario.flip(1),
                cand_ts=batch.cand_ts + 777, cand_mask=torch.tensor([[True, False, True], [False, True, True]]))
    )
    assert close(states[:, :L], other[:, :L])
    assert not close(states[:, L:], other[:, L:])
    for t in (2, L - 1):  # change history event t: states before t stay, t and later change
        s = batch.seqs[0]
        item, ts = s.item.clone(), s.ts.clone()
        item[:, t] = item[:, t] % INFO.num_items + 1
        ts[:, t:] += 1000 * (t + 1)  # keeps ts increasing
        changed = model.hidden_states(replace(batch, seqs=[dataclasses.replace(s, item=item, ts=ts)]))
        assert close(states[:, :t], changed[:, :t])
        assert not close(states[:, t], changed[:, t])
        assert not close(states[:, L:], changed[:, L:])
