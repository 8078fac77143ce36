"""SampleLoader: determinism, epoch reshuffle, __len__, streaming in chunks equals loading at once."""

import shutil
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from climber.data import loader as loader_module
from climber.data.batch import Batch
from climber.data.loader import SampleLoader
from climber.data.sequences import Strategy
from test_samples import STRATEGIES, write_prepared

ML_100K = Path("/work/shared/data/ml-100k")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    return write_prepared(tmp_path_factory.mktemp("loader"), users=40, seed=1)


@pytest.fixture(scope="module")
def rechunked(prepared, tmp_path_factory) -> Path:
    """The same prepared dir, events.parquet rewritten in row groups of 7 rows: users span row groups."""
    out = tmp_path_factory.mktemp("rechunked") / "prep"
    shutil.copytree(prepared, out)
    pq.write_table(pq.read_table(prepared / "events.parquet"), out / "events.parquet", row_group_size=7)
    return out


def loader(prepared, split, mode="multi", **kw) -> SampleLoader:
    c = 4 if mode == "multi" else 1
    return SampleLoader(prepared, split, STRATEGIES, batch_size=kw.pop("batch_size", 5), candidates_per_row=c,
                        mode=mode, **kw)


def tensors(batch: Batch) -> list[torch.Tensor]:
    out = [batch.user, batch.cand_item, batch.cand_scenario, batch.cand_ts, batch.cand_mask, batch.label]
    for s in batch.seqs:
        out += [s.item, s.action, s.scenario, s.ts, s.mask]
    return out


def same(a: list[Batch], b: list[Batch]) -> bool:
    return len(a) == len(b) and all(
        all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(tensors(p), tensors(q))) for p, q in zip(a, b)
    )


def rows(batches: list[Batch]) -> Counter:
    """The multiset of rows, each as plain values (real entries only), independent of padding and order."""
    out = Counter()
    for b in batches:
        for i in range(len(b.user)):
            m = b.cand_mask[i]
            key = [int(b.user[i]), *(tuple(t[i][m].tolist()) for t in (b.cand_item, b.cand_ts, b.label))]
            key += [tuple(t[i][s.mask[i]].tolist()) for s in b.seqs for t in (s.item, s.ts)]
            out[tuple(key)] += 1
    return out


def candidate_events(batches: list[Batch]) -> Counter:
    return Counter(
        (int(b.user[i]), int(item), int(ts))
        for b in batches for i in range(len(b.user))
        for item, ts in zip(b.cand_item[i][b.cand_mask[i]].tolist(), b.cand_ts[i][b.cand_mask[i]].tolist())
    )


def split_events(prepared: Path, split: str) -> Counter:
    t = pq.read_table(prepared / "events.parquet", columns=["user", "item", "ts", "split"]).to_pydict()
    return Counter((u, i, ts) for u, i, ts, s in zip(t["user"], t["item"], t["ts"], t["split"]) if s == split)


@pytest.mark.parametrize("mode", ["multi", "single"])
def test_same_seed_and_epoch_same_batches_and_train_reshuffles(prepared, mode):
    train = loader(prepared, "train", mode, seed=3)
    first = list(train)
    assert same(first, list(train))
    assert len(train) == len(first)
    train.set_epoch(1)
    second = list(train)
    assert len(train) == len(second) and not same(first, second)
    assert candidate_events(first) == candidate_events(second) == split_events(prepared, "train")
    assert not same(first, list(loader(prepared, "train", mode, seed=4)))


@pytest.mark.parametrize("split", ["val", "test"])
def test_eval_is_in_order_the_same_every_epoch_and_covers_the_split(prepared, split):
    ev = loader(prepared, split)
    first = list(ev)
    ev.set_epoch(5)
    assert same(first, list(ev)) and len(ev) == len(first)
    users = torch.cat([b.user for b in first]).tolist()
    assert users == sorted(users)
    assert candidate_events(first) == split_events(prepared, split)


@pytest.mark.parametrize("split, mode", [("train", "single"), ("val", "multi"), ("val", "single"),
                                         ("test", "multi"), ("test", "single")])
