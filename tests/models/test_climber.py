"""Climber: shapes, gradients, candidate independence, causality, attention paths, ablations, FLOPs, presets."""

from __future__ import annotations

import dataclasses
import itertools
import math
from importlib import resources

import pytest
import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

from climber.data.batch import Batch, Subsequence
from climber.data.sequences import Strategy
from climber.models import DataInfo, SampleShape
from climber.models.climber import Climber, ClimberConfig
from climber.models.layers import attend, history_candidate_mask, relative_position_bucket, time_bucket

INFO = DataInfo(num_users=20, num_items=50, actions=("click", "like", "skip"), scenarios=("home", "search", "radio"))
STRATS = [{"name": "recent", "kind": "recency", "length": 5}, {"name": "pos", "kind": "positive", "length": 8}]


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
        return torch.cat([torch.zeros(t.shape[0], extra, dtype=t.dtype), t], dim=1)

    seqs = [Subsequence(*(pad(getattr(s, f.name)) for f in dataclasses.fields(s))) for s in batch.seqs]
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


def select_rows(batch: Batch, rows) -> Batch:
    moved = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
    moved = {k: v[rows] for k, v in moved.items() if torch.is_tensor(v)}
    seqs = [Subsequence(*(getattr(s, f.name)[rows] for f in dataclasses.fields(s))) for s in batch.seqs]
    return Batch(seqs=seqs, **moved)


def build(seed=0, **kw) -> Climber:
    """A tiny model whose relative biases and temperatures are randomised, so that they matter."""
    torch.manual_seed(seed)
    cfg = ClimberConfig(**{"d_model": 16, "n_heads": 2, "n_layers": 2, "strategies": STRATS, **kw})
    model = Climber(cfg, INFO)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "rel_bias" in name or "temperature" in name:
                p.copy_(torch.randn_like(p) * 0.5)
    return model


def close(a, b, tol=1e-5):
    return torch.allclose(a, b, atol=tol, rtol=tol)


FLAGS = list(itertools.product([True, False], repeat=3))


@pytest.mark.parametrize("use_atl,use_bgf,use_mse", FLAGS)
def test_shape_finite_and_gradients_reach_every_parameter(use_atl, use_bgf, use_mse):
    model = build(use_atl=use_atl, use_bgf=use_bgf, use_mse=use_mse, user_embedding=not use_mse,
                  item_bias=use_bgf).train()
    lengths = [s.length for s in model.strategies()]
    batch = make_batch(lengths=lengths, C=4)
    logits = model(batch)
    assert logits.shape == (3, 4)
    assert torch.isfinite(logits).all()
    logits[batch.cand_mask].sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        if name == "fusion_temperature.raw" and not use_mse:
            continue  # BGF over a single block token: a softmax over one key cannot depend on tau
        assert p.grad.abs().sum() > 0, name


def test_action_heads_are_trained_but_the_candidate_action_is_never_an_input():
    from climber.train.loop import training_loss

    model = build(action_heads=True).eval()
    batch = make_batch(C=4)
    out = model.forward_tasks(batch)
    assert out["action"].shape == (3, 4, INFO.num_actions)
    other = replace(batch, cand_action=(batch.cand_action % INFO.num_actions + 1) * batch.cand_mask)
    assert torch.equal(model(other), model(batch))  # the target does not leak into the scores
    assert training_loss(model, other, 0.5) != training_loss(model, batch, 0.5)  # but it is a target
    assert training_loss(model, other, 0.0) == training_loss(model, batch, 0.0)
    assert not any("action_out" in n for n, _ in build().named_parameters())


def test_candidates_never_see_each_other():
    model = build().eval()
    batch = make_batch(B=2, C=4, full=True)
    base = model(batch)
    j = 2
    item, scen, ts = batch.cand_item.clone(), batch.cand_scenario.clone(), batch.cand_ts.clone()
    item[:, j] = item[:, j] % INFO.num_items + 1
    scen[:, j] = scen[:, j] % INFO.num_scenarios + 1
    ts[:, j] += 12345
    changed = model(replace(batch, cand_item=item, cand_scenario=scen, cand_ts=ts))
    others = [i for i in range(4) if i != j]
    assert close(changed[:, others], base[:, others])
    assert not close(changed[:, j], base[:, j])  # the test can fail: candidate j itself did change


def test_padding_candidates_and_one_at_a_time():
    model = build().eval()
    batch = make_batch(B=3, C=4)
    base = model(batch)
    real = batch.cand_mask
    more = model(select_cands(batch, [0, 1, 2, 3, -1, -1, -1]))  # three more padding candidates
    assert close(more[:, :4][real], base[real])
    n_max = int(real.sum(1).max())
    fewer = model(select_cands(batch, list(range(n_max))))  # drop all-padding columns
    assert close(fewer[real[:, :n_max]], base[real[:, :n_max]])
    for c in range(4):
        alone = model(select_cands(batch, [c]))[:, 0]  # C = 1
        assert close(alone[real[:, c]], base[:, c][real[:, c]])


