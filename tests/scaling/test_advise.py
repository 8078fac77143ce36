"""climber scale advise: the surface through a sweep, the equal-FLOPs set, the recommendation, errors."""

from __future__ import annotations

import json
import math

import pytest

from climber.cli import main
from climber.config import ConfigError
from climber.scaling.advise import advise, flops_per_candidate


def surface(s, l):
    return 0.6 - 0.02 * math.log(s) - 0.03 * math.log(l) + 0.004 * math.log(s) * math.log(l)


@pytest.fixture
def sweep(tmp_path):
    rows = [{"model": "climber", "s": s, "l": l, "d": 64, "test_logloss": surface(s, l)}
            for s in (16, 32, 64) for l in (1, 2, 4)]
    (tmp_path / "sweep.json").write_text(json.dumps({"rows": rows}))
    return tmp_path


def test_recommends_the_best_predicted_point_at_equal_flops(sweep, capsys):
    budget = flops_per_candidate("climber", {"s": 32, "l": 2}, 16)
    out = advise(sweep, budget)
    table = out["equal_flops"]
    assert all(abs(r["flops_per_candidate"] / budget - 1) <= 0.15 for r in table)
    for r in table:  # the surface is exact here: predictions equal the law, measured where swept
        assert r["predicted_logloss"] == pytest.approx(surface(r["s"], r["l"]), abs=1e-9)
        if r["measured_logloss"] is not None:
            assert r["measured_logloss"] == pytest.approx(r["predicted_logloss"], abs=1e-9)
    assert out["recommended"] == min(table, key=lambda r: r["predicted_logloss"])
    points = {(r["s"], r["l"]) for r in table}
    assert (32, 2) in points and {l for _, l in points} - {2}  # the budget's point and another depth
    assert not next(r for r in table if r["s"] < 16)["inside_sweep"]
    assert main(["scale", "advise", "--sweep", str(sweep), "--flops", str(budget)]) == 0
    assert "recommended" in capsys.readouterr().out


def test_errors(sweep, tmp_path):
    with pytest.raises(ConfigError, match="no \\(s, l, d\\) within"):
        advise(sweep, 1.0)
    with pytest.raises(ConfigError, match="no points of model"):
        advise(sweep, 1e6, model="din")
    few = tmp_path / "few"
    few.mkdir()
    rows = [{"model": "climber", "s": s, "l": l, "d": 64, "test_logloss": 0.5} for s, l in ((16, 1), (32, 2), (64, 4))]
    (few / "sweep.json").write_text(json.dumps({"rows": rows}))
    with pytest.raises(ConfigError, match="cannot fit"):
        advise(few, 1e6)
