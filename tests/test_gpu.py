"""On a CUDA GPU (`make gpu-check`, or `pytest -m gpu`): the structured attention and FlexAttention on the
GPU against the reference on the CPU, flex against tiled and dense timed (`-s` shows the table), a two-epoch training in bf16 whose checkpoint loads on the CPU,
and eval / bench on the GPU. Skipped, with the reason, where torch sees no GPU."""

from __future__ import annotations

import json

import pytest
import torch

from climber.cli import main
from models.helpers import INFO, close, make_batch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU (torch.cuda.is_available() is False)")]

CUDA = torch.device("cuda")
CASES = {
    "climber": dict(d_model=32, n_heads=2, n_layers=2, dropout=0.0, match_bias=True,
                    strategies=[{"name": "recent", "kind": "recency", "length": 300},
                                {"name": "pos", "kind": "positive", "length": 40}]),
    "transformer": dict(d_model=32, n_heads=2, n_layers=2, max_len=300, dropout=0.0),
    "hstu": dict(d_model=32, n_heads=2, n_layers=2, max_len=300, dropout=0.0),
}


def logits_and_grads(model, batch):
    model.zero_grad()
    out = model(batch)
    out[batch.cand_mask].sum().backward()
    return out.detach().cpu(), {n: p.grad.cpu() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("path", ["structured", "flex"])
def test_structured_on_the_gpu_equals_the_reference_on_the_cpu(name, path):
    """The default (tiled) kernel and FlexAttention (with its backward, which the CPU lacks) on the GPU;
    fp32 without TF32."""
    from climber.models import build_model

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    reference = build_model(name, {**CASES[name], "attention": "reference"}, INFO).train()
    model = build_model(name, {**CASES[name], "attention": path}, INFO)
    model.load_state_dict(reference.state_dict())
    model.to(CUDA).train()
    batch = make_batch(B=3, lengths=tuple(s.length for s in reference.strategies()), C=5, seed=1)
    want = logits_and_grads(reference, batch)
    got = logits_and_grads(model, batch.to(CUDA))
    assert close(got[0], want[0], tol=1e-4), (got[0] - want[0]).abs().max()
    for n, g in want[1].items():
        assert close(got[1][n], g, tol=1e-4), n


def test_two_epochs_in_bf16_on_the_gpu_then_eval_on_gpu_and_cpu(tiny_synth, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(tiny_synth), "--model", "climber-tiny", "--out", str(run), "--no-progress",
                 "--device", "cuda", "--set", "train.epochs=2", "--set", "train.precision=bf16",
                 "--set", "model.popularity_prior=true", "--set", "model.popularity_count=true",
                 "--set", "model.popularity_fit=true", "--set", "train.item_min_events=2",
                 "--set", "train.item_id_shrink=10"]) == 0  # fold tables on the GPU
    epochs = [json.loads(x) for x in (run / "epochs.jsonl").read_text().splitlines()]
    assert len(epochs) == 2 and all(0.5 < e["val"]["auc"] <= 1 for e in epochs)
    capsys.readouterr()
    figures = {}
    for device in ("cuda", "cpu"):
        assert main(["eval", "--run", str(run), "--device", device, "--json"]) == 0
        figures[device] = json.loads(capsys.readouterr().out)["metrics"]["auc"]
    assert figures["cuda"] == pytest.approx(figures["cpu"], abs=1e-4)


def test_bench_attention_on_the_gpu_flex_against_tiled(capsys):
    """Prints the measurement that decides the CUDA kernel of model.attention=structured."""
    assert main(["bench", "attention", "--device", "cuda", "--lengths", "512,2048", "--candidates", "64", "--rows", "8",
                 "--paths", "flex,tiled,dense", "--set", "model.dropout=0"]) == 0  # flex has no attention dropout
    print(capsys.readouterr().out)
