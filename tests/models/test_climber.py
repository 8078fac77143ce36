"""Climber: action heads, causal history states, the two attention paths, ablations, attention and mask
builder by hand, buckets, temperature, config validation, presets (the model contract: test_contract.py)."""

from __future__ import annotations

import dataclasses
import itertools
import math
from importlib import resources

import pytest
import torch
import yaml
from helpers import INFO, close, make_batch, replace

from climber.data.sequences import Strategy
from climber.models.climber import Climber, ClimberConfig
from climber.models.layers import RelativeBias, attend, history_candidate_mask, relative_position_bucket, time_bucket

STRATS = [{"name": "recent", "kind": "recency", "length": 5}, {"name": "pos", "kind": "positive", "length": 8}]


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


@pytest.mark.parametrize("bgf", [True, False])
def test_the_dot_head_adds_the_product_of_the_projected_state_and_the_item_vector(bgf):
    """dot_head: logits = the head's logits + <W Y, item vector>; everything else is the model without it."""
    model = build(dot_head=True, use_bgf=bgf).eval()
    plain = build(use_bgf=bgf).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("dot_proj")})
    batch = make_batch(C=4)
    states = torch.stack(model.block_states(batch), dim=2)  # (B, C, Nb, d)
    captured = {}
    model.dot_proj.register_forward_hook(lambda m, args, out: captured.update(y=args[0], wy=out))
    logits = model(batch)
    expected = plain(batch) + (captured["wy"] * model.emb.candidate_item(batch)).sum(-1)
    assert close(logits, expected)
    assert captured["y"].shape[-1] == (states.shape[2] * states.shape[3] if bgf else states.shape[3])
    with torch.no_grad():
        model.dot_proj.weight.normal_()
    assert not close(model(batch), plain(batch))  # the term is in the logits


@pytest.mark.parametrize("attention", ["structured", "dense"])
def test_context_features_add_the_history_length_and_gap_per_block(attention):
    """context_features: block k's candidate states + W_k [log1p(its history length), log1p(gap to its
    most recent event) / 10]; without ATL's time bias, a candidate's ts then reaches its score and no other's."""
    model = build(context_features=True, use_atl=False, attention=attention).eval()
    plain = build(use_atl=False, attention=attention).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("context")})
    batch = make_batch(C=4)
    for b, (got, want, seq) in enumerate(zip(model.block_states(batch), plain.block_states(batch), batch.seqs)):
        count = seq.mask.sum(1, keepdim=True).float()  # (B, 1)
        last = torch.where(seq.mask, seq.ts, 0).max(1, keepdim=True).values  # (B, 1)
        gap = torch.where(count > 0, (batch.cand_ts - last).clamp(min=0), 0).float()  # (B, C)
        dense = torch.stack([torch.log1p(count).expand_as(gap), torch.log1p(gap) / 10], dim=-1)  # (B, C, 2)
        assert close(got - want, model.context[b](dense))
    later = replace(batch, cand_ts=batch.cand_ts + torch.tensor([1000, 0, 0, 0]))
    assert torch.equal(plain(later), plain(batch))  # no time bias: ts does not reach the plain model
    moved = (model(later) != model(batch))
    assert moved[:, 0][batch.cand_mask[:, 0]].all() and not moved[:, 1:].any()


@pytest.mark.parametrize("attention", ["structured", "dense"])
def test_history_keys_are_causal_and_candidate_states_ignore_other_candidates(attention):
    """The KV-cacheable part: every layer's K / V of history event i depend on events <= i only (encode
    never sees a candidate); a candidate's state does not change when the other candidates do."""
    model = build(attention=attention).eval()
    batch = make_batch(B=2, C=3, full=True)
    seqs = [dataclasses.replace(s, item=s.item.clone()) for s in batch.seqs]
    for s in seqs:
        s.item[:, -1] = s.item[:, -1] % INFO.num_items + 1
    for b, (seq, other) in enumerate(zip(batch.seqs, seqs)):
        kv, kv_other = (model.encode(b, model.history_tokens(b, s), model.keys(s.ts, s.item, s.mask), s.scenario)
                        for s in (seq, other))
        for (k, v), (k2, v2) in zip(kv, kv_other):
            assert close(k[:, :, :-1], k2[:, :, :-1]) and close(v[:, :, :-1], v2[:, :, :-1])
            assert not close(k[:, :, -1], k2[:, :, -1])
    states = model.block_states(batch)
    flipped = model.block_states(replace(batch, cand_item=batch.cand_item.flip(1),
                                         cand_scenario=batch.cand_scenario.flip(1)))
    for s, o in zip(states, flipped):
        assert close(s[:, 1], o[:, 1]) and not close(s[:, 0], o[:, 0])  # the middle candidate stays


