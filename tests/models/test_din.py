"""DIN: unnormalised activation weights (duplicated history -> doubled interest; padding -> weight 0), the
split first layer against the plain Linear over [h, c, h - c, h * c], Dice, config validation and preset
(the model contract: test_contract.py)."""

from __future__ import annotations

from importlib import resources

import pytest
import torch
import yaml
from helpers import INFO, close, make_batch, replace

from climber.data.sequences import Strategy
from climber.models.din import DIN, DINConfig, Dice

L = 6  # history length of the tiny batches


def build(seed=0, **kw) -> DIN:
    """A tiny model with larger embeddings than the 0.02 init, whose Dice running statistics have been
    moved by a few training-mode passes (so that evaluation-mode checks use non-trivial statistics)."""
    torch.manual_seed(seed)
    model = DIN(DINConfig(**{"d_model": 8, "max_len": L, "att_hidden": [12, 6], "mlp_hidden": [16, 8], **kw}), INFO)
    with torch.no_grad():
        for table in (model.emb.user, model.emb.item, model.emb.action, model.emb.scenario):
            table.weight[1:].normal_(std=0.5)
        model.train()
        for s in range(3):
            model(make_batch(lengths=(L,), seed=100 + s))
    return model.eval()


def test_strategies_are_one_recency_history():
    assert build().strategies() == [Strategy(name="history", kind="recency", length=L)]


def test_weights_are_unnormalised_and_zero_at_padding():
    model = build()
    batch = make_batch(B=3, lengths=(L,), C=4)
    w = model.activation_weights(batch)  # (B, C, L)
    pad = ~batch.seqs[0].mask[:, None, :].expand_as(w)
    assert pad.any() and torch.equal(w[pad], torch.zeros(int(pad.sum())))
    assert (w[~pad] != 0).all()
    # every event twice: each weight is repeated, so the pooled interest doubles (no softmax to undo it)
    seq = batch.seqs[0]
    twice = seq.apply(lambda t: t.repeat_interleave(2, dim=1))
    doubled = replace(batch, seqs=[twice])
    assert close(model.activation_weights(doubled), w.repeat_interleave(2, dim=-1))
    assert close(model.interest(doubled), 2 * model.interest(batch))
    assert not close(w.sum(-1), torch.ones(3, 4), tol=1e-2)  # the weights of a row do not sum to 1 either


def test_split_first_layer_equals_the_linear_over_the_concatenation():
    model = build()
    batch = make_batch(B=2, lengths=(L,), C=3, full=True)
    h, c = model.emb.history(batch.seqs[0]), model.emb.candidate(batch)  # (B, L, d), (B, C, d)
    hh, cc = h[:, None].expand(-1, 3, -1, -1), c[:, :, None].expand(-1, -1, L, -1)  # (B, C, L, d)
    x = torch.cat([hh, cc, hh - cc, hh * cc], dim=-1)  # (B, C, L, 4d): the paper's input
    pairs = torch.ones(2, 3, L, dtype=torch.bool)
    assert close(model.att(x, pairs).squeeze(-1), model.activation_weights(batch))


def test_dice_formula_masked_statistics_and_running_averages():
    torch.manual_seed(0)
    dice = Dice(3, momentum=0.5)
    with torch.no_grad():
        dice.alpha.copy_(torch.tensor([0.1, -0.2, 0.3]))
    s = torch.randn(4, 5, 3)
    mask = torch.rand(4, 5) > 0.3
    real = s[mask]  # (n, 3)
    mean, var = real.mean(0), real.var(0, unbiased=False)
    p = torch.sigmoid((s - mean) / torch.sqrt(var + 1e-8))
    assert close(dice.train()(s, mask), p * s + (1 - p) * dice.alpha * s)
    noisy = s.masked_fill(~mask[..., None], 1e3)  # padding values do not count
    assert close(dice(noisy, mask)[mask], (p * s + (1 - p) * dice.alpha * s)[mask])
    # two updates with momentum 0.5 from (mean 0, var 1), both with the same masked statistics
    assert close(dice.running_mean, 0.75 * mean) and close(dice.running_var, 0.25 + 0.75 * var)
    p_eval = torch.sigmoid((s - dice.running_mean) / torch.sqrt(dice.running_var + 1e-8))
    assert close(dice.eval()(s, mask), p_eval * s + (1 - p_eval) * dice.alpha * s)


def test_config_validation_and_preset():
    with pytest.raises(ValueError, match="activation"):
        DINConfig(activation="relu")
    with pytest.raises(ValueError, match="att_hidden"):
        DINConfig(att_hidden=[])
    doc = yaml.safe_load((resources.files("climber") / "presets" / "din-default.yaml").read_text())
    assert DINConfig.from_dict(doc["model_config"]) == DINConfig()