def test_rows_are_independent_and_left_padding_changes_nothing():
    model = build().eval()
    batch = make_batch(B=3, C=4)
    base = model(batch)
    alone = model(select_rows(batch, [0]))  # row 0 padded to its own lengths, not the batch's
    assert close(alone[0], base[0])
    # change every history event of row 1 (and make it longer, so row 0 gets more left padding)
    longer = pad_left(batch, 3)
    for s in longer.seqs:
        s.mask[1] = True
        s.item[1] = torch.randint(1, INFO.num_items + 1, s.item[1].shape)
        s.action[1] = torch.randint(1, INFO.num_actions + 1, s.action[1].shape)
        s.scenario[1] = torch.randint(1, INFO.num_scenarios + 1, s.scenario[1].shape)
        s.ts[1] = batch.cand_ts[1, 0] - 10 * torch.arange(s.ts.shape[1], 0, -1)
    out = model(longer)
    assert close(out[[0, 2]], base[[0, 2]])
    assert not close(out[1][batch.cand_mask[1]], base[1][batch.cand_mask[1]])
    assert close(model(pad_left(batch, 5)), base)


def test_history_states_are_causal_and_ignore_candidates():
    model = build().eval()
    batch = make_batch(B=2, C=3, full=True)
    states = model.block_states(batch)
    flipped = replace(batch, cand_item=batch.cand_item.flip(1), cand_scenario=batch.cand_scenario.flip(1))
    other = model.block_states(flipped)
    for s, o, seq in zip(states, other, batch.seqs):
        L = seq.item.shape[1]
        assert close(s[:, :L], o[:, :L])  # the KV-cacheable part
        assert not close(s[:, L:], o[:, L:])
    # changing the last event changes no earlier history state
    seqs = [dataclasses.replace(s, item=s.item.clone()) for s in batch.seqs]
    for s in seqs:
        s.item[:, -1] = s.item[:, -1] % INFO.num_items + 1
    changed = model.block_states(replace(batch, seqs=seqs))
    for s, o, seq in zip(states, changed, batch.seqs):
        L = seq.item.shape[1]
        assert close(s[:, : L - 1], o[:, : L - 1])
        assert not close(s[:, L - 1 :], o[:, L - 1 :])


@pytest.mark.parametrize("use_atl", [True, False])
def test_reference_and_sdpa_agree(use_atl):
    ref = build(attention="reference", use_atl=use_atl).eval()
    fast = build(attention="sdpa", use_atl=use_atl).eval()
    fast.load_state_dict(ref.state_dict())
    batch = make_batch(B=3, C=4)
    a, b = ref(batch), fast(batch)
    assert close(a, b)
    a[batch.cand_mask].sum().backward()
    b[batch.cand_mask].sum().backward()
    grads = dict(fast.named_parameters())
    for name, p in ref.named_parameters():
        assert close(p.grad, grads[name].grad), name


def test_ablation_flags_add_and_remove_parameters():
    def names(**kw):
        return {n for n, _ in build(**kw).named_parameters()}

    full = names()
    assert {"blocks.0.rel_bias.pos_bias", "blocks.1.rel_bias.time_bias", "blocks.1.temperature.raw"} <= full
    assert {"fusion_temperature.raw", "se.0.weight", "fusion.attn.qkv.weight"} <= full
    assert "user_emb.weight" not in full and "user_emb.weight" in names(user_embedding=True)
    no_atl = names(use_atl=False)
    assert not [n for n in no_atl if "rel_bias" in n or "temperature" in n]
    assert "fusion.attn.qkv.weight" in no_atl
    no_bgf = names(use_bgf=False)
    assert not [n for n in no_bgf if n.startswith(("fusion", "se."))]
    assert "blocks.1.temperature.raw" in no_bgf
    assert not [n for n in names(use_mse=False) if n.startswith("blocks.1.")]


def test_no_mse_is_one_block_over_the_longest_recent_history():
    model = build(use_mse=False).eval()
    assert model.strategies() == [Strategy(name="full", kind="recency", length=8)]
    assert len(model.blocks) == 1
    assert model(make_batch(lengths=(8,))).shape == (3, 4)
    with pytest.raises(ValueError, match="expects 1"):
        model(make_batch(lengths=(5, 8)))
    assert [s.name for s in build().strategies()] == ["recent", "pos"]