def test_ablation_flags_add_and_remove_parameters():
    def names(**kw):
        return {n for n, _ in build(**kw).named_parameters()}

    full = names()
    assert {"blocks.0.rel_bias.pos_bias", "blocks.1.rel_bias.time_bias", "blocks.1.temperature.raw"} <= full
    assert {"fusion_temperature.raw", "se.0.weight", "fusion.attn.qkv.weight"} <= full
    assert "emb.user.weight" not in full and "emb.user.weight" in names(user_embedding=True)
    no_atl = names(use_atl=False)
    assert not [n for n in no_atl if "rel_bias" in n or "temperature" in n]
    assert "fusion.attn.qkv.weight" in no_atl
    no_temperature = names(use_temperature=False)  # the -temperature ablation keeps the bias ...
    assert not [n for n in no_temperature if "temperature" in n] and "blocks.1.rel_bias.time_bias" in no_temperature
    no_bias = names(use_relative_bias=False)  # ... and -bias keeps the temperatures, BGF's included
    assert not [n for n in no_bias if "rel_bias" in n] and {"blocks.1.temperature.raw", "fusion_temperature.raw"} <= no_bias
    no_bgf = names(use_bgf=False)
    assert not [n for n in no_bgf if n.startswith(("fusion", "se."))]
    assert "blocks.1.temperature.raw" in no_bgf
    assert not [n for n in names(use_mse=False) if n.startswith("blocks.1.")]


def test_no_mse_is_one_block_over_the_longest_recent_history():
    model = build(use_mse=False).eval()
    assert model.strategies() == [Strategy(name="full", kind="recency", length=8)]
    assert len(model.blocks) == 1
    assert model(make_batch(lengths=(8,))).shape == (3, 4)
    assert [s.name for s in build().strategies()] == ["recent", "pos"]


@pytest.mark.parametrize("impl", ["reference", "dense"])
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
    # against an independent computation: 1 + floor(log2 dt) from float64's exponent, around every power of 2
    powers = 2 ** torch.arange(45)
    gaps = torch.cat([powers - 1, powers, powers + 1, torch.randint(0, 2**45, (1000,))])
    assert torch.equal(time_bucket(gaps, 40), torch.frexp(gaps.double()).exponent.long().clamp(max=39))
    # the lookup table of RelativeBias: the same buckets, beyond max_distance too
    assert torch.equal(RelativeBias(2, 32, 8, 256).position_buckets(rel - 5), relative_position_bucket(rel - 5, 32, 256))


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


def test_config_validation():
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


@pytest.mark.parametrize("impl", ["reference", "dense"])
def test_the_attention_sink_makes_attention_count_aware(impl):
    """Without a sink, a query over n copies of one key/value returns that value whatever n; with a sink
    (key 0 of every query) the output is shrunk towards the sink's value, less so the more copies:
    (e^z0 v0 + n e^z v) / (e^z0 + n e^z), checked against that formula."""
    from climber.models.layers import Attention

    torch.manual_seed(0)
    for sink in (False, True):
        att = Attention(8, 2, 0.0, impl, sink=sink).eval()
        if sink:
            with torch.no_grad():
                att.sink.normal_()
        x = torch.randn(1, 1, 8)
        outs = []
        for n in (1, 4, 16):
            tokens = torch.cat([x.expand(1, n, 8), torch.randn(1, 1, 8)], dim=1)  # n copies, then the query
            mask = torch.zeros(1, 1, n + 1, dtype=torch.bool)
            mask[..., :n] = True  # the query sees the n copies only (and the sink)
            outs.append(att(tokens, mask=mask.expand(1, n + 1, n + 1))[:, -1])
        if not sink:
            assert close(outs[0], outs[1]) and close(outs[1], outs[2])
            continue
        assert not close(outs[0], outs[2])
        # the formula, per head: q of the query token, k, v of the copies
        q, k, v = att.qkv(tokens).view(1, n + 1, 3, 2, 4).permute(2, 0, 3, 1, 4)
        z, z0 = (q[..., -1, :] * k[..., 0, :]).sum(-1) / 2, (q[..., -1, :] * att.sink[0, :, 0]).sum(-1) / 2
        w0 = torch.exp(z0) / (torch.exp(z0) + n * torch.exp(z))
        y = w0[..., None] * att.sink[1, :, 0] + (1 - w0)[..., None] * v[..., 0, :]  # (1, H, dh)
        assert close(outs[2], att.proj(y.reshape(1, 8)))


