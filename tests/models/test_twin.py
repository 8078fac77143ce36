"""TWIN: the GSU's top-k against a sort of the shared score, k >= L equals full target attention,
non-selected events do not matter, config validation and preset (the model contract: test_contract.py)."""

from __future__ import annotations

import dataclasses
import math
from importlib import resources

import pytest
import torch
import yaml
from helpers import INFO, close, make_batch, replace

from climber.data.sequences import Strategy
from climber.models.twin import TWIN, TWINConfig

L = 12  # history length of the tiny batches
K = 4  # top-k of the tiny models (< L, so that the GSU has to choose)


def build(seed=0, **kw) -> TWIN:
    """A tiny model with larger embeddings and score biases than the init, so that attention is peaked."""
    torch.manual_seed(seed)
    model = TWIN(TWINConfig(**{"d_model": 8, "n_heads": 2, "max_len": L, "top_k": K, "mlp_hidden": [16], **kw}), INFO)
    with torch.no_grad():
        for table in (model.emb.user, model.emb.item, model.emb.action, model.emb.scenario, model.action_bias):
            table.weight[1:].normal_()
    return model.eval()


def shared_score(model: TWIN, batch) -> torch.Tensor:
    """Mean over heads of the target-attention logits, computed head by head: (B, C, L)."""
    seq, E, H = batch.seqs[0], model.emb, model.cfg.n_heads
    q = model.query(E.item(batch.cand_item) + E.scenario(batch.cand_scenario)).unflatten(-1, (H, -1))
    k = model.key(E.item(seq.item) + E.scenario(seq.scenario)).unflatten(-1, (H, -1))
    logits = torch.einsum("bchd,blhd->bchl", q, k) / math.sqrt(q.shape[-1])
    logits = logits + model.action_bias(seq.action).transpose(1, 2)[:, None]  # (B, C, H, L)
    return logits.mean(dim=2)


def full_target_attention(model: TWIN, batch) -> torch.Tensor:
    """Logits (B, C) of multi-head target attention over every real history event (no search stage)."""
    seq, E, H = batch.seqs[0], model.emb, model.cfg.n_heads
    c = E.item(batch.cand_item) + E.scenario(batch.cand_scenario)
    inherent = E.item(seq.item) + E.scenario(seq.scenario)
    q = model.query(c).unflatten(-1, (H, -1))
    k = model.key(inherent).unflatten(-1, (H, -1))
    v = model.value(inherent + E.action(seq.action)).unflatten(-1, (H, -1))
    logits = torch.einsum("bchd,blhd->bchl", q, k) / math.sqrt(q.shape[-1])
    logits = logits + model.action_bias(seq.action).transpose(1, 2)[:, None]
    att = logits.masked_fill(~seq.mask[:, None, None], float("-inf")).softmax(dim=-1)
    y = model.out(torch.einsum("bchl,blhd->bchd", att, v).flatten(2))
    user = E.user(batch.user)[:, None].expand_as(c)
    return model.head(torch.cat([y, c, user], dim=-1)).squeeze(-1)


def test_strategies_are_one_long_recency_history():
    assert TWIN(TWINConfig(), INFO).strategies() == [Strategy(name="history", kind="recency", length=512)]


def test_gsu_picks_the_top_k_of_the_shared_score():
    model = build()
    batch = make_batch(B=4, lengths=(L,), C=3, seed=1)  # random lengths: some rows have fewer than K events
    q, k, bias, _, mask = model.project(batch)
    index, valid = model.gsu(q, k, bias, mask)
    score = shared_score(model, batch)
    assert (mask.sum(1) < K).any() and (mask.sum(1) > K).any()
    for b in range(4):
        real = mask[b].nonzero().squeeze(1)
        for c in range(3):
            order = real[score[b, c, real].argsort(descending=True)]
            expected = set(order[:K].tolist())  # all real events when there are fewer than K
            assert set(index[b, c][valid[b, c]].tolist()) == expected
            assert int(valid[b, c].sum()) == min(K, len(real))


def test_k_at_least_the_history_length_is_full_target_attention():
    for top_k in (L, 50):
        model = build(top_k=top_k)
        batch = make_batch(B=3, lengths=(L,), C=4)
        assert close(model(batch), full_target_attention(model, batch))
    small = build(top_k=2)  # the check can fail: with a real search the two differ
    full = make_batch(B=3, lengths=(L,), C=4, full=True)
    assert not close(small(full), full_target_attention(small, full))


def test_non_selected_events_do_not_change_the_logit():
    model = build()
    batch = make_batch(B=2, lengths=(L,), C=3, full=True, seed=2)
    q, k, bias, v, mask = model.project(batch)
    index, valid = model.gsu(q, k, bias, mask)
    selected = torch.zeros_like(mask)
    for b in range(2):
        selected[b, index[b][valid[b]]] = True  # picked for at least one candidate
    # move every other event to the action with the lowest score bias: its score cannot rise, so it stays
    # out of every top-k, while its value (item + action + scenario) changes
    lowest = int(model.action_bias.weight[1:].mean(-1).argmin()) + 1
    seq = batch.seqs[0]
    action = torch.where(selected, seq.action, torch.full_like(seq.action, lowest))
    assert (action != seq.action).any()
    moved = replace(batch, seqs=[dataclasses.replace(seq, action=action)])
    assert close(model(moved), model(batch))
    q2, k2, bias2, _, mask2 = model.project(moved)
    assert torch.equal(model.gsu(q2, k2, bias2, mask2)[0].sort(-1).values, index.sort(-1).values)
    # while changing the action of an event selected for candidate 0 of row 0 changes that candidate's logit
    j = int(index[0, 0, 0])
    action = seq.action.clone()
    action[0, j] = action[0, j] % INFO.num_actions + 1
    changed = model(replace(batch, seqs=[dataclasses.replace(seq, action=action)]))
    assert not close(changed[0, 0], model(batch)[0, 0])


def test_config_validation_and_preset():
    with pytest.raises(ValueError, match="divisible"):
        TWINConfig(d_model=10, n_heads=4)
    with pytest.raises(ValueError, match="top_k"):
        TWINConfig(top_k=0)
    doc = yaml.safe_load((resources.files("climber") / "presets" / "twin-default.yaml").read_text())
    assert TWINConfig.from_dict(doc["model_config"]) == TWINConfig()
