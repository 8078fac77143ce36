"""Features beyond ids (issue 19) in the data pipeline and the models: user features and bags of values
(tables filled from the prepared data, mean pooling of a bag, where a user's features enter each model,
checkpoints from before them), and per-event context (ctx_*, num_*) carried by batches into every token."""

from __future__ import annotations

import dataclasses

import polars as pl
import pytest
import torch

from climber.cli import main
from climber.models import DataInfo, build_model, model_names
from climber.models.layers import ItemEmbedding, UserFeatures
from conftest import TINY, prepare_feature_log
import helpers

INFO = dataclasses.replace(helpers.INFO, item_bags=(("item_tags", 4, 3),), user_features=(("user_age", 3),),
                           user_bags=(("user_likes", 5, 2),))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepare_feature_log(tmp_path_factory.mktemp("features"))


def test_the_tables_hold_each_users_and_items_values(prepared):
    info = DataInfo.from_prepared(prepared)
    assert info.user_features == (("user_age", 3),) and info.user_bags == (("user_likes", 3, 2),)
    assert info.item_bags == (("item_tags", 4, 3),)
    model = build_model("transformer", {"d_model": 8, "n_heads": 2, "max_len": 8}, info, prepared=prepared)
    events = pl.read_parquet(prepared / "events.parquet")
    first = events.group_by("user").agg(pl.col("user_age").first(), pl.col("user_likes").first())
    users = model.emb.user_features
    for row in first.iter_rows(named=True):
        assert users.feature_ids[row["user"], 0] == row["user_age"]
        assert users.bag_ids[row["user"], 0].tolist() == row["user_likes"] + [0] * (2 - len(row["user_likes"]))
    u9 = events.filter(pl.col("user_raw") == "u9")["user"][0]  # no row in the user table: unknown
    assert users.feature_ids[u9].eq(0).all() and users.bag_ids[u9].eq(0).all()
    item_first = events.group_by("item").agg(pl.col("item_tags").first())
    for row in item_first.iter_rows(named=True):
        bag = model.emb.item.bag_ids[row["item"], 0].tolist()
        assert bag == row["item_tags"] + [0] * (3 - len(row["item_tags"]))


def test_a_bag_embeds_to_the_mean_of_its_values():
    torch.manual_seed(0)
    emb = ItemEmbedding(INFO.num_items, 4, (), INFO.item_bags)
    emb.bag_ids[1, 0] = torch.tensor([2, 3, 0])
    emb.bag_ids[2, 0] = torch.tensor([4, 0, 0])  # items 3.. have an empty bag: the id vector alone
    tags = emb.bags[0].weight
    want = torch.stack([emb.weight[1] + (tags[2] + tags[3]) / 2, emb.weight[2] + tags[4], emb.weight[3]])
    torch.testing.assert_close(emb(torch.tensor([1, 2, 3])), want)


