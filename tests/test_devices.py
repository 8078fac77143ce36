"""climber.devices: device names, the bf16 refusal on CPUs without native bf16, and the structured attention
under bf16 autocast (the forward of train.precision=bf16), checked on the CPU for what a GPU runs."""

from __future__ import annotations

import pytest
import torch

from climber.config import ConfigError, TrainConfig
from climber.devices import autocast, check_precision, flushed_denormals, native_bf16, resolve_device
from climber.models import build_model
from models.helpers import INFO, make_batch

CPU = torch.device("cpu")


def test_device_names():
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto") == (torch.device("cuda") if torch.cuda.is_available() else CPU)
    for bad, message in (("tpu", "device must be auto, cpu, cuda, cuda:N or mps, got 'tpu'"),
                         ("cuda:first", "expected cuda:N")):
        with pytest.raises(ConfigError, match=message):
            resolve_device(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")
def test_cuda_without_a_gpu_is_one_clear_error():
    for name in ("cuda", "cuda:0"):
        with pytest.raises(ConfigError, match=f"device {name}: no CUDA GPU is available"):
            resolve_device(name)


def test_precision_names_and_the_bf16_refusal():
    check_precision("fp32", CPU)
    with pytest.raises(ConfigError, match="train.precision must be one of fp32, bf16"):
        TrainConfig(precision="fp16")
    if native_bf16(CPU):
        check_precision("bf16", CPU)
    else:
        with pytest.raises(ConfigError, match="no native bf16 .* use train.precision=fp32 or a GPU"):
            check_precision("bf16", CPU)


@pytest.mark.parametrize("name", ["climber", "transformer", "hstu"])
def test_structured_attention_runs_under_bf16_autocast_close_to_fp32(name):
    """bf16 matmuls (about 3 significant digits) inside the tiled kernel: logits within 0.05 of fp32 and
    finite fp32 gradients for every parameter."""
    cfg = dict(d_model=16, n_heads=2, n_layers=2, dropout=0.0)
    cfg |= {"strategies": [{"name": "recent", "kind": "recency", "length": 12}]} if name == "climber" else {"max_len": 12}
    model = build_model(name, cfg, INFO).train()
    batch = make_batch(B=2, lengths=tuple(s.length for s in model.strategies()), C=3, seed=1)
    want = model(batch).detach()
    with autocast(CPU, "bf16"):
        got = model(batch)
    assert got.dtype == torch.float32 or got.dtype == torch.bfloat16
    assert (got.float() - want)[batch.cand_mask].abs().max() < 0.05
    got.float()[batch.cand_mask].sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_subnormals_flush_to_zero_only_within_the_context():
    tiny = torch.tensor([1e-40])  # a float32 subnormal
    with flushed_denormals():
        assert (tiny * 1.0).item() == 0.0
    assert (tiny * 1.0).item() > 0.0  # IEEE again, for whatever runs next in this process
