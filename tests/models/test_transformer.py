"""Transformer (SASRec-style): the model contract, causal history states, the two attention paths and a
hand check of one layer. The ``check_*`` functions are the contract checks of any one-history sequence
model over [history ; candidates]; tests/models/test_hstu.py reuses them."""

from __future__ import annotations

import dataclasses
import math
from importlib import resources

import pytest
import torch
import torch.nn.functional as F
import yaml
from test_climber import INFO, close, make_batch, pad_left, replace, select_cands, select_rows
from torch.utils.flop_counter import FlopCounterMode

from climber.data.batch import Subsequence
from climber.data.sequences import Strategy
from climber.models import SampleShape, build_model
from climber.models.transformer import Transformer, TransformerConfig

MAX_LEN = 8
L = 6  # history width of the test batches: shorter than max_len, as a loader's batch may be


def build(seed=0, **kw) -> Transformer:
    torch.manual_seed(seed)
    cfg = TransformerConfig(**{"d_model": 16, "n_heads": 2, "n_layers": 2, "max_len": MAX_LEN, **kw})
    return Transformer(cfg, INFO)


# ---------------------------------------------------------------- contract checks (shared with HSTU)


def with_empty_history(batch, row=0):
    """A copy of ``batch`` whose row ``row`` has no history event at all."""
    seqs = []
    for s in batch.seqs:
        s = Subsequence(*(getattr(s, f.name).clone() for f in dataclasses.fields(s)))
        for t in (s.item, s.action, s.scenario, s.ts, s.mask):
            t[row] = 0
        seqs.append(s)
    return replace(batch, seqs=seqs)


def check_shape_finite_and_gradients(model):
    batch = with_empty_history(make_batch(B=3, lengths=(L,), C=4))
    assert not batch.seqs[0].mask[0].any() and batch.cand_mask[0].any()
    logits = model.eval()(batch)
    assert logits.shape == (3, 4)
    assert torch.isfinite(logits).all()  # the empty-history row too
    logits = model.train()(batch)
    assert torch.isfinite(logits).all()
    logits[batch.cand_mask].sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name


def check_candidate_independence(model):
    model.eval()
    batch = make_batch(B=2, lengths=(L,), C=4, full=True)
    base = model(batch)
    j = 2
    item, scen, ts = batch.cand_item.clone(), batch.cand_scenario.clone(), batch.cand_ts.clone()
    item[:, j] = item[:, j] % INFO.num_items + 1
    scen[:, j] = scen[:, j] % INFO.num_scenarios + 1
    ts[:, j] += 12345
    changed = model(replace(batch, cand_item=item, cand_scenario=scen, cand_ts=ts))
    others = [i for i in range(4) if i != j]
    assert close(changed[:, others], base[:, others])
    assert not close(changed[:, j], base[:, j])  # the check can fail: candidate j itself did change

    batch = make_batch(B=3, lengths=(L,), C=4)
    base, real = model(batch), batch.cand_mask
    more = model(select_cands(batch, [0, 1, 2, 3, -1, -1, -1]))  # three more padding candidates
    assert close(more[:, :4][real], base[real])
    for c in range(4):
        alone = model(select_cands(batch, [c]))[:, 0]  # scored one at a time (C = 1)
        assert close(alone[real[:, c]], base[:, c][real[:, c]])


def check_rows_and_left_padding(model):
    model.eval()
    batch = make_batch(B=3, lengths=(L,), C=4)
    base = model(batch)
    assert close(model(select_rows(batch, [0]))[0], base[0])  # row 0 alone, padded to its own length
    assert close(model(pad_left(batch, 5)), base)  # wider than max_len, but only with padding
    # row 1 gets a new, full history of max_len events (so the others get more left padding)
    longer = pad_left(batch, MAX_LEN - L)
    s = longer.seqs[0]
    s.mask[1] = True
    s.item[1] = torch.randint(1, INFO.num_items + 1, (MAX_LEN,))
    s.action[1] = torch.randint(1, INFO.num_actions + 1, (MAX_LEN,))
    s.scenario[1] = torch.randint(1, INFO.num_scenarios + 1, (MAX_LEN,))
    s.ts[1] = batch.cand_ts[1, 0] - 10 * torch.arange(MAX_LEN, 0, -1)
    out = model(longer)
    assert close(out[[0, 2]], base[[0, 2]])
    real = batch.cand_mask[1]
    assert not close(out[1][real], base[1][real])


def check_history_states(model):
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


def check_flops(model, C=6):
    model.eval()
    batch = make_batch(B=1, lengths=(L,), C=C, full=True)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(batch)
    measured = counter.get_total_flops()
    analytic = model.flops(SampleShape(lengths=(L,), candidates=C))
    assert abs(analytic - measured) / measured < 0.05, (analytic, measured)


def check_config_and_preset(name, cfg_cls, bad: dict):
    cfg = cfg_cls(d_model=32, max_len=17)
    assert cfg_cls.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="d_modle"):
        cfg_cls.from_dict({"d_modle": 32})
    for key, value in bad.items():
        with pytest.raises(ValueError, match=key):
            cfg_cls(**{key: value})
    doc = yaml.safe_load((resources.files("climber") / "presets" / f"{name}-default.yaml").read_text())
    assert doc["model"] == name
    model = build_model(name, doc["model_config"], INFO)
    assert model.strategies() == [Strategy(name="history", kind="recency", length=model.cfg.max_len)]


def check_rejects_other_batches(model):
    two = make_batch(lengths=(L, L))
    with pytest.raises(ValueError, match="expects 1"):
        model(two)


# ---------------------------------------------------------------- the contract, for the Transformer


def test_shape_finite_and_gradients_reach_every_parameter():
    check_shape_finite_and_gradients(build(dropout=0.1))


def test_candidates_never_see_each_other_and_score_alone():
    check_candidate_independence(build())


def test_rows_are_independent_and_left_padding_changes_nothing():
    check_rows_and_left_padding(build())


def test_history_states_are_causal_and_ignore_candidates():
    check_history_states(build())


@pytest.mark.parametrize("kw", [dict(), dict(d_model=32, n_heads=4, n_layers=1, ffn_mult=2)])
def test_flops_match_flop_counter(kw):
    # the reference path: FlopCounterMode has no formula for SDPA's CPU flash kernel and would miss attention
    check_flops(build(attention="reference", **kw))


def test_config_round_trip_validation_and_preset():
    check_config_and_preset(
        "transformer", TransformerConfig,
        {"attention": "flash", "n_heads": 3, "max_len": 0, "dropout": 1.0, "n_layers": 0},
    )


def test_wrong_batches_are_rejected():
    model = build()
    check_rejects_other_batches(model)
    s = make_batch(lengths=(MAX_LEN + 1,), full=True)  # more real events than position embeddings
    with pytest.raises(ValueError, match="max_len"):
        model(s)


# ---------------------------------------------------------------- model-specific


def test_reference_and_sdpa_agree():
    ref, fast = build(attention="reference").eval(), build(attention="sdpa").eval()
    fast.load_state_dict(ref.state_dict())
    batch = make_batch(B=3, lengths=(L,), C=4)
    a, b = ref(batch), fast(batch)
    assert close(a, b)
    a[batch.cand_mask].sum().backward()
    b[batch.cand_mask].sum().backward()
    grads = dict(fast.named_parameters())
    for name, p in ref.named_parameters():
        assert close(p.grad, grads[name].grad), name


@pytest.mark.parametrize("attention", ["reference", "sdpa"])
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