def test_streaming_in_small_chunks_yields_the_rows_of_one_chunk(prepared, rechunked, monkeypatch, split, mode):
    whole = list(loader(prepared, split, mode))
    monkeypatch.setattr(loader_module, "READ_BATCH_ROWS", 5)
    for shuffle in (False, True):
        streamed = loader(rechunked, split, mode, users_per_chunk=3, shuffle=shuffle)
        batches = list(streamed)
        assert len(streamed) == len(batches)
        assert rows(batches) == rows(whole)


def test_streaming_train_multi_covers_every_train_event_once(rechunked, monkeypatch):
    monkeypatch.setattr(loader_module, "READ_BATCH_ROWS", 5)
    train = loader(rechunked, "train", users_per_chunk=3)
    for epoch in (0, 1):
        train.set_epoch(epoch)
        batches = list(train)
        assert len(train) == len(batches)
        assert candidate_events(batches) == split_events(rechunked, "train")
        first_users = [int(b.user[0]) for b in batches]
        assert first_users != sorted(first_users)  # chunks and rows are shuffled


def test_clear_errors(prepared):
    with pytest.raises(ValueError, match="'dev' is not one of train, val, test"):
        loader(prepared, "dev")
    with pytest.raises(ValueError, match=r"strategy 'love'.*'love'.*known action values: like, play, skip"):
        SampleLoader(prepared, "train", [Strategy("love", "action", 4, ("love",))], batch_size=2,
                     candidates_per_row=2)


@pytest.mark.skipif(not ML_100K.exists(), reason="MovieLens 100k not in /work/shared/data")
def test_movielens_100k_epoch_covers_the_train_split(tmp_path):
    from climber.data.datasets import load_dataset
    from climber.data.prepare import prepare

    manifest = prepare(load_dataset("movielens-100k", ML_100K), tmp_path / "ml", log=lambda *_: None)
    strategies = [Strategy("recent", "recency", 256), Strategy("likes", "action", 64, ("4", "5"))]
    train = SampleLoader(tmp_path / "ml", "train", strategies, batch_size=64, candidates_per_row=32)
    batches = list(train)
    assert len(batches) == len(train)
    assert sum(b.num_candidates for b in batches) == manifest["splits"]["train"]["rows"]
    assert max(b.seqs[0].mask.shape[1] for b in batches) == 256


def padding(batches: list[Batch]) -> float:
    padded, slots = (sum(x) for x in zip(*(b.history_slots() for b in batches)))
    return padded / slots


def test_bucketed_batches_are_the_same_rows_with_less_padding_fresh_each_epoch(prepared):
    plain = loader(prepared, "train", seed=3, batch_size=4)
    bucketed = loader(prepared, "train", seed=3, batch_size=4, bucket=True)
    for epoch in (0, 1):
        plain.set_epoch(epoch)
        bucketed.set_epoch(epoch)
        a, b = list(plain), list(bucketed)
        assert rows(a) == rows(b) and len(a) == len(b) == len(bucketed)  # the same rows, as many batches
        assert padding(b) < padding(a)
        assert same(b, list(bucketed))  # deterministic per (seed, epoch)
    bucketed.set_epoch(0)
    first = list(bucketed)
    bucketed.set_epoch(1)
    assert not same(first, list(bucketed))
    assert not same(first, list(loader(prepared, "train", seed=4, batch_size=4, bucket=True)))


def test_bucketing_needs_shuffled_rows(prepared):
    with pytest.raises(ValueError, match="bucket needs shuffle"):
        loader(prepared, "val", bucket=True)


@pytest.mark.parametrize("split", ["train", "val"])
def test_worker_processes_give_the_batches_of_one_process_in_order(prepared, split):
    kw = {"seed": 2, "batch_size": 3, "users_per_chunk": 7, "bucket": split == "train"}
    one = loader(prepared, split, **kw)
    two = loader(prepared, split, workers=2, **kw)
    for epoch in (0, 1):
        one.set_epoch(epoch)
        two.set_epoch(epoch)
        assert same(list(one), list(two))


def test_auto_workers_leaves_small_machines_one_process():
    assert loader_module.auto_workers(2) == 0 and loader_module.auto_workers(1) == 0
    assert loader_module.auto_workers(3) == 2 and loader_module.auto_workers(16) == 2
