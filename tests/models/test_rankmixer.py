"""RankMixer: token mixing, per-token FFNs, ReLU-routed MoE with sparse inference equal to dense
computation, the L1 penalty on the gates, config validation and preset (the model contract:
test_contract.py)."""

from __future__ import annotations

import pytest
import torch
from helpers import INFO, close, make_batch

from climber.config import load_preset
from climber.data.sequences import Strategy
from climber.models.rankmixer import DenseFFN, RankMixer, RankMixerConfig, ReLUMoE, mix_tokens

TINY = dict(T=4, d_token=8, d_feature=6, n_layers=2, ffn_mult=2, max_len=6, recent_k=3)  # 8 x 6 = 48 -> 4 x 12
MOE = dict(moe_experts=3)


def build(seed=0, **kw) -> RankMixer:
    torch.manual_seed(seed)
    return RankMixer(RankMixerConfig(**{**TINY, **kw}), INFO)


@pytest.mark.parametrize("kw,match", [({"moe_experts": -1}, "moe_experts"), ({"dropout": -0.1}, "dropout"),
                                      ({"T": 0}, "T"), ({"T": 3, "d_token": 8}, "divisible")])
def test_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        RankMixerConfig(**kw)


def test_strategies_are_one_recency_history_of_max_len():
    cfg = RankMixerConfig.from_dict(load_preset("rankmixer-default")["model_config"])
    assert RankMixer(cfg, INFO).strategies() == [Strategy(name="history", kind="recency", length=cfg.max_len)]


def test_token_mixing_is_the_transpose_of_the_token_head_grid():
    torch.manual_seed(0)
    N, T, D = 2, 4, 12
    w = D // T
    x = torch.randn(N, T, D)
    out = mix_tokens(x)
    by_hand = torch.empty(N, T, D)
    for n in range(N):
        for t in range(T):
            for h in range(T):
                by_hand[n, h, t * w : (t + 1) * w] = x[n, t, h * w : (h + 1) * w]  # token t, head h -> token h, slot t
    assert torch.equal(out, by_hand)
    assert torch.equal(out.flatten(1).sort().values, x.flatten(1).sort().values)  # the same multiset per row
    assert torch.equal(mix_tokens(out), x)  # invertible: the transpose is its own inverse
    assert not torch.equal(out, x)


def test_every_token_has_its_own_ffn():
    torch.manual_seed(0)
    ffn = DenseFFN(T=3, D=4, H=8)
    s = torch.randn(5, 3, 4)
    base = ffn(s)
    with torch.no_grad():
        ffn.experts.w1[0] += 1.0  # token 0's weights only
    out = ffn(s)
    assert torch.equal(out[:, 1:], base[:, 1:])
    assert not close(out[:, 0], base[:, 0])
    for t in range(3):  # and each token's output is its own FFN of its own input
        assert close(out[:, t], ffn.experts.expert(s[:, t], t, 0))


def moe_with_some_gates_off(seed=0):
    torch.manual_seed(seed)
    moe = ReLUMoE(T=3, E=4, D=6, H=8)
    s = torch.randn(20, 3, 6)
    g = torch.relu(moe.router(s))
    assert (g == 0).any() and (g > 0).any()  # a meaningful mix of active and inactive experts
    return moe, s


def test_relu_routing_gives_exact_zeros_and_switched_off_experts_do_not_matter():
    moe, s = moe_with_some_gates_off()
    before = {mode: moe.train(mode)(s) for mode in (False, True)}  # sparse (eval) and dense (train)
    g = moe.gates
    assert g.min() == 0.0 and (g >= 0).all()  # ReLU: exact zeros, no softmax renormalisation
    off = g[:, 0, 1] == 0  # rows where expert 1 of token 0 is switched off
    assert off.any() and not off.all()
    with torch.no_grad():
        moe.experts.w2[0, 1] += 1.0
    for mode in (False, True):
        out, base = moe.train(mode)(s), before[mode]
        assert torch.equal(out[off, 0], base[off, 0])  # exactly unchanged where its gate is 0
        assert not close(out[~off, 0], base[~off, 0])
        assert close(out[:, 1:], base[:, 1:])


def test_sparse_inference_equals_dense_computation():
    moe, s = moe_with_some_gates_off()
    g = torch.relu(moe.router(s))
    assert close(moe.sparse(s, g), moe.dense(s, g), tol=1e-6)
    moe.eval()
    eval_out = moe(s)
    moe.train()
    assert close(eval_out, moe(s), tol=1e-6)
    # the whole model: eval (sparse) = train (dense) once dropout is off
    model = build(dropout=0.0, **MOE)
    batch = make_batch(B=3, lengths=(6,), C=4)
    dense = model.train()(batch)
    sparse = model.eval()(batch)
    assert close(sparse, dense, tol=1e-6)


def test_aux_loss_is_the_l1_penalty_on_the_gates():
    model = build(l1_weight=0.1, **MOE).train()
    batch = make_batch(B=3, lengths=(6,), C=4)
    model(batch)
    real = batch.cand_mask.flatten()
    gate_sum = sum(layer.ffn.gates.sum(dim=(1, 2)) for layer in model.layers)  # (N,)
    assert close(model.aux_loss(), 0.1 * gate_sum[real].mean())
    assert model.aux_loss() > 0
    model.aux_loss().backward()
    last = model.layers[-1].ffn
    assert last.router.weight.grad.abs().sum() > 0  # the penalty trains the routers
    assert last.experts.w1.grad is None  # not the experts of the last layer (earlier ones feed later gates)
    with pytest.raises(RuntimeError, match="forward"):
        build(**MOE).aux_loss()
    assert build().aux_loss() == 0  # dense PFFN: no penalty
