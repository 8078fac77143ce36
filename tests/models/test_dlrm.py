"""DLRM: shapes, gradients, candidate / row independence, left padding, dense features, the dot and DCN
interactions against hand computations, FLOPs, config and preset."""

from __future__ import annotations

import dataclasses
from importlib import resources

import pytest
import torch
import yaml
from test_climber import INFO, make_batch, pad_left, replace, select_cands, select_rows
from torch.utils.flop_counter import FlopCounterMode

from climber.data.sequences import Strategy
from climber.models import SampleShape
from climber.models.dlrm import DLRM, CrossLayer, DLRMConfig

L = 6  # history length of the tiny batches


def build(seed=0, **kw) -> DLRM:
    torch.manual_seed(seed)
    model = DLRM(DLRMConfig(**{"d_model": 8, "max_len": L, "bottom_mlp": [4], "top_mlp": [16], **kw}), INFO)
    with torch.no_grad():  # larger embeddings than the 0.02 init, so that dot products matter in the checks
        for table in (model.emb.user, model.emb.item, model.emb.action, model.emb.scenario):
            table.weight[1:].normal_()
    return model


def close(a, b, tol=1e-5):
    return torch.allclose(a, b, atol=tol, rtol=tol)


def empty_history(batch, row):
    """The same batch with row ``row``'s history emptied (all padding)."""
    seq = batch.seqs[0]
    keep = torch.ones_like(seq.mask)
    keep[row] = False
    fields = {n: getattr(seq, n) * keep for n in ("item", "action", "scenario", "ts")}
    return replace(batch, seqs=[dataclasses.replace(seq, mask=seq.mask & keep, **fields)])


INTERACTIONS = ["dot", "dcn"]


@pytest.mark.parametrize("interaction", INTERACTIONS)
def test_shape_finite_and_gradients_reach_every_parameter(interaction):
    model = build(interaction=interaction).train()
    batch = empty_history(make_batch(lengths=(L,), C=4), row=0)
    logits = model(batch)
    assert logits.shape == (3, 4)
    assert torch.isfinite(logits).all()
    logits[batch.cand_mask].sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name


def test_strategies_are_one_recency_history():
    assert build().strategies() == [Strategy(name="history", kind="recency", length=L)]
    with pytest.raises(ValueError, match="expects 1"):
        build()(make_batch(lengths=(L, L)))


@pytest.mark.parametrize("interaction", INTERACTIONS)
def test_candidates_are_scored_independently(interaction):
    model = build(interaction=interaction).eval()
    batch = make_batch(B=3, lengths=(L,), C=4)
    base = model(batch)
    full = make_batch(B=2, lengths=(L,), C=4, full=True)
    j = 2
    item, scen, ts = full.cand_item.clone(), full.cand_scenario.clone(), full.cand_ts.clone()
    item[:, j] = item[:, j] % INFO.num_items + 1
    scen[:, j] = scen[:, j] % INFO.num_scenarios + 1
    ts[:, j] += 12345
    before, after = model(full), model(replace(full, cand_item=item, cand_scenario=scen, cand_ts=ts))
    others = [i for i in range(4) if i != j]
    assert close(after[:, others], before[:, others])
    assert not close(after[:, j], before[:, j])
    real = batch.cand_mask
    more = model(select_cands(batch, [0, 1, 2, 3, -1, -1]))  # more padding candidates
    assert close(more[:, :4][real], base[real])
    for c in range(4):
        alone = model(select_cands(batch, [c]))[:, 0]
        assert close(alone[real[:, c]], base[:, c][real[:, c]])


@pytest.mark.parametrize("interaction", INTERACTIONS)
def test_rows_are_independent_and_left_padding_changes_nothing(interaction):
    model = build(interaction=interaction).eval()
    batch = make_batch(B=3, lengths=(L,), C=4)
    base = model(batch)
    assert close(model(select_rows(batch, [0])), base[[0]])
    assert close(model(pad_left(batch, 4)), base)
    seq = batch.seqs[0]
    item = seq.item.clone()
    item[1] = (item[1] % INFO.num_items + 1) * seq.mask[1]
    out = model(replace(batch, seqs=[dataclasses.replace(seq, item=item)]))
    assert close(out[[0, 2]], base[[0, 2]])
    assert not close(out[1][batch.cand_mask[1]], base[1][batch.cand_mask[1]])


def test_dense_features_by_hand():
    batch = make_batch(B=2, lengths=(4,), C=3, full=True)
    batch = empty_history(batch, row=1)
    seq = batch.seqs[0]
    dense = DLRM.dense_features(batch)  # (B, C, 2)
    gap = (batch.cand_ts[0] - seq.ts[0, -1]).double()
    expected0 = torch.stack([torch.full((3,), torch.log1p(torch.tensor(4.0))), torch.log1p(gap).float() / 10], -1)
    assert close(dense[0], expected0)
    assert torch.equal(dense[1], torch.zeros(3, 2))  # empty history: both 0


def test_dot_interaction_matches_hand_computation():
    model = build(d_model=2)
    f = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.5, 0.0], [-2.0, 1.0], [4.0, 3.0]])[None, None]  # (1, 1, 5, 2)
    out = model.interact(f)[0, 0]
    # [z ; <u,i>, <u,s>, <u,h>, <u,z>, <i,s>, <i,h>, <i,z>, <s,h>, <s,z>, <h,z>]
    expected = torch.tensor([4.0, 3.0, 1.0, 0.5, 0.0, 10.0, 1.5, -7.0, 9.0, -1.0, 2.0, -5.0])
    assert torch.equal(out, expected)


def test_dcn_cross_layers_match_their_formula():
    torch.manual_seed(0)
    layer = CrossLayer(5)
    x0, x = torch.randn(2, 5), torch.randn(2, 5)
    W, b = layer.linear.weight, layer.linear.bias
    assert close(layer(x0, x), x0 * (x @ W.T + b) + x)
    model = build(interaction="dcn", n_cross=2)
    f = torch.randn(2, 3, 5, 8)
    x0 = f.flatten(2)  # (2, 3, 40)
    x = x0
    for cross in model.cross:
        x = x0 * (x @ cross.linear.weight.T + cross.linear.bias) + x
    assert close(model.interact(f), x)
    assert model.top[0].in_features == 40 and build().top[0].in_features == 8 + 10


@pytest.mark.parametrize("interaction", INTERACTIONS)
def test_flops_match_flop_counter(interaction):
    model = build(interaction=interaction).eval()
    batch = make_batch(B=1, lengths=(L,), C=5, full=True)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(batch)
    measured = counter.get_total_flops()
    analytic = model.flops(SampleShape(lengths=(L,), candidates=5))
    assert abs(analytic - measured) / measured < 0.05, (analytic, measured)


def test_config_round_trip_validation_and_preset():
    cfg = DLRMConfig(d_model=16, interaction="dcn", top_mlp=[32, 8])
    assert DLRMConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="d_modle"):
        DLRMConfig.from_dict({"d_modle": 16})
    with pytest.raises(ValueError, match="interaction"):
        DLRMConfig(interaction="cat")
    with pytest.raises(ValueError, match="top_mlp"):
        DLRMConfig(top_mlp=[0])
    doc = yaml.safe_load((resources.files("climber") / "presets" / "dlrm-default.yaml").read_text())
    assert doc["model"] == "dlrm"
    assert DLRMConfig.from_dict(doc["model_config"]) == DLRMConfig()
