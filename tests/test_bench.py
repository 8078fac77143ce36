"""climber.bench: the random inputs, the single-item expansion, and the train benchmark's report."""

from __future__ import annotations

import json

import pytest
import torch

from climber import bench
from climber.cli import main

TINY_CLIMBER = ["model.d_model=16", "model.n_heads=2", "model.n_layers=1"]


def test_single_item_rows_score_like_the_multi_item_batch():
    model = bench.bench_model("climber", TINY_CLIMBER, 12).eval()
    batch = bench.random_batch(tuple(s.length for s in model.strategies()), rows=3, candidates=5)
    single = bench.single_item_rows(batch)
    assert single.cand_item.shape == (15, 1) and single.seqs[0].item.shape == (15, 12)
    assert torch.equal(single.seqs[1].ts[5], batch.seqs[1].ts[1])  # row 5 = user 1, candidate 0
    torch.testing.assert_close(model(single)[:, 0], model(batch).reshape(-1), rtol=1e-5, atol=1e-5)


def test_per_candidate_scorer_in_chunks_scores_like_the_batch():
    model = bench.bench_model("climber", TINY_CLIMBER, 10).eval()
    batch = bench.random_batch(tuple(s.length for s in model.strategies()), rows=1, candidates=7)
    score = bench.per_candidate_scorer(model, batch, max_elements=3 * 11**2)  # chunks of 3 rows: 3 + 3 + 1
    torch.testing.assert_close(score(), model(batch)[0], rtol=1e-5, atol=1e-5)


def test_bench_model_sets_every_length():
    assert [s.length for s in bench.bench_model("climber", TINY_CLIMBER, 40).strategies()] == [40, 40]
    assert [s.length for s in bench.bench_model("din", [], 40).strategies()] == [40]


def test_bench_train_report(capsys):
    out = bench.bench_train("climber", lengths=(8,), candidates=(2, 4), rows=2, steps=1, warmup=0,
                            overrides=TINY_CLIMBER, peak=1e9, log=lambda *_: None)
    assert [(r["history"], r["candidates"]) for r in out["results"]] == [(8, 2), (8, 4)]
    for r in out["results"]:
        assert r["speedup"] == pytest.approx(r["multi"]["samples_per_s"] / r["single"]["samples_per_s"])
        for form in ("multi", "single"):
            assert r[form]["samples_per_s"] == pytest.approx(2 * r["candidates"] / r[form]["step_s"])
            assert r[form]["mfu"] == pytest.approx(r[form]["flop_per_s"] / 1e9)
    assert main(["bench", "train", "--lengths", "8", "--candidates", "2", "--steps", "1", "--json",
                 *[x for s in TINY_CLIMBER for x in ("--set", s)]]) == 0
    assert json.loads(capsys.readouterr().out)["results"][0]["history"] == 8


def test_bench_train_multi_form_only(capsys):
    assert main(["bench", "train", "--lengths", "8", "--candidates", "2", "--steps", "1", "--no-single",
                 *[x for s in TINY_CLIMBER for x in ("--set", s)]]) == 0
    out = capsys.readouterr().out
    assert "| 8 | 2 |" in out and "- | - | - |" in out  # the multi form's figures, none for the single form
    assert main(["bench", "train", "--lengths", "8,x"]) == 2
    assert "comma separated integers" in capsys.readouterr().err


@pytest.mark.parametrize("model", ["climber", "hstu", "din"])
def test_bench_serve_report(model, capsys):
    overrides = TINY_CLIMBER if model == "climber" else ["model.d_model=16"]
    out = bench.bench_serve(model, lengths=(12,), candidates=(3,), requests=2, overrides=overrides, peak=1e9,
                            log=lambda *_: None)  # it checks cached == full scores itself
    (r,) = out["results"]
    assert r["speedup_p50"] == pytest.approx(r["full"]["p50_ms"] / r["cached"]["p50_ms"])
    assert r["cached"]["p99_ms"] >= r["cached"]["p50_ms"] > 0
    assert 0 < r["full"]["flops"] and r["full"]["mfu"] == pytest.approx(r["full"]["flop_per_s"] / 1e9)
    assert r["speedup_vs_per_candidate_p50"] == pytest.approx(r["per_candidate"]["p50_ms"] / r["cached"]["p50_ms"])
    assert "| 12 | 3 |" in bench.markdown(out)
    if model == "climber":  # candidates only, against cached keys: fewer FLOPs than the full forward
        assert r["cached"]["flops"] < r["full"]["flops"]
        assert main(["bench", "serve", "--lengths", "12", "--candidates", "3", "--requests", "1", "--json",
                     *[x for s in TINY_CLIMBER for x in ("--set", s)]]) == 0
        assert json.loads(capsys.readouterr().out)["benchmark"] == "serve"


def test_bench_attention_report(capsys):
    """Each path in its own process: the same FLOPs formula per path (structured counts fewer), ratios
    against the last path, clear errors on an unknown path or several candidate counts."""
    assert main(["bench", "attention", "--lengths", "16,32", "--candidates", "4", "--rows", "2", "--steps", "1",
                 "--threads", "1", "--json", *[x for s in TINY_CLIMBER for x in ("--set", s)]]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["history"] for r in out["results"]] == [16, 32] and out["paths"] == ["structured", "dense"]
    for r in out["results"]:
        s, d = r["structured"], r["dense"]
        assert s["flops"] < d["flops"]  # no candidate x candidate scores, last layer candidates only
        assert r["structured_speedup"] == pytest.approx(d["seconds"] / s["seconds"])
        assert s["peak_rss_mb"] > 0 and s["step_peak_mb"] >= 0
    assert main(["bench", "attention", "--paths", "structured,flash"]) == 2
    assert "'flash' not one of structured" in capsys.readouterr().err
    assert main(["bench", "attention", "--candidates", "4,8"]) == 2
    assert "one --candidates value" in capsys.readouterr().err


def test_bench_train_times_a_config_file_as_configured(capsys, tmp_path):
    config = tmp_path / "two-blocks.yaml"
    config.write_text("model: climber\nmodel_config:\n  d_model: 16\n  n_layers: 1\n  strategies:\n"
                      "    - {name: recent, kind: recency, length: 12}\n    - {name: positive, kind: positive, length: 20}\n")
    args = ["bench", "train", "--config", str(config), "--candidates", "2", "--steps", "1", "--rows", "1", "--no-single"]
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == str(config) and out["results"][0]["history"] == 12 + 20  # the blocks' own lengths
    assert main([*args, "--lengths", "8"]) == 2  # a length would override the config's own
    assert "leave out --lengths" in capsys.readouterr().err
