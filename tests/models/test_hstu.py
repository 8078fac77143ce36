"""HSTU: causal history states, one layer against a direct implementation of the paper's formulas, no
softmax, masked keys exactly zero, config validation and preset (the model contract: test_contract.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import INFO, check_history_states, close

from climber.config import load_preset
from climber.data.sequences import Strategy
from climber.models.hstu import HSTU, HSTUConfig
from climber.models.layers import history_candidate_mask, relative_position_bucket, time_bucket

MAX_LEN = 8
L = 6  # history width of the test batches: shorter than max_len, as a loader's batch may be


def build(seed=0, **kw) -> HSTU:
    """A tiny model whose relative biases (zero at initialisation) are randomised, so that they matter."""
    torch.manual_seed(seed)
    model = HSTU(HSTUConfig(**{"d_model": 16, "n_heads": 2, "n_layers": 2, "max_len": MAX_LEN, **kw}), INFO)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "rab" in name:
                p.copy_(torch.randn_like(p) * 0.5)
    return model


def test_history_states_are_causal_and_ignore_candidates():
    check_history_states(build(), L)


@pytest.mark.parametrize("key,value", [("n_heads", 3), ("max_len", 0), ("dropout", -0.1), ("pos_buckets", 1),
                                       ("time_buckets", 0)])
def test_config_validation(key, value):
    with pytest.raises(ValueError, match=key):
        HSTUConfig(**{key: value})


def test_strategies_are_one_recency_history_of_max_len():
    model = HSTU(HSTUConfig.from_dict(load_preset("hstu-default")["model_config"]), INFO)
    assert model.strategies() == [Strategy(name="history", kind="recency", length=model.cfg.max_len)]


def tiny_layer_input(seed=0):
    """One layer of a d = 8, 2-head model and an input over [history (4, one padding) ; candidates (2)]."""
    model = build(seed, n_layers=1, d_model=8, n_heads=2).eval()
    with torch.no_grad():  # non-trivial LayerNorm affine parameters, so that they are checked too
        for name, p in model.named_parameters():
            if "ln" in name:
                p.copy_(torch.randn_like(p))
    torch.manual_seed(seed)
    x = torch.randn(1, 6, 8)
    hist_mask = torch.tensor([[False, True, True, True]])
    mask = history_candidate_mask(hist_mask, torch.tensor([[True, True]]))  # (1, 6, 6)
    pos = torch.tensor([0, 1, 2, 3, 4, 4])  # candidates right after the most recent event
    ts = torch.tensor([[0, 100, 130, 1000, 5000, 5100]])
    return model.layers[0], x, mask, pos, ts


def test_one_layer_matches_the_formulas():
    """U, V, Q, K = split(SiLU(f1(LN(X)))); A = SiLU(Q K^T + rab^{p,t}) / max_len where allowed, else 0;
    X + f2(LN(A V) * U), written out element by element."""
    layer, x, mask, pos, ts = tiny_layer_input()
    d, H, dh, n = 8, 2, 4, MAX_LEN
    X = x[0]
    uvqk = F.silu(F.layer_norm(X, (d,), layer.ln_in.weight, layer.ln_in.bias) @ layer.f1.weight.T + layer.f1.bias)
    U, V, Q, K = uvqk[:, :d], uvqk[:, d : 2 * d], uvqk[:, 2 * d : 3 * d], uvqk[:, 3 * d :]
    AV = torch.zeros(6, d)
    for i in range(6):
        for h in range(H):
            sl = slice(h * dh, (h + 1) * dh)
            for j in range(6):
                if not mask[0, i, j]:
                    continue
                p_bucket = relative_position_bucket(pos[i] - pos[j], 32, MAX_LEN + 1)
                t_bucket = time_bucket(ts[0, i] - ts[0, j], 32)
                rab = layer.rab.pos_bias[p_bucket, h] + layer.rab.time_bias[t_bucket, h]
                AV[i, sl] += F.silu(Q[i, sl] @ K[j, sl] + rab) / n * V[j, sl]
    Y = (F.layer_norm(AV, (d,), layer.ln_av.weight, layer.ln_av.bias) * U) @ layer.f2.weight.T + layer.f2.bias
    assert close(layer(x, mask, pos, ts)[0], X + Y)


def test_attention_is_pointwise_not_softmax():
    layer, x, mask, pos, ts = tiny_layer_input()
    u, v, q, k = layer.project(x)
    A = layer.attention_weights(q, k, mask, pos, ts)  # (1, H, 6, 6)
    sums = A.sum(-1)
    assert (sums - 1).abs().min() > 1e-2  # no row is a distribution
    assert not close(sums[..., 3], sums[..., 4])  # nor a constant: rows aggregate, they do not average
    # softmax is invariant to a shift of a row's scores; HSTU is not: shift all scores by 1 through rab
    with torch.no_grad():
        layer.rab.pos_bias += 1.0
    shifted = layer.attention_weights(q, k, mask, pos, ts)
    assert (shifted - A)[mask[:, None].expand_as(A)].abs().min() > 1e-4
    # and doubling Q gives exactly SiLU(2 Q K^T + rab) / n, pointwise
    with torch.no_grad():
        layer.rab.pos_bias -= 1.0
    doubled = layer.attention_weights(2 * q, k, mask, pos, ts)
    scores = layer.heads(2 * q) @ layer.heads(k).transpose(-2, -1) + layer.rab(pos, ts)
    assert close(doubled, F.silu(scores) / MAX_LEN * mask[:, None])


def test_masked_keys_contribute_exactly_zero():
    layer, x, mask, pos, ts = tiny_layer_input()
    with torch.no_grad():
        layer.rab.pos_bias.fill_(1e4)  # huge scores everywhere
    u, v, q, k = layer.project(x)
    A = layer.attention_weights(q, k, mask, pos, ts)
    hidden = ~mask[:, None].expand_as(A)
    assert (A[hidden] == 0).all() and (A[~hidden] > 0).all()
    # changing what only hidden keys carry (the padding event, the last candidate) changes no other output
    base = layer(x, mask, pos, ts)
    y = x.clone()
    y[0, 0] += 100.0 * torch.randn(8)
    y[0, 5] += 100.0 * torch.randn(8)
    out = layer(y, mask, pos, ts)
    assert torch.equal(out[0, 1:5], base[0, 1:5])
