"""Structured attention (climber.models.attention) against its two oracles, the full-sequence paths
"dense" (SDPA on an N x N float mask) and "reference" (explicit matmul): equal logits and gradients (fp32,
1e-5) for every Climber ablation and option, the Transformer and HSTU, on left-padded and empty histories,
one candidate and padded candidates, with one tile and with many (checkpointed) tiles; and no tensor of
N x N elements in the structured path."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import INFO, close, make_batch, with_empty_history
from torch.utils._python_dispatch import TorchDispatchMode

import climber.models.attention as attention
from climber.models import build_model
from conftest import perturb_parameters

SIDE_INFO = dataclasses.replace(INFO, item_features=(("item_genre", 3), ("item_decade", 2)))
CLIMBER = dict(d_model=16, n_heads=2, n_layers=2, dropout=0.0,
               strategies=[{"name": "recent", "kind": "recency", "length": 5}, {"name": "pos", "kind": "positive", "length": 8}])
CASES = {
    "climber": CLIMBER,
    "climber-noatl": {**CLIMBER, "use_atl": False},
    "climber-notemperature": {**CLIMBER, "use_temperature": False},
    "climber-nobias": {**CLIMBER, "use_relative_bias": False},
    "climber-nobgf": {**CLIMBER, "use_bgf": False},
    "climber-nomse": {**CLIMBER, "use_mse": False},
    "climber-one-layer": {**CLIMBER, "n_layers": 1},
    "climber-three-layers-user-itembias": {**CLIMBER, "n_layers": 3, "user_embedding": True, "item_bias": True},
    "climber-sink": {**CLIMBER, "attention_sink": True},
    "climber-match-bias": {**CLIMBER, "match_bias": True},
    "climber-match-mask": {**CLIMBER, "match_mask": True},
    "transformer": dict(d_model=16, n_heads=2, n_layers=2, max_len=8, dropout=0.0),
    "hstu": dict(d_model=16, n_heads=2, n_layers=2, max_len=8, dropout=0.0),
    "hstu-one-layer": dict(d_model=16, n_heads=4, n_layers=1, max_len=8, dropout=0.0),
}


def build(case: str, attention_path: str, seed: int = 0):
    """The model of ``case`` on data with two item side features (items of random genre / decade), its
    parameters (biases and temperatures included) moved off their initial values."""
    name = case.split("-")[0]
    model = build_model(name, {**CASES[case], "attention": attention_path}, SIDE_INFO)
    g = torch.Generator().manual_seed(seed)
    model.emb.item.feature_ids[1:] = torch.randint(0, 3, (INFO.num_items, 2), generator=g)  # 0 = unknown
    return perturb_parameters(model, seed)


def batch_for(model, **kw):
    return make_batch(lengths=tuple(s.length for s in model.strategies()), **kw)


def batches(model):
    """Left-padded histories with padded candidates; an empty history; one candidate; full rows."""
    yield with_empty_history(batch_for(model, B=3, C=4, seed=1), row=1)
    yield batch_for(model, B=2, C=1, seed=2)
    yield batch_for(model, B=2, C=3, seed=3, full=True)


def logits_and_grads(model, batch):
    model.zero_grad()
    out = model(batch)
    (out[batch.cand_mask] * torch.linspace(-1, 1, int(batch.cand_mask.sum()))).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_agree(got, want):
    assert close(got[0], want[0]), (got[0] - want[0]).abs().max()
    assert got[1].keys() == want[1].keys()
    for name, g in want[1].items():
        assert close(got[1][name], g), name


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("tiles", ["one", "many"])
def test_structured_equals_dense_and_reference(case, tiles, monkeypatch):
    """In train mode (dropout 0, so gradients are those of training); "many": tiles of 2 queries, each
    recomputed in backward (the checkpointed path of long histories)."""
    if tiles == "many":
        monkeypatch.setattr(attention, "QUERY_TILE", 2)
        monkeypatch.setattr(attention, "CHECKPOINT_SCORES", 0)
    models = {path: build(case, path).train() for path in ("reference", "dense", "structured")}
    for model in models.values():
        model.load_state_dict(models["reference"].state_dict())
    for batch in batches(models["reference"]):
        want = logits_and_grads(models["reference"], batch)
        assert_agree(logits_and_grads(models["dense"], batch), want)
        assert_agree(logits_and_grads(models["structured"], batch), want)


@pytest.mark.parametrize("case", ["climber", "transformer", "hstu"])
def test_attention_dropout_is_applied_in_training_only(case):
    model = build_model(case.split("-")[0], {**CASES[case], "dropout": 0.5, "attention": "tiled"}, INFO)
    batch = batch_for(model, B=2, C=3, full=True)
    model.train()
    assert not close(model(batch), model(batch))
    model.eval()
    assert torch.equal(model(batch), model(batch))


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("path,quadratic", [("structured", False), ("dense", True)])
def test_no_tensor_of_n_by_n_elements_in_the_structured_path(path, quadratic, monkeypatch):
    """One row of history 512 + 32 candidates, forward and backward: the structured path never creates a
    tensor of N x N = 544^2 elements (its largest holds a tile's scores); the dense path does."""
    monkeypatch.setattr(attention, "CHECKPOINT_SCORES", 0)
    cfg = {**CLIMBER, "strategies": [{"name": "recent", "kind": "recency", "length": 512}], "attention": path}
    model = build_model("climber", cfg, INFO).train()
    batch = make_batch(B=1, lengths=(512,), C=32, full=True)
    with LargestTensor() as seen:
        model(batch).sum().backward()
    N = 512 + 32
    assert (seen.largest >= N * N) == quadratic, seen.largest


@pytest.mark.slow
def test_flex_kernel_equals_the_tiled_kernel_in_inference():
    """FlexAttention (compiled through inductor on the CPU; forward only in torch 2.13): the same logits as
    the tiled kernel, with relative bias, temperature, side-match bias, match mask and sink, on padded,
    empty and full histories. Histories of 5 and 8 events: every query / key block is padded to 128."""
    for case in ("climber-match-bias", "climber-match-mask", "climber-sink", "transformer"):
        tiled, flex = build(case, "tiled").eval(), build(case, "flex").eval()
        flex.load_state_dict(tiled.state_dict())
        for batch in batches(tiled):
            with torch.inference_mode():
                got, want = flex(batch), tiled(batch)
            assert close(got, want), (case, (got - want).abs().max())


def test_flex_kernel_refuses_training_on_the_cpu():
    model = build("climber", "flex").train()
    with pytest.raises(ValueError, match="no CPU backward"):
        model(batch_for(model, B=2, C=2))
