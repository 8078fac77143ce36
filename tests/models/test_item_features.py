"""Item side features (item_* columns): the lookup table built from the data, and what the embedding adds."""

from __future__ import annotations

import json

import polars as pl
import pytest
import torch

from climber.data import synthetic
from climber.models import DataInfo, build_model
from climber.models.layers import ItemEmbedding


def test_table_maps_each_item_to_its_generator_topic(tiny_synth):
    info = DataInfo.from_prepared(tiny_synth)
    assert [c for c, _ in info.item_features] == ["item_topic"]
    model = build_model("climber", {}, info, prepared=tiny_synth)
    table = model.emb.item.feature_ids  # (num_items + 1, 1)
    gen = json.loads((tiny_synth / "manifest.json").read_text())["generator"]
    topic, _ = synthetic.item_params(gen["items"], gen["topics"], gen["seed"])
    items = pl.read_parquet(tiny_synth / "vocab" / "item.parquet")
    topics = dict(pl.read_parquet(tiny_synth / "vocab" / "item_topic.parquet").select("raw", "id").iter_rows())
    for item_id, raw in items.select("id", "raw").iter_rows():
        assert table[item_id, 0] == topics[f"t{topic[int(raw[1:])]}"]
    assert table[0, 0] == 0


def test_item_embedding_adds_the_feature_vector(tiny_synth):
    info = DataInfo.from_prepared(tiny_synth)
    emb = ItemEmbedding(info.num_items, 8, info.item_features)
    emb.feature_ids.copy_(torch.randint(1, info.item_features[0][1] + 1, emb.feature_ids.shape))
    ids = torch.tensor([[1, 5], [2, 0]])
    expected = emb.weight[ids] + emb.features[0].weight[emb.feature_ids[ids, 0]]
    torch.testing.assert_close(emb(ids), expected)
    # without features (or before the table is filled) it is the plain id table
    plain = build_model("climber", {}, info)
    assert torch.equal(plain.emb.item.feature_ids, torch.zeros_like(plain.emb.item.feature_ids))
    assert "emb.item.feature_ids" in plain.state_dict()  # saved with the checkpoint


def test_train_item_vocab_embeds_items_without_a_train_event_as_the_unknown_item(tmp_path):
    data = tmp_path / "sparse"  # 400 items, 300 events: many items first seen in val / test
    synthetic.synthesize(data, users=30, events_per_user=10, items=400, topics=4, seed=2, log=lambda *_: None)
    info = DataInfo.from_prepared(data)
    events = pl.read_parquet(data / "events.parquet")
    in_train = set(events.filter(pl.col("split") == "train")["item"].to_list())
    unseen = sorted(set(events["item"].to_list()) - in_train)
    assert unseen
    torch.manual_seed(0)
    own = build_model("climber", {}, info, prepared=data)
    torch.manual_seed(0)
    shared = build_model("climber", {}, info, prepared=data, item_vocab="train")
    seen = sorted(in_train)[:3]
    ids = torch.tensor([*seen, *unseen[:3]])
    side = shared.emb.item.features[0].weight[shared.emb.item.feature_ids[ids, 0]]  # side features stay the item's own
    torch.testing.assert_close(shared.emb.item(ids)[:3], own.emb.item(ids)[:3])
    torch.testing.assert_close(shared.emb.item(ids)[3:], side[3:])  # id part: row 0, the zero vector
    assert not torch.allclose(own.emb.item(ids)[3:], side[3:])
    assert shared.state_dict()["emb.item.id_row"][unseen].eq(0).all()  # saved with the checkpoint (serving)


