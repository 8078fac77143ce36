"""Config resolution and overrides; checkpoint round trip (weights, optimizer, RNG) and atomic writes."""

from __future__ import annotations

import pytest
import torch

from climber.config import ConfigError, RunConfig, TrainConfig, apply_overrides, preset_names, resolve
from climber.data.schema import DataError
from climber.train import checkpoint


def test_overrides_are_typed_and_nested():
    d = apply_overrides({"model": "climber", "model_config": {"d_model": 32}},
                        ["train.lr=3e-4", "model.d_model=128", "model_config.use_bgf=false", "train.epochs=2"])
    assert d["train"] == {"lr": 3e-4, "epochs": 2}
    assert d["model_config"] == {"d_model": 128, "use_bgf": False}
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["train.lr"])


def test_unknown_train_setting_and_bad_values_are_rejected():
    with pytest.raises(ConfigError, match="unknown train settings.*'lrr'"):
        RunConfig.from_dict({"model": "climber", "train": {"lrr": 1}})
    with pytest.raises(ConfigError, match="train.mode"):
        TrainConfig(mode="both")
    with pytest.raises(ConfigError, match="train.batch_size"):
        TrainConfig(batch_size=0)


@pytest.mark.parametrize("override, message", [
    ("train.epochs=one", "train.epochs: expected an integer, got 'one'"),
    ("train.epochs=2.5", "train.epochs: expected an integer, got 2.5"),
    ("train.epochs=true", "train.epochs: expected an integer, got True"),
    ("train.lr=fast", "train.lr: expected a number, got 'fast'"),
    ("train.lr=false", "train.lr: expected a number, got False"),
    ("train.tensorboard=1", "train.tensorboard: expected true or false, got 1"),
    ("train.select=1", "train.select: expected a string, got 1"),
])
def test_train_settings_of_the_wrong_type_are_named_with_the_value_and_type(override, message):
    with pytest.raises(ConfigError) as e:
        resolve("climber-tiny", None, [override])
    assert str(e.value) == message


def test_a_float_setting_takes_an_integer():
    assert resolve("climber-tiny", None, ["train.lr=1", "train.max_epoch_minutes=2"]).train.lr == 1


@pytest.mark.parametrize("model, override, message", [
    ("climber", "model.d_model=abc", "ClimberConfig.d_model: expected an integer, got 'abc'"),
    ("climber", "model.use_atl=2", "ClimberConfig.use_atl: expected true or false, got 2"),
    ("climber", "model.dropout=high", "ClimberConfig.dropout: expected a number, got 'high'"),
    ("climber", "model.strategies=recent", "ClimberConfig.strategies: expected a list of mappings, got 'recent'"),
    ("dlrm", "model.top_mlp=64", "DLRMConfig.top_mlp: expected a list of integers, got 64"),
    ("dlrm", "model.top_mlp=[64,x]", "DLRMConfig.top_mlp: expected a list of integers, got [64, 'x']"),
    ("din", "model.activation=[dice]", "DINConfig.activation: expected a string, got ['dice']"),
])
def test_model_settings_of_the_wrong_type_are_named_with_the_value_and_type(model, override, message):
    from climber.models import config_class

    cfg = resolve(model, None, [override])
    with pytest.raises(ConfigError) as e:
        config_class(cfg.model).from_dict(cfg.model_config)
    assert str(e.value) == message


def test_resolve_layers_preset_file_and_overrides(tmp_path):
    assert "climber-small" in preset_names()
    f = tmp_path / "c.yaml"
    f.write_text("model_config: {d_model: 48}\ntrain: {epochs: 3, lr: 0.002}\n")
    cfg = resolve("climber-tiny", f, ["train.lr=0.005"])
    assert cfg.model == "climber"
    assert cfg.model_config["d_model"] == 48  # file beats preset
    assert cfg.train.lr == 0.005 and cfg.train.epochs == 3  # --set beats file
    assert "strategies" in cfg.model_config  # the rest comes from the preset
    with pytest.raises(ConfigError, match="not found"):
        resolve("climber", tmp_path / "missing.yaml", [])


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(5, 3)
        self.lin = torch.nn.Linear(3, 1)

    def forward(self, x):
        return torch.nn.functional.dropout(self.lin(self.emb(x)), 0.5, training=True).sum()


def test_checkpoint_round_trip_restores_training_exactly(tmp_path):
    torch.manual_seed(0)
    model, opt = Tiny(), None
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    x = torch.tensor([1, 2, 3])
    for _ in range(3):
        opt.zero_grad()
        model(x).backward()
        opt.step()
    checkpoint.save(tmp_path / "c.safetensors", model, {"epoch": 7}, opt)

    def continue_training(m, o):
        for _ in range(3):
            o.zero_grad()
            m(x).backward()
            o.step()
        return [p.detach().clone() for p in m.parameters()]

    expected = continue_training(model, opt)
    model2 = Tiny()
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.1)
    meta = checkpoint.load(tmp_path / "c.safetensors", model2, opt2)
    assert meta["epoch"] == 7
    got = continue_training(model2, opt2)  # same dropout draws (RNG restored), same Adam moments
    for a, b in zip(expected, got):
        assert torch.equal(a, b)
    assert not list(tmp_path.glob("*.tmp"))


def test_checkpoint_rejects_foreign_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(DataError, match="not a climber checkpoint"):
        checkpoint.read_meta(tmp_path / "other.safetensors")


def test_weight_average_follows_its_formula_and_restores_live_weights():
    from climber.train.optim import WeightAverage

    model = torch.nn.Linear(2, 1)
    start = model.weight.detach().clone()
    avg = WeightAverage(model, decay=0.9)
    with torch.no_grad():
        model.weight.add_(1.0)
    avg.update(model)  # t = 1: decay min(0.9, 2 / 11)
    d = 2 / 11
    assert torch.allclose(avg.shadow["weight"], d * start + (1 - d) * (start + 1))
    live = model.weight.detach().clone()
    with avg.applied(model):
        assert torch.equal(model.weight, avg.shadow["weight"])
    assert torch.equal(model.weight, live)
