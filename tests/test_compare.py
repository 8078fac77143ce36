"""climber compare: entries, seeds, skipping finished runs, the table against the run dirs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

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
    from climber.config import load_yaml
    from climber.models import DataInfo, SampleShape, build_model

    for row in res["rows"]:  # FLOPs per candidate: the run's own model at full lengths, C per row
        cfg = load_yaml(tmp_path / row["model"] / "seed0" / "config.yaml")
        net = build_model(cfg["model"], cfg["model_config"], DataInfo.from_prepared(tiny_synth))
        C = cfg["train"]["candidates_per_row"]
        want = net.flops(SampleShape(tuple(s.length for s in net.strategies()), C)) / C
        assert row["flops_per_candidate"] == pytest.approx(want) and want > 0
    assert res["rows"][0]["flops_per_candidate"] != res["rows"][1]["flops_per_candidate"]  # no BGF: fewer
    assert "| climber-tiny | 2 |" in (tmp_path / "results.md").read_text()
    ceiling = json.loads((tiny_synth / "manifest.json").read_text())["bayes"]
    assert res["bayes"] == ceiling  # synthetic data: the table states the attainable ceiling
    assert f"attainable under the protocol): AUC {ceiling['test']['auc']:.4f}" in (tmp_path / "results.md").read_text()
    gap = ceiling["test"]["gauc"] - res["rows"][1]["gauc"]  # and each model's distance to it
    assert f"| nobgf | {ceiling['test']['auc'] - res['rows'][1]['auc']:.4f} | {gap:.4f} |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    default = torch.get_num_threads()
    torch.set_num_threads(2)  # this process's threads now differ from the runs' (train.threads=1)
    try:
        assert main(args) == 0  # everything finished: all skipped
    finally:
        torch.set_num_threads(default)
    assert capsys.readouterr().out.count("skipped") == 4
    assert json.loads((tmp_path / "results.json").read_text())["machine"].endswith(", 1 threads per run")
    assert ", 1 threads per run  \n" in (tmp_path / "results.md").read_text()


def test_tune_same_draws_for_every_model_winner_on_val_and_config_saved(tiny_synth, tmp_path, capsys):
    from climber.config import load_yaml, resolve
    from climber.tune import SPACE, draws

    d = draws(4, seed=3)
    assert d[0] == [] and d == draws(4, seed=3) and d != draws(4, seed=4)
    for overrides in d[1:]:
        values = dict(o.split("=") for o in overrides)
        assert SPACE["train.lr"][0] <= float(values["train.lr"]) <= SPACE["train.lr"][1]
        assert float(values["model.dropout"]) in SPACE["model.dropout"]
    sets = [x for s in TINY + ["train.epochs=1"] for x in ("--set", s)]
    args = ["tune", "--data", str(tiny_synth), "--models", "climber-tiny,nobgf=climber-tiny:model.use_bgf=false", "--trials", "3",
            "--out", str(tmp_path / "tune"), "--configs", str(tmp_path / "configs")] + sets
    assert main(args) == 0
    rows = json.loads((tmp_path / "tune" / "tuning.json").read_text())["rows"]
    for model in ("climber-tiny", "nobgf"):
        mine = [r for r in rows if r["model"] == model]
        assert [r["overrides"] for r in mine] == draws(3)  # the same draws for every model
        vals = [json.loads((tmp_path / "tune" / model / f"trial{k}" / "metrics.json").read_text())["best"]["val"]["auc"]
                for k in range(3)]
        winner = [r for r in mine if r["winner"]]
        assert len(winner) == 1 and winner[0]["trial"] == int(np.argmax(vals))
        saved = resolve(None, tmp_path / "configs" / f"{model}.yaml", [])
        trained = load_yaml(tmp_path / "tune" / model / f"trial{winner[0]['trial']}" / "config.yaml")
        assert saved.to_dict() == {k: trained[k] for k in ("model", "model_config", "train")}
    capsys.readouterr()
    assert main(["compare", "--data", str(tiny_synth), "--models", str(tmp_path / "configs" / "nobgf.yaml"),
                 "--seeds", "1", "--out", str(tmp_path / "cmp")]) == 0  # a saved config is a compare entry
    assert json.loads((tmp_path / "cmp" / "results.json").read_text())["rows"][0]["model"] == "nobgf"
    assert main(["tune", "--data", str(tiny_synth), "--models", "dlrm", "--trials", "0", "--out", str(tmp_path)]) == 2


def test_the_table_gives_a_spread_only_where_several_seeds_ran():
    from climber.compare import markdown

    row = {"model": "m", "parameters": 10, "seconds_per_epoch": 1.0, "epochs": 2.0, "last_auc": 0.7, "last_gauc": 0.6,
           "flops_per_candidate": 2.5e6}
    for m, v in (("auc", 0.75), ("gauc", 0.65), ("logloss", 0.5)):
        row.update({m: v, f"{m}_std": 0.01})
    assert "| m | 1 | 0.7500 | 0.6500 | 0.5000 | 0.7000 | 0.6000 | 1.0 | 2.0 | 10 | 2.50 |" in markdown([{**row, "seeds": 1}])
    assert "| m | 3 | 0.7500 ± 0.0100 | 0.6500 ± 0.0100 | 0.5000 ± 0.0100 |" in markdown([{**row, "seeds": 3}])


@pytest.mark.parametrize("model,setting", [("climber", "context_features"), ("climber", "popularity_prior"),
                                           ("climber", "popularity_count"), ("dlrm", "popularity_prior"),
                                           ("dlrm", "popularity_count")])
def test_a_model_setting_a_saved_run_lacks_counts_as_off(tmp_path, model, setting):
    """Default presets turned model settings on (robustness suite: Climber's context features in the
    ninth round, popularity prior in the eleventh, count in the thirteenth; DLRM's prior and count in
    the thirteenth): a run saved before the setting existed was trained without it and is no run of
    today's default."""
    from climber.compare import Entry, train_or_skip
    from climber.config import ConfigError, save_yaml

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"best": {"epoch": 0}}))
    saved = Entry.parse(model).config([]).to_dict()
    assert saved["model_config"][setting] is True
    del saved["model_config"][setting]
    if setting == "popularity_prior":  # the count needs the prior: a run from before the prior had neither
        del saved["model_config"]["popularity_count"]
    save_yaml(saved, run / "config.yaml")
    off = [f"model.{setting}=false"] + (["model.popularity_count=false"] if setting == "popularity_prior" else [])
    without = Entry.parse(model).config(off)
    assert train_or_skip(run, tmp_path, without, "x", log=lambda *_: None) == {"best": {"epoch": 0}}
    with pytest.raises(ConfigError, match=rf"model_config.{setting}: False -> True"):
        train_or_skip(run, tmp_path, Entry.parse(model).config([]), "x", log=lambda *_: None)