def test_rate_buckets_order_items_by_their_smoothed_train_rate(tmp_path):
    from climber.eval.floor import PRIOR_EVENTS
    from climber.eval.floor import item_train_rates
    from climber.models import RATE_FEATURE, item_rate_buckets, train_events

    data = tmp_path / "sparse"
    synthetic.synthesize(data, users=30, events_per_user=10, items=400, topics=4, seed=2, log=lambda *_: None)
    events = pl.read_parquet(data / "events.parquet")
    train = events.filter(pl.col("split") == "train")
    glob = train["label"].mean()
    info = DataInfo.from_prepared(data, item_rate_buckets=5)
    assert info.item_features[-1] == (RATE_FEATURE, 5) and info.rate_buckets == 5 and info.matches(data)
    buckets = item_rate_buckets(item_train_rates(train_events(data)), info.num_items, 5)
    assert buckets[0] == 0 and buckets[1:].min() >= 1 and buckets.max() == 5
    rate = {}  # recomputed: (positives + 10 x global) / (events + 10); the global rate without a train event
    for item in range(1, info.num_items + 1):
        labels = train.filter(pl.col("item") == item)["label"]
        rate[item] = (labels.sum() + PRIOR_EVENTS * glob) / (len(labels) + PRIOR_EVENTS)
    order = sorted(rate, key=rate.get)
    assert all(buckets[a] <= buckets[b] for a, b in zip(order, order[1:]))  # monotone in the rate
    in_train = set(train["item"].to_list())
    counts = torch.bincount(buckets[sorted(in_train)], minlength=6)[1:]
    assert counts.max() <= 2.5 * len(in_train) / 5  # quantile buckets: no bucket holds most items
    model = build_model("climber", {}, info, prepared=data)
    assert torch.equal(model.emb.item.feature_ids[:, -1], buckets)


def test_rate_buckets_give_items_of_few_train_events_the_global_rate(tmp_path):
    from climber.eval.floor import item_train_rates
    from climber.models import item_rate_buckets, train_events

    data = tmp_path / "sparse"
    synthetic.synthesize(data, users=60, events_per_user=12, items=150, topics=4, seed=3, log=lambda *_: None)
    train = pl.read_parquet(data / "events.parquet").filter(pl.col("split") == "train")
    info = DataInfo.from_prepared(data)
    counts = dict(train.group_by("item").len().iter_rows())
    few = [i for i in range(1, info.num_items + 1) if counts.get(i, 0) < 4]
    many = [i for i in range(1, info.num_items + 1) if counts.get(i, 0) >= 4]
    assert few and many
    buckets = item_rate_buckets(item_train_rates(train_events(data)), info.num_items, 5, min_events=4)
    glob = train["label"].mean()
    below = sum(1 for i in many if train.filter(pl.col("item") == i)["label"].mean() < glob)
    assert len({int(buckets[i]) for i in few}) == 1  # one shared bucket, whatever their own labels
    assert len({int(buckets[i]) for i in many}) == 5  # quantiles over the items with enough events
    shared = int(buckets[few[0]])
    assert sum(int(buckets[i]) < shared for i in many) <= below  # the shared bucket sits at the global rate
    assert item_rate_buckets(item_train_rates(train_events(data)), info.num_items, 5, min_events=1)[few].unique().numel() > 1


def test_id_dropout_drops_the_id_vector_at_its_rate_in_training_only_and_keeps_side_features(tiny_synth):
    info = DataInfo.from_prepared(tiny_synth)
    emb = ItemEmbedding(info.num_items, 4, info.item_features)
    with torch.no_grad():
        emb.weight[1:] = 1.0  # every id vector (1, 1, 1, 1); feature vectors (-1, ...) * 10
        emb.features[0].weight[1:] = -10.0
    emb.feature_ids.fill_(1)
    emb.feature_ids[0] = 0
    ids = torch.randint(1, info.num_items + 1, (200, 50))
    emb.id_dropout = 0.3
    torch.manual_seed(0)
    out = emb.train()(ids)[..., 0]  # -9 where the id vector is kept, -10 where it is dropped
    assert set(out.unique().tolist()) == {-10.0, -9.0}
    assert abs(float((out == -10).float().mean()) - 0.3) < 0.01
    assert torch.equal(emb.eval()(ids)[..., 0], torch.full((200, 50), -9.0))  # eval: no dropout


