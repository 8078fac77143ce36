"""climber scale sweep: the grid, the overrides per model, resumable points, the table against the run dirs."""

from __future__ import annotations

import json

import pytest

from climber.cli import main
from climber.config import ConfigError, resolve
from climber.scaling.sweep import load_grid_preset, parse_grid, parse_grids, point_overrides
from conftest import TINY


def test_parse_grid():
    assert parse_grid("s=64,128; l=1,2 ;d=32") == {"s": [64, 128], "l": [1, 2], "d": [32]}
    assert parse_grid("l=3") == {"l": [3]}
    for bad in ("x=1", "s=", "s=a", "s=0"):
        with pytest.raises(ConfigError):
            parse_grid(bad)


def test_a_union_of_grids_and_its_errors():
    assert parse_grids("s=8,16;l=1 | s=8;l=2") == [{"s": [8, 16], "l": [1]}, {"s": [8], "l": [2]}]
    assert parse_grids(["s=8;l=1"]) == [{"s": [8], "l": [1]}]
    with pytest.raises(ConfigError, match="same axes"):
        parse_grids("s=8;l=1|s=8")
    with pytest.raises(ConfigError, match="no grid"):
        parse_grids(" | ")


def test_grid_presets_ship_and_files_load(tmp_path):
    from climber.models import DataInfo, SampleShape, build_model

    cpu = load_grid_preset("cpu")
    grid = parse_grid(cpu["grid"])
    # the default CPU grid spans at least 1.5 decades of forward FLOPs per candidate (issue 7)
    info = DataInfo(num_users=10, num_items=100, actions=("a", "b"), scenarios=("x",))
    flops = []
    for model in cpu["models"]:
        for s, l in ((min(grid["s"]), min(grid["l"])), (max(grid["s"]), max(grid["l"]))):
            cfg = resolve(model, None, point_overrides(model, {"s": s, "l": l, "d": grid["d"][0]}) + cpu["set"])
            net = build_model(cfg.model, cfg.model_config, info)
            C = cfg.train.candidates_per_row
            flops.append(net.flops(SampleShape(tuple(x.length for x in net.strategies()), C)) / C)
    assert max(flops) / min(flops) >= 10**1.5
    assert load_grid_preset("gpu")["models"][0] == "climber"
    mine = tmp_path / "mine.yaml"
    mine.write_text("models: [dlrm]\ngrid: 's=4'\n")
    assert load_grid_preset(str(mine)) == {"models": ["dlrm"], "grid": "s=4"}
    mine.write_text("modles: [dlrm]\n")
    with pytest.raises(ConfigError, match="expected keys"):
        load_grid_preset(str(mine))
    with pytest.raises(ConfigError, match="neither"):
        load_grid_preset("no-such-grid")


def test_point_overrides_reach_each_model():
    climber = resolve("climber", None, point_overrides("climber", {"s": 48, "l": 3, "d": 32}))
    assert [s["length"] for s in climber.model_config["strategies"]] == [48, 48]
    assert climber.model_config["n_layers"] == 3 and climber.model_config["d_model"] == 32
    dlrm = resolve("dlrm", None, point_overrides("dlrm", {"s": 20, "l": 4}))
    assert dlrm.model_config["max_len"] == 20 and dlrm.model_config["n_cross"] == 4
    assert resolve("rankmixer", None, point_overrides("rankmixer", {"d": 16})).model_config["d_token"] == 16
    with pytest.raises(ConfigError, match="no depth"):
        point_overrides("din", {"l": 2})



def test_climber_s_sets_every_block_or_their_sum_each_keeping_its_share(tmp_path):
    config = tmp_path / "mine.yaml"  # a YAML config, as compare takes it: blocks of 256 and 1,024
    config.write_text("model: climber\nmodel_config:\n  strategies:\n"
                      "  - {name: recent, kind: recency, length: 256}\n  - {name: positive, kind: positive, length: 1024}\n")
    cfg = resolve(None, config, point_overrides(str(config), {"s": 640}, blocks="total"))
    assert [s["length"] for s in cfg.model_config["strategies"]] == [128, 512]
    cfg = resolve(None, config, point_overrides(str(config), {"s": 512}))  # the default: every block
    assert [s["length"] for s in cfg.model_config["strategies"]] == [512, 512]
    with pytest.raises(ConfigError, match="blocks"):
        point_overrides(str(config), {"s": 512}, blocks="longest")


def test_sweep_runs_the_grid_skips_finished_points_and_tables_match(tiny_synth, tmp_path, capsys):
    sets = [x for s in TINY + ["train.epochs=1"] if not s.startswith(("model.d_model", "model.n_layers"))
            for x in ("--set", s)]
    args = ["scale", "sweep", "--data", str(tiny_synth), "--grid", "s=4,8;l=1;d=16", "--models", "climber-tiny",
            "--out", str(tmp_path)] + sets
    assert main(args) == 0
    rows = json.loads((tmp_path / "sweep.json").read_text())["rows"]
    assert [(r["s"], r["l"], r["d"]) for r in rows] == [(4, 1, 16), (8, 1, 16)]
    for r in rows:
        run = tmp_path / "climber-tiny" / f"s{r['s']}-l1-d16"
        m = json.loads((run / "metrics.json").read_text())
        assert r["test_auc"] == m["best"]["test"]["auc"] and r["parameters"] == m["parameters"]
    assert rows[1]["forward_flops_per_candidate"] > rows[0]["forward_flops_per_candidate"]  # longer history
    capsys.readouterr()
    assert main(args) == 0
    assert capsys.readouterr().out.count("skipped") == 2
    capsys.readouterr()
    assert main([*args, "--grid", "s=4;l=1;d=16|s=4;l=1;d=16", "--seeds", "2"]) == 0  # seed 0 is the run above
    assert capsys.readouterr().out.count("skipped") == 1
    rows = json.loads((tmp_path / "sweep.json").read_text())["rows"]
    assert [r["seed"] for r in rows] == [0, 1]
    seed1 = json.loads((tmp_path / "climber-tiny" / "s4-l1-d16-seed1" / "metrics.json").read_text())
    assert rows[1]["test_logloss"] == seed1["best"]["test"]["logloss"] != rows[0]["test_logloss"]