def test_a_finished_run_with_other_settings_is_refused_not_reused(tmp_path):
    from climber.compare import Entry, train_or_skip
    from climber.config import ConfigError, save_yaml

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"best": {"epoch": 0}}))
    saved = Entry.parse("climber").config(["train.lr=0.002", "train.threads=2"]).to_dict()
    for key in ("embedding_decay", "lazy_embeddings", "id_init", "embedding_lr_mult"):  # a run written before
        del saved["train"][key]                                                        # these settings existed
    saved["train"]["item_rate_buckets"] = 0
    del saved["train"]["item_rate_min_events"]
    save_yaml(saved, run / "config.yaml")
    # a missing setting counts as the value it had before it existed (embedding_decay 0, lazy_embeddings
    # false, id_init normal); embedding_lr_mult's default kept the earlier behaviour; the rate feature is
    # off on both sides, so its minimum of events is moot
    before = ["train.embedding_decay=0", "train.lazy_embeddings=false", "train.id_init=normal", "train.item_rate_buckets=0"]
    same = Entry.parse("climber").config(["train.lr=0.002", "train.threads=1", *before])
    assert train_or_skip(run, tmp_path, same, "x", log=lambda *_: None) == {"best": {"epoch": 0}}
    new_default = Entry.parse("climber").config(["train.lr=0.002", "train.embedding_decay=0", "train.item_rate_buckets=0"])
    with pytest.raises(ConfigError, match=r"train.id_init: 'normal' -> 'zero'; train.lazy_embeddings: False -> True"):
        train_or_skip(run, tmp_path, new_default, "x", log=lambda *_: None)
    with pytest.raises(ConfigError, match=r"train.item_rate_min_events: 1 -> 20"):  # moot no more
        train_or_skip(run, tmp_path, Entry.parse("climber").config(["train.lr=0.002", *before[:3]]), "x")
    other = Entry.parse("climber").config(["train.lr=0.001", *before])
    with pytest.raises(ConfigError, match=r"\(train.lr: 0.002 -> 0.001\)"):
        train_or_skip(run, tmp_path, other, "x", log=lambda *_: None)
    saved["model_config"]["strategies"][0]["length"] = 7  # a list of dicts is compared item by item
    save_yaml(saved, run / "config.yaml")
    with pytest.raises(ConfigError, match=r"model_config.strategies\[0\].length: 7 -> 64"):
        train_or_skip(run, tmp_path, same, "x", log=lambda *_: None)