def test_a_checkpoint_from_before_id_row_loads_with_every_id_on_its_own_row(tiny_synth):
    info = DataInfo.from_prepared(tiny_synth)
    model = build_model("climber", {}, info, prepared=tiny_synth)
    model.emb.item.id_row.zero_()  # as if every item were unseen
    old = {k: v for k, v in build_model("climber", {}, info).state_dict().items() if not k.endswith("id_row")}
    model.load_state_dict(old)  # strict: no missing key
    assert torch.equal(model.emb.item.id_row, torch.arange(info.num_items + 1))


def sparse_log(tmp_path):
    data = tmp_path / "sparse"
    synthetic.synthesize(data, users=60, events_per_user=12, items=600, topics=4, seed=3, log=lambda *_: None)
    return data


def assert_fold_rows_ignore_their_users_labels(data, tables, folds: int, tmp_path) -> None:
    """``tables(prepared dir)`` (folds, ...): flip every train label of fold k's users and row k stays
    as it was while another row moves."""
    import shutil

    before = tables(data)
    events = pl.read_parquet(data / "events.parquet")
    for k in range(folds):
        flipped = tmp_path / f"flipped{k}"
        shutil.copytree(data, flipped)
        own = (pl.col("user") % folds == k) & (pl.col("split") == "train")
        events.with_columns(pl.when(own).then(1 - pl.col("label")).otherwise(pl.col("label")).alias("label")) \
            .write_parquet(flipped / "events.parquet")
        again = tables(flipped)
        assert torch.equal(again[k], before[k])
        assert not torch.equal(again[(k + 1) % folds], before[(k + 1) % folds])


def test_out_of_fold_rate_buckets_never_hold_the_labels_of_the_folds_own_users(tmp_path):
    from climber.eval.floor import item_train_rates
    from climber.models import fold_rate_buckets, item_rate_buckets, train_events

    data = sparse_log(tmp_path)
    info = DataInfo.from_prepared(data, item_rate_buckets=5)
    folds = fold_rate_buckets(train_events(data), info.num_items, 5, 1, 3)  # (3, items + 1)
    assert folds.shape == (3, info.num_items + 1) and folds[:, 0].eq(0).all()
    assert folds.min() >= 0 and folds.max() <= 5
    full = item_rate_buckets(item_train_rates(train_events(data)), info.num_items, 5)
    assert not all(torch.equal(folds[k], full) for k in range(3))
    assert_fold_rows_ignore_their_users_labels(data, lambda d: fold_rate_buckets(train_events(d), info.num_items, 5, 1, 3), 3, tmp_path)


def test_item_min_events_gives_items_of_fewer_train_events_the_unknown_items_row(tmp_path):
    """train.item_min_events=k: an item with fewer than k train events embeds as the unknown item (row 0,
    a zero vector, plus its own side features), as an item without one does; the trainer builds it."""
    from climber.config import ConfigError, resolve
    from climber.train.loop import Trainer
    from conftest import TINY

    data = sparse_log(tmp_path)
    counts = dict(pl.read_parquet(data / "events.parquet").filter(pl.col("split") == "train")
                  .group_by("item").len().iter_rows())
    cfg = resolve("climber-tiny", None, TINY + ["train.item_vocab=train", "train.item_min_events=3"])
    id_row = Trainer(tmp_path / "run", data, cfg, log=lambda *_: None, progress=False).model.emb.item.id_row
    expected = [item if counts.get(item, 0) >= 3 else 0 for item in range(len(id_row))]
    assert id_row.tolist() == expected
    assert 0 < sum(1 for n in counts.values() if n < 3) and any(n >= 3 for n in counts.values())
    with pytest.raises(ConfigError, match="item_min_events"):
        resolve("climber-tiny", None, ["train.item_min_events=0"])
    with pytest.raises(ConfigError, match="needs train.item_vocab=train"):
        resolve("climber-tiny", None, ["train.item_vocab=all", "train.item_min_events=2"])


