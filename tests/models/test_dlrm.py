"""DLRM: the dense features and the dot and DCN interactions against hand computations, config validation
and preset (the model contract: test_contract.py)."""

from __future__ import annotations

from importlib import resources

import pytest
import torch
import yaml
from helpers import INFO, close, make_batch, with_empty_history

from climber.data.sequences import Strategy
from climber.models.dlrm import DLRM, CrossLayer, DLRMConfig
from climber.models.features import dense_features

L = 6  # history length of the tiny batches


def build(seed=0, **kw) -> DLRM:
    torch.manual_seed(seed)
    model = DLRM(DLRMConfig(**{"d_model": 8, "max_len": L, "bottom_mlp": [4], "top_mlp": [16], **kw}), INFO)
    with torch.no_grad():  # larger embeddings than the 0.02 init, so that dot products matter in the checks
        for table in (model.emb.user, model.emb.item, model.emb.action, model.emb.scenario):
            table.weight[1:].normal_()
    return model


def test_strategies_are_one_recency_history():
    assert build().strategies() == [Strategy(name="history", kind="recency", length=L)]


def test_dense_features_by_hand():
    batch = make_batch(B=2, lengths=(4,), C=3, full=True)
    batch = with_empty_history(batch, row=1)
    seq = batch.seqs[0]
    dense = dense_features(seq, batch)  # (B, C, 2)
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


def test_config_validation_and_preset():
    with pytest.raises(ValueError, match="interaction"):
        DLRMConfig(interaction="cat")
    with pytest.raises(ValueError, match="top_mlp"):
        DLRMConfig(top_mlp=[0])
    doc = yaml.safe_load((resources.files("climber") / "presets" / "dlrm-default.yaml").read_text())
    # the preset: the config's defaults and the robustness suite's popularity terms (thirteenth round) with
    # their fitted start (fourteenth)
    assert DLRMConfig.from_dict(doc["model_config"]) == DLRMConfig(popularity_prior=True, popularity_count=True,
                                                                    popularity_fit=True)
