"""The command line itself: --version, `models --json`, which errors are the user's (one line, exit 2)
and which are bugs (a traceback), wrong-typed --set values."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import climber
from climber import cli
from climber.cli import main
from climber.config import ConfigError, preset_names, resolve
from climber.data.schema import DataError
from climber.models import DataInfo, build_model, flops_per_candidate, model_names


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"climber {climber.__version__}\n"


def test_models_json_gives_each_preset_its_parameters_and_flops_on_the_stated_vocabularies(capsys):
    assert main(["models", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["version"] == climber.__version__
    a = out["assumes"]
    info = DataInfo(num_users=a["users"], num_items=a["items"], actions=tuple(f"a{i}" for i in range(a["actions"])),
                    scenarios=tuple(f"s{i}" for i in range(a["scenarios"])))
    assert [m["name"] for m in out["models"]] == model_names()
    assert {m["name"]: m["default_preset"] for m in out["models"]}["climber"] == "climber-small"
    assert [p["name"] for p in out["presets"]] == preset_names()
    for p in out["presets"]:
        cfg = resolve(p["name"], None, [])
        model = build_model(cfg.model, cfg.model_config, info)
        assert p["model"] == cfg.model
        assert p["parameters"]["total"] == sum(x.numel() for x in model.parameters())
        assert p["forward_flops_per_candidate"] == flops_per_candidate(model, a["candidates_per_row"])


def _raises(error):
    def command(args):
        raise error
    return command


def test_a_value_error_of_the_library_is_a_bug_with_its_traceback(monkeypatch):
    monkeypatch.delenv("CLIMBER_DEBUG", raising=False)
    monkeypatch.setattr(cli, "_models", _raises(ValueError("boom")))
    with pytest.raises(ValueError, match="boom"):
        main(["models"])


@pytest.mark.parametrize("error", [ConfigError, DataError, FileNotFoundError])
def test_a_user_error_is_one_line_and_exit_2(error, monkeypatch, capsys):
    monkeypatch.delenv("CLIMBER_DEBUG", raising=False)
    monkeypatch.setattr(cli, "_models", _raises(error("what to fix")))
    assert main(["models"]) == 2
    assert capsys.readouterr().err == "climber: error: what to fix\n"


@pytest.mark.parametrize("override, message", [
    ("train.epochs=one", "train.epochs: expected an integer, got 'one'"),
    ("train.lr=fast", "train.lr: expected a number, got 'fast'"),
    ("model.d_model=abc", "ClimberConfig.d_model: expected an integer, got 'abc'"),
])
def test_train_with_a_wrong_typed_setting_names_it_in_one_line(tiny_synth, tmp_path, capsys, override, message):
    run = tmp_path / "run"
    assert main(["train", "--data", str(tiny_synth), "--model", "climber-tiny", "--out", str(run),
                 "--set", override]) == 2
    assert capsys.readouterr().err == f"climber: error: {message}\n"
    assert not run.exists()


def test_the_installed_command_exits_2_without_a_traceback(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "CLIMBER_DEBUG"}
    proc = subprocess.run([sys.executable, "-m", "climber", "train", "--data", str(tmp_path), "--out",
                           str(tmp_path / "run"), "--set", "train.epochs=one"], env=env, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr == "climber: error: train.epochs: expected an integer, got 'one'\n"