def test_item_id_shrink_scales_each_items_own_vector_by_its_train_evidence(tmp_path):
    """train.item_id_shrink=k (default 10): item i's id vector times n_i / (n_i + k), n_i its train events (0 without
    one), its side features unscaled; off (0), the scales are ones, so lookups are the plain rows exactly.
    A checkpoint written before the setting loads with ones."""
    from climber.config import ConfigError, resolve
    from climber.models.layers import side_vector
    from climber.train.loop import Trainer
    from conftest import TINY

    data = sparse_log(tmp_path)
    counts = dict(pl.read_parquet(data / "events.parquet").filter(pl.col("split") == "train")
                  .group_by("item").len().iter_rows())
    cfg = resolve("climber-tiny", None, TINY + ["train.item_id_shrink=4"])
    emb = Trainer(tmp_path / "run", data, cfg, log=lambda *_: None, progress=False).model.emb.item
    expected = torch.tensor([counts.get(i, 0) / (counts.get(i, 0) + 4) for i in range(emb.num_embeddings)])
    assert torch.allclose(emb.id_scale, expected)
    assert expected.max() < 1 and len(set(counts.values())) > 1  # items of different evidence: different scales
    with torch.no_grad():
        emb.weight.normal_()
    emb.eval()
    ids = torch.arange(1, emb.num_embeddings).view(1, -1)
    want = emb.weight[emb.id_row[ids]] * expected[ids].unsqueeze(-1) + side_vector(emb, ids, None)
    assert torch.allclose(emb(ids), want)
    plain = Trainer(tmp_path / "plain", data, resolve("climber-tiny", None, TINY + ["train.item_id_shrink=0"]),
                    log=lambda *_: None, progress=False).model.emb.item
    assert torch.equal(plain.id_scale, torch.ones(plain.num_embeddings))
    state = {k: v for k, v in emb.state_dict().items() if k != "id_scale"}
    emb.load_state_dict(state)
    assert torch.equal(emb.id_scale, torch.ones(emb.num_embeddings))
    with pytest.raises(ConfigError, match="item_id_shrink"):
        resolve("climber-tiny", None, ["train.item_id_shrink=-1"])


def test_the_popularity_prior_is_the_floors_logit_less_the_global_rates_and_never_its_folds_labels(tmp_path):
    """Climber's popularity_prior table: for each item the floor's score (its smoothed train rate as
    log-odds, climber.eval.floor) minus the global rate's, so 0 for an item without a train event; the
    training tables (one per fold) hold no label of their fold's users."""
    import math

    from climber.eval.floor import item_train_rates, with_floor_logits
    from climber.models import PRIOR_FOLDS, fold_prior_logits, train_events

    data = sparse_log(tmp_path)
    info = DataInfo.from_prepared(data)
    prior = build_model("climber", {"popularity_prior": True}, info, prepared=data).prior
    events = pl.read_parquet(data / "events.parquet")
    per_item, rate = item_train_rates(events)
    floor = with_floor_logits(pl.DataFrame({"item": range(1, info.num_items + 1)}), per_item, rate).sort("item")
    expected = torch.tensor(floor["floor_logit"].to_numpy() - math.log(rate / (1 - rate)), dtype=torch.float32)
    torch.testing.assert_close(prior.logits[1:], expected)
    unseen = torch.from_numpy(floor["events"].to_numpy() == 0)
    assert unseen.any() and prior.logits[1:][unseen].eq(0).all() and prior.logits[0] == 0
    assert prior.logits[1:][~unseen].ne(0).any() and prior.weight.item() == 1.0
    assert prior.fold_logits.shape == (PRIOR_FOLDS, info.num_items + 1)
    assert_fold_rows_ignore_their_users_labels(data, lambda d: fold_prior_logits(train_events(d), info.num_items, 3)[0], 3, tmp_path)