def filled(name: str, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(name, {}, INFO).eval()
    users = model.emb.user_features if hasattr(model, "emb") else model.features.emb.user_features
    users.feature_ids[1:] = torch.randint(1, 4, users.feature_ids[1:].shape)
    users.bag_ids[1:] = torch.randint(0, 6, users.bag_ids[1:].shape)
    return model, users


@pytest.mark.parametrize("name", model_names())
def test_a_users_features_reach_every_models_scores(name):
    model, users = filled(name)
    batch = helpers.make_batch(lengths=[s.length for s in model.strategies()])
    with torch.no_grad():
        before = model(batch)
        users.feature_ids[batch.user] = 0  # the same users without their features
        users.bag_ids[batch.user] = 0
        after = model(batch)
    real = batch.cand_mask
    assert not torch.allclose(before[real], after[real])


def test_a_user_new_at_serving_time_has_no_features():
    users = UserFeatures(INFO.num_users, 4, INFO.user_features, INFO.user_bags)
    users.feature_ids[1:] = 1
    assert users(torch.tensor([INFO.num_users + 3])).eq(0).all() and users(torch.tensor([2])).ne(0).any()


@pytest.mark.parametrize("name", model_names())
def test_checkpoints_from_before_bags_user_and_event_features_load(name):
    model = build_model(name, {}, DataInfo(num_users=6, num_items=9, actions=("a",), scenarios=("s",)))
    old = {k: v for k, v in model.state_dict().items()
           if "bag_ids" not in k and "user_features" not in k and "context" not in k}
    assert len(old) < len(model.state_dict())
    model.load_state_dict(old)  # strict: the missing buffers are the empty ones these models have


def test_a_run_trains_and_evaluates_on_every_kind_of_feature(prepared, tmp_path):
    for name in ("climber-tiny", "dlrm"):
        keep = [s for s in TINY if name == "climber-tiny" or not s.startswith("model.")]
        sets = [x for s in keep + ["train.epochs=1"] for x in ("--set", s)]
        run = tmp_path / name
        assert main(["train", "--data", str(prepared), "--model", name, "--out", str(run), "--no-progress", *sets]) == 0
        assert main(["eval", "--run", str(run)]) == 0


def test_batches_carry_each_events_context_and_each_candidates(prepared):
    from climber.data.loader import SampleLoader
    from climber.data.sequences import Strategy

    info = DataInfo.from_prepared(prepared)
    assert [c for c, _ in info.ctx_features] == ["ctx_device", "ctx_hour"]
    assert [c for c, *_ in info.numeric_features] == ["num_price"]
    events = pl.read_parquet(prepared / "events.parquet")
    by_key = {(r["user"], r["ts"]): ((r["ctx_device"], r["ctx_hour"]), r["num_price"]) for r in events.iter_rows(named=True)}
    loader = SampleLoader(prepared, "test", [Strategy(name="recent", kind="recency", length=6)], batch_size=4,
                          candidates_per_row=3)
    checked = 0
    for batch in loader:
        seq = batch.seqs[0]
        for where, ts, ctx, num, mask in ((seq, seq.ts, seq.ctx, seq.num, seq.mask),
                                          (batch, batch.cand_ts, batch.cand_ctx, batch.cand_num, batch.cand_mask)):
            for b, j in mask.nonzero().tolist():
                want_ctx, want_num = by_key[(int(batch.user[b]), int(ts[b, j]))]
                assert tuple(ctx[b, j].tolist()) == want_ctx and float(num[b, j]) == pytest.approx(want_num)
                checked += 1
            assert ctx[~mask].eq(0).all() and num[~mask].eq(0).all()  # padding
    assert checked > 50


def test_context_enters_tokens_standardised_and_a_candidates_own_context_moves_only_its_score(prepared):
    from climber.data.loader import SampleLoader

    info = DataInfo.from_prepared(prepared)
    torch.manual_seed(0)
    model = build_model("climber", {"d_model": 8, "n_heads": 2}, info, prepared=prepared).eval()
    context = model.emb.context
    _, mean, std = info.numeric_features[0]
    num, ctx, mask = torch.tensor([[3.0], [0.0]]), torch.tensor([[1, 2], [0, 0]]), torch.tensor([True, False])
    want = context.features[0].weight[1] + context.features[1].weight[2] + context.numbers.weight[:, 0] * (3.0 - mean) / std
    got = context(ctx, num, mask)
    torch.testing.assert_close(got[0], want)
    assert got[1].eq(0).all()  # padding
    batch = next(iter(SampleLoader(prepared, "test", model.strategies(), batch_size=2, candidates_per_row=4)))
    with torch.no_grad():
        before = model(batch)
        batch.cand_ctx[0, 0, 0] = batch.cand_ctx[0, 0, 0] % 3 + 1  # another device for one candidate
        after = model(batch)
    assert not torch.isclose(before[0, 0], after[0, 0])
    torch.testing.assert_close(before[0, 1:], after[0, 1:])  # candidates never see each other
    torch.testing.assert_close(before[1:], after[1:])
