"""Item side features (item_* columns): the lookup table built from the data, and what the embedding adds."""

from __future__ import annotations

import json

import polars as pl
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