def test_the_popularity_count_is_log1p_of_the_train_events_and_out_of_fold_in_training(tmp_path):
    """popularity_count's tables: log1p(an item's train events), 0 without one; the row of fold k counts
    the train events of the users outside fold k, times folds / (folds - 1)."""
    from climber.models import fold_prior_logits, train_events

    data = sparse_log(tmp_path)
    info = DataInfo.from_prepared(data)
    prior = build_model("climber", {"popularity_prior": True, "popularity_count": True}, info, prepared=data).prior
    train = pl.read_parquet(data / "events.parquet").filter(pl.col("split") == "train")

    def expected(events, scale):
        counts = torch.zeros(info.num_items + 1)
        for item, n in events.group_by("item").len().iter_rows():
            counts[item] = n
        return torch.log1p(counts * scale) * (counts > 0)

    torch.testing.assert_close(prior.log_counts, expected(train, 1.0))
    assert prior.log_counts[0] == 0 and prior.count_weight.item() == 0.0
    _, folds = fold_prior_logits(train_events(data), info.num_items, 3)
    for k in range(3):
        torch.testing.assert_close(folds[k], expected(train.filter(pl.col("user") % 3 != k), 1.5))
    assert (folds == 0).sum() > (prior.log_counts == 0).sum() * 3  # items only fold k saw count 0 there


def labelled_by_known_weights(tmp_path, theta, folds: int = 5):
    """A prepared-like dir of train events whose labels follow a conditional logit: P(click) =
    sigmoid(user's own offset + theta . x), x the item's rows in two random (folds, items + 1) tables
    at the user's fold; returns (dir, tables)."""
    generator = torch.Generator().manual_seed(0)
    users, items_per_user, num_items = 400, 40, 300
    tables = [torch.randn(folds, num_items + 1, generator=generator) for _ in theta]
    user = torch.arange(users).repeat_interleave(items_per_user)
    item = torch.randint(1, num_items + 1, (len(user),), generator=generator)
    x = torch.stack([t[user % folds, item] for t in tables], dim=1)
    offset = 2 * torch.randn(users, generator=generator)[user]
    label = torch.rand(len(user), generator=generator) < torch.sigmoid(offset + x @ torch.tensor(theta))
    data = tmp_path / "known"
    data.mkdir()
    pl.DataFrame({"user": user.numpy(), "item": item.numpy(), "label": label.int().numpy(),
                  "split": ["train"] * (len(user) - 100) + ["test"] * 100}).write_parquet(data / "events.parquet")
    return data, tables


def test_the_popularity_fit_finds_the_weights_that_labelled_the_data_and_matches_an_exact_fit(tmp_path):
    """fit_prior_weights recovers the weights of a conditional logit from the user-fold rows of the
    tables, whatever each user's own click rate; and it equals a plain fit over every pair of every user,
    weighted as GAUC weighs them (n_u / (positives_u x negatives_u)), solved by L-BFGS."""
    from climber.models import fit_prior_weights, train_events

    data, tables = labelled_by_known_weights(tmp_path, [0.8, -0.5])
    fitted = fit_prior_weights(train_events(data), tables)
    assert fitted == pytest.approx([0.8, -0.5], abs=0.12)

    train = pl.read_parquet(data / "events.parquet").filter(pl.col("split") == "train")
    user, item = torch.tensor(train["user"].to_numpy()), torch.tensor(train["item"].to_numpy())
    x = torch.stack([t[user % 5, item] for t in tables], dim=1).double()
    label = torch.tensor(train["label"].to_numpy()).bool()
    diffs, weights = [], []
    for u in user.unique():
        mine = user == u
        pos, neg = x[mine & label], x[mine & ~label]
        if len(pos) and len(neg):
            diffs.append((pos[:, None] - neg[None]).reshape(-1, 2))
            weights.append(torch.full((len(pos) * len(neg),), mine.sum().item() / (len(pos) * len(neg))))
    diff, weight = torch.cat(diffs), torch.cat(weights).double()
    theta = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([theta], max_iter=200, tolerance_grad=1e-10, line_search_fn="strong_wolfe")

    def loss():
        optimizer.zero_grad()
        value = -(weight * torch.nn.functional.logsigmoid(diff @ theta)).sum() / weight.sum()
        value.backward()
        return value

    optimizer.step(loss)
    assert fitted == pytest.approx(theta.tolist(), abs=0.03)  # the sampled pairs against all of them