@pytest.mark.parametrize("impl", ["reference", "sdpa"])
def test_attend_matches_hand_computation(impl):
    torch.manual_seed(0)
    B, H, N, dh = 2, 2, 3, 4
    q, k, v = torch.randn(3, B, H, N, dh).unbind(0)
    mask = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 1, 1]], dtype=torch.bool).expand(B, N, N)
    bias = torch.randn(B, H, N, N)
    tau = torch.rand(B, N) + 0.5
    plain = torch.empty(B, H, N, dh)
    adaptive = torch.empty(B, H, N, dh)
    for b, h, i in itertools.product(range(B), range(H), range(N)):
        keys = [j for j in range(N) if mask[b, i, j]]
        s = torch.stack([q[b, h, i] @ k[b, h, j] / math.sqrt(dh) for j in keys])
        plain[b, h, i] = sum(w * v[b, h, j] for w, j in zip(torch.softmax(s, 0), keys))
        r = (s + bias[b, h, i, keys]) / tau[b, i]
        adaptive[b, h, i] = sum(w * v[b, h, j] for w, j in zip(torch.softmax(r, 0), keys))
    assert close(attend(q, k, v, mask, impl=impl), plain)
    assert close(attend(q, k, v, mask, bias, tau, impl=impl), adaptive)
    full = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(dh), -1) @ v
    assert close(attend(q, k, v, impl=impl), full)


def test_mask_builder_single_user_multiple_items():
    hist = torch.tensor([[False, True, True]])  # one padding event on the left
    cand = torch.tensor([[True, False]])  # one padding candidate on the right
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0],  # padding history event: itself only
            [0, 1, 0, 0, 0],
            [0, 1, 1, 0, 0],  # history: causal over real events
            [0, 1, 1, 1, 0],  # candidate: whole real history + itself
            [0, 1, 1, 0, 1],  # padding candidate: same, harmless, never empty
        ],
        dtype=torch.bool,
    )
    assert torch.equal(history_candidate_mask(hist, cand)[0], expected)


def test_bucket_functions():
    dt = torch.tensor([-5, 0, 1, 2, 3, 4, 7, 8, 10**12])
    assert time_bucket(dt, 32).tolist() == [0, 0, 1, 2, 2, 3, 3, 4, 31]
    rel = torch.arange(0, 300)
    b = relative_position_bucket(rel, 32, 256)
    assert b[:16].tolist() == list(range(16))  # exact for small distances
    assert (b.diff() >= 0).all() and b.max() == 31 and b[-1] == 31
    assert relative_position_bucket(torch.tensor([-3]), 32, 256).item() == 0


def test_temperature_changes_only_its_scenario():
    model = build().eval()
    batch = make_batch(B=3, C=4, full=True, hist_scenarios=(1, 2))  # scenario 3 only on candidates
    batch = replace(batch, cand_scenario=torch.tensor([[3, 1, 2, 3], [1, 3, 2, 1], [2, 2, 3, 1]]))
    base = model(batch)
    with torch.no_grad():
        model.blocks[1].temperature.raw[3] += 2.0
    out = model(batch)
    is3 = batch.cand_scenario == 3
    assert close(out[~is3], base[~is3])
    assert (out[is3] - base[is3]).abs().min() > 1e-6


@pytest.mark.parametrize("kw", [dict(), dict(use_atl=False, use_bgf=False, n_layers=1, d_model=32)])
def test_flops_match_flop_counter(kw):
    # the reference path: FlopCounterMode has no formula for SDPA's CPU flash kernel and would miss attention
    model = build(attention="reference", **kw).eval()
    batch = make_batch(B=1, lengths=(5, 8), C=6, full=True)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(batch)
    measured = counter.get_total_flops()
    analytic = model.flops(SampleShape(lengths=(5, 8), candidates=6))
    assert abs(analytic - measured) / measured < 0.05, (analytic, measured)


def test_config_dict_round_trip_and_unknown_keys():
    cfg = ClimberConfig(d_model=32, strategies=STRATS)
    again = ClimberConfig.from_dict(cfg.to_dict())
    assert again == cfg
    with pytest.raises(ValueError, match="d_modle"):
        ClimberConfig.from_dict({"d_modle": 32})
    with pytest.raises(ValueError, match="attention"):
        ClimberConfig(attention="flash")


def test_presets_parse_and_grow():
    sizes = []
    for name in ("tiny", "small", "base", "large"):
        doc = yaml.safe_load((resources.files("climber") / "presets" / f"climber-{name}.yaml").read_text())
        assert doc["model"] == "climber"
        cfg = ClimberConfig.from_dict(doc["model_config"])
        sizes.append((cfg.d_model, cfg.n_layers, max(s["length"] for s in cfg.strategies)))
    assert sizes == sorted(sizes) and len(set(sizes)) == 4
    assert sizes[1] == (64, 2, 256)