def test_the_match_bias_adds_its_weight_where_query_and_key_items_share_a_side_value():
    """RelativeBias with two side features: the bias is the position / time bias plus, per feature, its
    per-head weight where query and key hold the same known value (0 = unknown never matches), written
    out with loops; a Climber built with match_bias on data with a side feature gets the term."""
    from climber.models.layers import RelativeBias

    torch.manual_seed(0)
    rb = RelativeBias(n_heads=2, pos_buckets=8, time_buckets=8, max_distance=16, match_features=2)
    with torch.no_grad():
        rb.match_bias.normal_()
    plain = RelativeBias(n_heads=2, pos_buckets=8, time_buckets=8, max_distance=16)
    plain.load_state_dict({k: v for k, v in rb.state_dict().items() if k != "match_bias"})
    B, N, first = 2, 7, 3
    pos, ts = torch.arange(N), torch.randint(0, 10**5, (B, N)).sort(dim=1).values
    side = torch.randint(0, 3, (B, N, 2))
    got = rb.pairs(pos[first:], ts[:, first:], pos, ts, side[:, first:], side)  # (B, H, N - first, N)
    base = plain.pairs(pos[first:], ts[:, first:], pos, ts)
    assert close(rb(pos, ts, side)[:, :, first:], got)
    assert close(rb.on_itself(side[:, first:]), torch.diagonal(got[..., first:], dim1=-2, dim2=-1))
    want = base.clone()
    for b, i, j, f in itertools.product(range(B), range(first, N), range(N), range(2)):
        if side[b, i, f] == side[b, j, f] != 0:
            want[b, :, i - first, j] += rb.match_bias[f]
    assert close(got, want) and not close(got, base)

    with_side = dataclasses.replace(INFO, item_features=(("item_topic", 3),))
    cfg = ClimberConfig(d_model=16, n_heads=2, strategies=[{"name": "recent", "kind": "recency", "length": 5}])
    assert Climber(dataclasses.replace(cfg, match_bias=True), with_side).blocks[0].rel_bias.match_bias.shape == (1, 2)
    assert Climber(cfg, with_side).blocks[0].rel_bias.match_bias is None


def test_the_match_mask_keeps_only_keys_that_share_every_known_side_value_and_the_diagonal():
    """same_side_mask against loops: key j is kept for query i when every side value of i is known and
    equal to j's, or j is i; a Climber block with match_mask never lets a candidate see an event of
    another topic (changing such an event leaves the candidate's state as it was)."""
    from climber.models.layers import same_side_mask

    torch.manual_seed(0)
    B, N, F = 2, 9, 2
    side = torch.randint(0, 3, (B, N, F))
    got = same_side_mask(side)
    for b, i, j in itertools.product(range(B), range(N), range(N)):
        keep = i == j or all(side[b, i, f] == side[b, j, f] != 0 for f in range(F))
        assert got[b, i, j].item() == keep

    with_side = dataclasses.replace(INFO, item_features=(("item_topic", 2),))
    cfg = ClimberConfig(d_model=16, n_heads=2, strategies=[{"name": "recent", "kind": "recency", "length": 5}],
                        match_mask=True)
    model = Climber(cfg, with_side).eval()
    model.emb.item.feature_ids[1:, 0] = torch.arange(INFO.num_items) % 2 + 1  # odd items topic 1, even topic 2
    batch = make_batch(B=1, lengths=(5,), C=2, full=True)
    batch.cand_item[0] = torch.tensor([1, 2])  # one candidate of each topic
    batch.seqs[0].item[0] = torch.tensor([3, 4, 6, 7, 9])  # events of both topics
    other = batch.seqs[0].item[0] % 2 == 0  # events of topic 2
    changed = replace(batch, seqs=[dataclasses.replace(batch.seqs[0], action=torch.where(
        other[None], batch.seqs[0].action % INFO.num_actions + 1, batch.seqs[0].action))])
    with torch.no_grad():
        before, after = model.block_states(batch)[0][0, -2:], model.block_states(changed)[0][0, -2:]
    assert close(before[0], after[0]) and not close(before[1], after[1])
