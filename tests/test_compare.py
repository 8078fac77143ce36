"""climber compare: entries, seeds, skipping finished runs, the table against the run dirs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from climber.cli import main
from climber.compare import Entry
from conftest import TINY


def test_entry_parsing():
    assert Entry.parse("climber") == Entry("climber", "climber", ())
    assert Entry.parse("noatl=climber:model.use_atl=false:train.lr=0.01") == Entry(
        "noatl", "climber", ("model.use_atl=false", "train.lr=0.01"))
    assert Entry.parse("climber-tiny:model.d_model=8") == Entry("climber-tiny", "climber-tiny", ("model.d_model=8",))


def test_compare_runs_seeds_skips_finished_and_tables_match(tiny_synth, tmp_path, capsys):
    sets = [x for s in TINY + ["train.epochs=1"] for x in ("--set", s)]
    args = ["compare", "--data", str(tiny_synth), "--models", "climber-tiny,nobgf=climber-tiny:model.use_bgf=false",
            "--seeds", "2", "--out", str(tmp_path)] + sets
    assert main(args) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert [r["model"] for r in res["rows"]] == ["climber-tiny", "nobgf"]
    for row in res["rows"]:
        runs = [json.loads((tmp_path / row["model"] / f"seed{s}" / "metrics.json").read_text()) for s in range(2)]
        aucs = [r["best"]["test"]["auc"] for r in runs]
        assert row["auc"] == pytest.approx(np.mean(aucs)) and row["auc_std"] == pytest.approx(np.std(aucs))
    assert res["rows"][0]["parameters"] != res["rows"][1]["parameters"]  # the override took effect
    assert "| climber-tiny | 2 |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    assert main(args) == 0  # everything finished: all skipped
    assert capsys.readouterr().out.count("skipped") == 4
