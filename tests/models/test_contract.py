"""The model contract (DESIGN.md, "Contracts"), checked for every model of ``climber.models.REGISTRY``:
output shape and finiteness (an empty history included), gradients to every parameter, candidate and
row independence, left-padding invariance, targets that are never inputs, analytic FLOPs against
FlopCounterMode, the config dict round trip, and the default preset.

A new model is tested by its registry line plus its entry in TINY; a registered model without one fails.
Each entry lists tiny configs: the first is the model's tiny config, the others variants whose code paths
differ (ablations, interactions, activations, MoE). Model-specific checks stay in test_<model>.py.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from helpers import (
    INFO,
    close,
    make_batch,
    pad_left,
    replace,
    select_cands,
    to_single_item_rows,
    with_empty_history,
)
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from climber.config import DEFAULT_PRESETS, ConfigError, load_preset
from conftest import perturb_parameters, randomize_prior_tables
from climber.models import REGISTRY, SampleShape, build_model, config_class

CLIMBER = dict(
    d_model=16,
    n_heads=2,
    n_layers=2,
    strategies=[{"name": "recent", "kind": "recency", "length": 5}, {"name": "pos", "kind": "positive", "length": 8}],
)
DLRM = dict(d_model=8, max_len=6, bottom_mlp=[4], top_mlp=[16])
DIN = dict(d_model=8, max_len=6, att_hidden=[12, 6], mlp_hidden=[16, 8])
TWIN = dict(d_model=8, n_heads=2, max_len=12, top_k=4, mlp_hidden=[16])  # top_k < max_len: the GSU chooses
WUKONG = dict(d_model=8, n_layers=2, n_fmb=3, n_lcb=4, mlp_hidden=16, max_len=6, recent_k=3)
RANKMIXER = dict(T=4, d_token=8, d_feature=6, n_layers=2, ffn_mult=2, max_len=6, recent_k=3)  # 8 x 6 -> 4 x 12

TINY: dict[str, list[dict]] = {
    "climber": [  # every ablation; user vector without MSE, popularity prior with it (its count with BGF too),
        # item bias with BGF, dot head with ATL, context without
        {**CLIMBER, "use_atl": atl, "use_bgf": bgf, "use_mse": mse, "user_embedding": not mse, "item_bias": bgf,
         "dot_head": atl, "context_features": not atl, "popularity_prior": mse, "popularity_count": mse and bgf}
        for atl, bgf, mse in itertools.product([True, False], repeat=3)
    ] + [{**CLIMBER, "use_atl": False, "use_bgf": False, "n_layers": 1, "d_model": 32},
         {**CLIMBER, "attention_sink": True}],
    "dlrm": [DLRM, {**DLRM, "interaction": "dcn", "popularity_prior": True, "popularity_count": True}],
    "din": [DIN, {**DIN, "activation": "prelu"}],
    "twin": [TWIN, {**TWIN, "top_k": 32}],
    "transformer": [
        dict(d_model=16, n_heads=2, n_layers=2, max_len=8),
        dict(d_model=32, n_heads=4, n_layers=1, ffn_mult=2, max_len=8),
    ],
    "hstu": [dict(d_model=16, n_heads=2, n_layers=2, max_len=8), dict(d_model=32, n_heads=4, n_layers=1, max_len=8)],
    "wukong": [
        WUKONG,
        {**WUKONG, "fm_rank": 2},  # optimized FM
        {**WUKONG, "n_fmb": 5, "n_lcb": 3, "n_layers": 3},  # n = n_F + n_L: identity residuals
    ],
    "rankmixer": [
        RANKMIXER,
        {**RANKMIXER, "moe_experts": 3},  # sparse in eval mode, dense in train mode
        {**RANKMIXER, "T": 5, "d_token": 10, "recent_k": 2},  # 7 x 6 features zero-padded to 5 x 9
    ],
}

# (model, parameter, the config values where it holds, why): parameters that may get no gradient
NO_GRADIENT = [
    ("climber", "fusion_temperature.raw", {"use_mse": False},
     "BGF over a single block token: a softmax over one key cannot depend on tau"),
]

CASES = [(name, i) for name in REGISTRY for i in range(len(TINY.get(name, [])))]
each_case = pytest.mark.parametrize("name,variant", CASES, ids=[f"{name}-{i}" for name, i in CASES])


def build(name: str, variant: int, **overrides) -> nn.Module:
    """The tiny model with every parameter perturbed (conftest.perturb_parameters) and random
    popularity prior tables (build_model fills them from the data)."""
    torch.manual_seed(variant)
    model = randomize_prior_tables(build_model(name, {**TINY[name][variant], **overrides}, INFO))
    return perturb_parameters(model, seed=variant)


def batch_for(model: nn.Module, **kw):
    return make_batch(lengths=[s.length for s in model.strategies()], **kw)


def may_get_no_gradient(name: str, cfg, parameter: str) -> bool:
    return any(
        model == name and param == parameter and all(getattr(cfg, k) == v for k, v in when.items())
        for model, param, when, _ in NO_GRADIENT
    )


def test_every_registered_model_has_a_tiny_config():
    assert set(REGISTRY) == set(TINY), "add the model's tiny configs to TINY in tests/models/test_contract.py"


@each_case
def test_shape_finite_and_gradients_reach_every_parameter(name, variant):
    model = build(name, variant)
    batch = with_empty_history(batch_for(model, B=3, C=4), row=0)
    assert batch.cand_mask[0].any()
    for training in (False, True):
        logits = model.train(training)(batch)
        assert logits.shape == (3, 4)
        assert torch.isfinite(logits).all()  # the empty-history row too
    logits[batch.cand_mask].sum().backward()  # train mode
    for param, p in model.named_parameters():
        assert p.grad is not None, param
        if not may_get_no_gradient(name, model.cfg, param):
            assert p.grad.abs().sum() > 0, param


@each_case
def test_candidates_never_see_each_other(name, variant):
    model = build(name, variant).eval()
    batch = batch_for(model, B=2, C=4, full=True)
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


@each_case
def test_padding_candidates_change_nothing_and_one_at_a_time_equals_together(name, variant):
    model = build(name, variant).eval()
    batch = batch_for(model, B=3, C=4)
    base, real = model(batch), batch.cand_mask
    assert not real.all()
    more = model(select_cands(batch, [0, 1, 2, 3, -1, -1, -1]))  # three more padding candidates
    assert close(more[:, :4][real], base[real])
    for c in range(4):
        alone = model(select_cands(batch, [c]))[:, 0]  # scored one at a time (C = 1)
        assert close(alone[real[:, c]], base[:, c][real[:, c]])


@each_case
def test_single_and_multiple_item_rows_give_equal_logits_and_gradients(name, variant):
    """The two sample forms of the paper on the same parameters and inputs: "single user, multiple items"
    (one history, C candidates) and "single user, single item" (the history repeated per candidate)."""
    multi_model = build(name, variant).eval()
    single_model = build(name, variant).eval()  # same seed: same parameters
    batch = batch_for(multi_model, B=3, C=5)
    single = to_single_item_rows(batch)
    multi_logits = multi_model(batch)[batch.cand_mask]  # (n,) in row-major order
    single_logits = single_model(single)[:, 0]  # (n,)
    assert close(multi_logits, single_logits)
    weight = torch.randn(multi_logits.shape, generator=torch.Generator().manual_seed(5))  # a generic loss
    (weight * multi_logits).sum().backward()
    (weight * single_logits).sum().backward()
    grads = dict(single_model.named_parameters())
    for param, p in multi_model.named_parameters():
        assert close(p.grad, grads[param].grad), param


def with_new_history(batch, row: int):
    """Row ``row`` gets a full history of new random events (its ts still before its candidates)."""
    g = torch.Generator().manual_seed(1)
    seqs = []
    for s in batch.seqs:
        s = s.apply(torch.clone)
        L = s.item.shape[1]
        s.mask[row] = True
        s.item[row] = torch.randint(1, INFO.num_items + 1, (L,), generator=g)
        s.action[row] = torch.randint(1, INFO.num_actions + 1, (L,), generator=g)
        s.scenario[row] = torch.randint(1, INFO.num_scenarios + 1, (L,), generator=g)
        s.ts[row] = batch.cand_ts[row, 0] - 10 * torch.arange(L, 0, -1)
        seqs.append(s)
    return replace(batch, seqs=seqs)


@each_case
def test_rows_are_independent_and_left_padding_changes_nothing(name, variant):
    model = build(name, variant).eval()
    batch = batch_for(model, B=3, C=4)
    base = model(batch)
    assert close(model(batch.take([0])), base[[0]])
    assert close(model(pad_left(batch, 5)), base)
    out = model(with_new_history(batch, row=1))
    assert close(out[[0, 2]], base[[0, 2]])
    real = batch.cand_mask[1]
    assert not close(out[1][real], base[1][real])  # the check can fail: row 1 itself did change


@each_case
def test_label_and_candidate_action_are_never_inputs(name, variant):
    model = build(name, variant).eval()
    batch = batch_for(model, B=3, C=4)
    base = model(batch)
    other = replace(batch, label=torch.rand(batch.label.shape),
                    cand_action=(batch.cand_action % INFO.num_actions + 1) * batch.cand_mask)
    assert torch.equal(model(other), base)


@each_case
def test_flops_match_flop_counter(name, variant):
    """On a 1-row unpadded batch, in train mode without dropout (every MoE expert runs, which is what the
    analytic count counts) and with the reference attention (FlopCounterMode has no formula for SDPA's
    CPU flash kernel and would miss attention)."""
    fields = {f.name for f in dataclasses.fields(config_class(name))}
    overrides = {k: v for k, v in {"attention": "reference", "dropout": 0.0}.items() if k in fields}
    model = build(name, variant, **overrides).train()
    lengths = tuple(s.length for s in model.strategies())
    batch = make_batch(B=1, lengths=lengths, C=5, full=True)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(batch)
    measured = counter.get_total_flops()
    analytic = model.flops(SampleShape(lengths=lengths, candidates=5))
    assert abs(analytic - measured) / measured < 0.05, (analytic, measured)


@each_case
def test_config_round_trip_and_unknown_keys(name, variant):
    cfg_cls = config_class(name)
    cfg = cfg_cls.from_dict(TINY[name][variant])
    assert cfg_cls.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="no_such_key"):
        cfg_cls.from_dict({**cfg.to_dict(), "no_such_key": 1})


@each_case
def test_a_batch_of_other_subsequences_is_rejected(name, variant):
    model = build(name, variant)
    lengths = [s.length for s in model.strategies()]
    with pytest.raises(ValueError, match="expects"):
        model(make_batch(lengths=[*lengths, lengths[-1]]))


@pytest.mark.parametrize("name", list(REGISTRY))
def test_default_preset_parses_and_builds(name):
    doc = load_preset(DEFAULT_PRESETS.get(name, f"{name}-default"))
    assert doc["model"] == name
    cfg = config_class(name).from_dict(doc["model_config"])
    assert isinstance(build_model(name, cfg, INFO), nn.Module)


PRIOR_MODELS = [name for name in REGISTRY if any(f.name == "popularity_prior" for f in dataclasses.fields(config_class(name)))]


def test_climber_and_dlrm_have_the_popularity_prior():
    assert {"climber", "dlrm"} <= set(PRIOR_MODELS)


@pytest.mark.parametrize("count", [False, True])
@pytest.mark.parametrize("name", PRIOR_MODELS)
def test_the_popularity_prior_adds_w_times_the_items_value_out_of_fold_in_training(name, count):
    """popularity_prior: logits = the model's without it + w * prior[candidate item] (with
    popularity_count, + v * log_counts[item]), where a training candidate reads its user's fold rows
    (users 4 and 7: folds 0 and 1 of 2) and eval the whole tables; the tables are saved (serving needs
    no data), the fold rows are not."""
    model = build(name, 0, popularity_prior=True, popularity_count=count)
    plain = build_model(name, {**TINY[name][0], "popularity_prior": False, "popularity_count": False}, INFO)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("prior.")})
    prior = model.prior
    with torch.no_grad():
        prior.weight.fill_(0.7)
        if count:
            prior.count_weight.fill_(0.4)
    prior.fold_logits = torch.randn(2, INFO.num_items + 1)
    if count:
        prior.fold_log_counts = torch.rand(2, INFO.num_items + 1)
    batch = dataclasses.replace(batch_for(model, B=2, C=4), user=torch.tensor([4, 7]))

    def term(table, folds=None):  # (B, C): the eval table's values, or each row's user's fold row
        if folds is None:
            return table[batch.cand_item]
        return torch.stack([folds[0, batch.cand_item[0]], folds[1, batch.cand_item[1]]])

    def logits(m, training):
        torch.manual_seed(1)  # the same dropout draws in every call
        return m.train(training)(batch)

    eval_term = 0.7 * term(prior.logits) + (0.4 * term(prior.log_counts) if count else 0)
    train_term = 0.7 * term(None, prior.fold_logits) + (0.4 * term(None, prior.fold_log_counts) if count else 0)
    assert close(logits(model, False), logits(plain, False) + eval_term)
    assert close(logits(model, True), logits(plain, True) + train_term)
    saved = model.state_dict()
    assert "prior.logits" in saved and "prior.fold_logits" not in saved and "prior.fold_log_counts" not in saved
    assert ("prior.log_counts" in saved) == count
    for option in ("popularity_count", "popularity_fit"):
        with pytest.raises(ConfigError, match=f"{option}: needs popularity_prior"):
            config_class(name).from_dict({**TINY[name][0], "popularity_prior": False, "popularity_count": False,
                                          "popularity_fit": False, option: True})


@pytest.mark.parametrize("name", list(REGISTRY))
def test_only_training_candidates_read_the_out_of_fold_rate_tables(name):
    """``train.item_rate_folds``: in train mode a candidate's rate bucket is its user's fold's; history
    tokens and eval mode keep the whole table."""
    from climber.models import RATE_FEATURE
    from climber.models.layers import ItemEmbedding

    info = dataclasses.replace(INFO, item_features=((RATE_FEATURE, 4),))
    torch.manual_seed(0)
    model = perturb_parameters(build_model(name, TINY[name][0], info), seed=0)
    (item,) = [m for m in model.modules() if isinstance(m, ItemEmbedding)]
    n = info.num_items + 1
    rates = torch.randint(1, 5, (n,), generator=torch.Generator().manual_seed(0))
    rates[0] = 0
    item.feature_ids[:, -1] = rates
    batch = batch_for(model, B=3, C=4, full=True)
    in_candidates = torch.zeros(n, dtype=torch.bool)
    in_candidates[batch.cand_item] = True
    moved = torch.where(rates > 0, rates % 4 + 1, 0)  # another bucket for every item

    def logits(fold_rates, training=True):
        item.fold_rates = fold_rates
        torch.manual_seed(1)  # the same dropout draws in every call
        return model.train(training)(batch)

    whole = logits(torch.zeros(0, n, dtype=torch.long))  # no fold tables
    assert close(logits(rates.repeat(2, 1)), whole)  # fold tables equal to the whole table
    assert not close(logits(moved.repeat(2, 1)), whole)  # the candidates' rates moved
    assert close(logits(torch.where(in_candidates, rates, moved).repeat(2, 1)), whole)  # history items' only
    assert close(logits(moved.repeat(2, 1), training=False), logits(torch.zeros(0, n, dtype=torch.long), training=False))
