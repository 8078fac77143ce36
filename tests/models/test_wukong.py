"""Wukong: the model contract, the shared feature tokens, FM / optimized FM and one layer by hand, FLOPs.

The ``check_*`` functions are the model contract for any single-subsequence model; test_rankmixer.py
imports them.
"""

from __future__ import annotations

import math
from importlib import resources

import pytest
import torch
import yaml
from test_climber import INFO, make_batch, pad_left, replace, select_cands, select_rows
from torch.utils.flop_counter import FlopCounterMode

from climber.data.batch import Subsequence
from climber.data.sequences import Strategy
from climber.models import SampleShape
from climber.models.features import FeatureTokens
from climber.models.wukong import InteractionLayer, Wukong, WukongConfig

TINY = dict(d_model=8, n_layers=2, n_fmb=3, n_lcb=4, mlp_hidden=16, max_len=6, recent_k=3)


def build(seed=0, **kw) -> Wukong:
    torch.manual_seed(seed)
    return Wukong(WukongConfig(**{**TINY, **kw}), INFO)


def close(a, b, tol=1e-5):
    return torch.allclose(a, b, atol=tol, rtol=tol)


def batch_for(model, **kw):
    return make_batch(lengths=(model.cfg.max_len,), **kw)


def empty_history(batch, row: int):
    """The same batch with row ``row``'s history entirely padding."""
    seqs = []
    for s in batch.seqs:
        keep = torch.ones_like(s.mask)
        keep[row] = False
        seqs.append(Subsequence(s.item * keep, s.action * keep, s.scenario * keep, s.ts * keep, s.mask & keep))
    return replace(batch, seqs=seqs)


# ---- the model contract, shared with test_rankmixer.py ----


def check_shape_finite_and_gradients(model, skip=()):
    model.train()
    batch = empty_history(batch_for(model, B=3, C=4), row=2)
    logits = model(batch)
    assert logits.shape == (3, 4)
    assert torch.isfinite(logits).all()
    logits[batch.cand_mask].sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        if name not in skip:
            assert p.grad.abs().sum() > 0, name


def check_candidate_independence(model):
    model.eval()
    batch = batch_for(model, B=2, C=4, full=True)
    base = model(batch)
    j = 1
    item, scen, ts = batch.cand_item.clone(), batch.cand_scenario.clone(), batch.cand_ts.clone()
    item[:, j] = item[:, j] % INFO.num_items + 1
    scen[:, j] = scen[:, j] % INFO.num_scenarios + 1
    ts[:, j] += 10**6
    changed = model(replace(batch, cand_item=item, cand_scenario=scen, cand_ts=ts))
    others = [i for i in range(4) if i != j]
    assert close(changed[:, others], base[:, others])
    assert not close(changed[:, j], base[:, j])  # candidate j itself did change

    batch = batch_for(model, B=3, C=4)
    base = model(batch)
    real = batch.cand_mask
    more = model(select_cands(batch, [0, 1, 2, 3, -1, -1]))  # two more padding candidates
    assert close(more[:, :4][real], base[real])
    for c in range(4):
        alone = model(select_cands(batch, [c]))[:, 0]  # scored one at a time
        assert close(alone[real[:, c]], base[:, c][real[:, c]])


def check_rows_and_left_padding(model):
    model.eval()
    batch = batch_for(model, B=3, C=4)
    base = model(batch)
    assert close(model(pad_left(batch, 4)), base)
    assert close(model(select_rows(batch, [0]))[0], base[0])
    seqs = [new_history_row(s, row=1) for s in batch.seqs]  # a new history for row 1 only
    out = model(replace(batch, seqs=seqs))
    assert close(out[[0, 2]], base[[0, 2]])
    assert not close(out[1][batch.cand_mask[1]], base[1][batch.cand_mask[1]])


def new_history_row(s: Subsequence, row: int) -> Subsequence:
    """Row ``row`` gets new random items and actions at its real events; other rows are untouched."""
    g = torch.Generator().manual_seed(1)
    item, action = s.item.clone(), s.action.clone()
    item[row] = torch.randint(1, INFO.num_items + 1, item[row].shape, generator=g) * s.mask[row]
    action[row] = torch.randint(1, INFO.num_actions + 1, action[row].shape, generator=g) * s.mask[row]
    return Subsequence(item, action, s.scenario, s.ts, s.mask)


def check_flops(model, C=5):
    L = model.cfg.max_len
    batch = make_batch(B=1, lengths=(L,), C=C, full=True)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(batch)
    measured = counter.get_total_flops()
    analytic = model.flops(SampleShape(lengths=(L,), candidates=C))
    assert abs(analytic - measured) / measured < 0.05, (analytic, measured)


def check_config_round_trip(cfg_cls, typo: str, invalid: dict):
    cfg = cfg_cls(max_len=7)
    assert cfg_cls.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=typo):
        cfg_cls.from_dict({typo: 1})
    for key, value in invalid.items():
        with pytest.raises(ValueError, match=key):
            cfg_cls(**{key: value})


def check_preset(name, cfg_cls):
    doc = yaml.safe_load((resources.files("climber") / "presets" / f"{name}-default.yaml").read_text())
    assert doc["model"] == name
    return cfg_cls.from_dict(doc["model_config"])


# ---- Wukong ----

VARIANTS = [dict(), dict(fm_rank=2), dict(n_fmb=5, n_lcb=3, n_layers=3, recent_k=3)]  # the last: n = n_F + n_L


@pytest.mark.parametrize("kw", VARIANTS)
def test_shape_finite_and_gradients_reach_every_parameter(kw):
    check_shape_finite_and_gradients(build(**kw))