@pytest.mark.parametrize("model", ["climber", "dlrm"])
def test_popularity_fit_starts_the_priors_weights_at_the_fit_of_its_own_training_tables(tmp_path, model):
    from climber.models import fit_prior_weights, train_events

    data = sparse_log(tmp_path)
    info = DataInfo.from_prepared(data)
    for count in (False, True):
        cfg = {"popularity_prior": True, "popularity_count": count}
        plain = build_model(model, cfg, info, prepared=data).prior
        fitted = build_model(model, {**cfg, "popularity_fit": True}, info, prepared=data).prior
        tables = [plain.fold_logits] + ([plain.fold_log_counts] if count else [])
        weights = [fitted.weight] + ([fitted.count_weight] if count else [])
        expected = fit_prior_weights(train_events(data), tables)
        assert [w.item() for w in weights] == pytest.approx(expected, rel=1e-6)
        assert expected != pytest.approx([1.0, 0.0][:len(expected)], abs=0.01)  # it moved from the start
        assert plain.weight.item() == 1.0


def test_training_candidates_take_their_users_fold_rate_history_and_eval_the_whole_table(tiny_synth):
    info = DataInfo.from_prepared(tiny_synth, item_rate_buckets=4)  # features: item_topic, then the rate
    emb = ItemEmbedding(info.num_items, 8, info.item_features)
    n = info.num_items + 1
    emb.feature_ids.copy_(torch.stack([torch.randint(1, 3, (n,)), torch.randint(1, 5, (n,))], dim=1))
    emb.fold_rates = torch.randint(1, 5, (2, n))
    ids, users = torch.tensor([[1, 5, 7], [2, 3, 9]]), torch.tensor([4, 7])  # folds 0 and 1

    def expected(rate):  # the id vector + topic vector + the given rate bucket's vector
        return emb.weight[ids] + emb.features[0].weight[emb.feature_ids[ids, 0]] + emb.features[1].weight[rate]

    own_fold = torch.stack([emb.fold_rates[0, ids[0]], emb.fold_rates[1, ids[1]]])
    torch.testing.assert_close(emb.train()(ids, users), expected(own_fold))
    torch.testing.assert_close(emb.train()(ids), expected(emb.feature_ids[ids, 1]))  # history tokens
    torch.testing.assert_close(emb.eval()(ids, users), expected(emb.feature_ids[ids, 1]))  # val, test, serving


def test_trainer_fills_fold_tables_that_checkpoints_leave_out_and_refuses_bad_folds(tiny_synth, tmp_path):
    """The rate buckets' and the popularity prior's out-of-fold tables, filled by the trainer, never saved."""
    from climber.config import ConfigError, resolve
    from climber.models import PRIOR_FOLDS
    from climber.train.loop import Trainer
    from conftest import TINY

    cfg = resolve("climber-tiny", None, TINY + ["train.item_rate_buckets=4", "train.item_rate_folds=2",
                                                "model.popularity_prior=true", "model.popularity_count=true"])
    model = Trainer(tmp_path / "run", tiny_synth, cfg, log=lambda *_: None, progress=False).model
    item = model.emb.item
    assert item.fold_rates.shape == (2, item.num_embeddings) and item.fold_rates[:, 1:].min() >= 1
    assert "emb.item.fold_rates" not in item.state_dict() and "fold_rates" not in item.state_dict()
    prior = model.prior
    for table, folds in ((prior.logits, prior.fold_logits), (prior.log_counts, prior.fold_log_counts)):
        assert table.abs().sum() > 0 and folds.shape == (PRIOR_FOLDS, item.num_embeddings) and folds.abs().sum() > 0
    assert not any("fold_" in k for k in model.state_dict())
    for bad, match in (("train.item_rate_folds=1", "item_rate_folds"), ("train.item_rate_folds=-2", "item_rate_folds")):
        with pytest.raises(ConfigError, match=match):
            resolve("climber-tiny", None, [bad])
    with pytest.raises(ConfigError, match="item_rate_buckets"):
        resolve("climber-tiny", None, ["train.item_rate_folds=3", "train.item_rate_buckets=0"])
