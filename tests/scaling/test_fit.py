"""climber scale fit: the power law recovered from known points, R², the bootstrap band, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from climber.cli import main
from climber.config import ConfigError
from climber.scaling.fit import bootstrap_band, fit_power_law, predict


def law(c):  # LogLoss from about 0.58 at 1e8 FLOPs to 0.47 at 1e12
    return 0.45 + 2.0 * c ** -0.15


def test_recovers_a_known_law():
    c = np.geomspace(1e8, 1e12, 12)
    fit = fit_power_law(c, law(c))
    assert fit["E"] == pytest.approx(0.45, abs=0.005) and fit["alpha"] == pytest.approx(0.15, abs=0.01)
    assert fit["r2"] > 0.999
    np.testing.assert_allclose(predict(fit, c), law(c), rtol=5e-3)


def test_noise_lowers_r2_and_the_band_covers_the_truth():
    rng = np.random.default_rng(0)
    c = np.repeat(np.geomspace(1e8, 1e12, 6), 3)
    y = law(c) + rng.normal(0, 0.002, len(c))
    fit = fit_power_law(c, y)
    assert 0.9 < fit["r2"] < 1.0
    lo, hi = bootstrap_band(c, y, [1e10], samples=100)
    assert lo[0] <= law(1e10) <= hi[0] and lo[0] < hi[0]


def test_too_few_points_and_the_cli(tmp_path, capsys):
    with pytest.raises(ConfigError, match="at least 3 points"):
        fit_power_law([1e9, 1e10], [0.5, 0.45])
    c = np.geomspace(1e8, 1e12, 5)
    rows = [{"model": "m", "train_flops": float(x), "test_logloss": float(law(x)), "test_auc": 0.7} for x in c]
    (tmp_path / "sweep.json").write_text(json.dumps({"rows": rows}))
    assert main(["scale", "fit", "--sweep", str(tmp_path)]) == 0
    fit = json.loads((tmp_path / "fit.json").read_text())["fits"]["m"]
    assert fit["alpha"] == pytest.approx(0.15, abs=0.01)
    assert "alpha" in capsys.readouterr().out
    assert main(["scale", "fit", "--sweep", str(tmp_path / "nope")]) == 2


def test_seeds_of_a_point_are_averaged_before_the_fit_and_their_spread_reported(tmp_path):
    c = np.geomspace(1e8, 1e12, 5)
    rows = [{"model": "m", "s": int(k), "l": 1, "d": 8, "seed": seed, "train_flops": float(x),
             "test_logloss": float(law(x)) + (0.01 if seed else -0.01), "test_auc": 0.7}
            for k, x in enumerate(c) for seed in (0, 1)]
    (tmp_path / "sweep.json").write_text(json.dumps({"rows": rows}))
    assert main(["scale", "fit", "--sweep", str(tmp_path)]) == 0
    fit = json.loads((tmp_path / "fit.json").read_text())["fits"]["m"]
    assert fit["points"] == 5 and fit["seeds"] == 2  # the means lie on the law: the seed noise cancels
    assert fit["r2"] > 0.999 and fit["residual_rms"] < 1e-3 and fit["seed_std"] == pytest.approx(0.01)


def test_axis_effects_tell_which_flops_buy_nothing(tmp_path, capsys):
    # width helps (-0.01 a step), depth hurts (+0.005 a step), length does nothing: FLOPs grow with each
    rows = [{"model": "m", "s": s, "l": l, "d": d, "train_flops": float(s * l * d * 1e6),
             "test_logloss": 0.7 - 0.01 * np.log2(d // 16) + 0.005 * np.log2(l), "test_auc": 0.7}
            for s in (128, 512) for l in (1, 2, 4) for d in (16, 32)]
    (tmp_path / "sweep.json").write_text(json.dumps({"rows": rows}))
    assert main(["scale", "fit", "--sweep", str(tmp_path)]) == 0
    axes = json.loads((tmp_path / "fit.json").read_text())["fits"]["m"]["axes"]
    assert axes["d"]["steps"] == 6 and axes["d"]["mean_change"] == pytest.approx(-0.01) and axes["d"]["worse"] == 0
    assert axes["l"]["steps"] == 8 and axes["l"]["mean_change"] == pytest.approx(0.005) and axes["l"]["worse"] == 8
    assert axes["s"]["steps"] == 6 and axes["s"]["mean_change"] == pytest.approx(0.0, abs=1e-12)
    assert axes["s"]["flops_ratio"] == pytest.approx(4.0)
    assert "raising l: 8 steps at 2.00x FLOPs, mean change +0.0050, worse in 8" in capsys.readouterr().out


def test_plot_writes_the_curves_and_a_heat_map_per_model(tmp_path):
    rows = [{"model": m, "s": s, "l": l, "d": 16, "train_flops": float(s * l * 1e9 * k),
             "test_logloss": float(law(s * l * 1e9 * k)), "test_auc": 0.7 + 0.01 * l}
            for k, m in ((1, "a"), (2, "b")) for s in (8, 16) for l in (1, 2)]
    (tmp_path / "sweep.json").write_text(json.dumps({"rows": rows}))
    assert main(["scale", "fit", "--sweep", str(tmp_path)]) == 0
    assert main(["scale", "plot", "--sweep", str(tmp_path)]) == 0
    for name in ("scaling.png", "heatmap-a.png", "heatmap-b.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