@pytest.mark.parametrize("kw", VARIANTS[:2])
def test_candidates_are_independent(kw):
    check_candidate_independence(build(**kw))


def test_rows_are_independent_and_left_padding_changes_nothing():
    check_rows_and_left_padding(build())


@pytest.mark.parametrize("kw", VARIANTS)
def test_flops_match_flop_counter(kw):
    check_flops(build(**kw).eval())


def test_config_round_trip_unknown_keys_and_validation():
    check_config_round_trip(WukongConfig, "d_modle", {"n_fmb": 0, "fm_rank": -1, "dropout": 1.0})


def test_preset_and_strategies():
    cfg = check_preset("wukong", WukongConfig)
    assert Wukong(cfg, INFO).strategies() == [Strategy(name="history", kind="recency", length=cfg.max_len)]


def test_feature_tokens_by_hand():
    torch.manual_seed(0)
    k, d = 4, 6
    ft = FeatureTokens(INFO, d, recent_k=k)
    with torch.no_grad():
        ft.dense.weight.normal_()
        ft.dense.bias.normal_()
    batch = empty_history(make_batch(B=3, lengths=(3,), C=2), row=2)  # L = 3 < recent_k: missing slots
    out = ft(batch)
    assert out.shape == (3, 2, ft.n_features, d) and ft.n_features == 9
    s = batch.seqs[0]
    for b in range(3):
        real = [i for i in range(3) if s.mask[b, i]]
        tokens = [ft.item_emb.weight[s.item[b, i]] + ft.action_emb.weight[s.action[b, i]]
                  + ft.scenario_emb.weight[s.scenario[b, i]] for i in real]
        mean = sum(tokens) / len(tokens) if tokens else torch.zeros(d)
        recent = [torch.zeros(d)] * (k - len(tokens[-k:])) + tokens[-k:]
        for c in range(2):
            gap = float(batch.cand_ts[b, c] - s.ts[b, real[-1]]) if real else 0.0
            dense = ft.dense(torch.tensor([math.log1p(len(real)), math.log1p(max(gap, 0.0)) / 10]))
            expected = [ft.user_emb.weight[batch.user[b]], ft.item_emb.weight[batch.cand_item[b, c]],
                        ft.scenario_emb.weight[batch.cand_scenario[b, c]], mean, *recent, dense]
            assert close(out[b, c], torch.stack(expected)), (b, c)
    assert (out[2, :, 3:3 + k] == 0).all()  # empty history: zero mean and recent tokens
    assert close(out[2, :, -1], ft.dense.bias.expand(2, d))  # and dense features [0, 0]


def test_fm_is_all_pairwise_dot_products_or_its_low_rank_form():
    torch.manual_seed(0)
    n, d, k = 4, 5, 2
    x = torch.randn(2, n, d)
    full = InteractionLayer(n, WukongConfig(**{**TINY, "d_model": d}))
    by_hand = torch.tensor([[[float(x[b, i] @ x[b, j]) for j in range(n)] for i in range(n)] for b in range(2)])
    assert close(full.fm(x), by_hand)

    low = InteractionLayer(n, WukongConfig(**{**TINY, "d_model": d, "fm_rank": k}))
    Y = low.fm_proj.detach()
    assert Y.shape == (n, k)
    by_hand = torch.tensor(
        [[[sum(float(x[b, i] @ x[b, j]) * float(Y[j, c]) for j in range(n)) for c in range(k)] for i in range(n)]
         for b in range(2)]
    )
    assert close(low.fm(x), by_hand)  # X (X^T Y) = (X X^T) Y: the same interactions, compressed to k columns


@pytest.mark.parametrize("n_in", [3, 7])  # 3: residual projected to n_F + n_L = 7 tokens; 7: identity
def test_layer_equals_the_formula(n_in):
    torch.manual_seed(0)
    d, n_f, n_l = 4, 3, 4
    layer = InteractionLayer(n_in, WukongConfig(**{**TINY, "d_model": d, "n_fmb": n_f, "n_lcb": n_l})).eval()
    with torch.no_grad():
        layer.ln.weight.normal_()
        layer.ln.bias.normal_()
    x = torch.randn(1, n_in, d)
    X = x[0]
    fm = [float(X[i] @ X[j]) for i in range(n_in) for j in range(n_in)]  # flatten(X X^T), row major
    fmb = layer.fmb_mlp(torch.tensor(fm)[None]).view(n_f, d)
    lcb = torch.stack([sum(layer.lcb[l, j] * X[j] for j in range(n_in)) for l in range(n_l)])
    assert (layer.residual is None) == (n_in == n_f + n_l)
    res = X if layer.residual is None else torch.stack(
        [sum(layer.residual[o, j] * X[j] for j in range(n_in)) for o in range(n_f + n_l)]
    )
    z = torch.cat([fmb, lcb]) + res  # (n_F + n_L, d)
    mu, var = z.mean(-1, keepdim=True), z.var(-1, unbiased=False, keepdim=True)
    expected = (z - mu) / torch.sqrt(var + layer.ln.eps) * layer.ln.weight + layer.ln.bias
    assert close(layer(x)[0], expected)


def test_only_a_mismatched_first_layer_projects_its_residual():
    model = build()  # n = 5 + 3 = 8 feature tokens, n_F + n_L = 7
    assert [layer.residual is not None for layer in model.layers] == [True, False]
    assert [layer.residual is not None for layer in build(n_fmb=4, n_lcb=4).layers] == [False, False]
