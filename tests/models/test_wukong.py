"""Wukong: the shared feature tokens, FM / optimized FM and one layer by hand, residual projections,
config validation and preset (the model contract: test_contract.py)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import INFO, close, make_batch, with_empty_history

from climber.config import load_preset
from climber.data.sequences import Strategy
from climber.models.features import FeatureTokens
from climber.models.wukong import InteractionLayer, Wukong, WukongConfig

TINY = dict(d_model=8, n_layers=2, n_fmb=3, n_lcb=4, mlp_hidden=16, max_len=6, recent_k=3)


def build(seed=0, **kw) -> Wukong:
    torch.manual_seed(seed)
    return Wukong(WukongConfig(**{**TINY, **kw}), INFO)


@pytest.mark.parametrize("key,value", [("n_fmb", 0), ("fm_rank", -1), ("dropout", 1.0)])
def test_config_validation(key, value):
    with pytest.raises(ValueError, match=key):
        WukongConfig(**{key: value})


def test_strategies_are_one_recency_history_of_max_len():
    cfg = WukongConfig.from_dict(load_preset("wukong-default")["model_config"])
    assert Wukong(cfg, INFO).strategies() == [Strategy(name="history", kind="recency", length=cfg.max_len)]


def test_feature_tokens_by_hand():
    torch.manual_seed(0)
    k, d = 4, 6
    ft = FeatureTokens(INFO, d, recent_k=k)
    with torch.no_grad():
        ft.dense.weight.normal_()
        ft.dense.bias.normal_()
    batch = with_empty_history(make_batch(B=3, lengths=(3,), C=2), row=2)  # L = 3 < recent_k: missing slots
    out = ft(batch)
    assert out.shape == (3, 2, ft.n_features, d) and ft.n_features == 9
    s = batch.seqs[0]
    for b in range(3):
        real = [i for i in range(3) if s.mask[b, i]]
        tokens = [ft.emb.item.weight[s.item[b, i]] + ft.emb.action.weight[s.action[b, i]]
                  + ft.emb.scenario.weight[s.scenario[b, i]] for i in real]
        mean = sum(tokens) / len(tokens) if tokens else torch.zeros(d)
        recent = [torch.zeros(d)] * (k - len(tokens[-k:])) + tokens[-k:]
        for c in range(2):
            gap = float(batch.cand_ts[b, c] - s.ts[b, real[-1]]) if real else 0.0
            dense = ft.dense(torch.tensor([math.log1p(len(real)), math.log1p(max(gap, 0.0)) / 10]))
            expected = [ft.emb.user.weight[batch.user[b]], ft.emb.item.weight[batch.cand_item[b, c]],
                        ft.emb.scenario.weight[batch.cand_scenario[b, c]], mean, *recent, dense]
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
