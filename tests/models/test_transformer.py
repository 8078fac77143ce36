"""Transformer (SASRec-style): causal history states, the two attention paths, a hand check of one layer,
positions limited to max_len, config validation and preset (the model contract: test_contract.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import INFO, check_history_states, close, make_batch

from climber.config import load_preset
from climber.data.sequences import Strategy
from climber.models.transformer import Transformer, TransformerConfig

MAX_LEN = 8
L = 6  # history width of the test batches: shorter than max_len, as a loader's batch may be


def build(seed=0, **kw) -> Transformer:
    torch.manual_seed(seed)
    cfg = TransformerConfig(**{"d_model": 16, "n_heads": 2, "n_layers": 2, "max_len": MAX_LEN, **kw})
    return Transformer(cfg, INFO)


def test_history_states_are_causal_and_ignore_candidates():
    check_history_states(build(), L)


@pytest.mark.parametrize("key,value", [("attention", "flash"), ("n_heads", 3), ("max_len", 0), ("dropout", 1.0),
                                       ("n_layers", 0)])
def test_config_validation(key, value):
    with pytest.raises(ValueError, match=key):
        TransformerConfig(**{key: value})


def test_strategies_are_one_recency_history_of_max_len():
    model = Transformer(TransformerConfig.from_dict(load_preset("transformer-default")["model_config"]), INFO)
    assert model.strategies() == [Strategy(name="history", kind="recency", length=model.cfg.max_len)]


def test_more_real_events_than_positions_are_rejected():
    with pytest.raises(ValueError, match="max_len"):
        build()(make_batch(lengths=(MAX_LEN + 1,), full=True))


@pytest.mark.parametrize("attention", ["reference", "dense"])
def test_one_layer_is_plain_softmax_attention(attention):
    """Tokens and one layer by hand: item + action + scenario + pos[k-th most recent] (candidates
    item + scenario + pos[0]), then x + W_o softmax(Q K^T / sqrt(dh)) V over the allowed keys, + FFN."""
    model = build(n_layers=1, d_model=8, n_heads=2, attention=attention).eval()
    with torch.no_grad():  # non-trivial LayerNorm affine parameters, so that they are checked too
        for name, p in model.named_parameters():
            if "ln" in name:
                p.copy_(torch.randn_like(p))
    batch = make_batch(B=1, lengths=(4,), C=2, full=True)
    s = batch.seqs[0]
    s.mask[0, 0] = False  # one padding event on the left
    for t in (s.item, s.action, s.scenario, s.ts):
        t[0, 0] = 0
    emb, layer, H, dh = model.emb, model.layers[0], 2, 4
    hist = [emb.item.weight[s.item[0, i]] + emb.action.weight[s.action[0, i]] + emb.scenario.weight[s.scenario[0, i]]
            + model.pos_emb.weight[4 - i] for i in range(4)]
    cand = [emb.item.weight[batch.cand_item[0, c]] + emb.scenario.weight[batch.cand_scenario[0, c]]
            + model.pos_emb.weight[0] for c in range(2)]
    x = torch.stack(hist + cand)  # (6, 8)
    keys = {1: [1], 2: [1, 2], 3: [1, 2, 3], 4: [1, 2, 3, 4], 5: [1, 2, 3, 5]}  # real queries -> allowed keys

    def ln(t, m):
        return F.layer_norm(t, (8,), m.weight, m.bias)

    q, k, v = (ln(x, layer.ln1) @ layer.attn.qkv.weight.T + layer.attn.qkv.bias).split(8, dim=-1)
    y = torch.zeros(6, 8)
    for i, allowed in keys.items():
        for h in range(H):
            sl = slice(h * dh, (h + 1) * dh)
            w = torch.softmax(torch.stack([q[i, sl] @ k[j, sl] / math.sqrt(dh) for j in allowed]), dim=0)
            y[i, sl] = sum(wj * v[j, sl] for wj, j in zip(w, allowed))
    x1 = x + y @ layer.attn.proj.weight.T + layer.attn.proj.bias
    x2 = x1 + layer.ffn(ln(x1, layer.ln2))
    expected = ln(x2, model.ln_f)
    got = model.hidden_states(batch)[0]
    real = list(keys)
    assert close(got[real], expected[real])
