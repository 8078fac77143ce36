"""climber flops: analytic against measured FLOPs for every model's default preset, the split, the CLI."""

from __future__ import annotations

import json

import pytest

from climber.cli import main
from climber.config import DEFAULT_PRESETS
from climber.models import REGISTRY
from climber.scaling.flops import flops_report


@pytest.mark.parametrize("model", list(REGISTRY))
def test_default_preset_analytic_flops_match_the_counter(model):
    r = flops_report(model, [], candidates=4, length=24)  # shortened: the counter runs the real forward
    f = r["forward_flops"]
    assert abs(f["relative_difference"]) < 0.05, f
    assert sum(r["measured_split"].values()) == f["measured"]
    assert all(v >= 0 for v in r["measured_split"].values())
    if model in ("climber", "transformer", "hstu"):
        assert r["measured_split"]["attention"] > 0
    if model in ("climber", "transformer"):
        assert r["measured_split"]["ffn"] > 0
    assert r["train_flops_analytic"] == 3 * f["analytic"]
    p = r["parameters"]
    assert p["total"] == p["embeddings"] + p["dense"] and p["embeddings"] > 0


def test_flops_grow_with_length_and_the_cli(capsys):
    short, long = (flops_report("climber", [], candidates=4, length=n)["forward_flops"]["analytic"] for n in (16, 32))
    assert 1.5 * short < long < 2.5 * short  # the history part doubles or more; candidates and head stay
    assert main(["flops", "--model", "climber", "--length", "16", "--candidates", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["forward_flops"]["analytic"] == short and out["lengths"] == [16, 16]
    assert main(["flops", "--model", DEFAULT_PRESETS["climber"], "--length", "8", "--candidates", "2"]) == 0
    assert "measured split" in capsys.readouterr().out
    assert main(["flops", "--length", "0"]) == 2
