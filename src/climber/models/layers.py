"""Shared building blocks: the one history subsequence of single-history models, the full-sequence mask
of "single user, multiple items" sequences (the dense oracle) and the positions of their tokens,
attention with bias / per-query temperature / mask over a full sequence (two paths that agree), the
structured two-step form of a layer stack (``encode_layers`` / ``score_layers``, see
climber.models.attention), feed-forward, pre-norm transformer layer (and its FLOPs), relative position
and time buckets, learned relative bias, per-scenario temperature, id embeddings, weight init, masked
mean and MLPs.

Shapes: B batch, H heads, N tokens (queries), M keys, L history slots, C candidates, d model width,
dh = d / H.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from climber.config import ConfigError
from climber.data.batch import Batch, Subsequence
from climber.data.sequences import Strategy
from climber.models.attention import QUERY_TILE, Plan, causal_tile_pairs


def history_strategy(max_len: int) -> list[Strategy]:
    """The strategies of a single-history model: the max_len most recent events."""
    return [Strategy(name="history", kind="recency", length=max_len)]


def one_history(batch: Batch, model: str) -> Subsequence:
    """The history subsequence of a single-history model's batch; ValueError naming ``model`` otherwise."""
    if len(batch.seqs) != 1:
        raise ValueError(f"{model}: batch has {len(batch.seqs)} subsequences, model expects 1 (history)")
    return batch.seqs[0]


def history_candidate_mask(hist_mask: torch.Tensor, cand_mask: torch.Tensor) -> torch.Tensor:
    """Who may attend to whom over the tokens [history (L) ; candidates (C)]; True = may attend.

    hist_mask (B, L) bool, cand_mask (B, C) bool -> (B, N, N) bool, N = L + C. History token i sees real
    history tokens j <= i (so history states never depend on candidates); candidate c sees every real
    history token and itself, never another candidate; padding keys are hidden; every row keeps its own
    diagonal, so no row is empty (no NaN from an all -inf softmax).
    """
    L, dev = hist_mask.shape[1], hist_mask.device
    N = L + cand_mask.shape[1]
    q = torch.arange(N, device=dev)[:, None]  # (N, 1) query positions
    k = torch.arange(N, device=dev)[None]  # (1, N) key positions
    allowed = torch.where(q < L, k <= q, k < L)  # history: causal; candidates: the whole history
    real_key = torch.cat([hist_mask, cand_mask], dim=1)  # (B, N)
    return (allowed[None] & real_key[:, None, :]) | (k == q)[None]  # (B, N, N)


def side_matches(q_side: torch.Tensor, k_side: torch.Tensor) -> torch.Tensor:
    """Item side feature ids of queries q_side (B, N, F) and keys k_side (B, M, F) (0 = unknown, never
    matches) -> (B, N, M, F) bool: query i and key j hold the same known value of feature f."""
    return (q_side[:, :, None] == k_side[:, None]) & (k_side[:, None] > 0)


def same_side_mask(side: torch.Tensor) -> torch.Tensor:
    """side (B, N, F) item side feature ids of the tokens (0 = unknown) -> (B, N, N) bool: the key's item
    shares every known side value of the query's item; each query keeps its own diagonal."""
    N = side.shape[1]
    return side_matches(side, side).all(dim=-1) | torch.eye(N, dtype=torch.bool, device=side.device)


def history_candidate_positions(seq: Subsequence, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """pos (1, N) int64 and ts (B, N) int64 of the tokens [history (L) ; candidates (C)]: history event i
    sits at position i, every candidate at L, right after the most recent event."""
    L, C, dev = seq.item.shape[1], batch.cand_item.shape[1], seq.item.device
    pos = torch.cat([torch.arange(L, device=dev), torch.full((C,), L, device=dev)])[None]
    return pos, torch.cat([seq.ts, batch.cand_ts], dim=1)


def relative_position_bucket(rel: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """T5-style unidirectional buckets of query minus key position (negatives clamp to 0).

    Distances below num_buckets // 2 get their own bucket; larger ones share log-spaced buckets up to
    max_distance; everything beyond falls into the last bucket. rel (...) int64 -> (...) int64.
    """
    n = rel.clamp(min=0)
    exact = num_buckets // 2
    log_ratio = torch.log(n.clamp(min=exact).float() / exact) / math.log(max_distance / exact)
    large = (exact + (log_ratio * (num_buckets - exact)).long()).clamp(max=num_buckets - 1)
    return torch.where(n < exact, n, large)


def time_bucket(dt: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """log2 buckets of a time gap in seconds (negatives clamp to 0): 0 -> 0, dt >= 1 -> 1 + floor(log2 dt),
    capped at num_buckets - 1. dt (...) int64 -> (...) int64: the number of powers of two 1, 2, 4, ...,
    2^(num_buckets - 2) that are <= dt, by binary search in integers (exact for every gap)."""
    powers = torch.bitwise_left_shift(torch.ones(num_buckets - 1, dtype=dt.dtype, device=dt.device),
                                      torch.arange(num_buckets - 1, device=dt.device))
    return torch.bucketize(dt, powers, right=True)


def attend(q, k, v, mask=None, bias=None, tau=None, dropout_p: float = 0.0, impl: str = "dense"):
    """Y = softmax((Q K^T / sqrt(dh) + bias) / tau) V over allowed keys, on a full (masked) score matrix.

    q (B, H, N, dh), k, v (B, H, M, dh); mask (B, N, M) bool, True = may attend (None: all); bias
    (B, H, N, M) float (None: 0); tau (B, N) positive temperature of each query (None: 1) -> (B, H, N, dh).
    "reference" is an explicit matmul / masked_fill / softmax; "dense" calls scaled_dot_product_attention
    with Q / tau and a float mask bias / tau (-inf where hidden), which is the same quantity.
    """
    if impl == "reference":
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, N, M)
        if bias is not None:
            scores = scores + bias
        if tau is not None:
            scores = scores / tau[:, None, :, None]
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None], float("-inf"))
        att = F.dropout(scores.softmax(dim=-1), p=dropout_p, training=dropout_p > 0)
        return att @ v
    if impl != "dense":
        raise ValueError(f"full-sequence attention {impl!r} not one of reference, dense")
    attn_mask = None if mask is None else mask[:, None]  # (B, 1, N, M) bool: True takes part
    if bias is not None:
        attn_mask = bias if tau is None else bias / tau[:, None, :, None]
        if mask is not None:
            attn_mask = attn_mask.masked_fill(~mask[:, None], float("-inf"))
    if tau is not None:
        q = q / tau[:, None, :, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)


class Steps(nn.Module):
    """A module with a full-sequence ``full`` and the structured steps ``encode`` and ``score``, run through
    ``module(..., step=NAME)`` so that module hooks (e.g. the FLOP counter's split by module) see them."""

    def forward(self, *args, step: str = "full", **kwargs):
        return getattr(self, step)(*args, **kwargs)


def encode_layers(layers, x: torch.Tensor, past, plan: Plan) -> list:
    """The structured first step of a layer stack: history tokens x (B, N, d) that follow P cached ones
    (past: per layer their (k, v), or None) through the ``encode`` step of each layer; the last layer only
    projects keys and values. -> per layer the (k, v) of all P + N tokens."""
    kvs = []
    for i, layer in enumerate(layers):
        x, kv = layer(x, None if past is None else past[i], plan, last=i == len(layers) - 1, step="encode")
        kvs.append(kv)
    return kvs


def score_layers(layers, x: torch.Tensor, kvs: list, plan: Plan) -> torch.Tensor:
    """The structured second step: candidate tokens x (B, C, d) through ``layer.score`` of each layer, as
    queries against that layer's history (k, v) and their own key (the ``score`` step) -> (B, C, d)."""
    for layer, kv in zip(layers, kvs):
        x = layer(x, kv, plan, step="score")
    return x


class Attention(Steps):
    """Multi-head self-attention; bias, temperature and mask come from the caller: over a full sequence
    (``forward``, see ``attend``) or structured (``structured``, see climber.models.attention)."""

    def __init__(self, d_model: int, n_heads: int, dropout: float, impl: str = "dense", sink: bool = False):
        super().__init__()
        if d_model % n_heads:
            raise ConfigError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        self.n_heads, self.dropout, self.impl = n_heads, dropout, impl
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.resid_drop = nn.Dropout(dropout)
        # sink: a learned key and value per head that every query may attend to (bias 0, never masked).
        # Softmax weights then depend on how many keys match, not only on their share: with n keys
        # of score z the output is (e^z0 v0 + e^z sum v_i) / (e^z0 + n e^z), a mean shrunk towards v0
        # with the pseudo-count e^(z0 - z), as a posterior mean shrinks a rate seen over few events.
        self.sink = nn.Parameter(torch.zeros(2, n_heads, 1, d_model // n_heads)) if sink else None

    def heads(self, t: torch.Tensor) -> torch.Tensor:  # (B, N, m * d) -> (m, B, H, N, dh)
        B, N, md = t.shape
        d = self.proj.in_features
        return t.view(B, N, md // d, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x (B, N, d) -> q, k, v, each (B, H, N, dh)."""
        return tuple(self.heads(self.qkv(x)))

    def project_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x (B, N, d) -> k, v, each (B, H, N, dh): the keys and values alone (2/3 of the projection)."""
        d = x.shape[-1]
        return tuple(self.heads(F.linear(x, self.qkv.weight[d:], self.qkv.bias[d:])))

    def output(self, y: torch.Tensor) -> torch.Tensor:  # (B, H, N, dh) -> (B, N, d): heads merged, projected
        B, H, N, dh = y.shape
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, N, H * dh)))

    def _sink(self, B: int):  # -> (k, v) each (B, H, 1, dh), or None
        return None if self.sink is None else tuple(t.expand(B, -1, -1, -1) for t in self.sink)

    def full(self, x, mask=None, bias=None, tau=None):
        """x (B, N, d), mask (B, N, N), bias (B, H, N, N), tau (B, N) -> (B, N, d)."""
        q, k, v = self.project(x)  # (B, H, N, dh) each
        p = self.dropout if self.training else 0.0
        sink = self._sink(x.shape[0])
        if sink is not None:  # the sink is key 0 of every query
            k, v = torch.cat([sink[0], k], dim=2), torch.cat([sink[1], v], dim=2)
            mask = None if mask is None else F.pad(mask, (1, 0), value=True)  # (B, N, 1 + N)
            bias = None if bias is None else F.pad(bias, (1, 0))  # (B, H, N, 1 + N)
        return self.output(attend(q, k, v, mask, bias, tau, p, self.impl))

    def encode(self, x, past, plan: Plan, last: bool = False):
        """History queries x (B, N, d) after P cached tokens (past: their (k, v), each (B, H, P, dh), or
        None) -> (out (B, N, d), or None when ``last``: only candidates read the last layer, so it projects
        keys and values alone; the (k, v) of all P + N tokens)."""
        if last:
            return None, extend_kv(past, *self.project_kv(x))
        q, k, v = self.project(x)
        keys = extend_kv(past, k, v)
        return self._structured(plan, q, k, v, keys), keys

    def score(self, x, kv, plan: Plan) -> torch.Tensor:
        """Candidate queries x (B, C, d) against the history's (k, v) (each (B, H, L, dh)) and their own
        key -> (B, C, d)."""
        return self._structured(plan, *self.project(x), kv)

    def _structured(self, plan: Plan, q, k, v, keys) -> torch.Tensor:
        p = self.dropout if self.training else 0.0
        return self.output(plan.attend(q, k, v, *keys, dropout_p=p, sink=self._sink(q.shape[0])))


def extend_kv(past, k, v):
    """(k, v) of P cached tokens (each (B, H, P, dh), or None) followed by k, v (B, H, N, dh)."""
    return (k, v) if past is None else (torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2))


class FeedForward(nn.Module):
    def __init__(self, d_model: int, mult: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d_model, mult * d_model), nn.GELU(), nn.Linear(mult * d_model, d_model), nn.Dropout(dropout)
        )

    def forward(self, x):
        return self.net(x)


class TransformerLayer(Steps):
    """Pre-norm residual layer: x = x + Attn(LN(x)); x = x + FFN(LN(x)). With bias and tau from the
    caller it is Climber's adaptive transformer layer (ATL); without them a standard layer."""

    def __init__(self, d_model: int, n_heads: int, ffn_mult: int, dropout: float, impl: str = "dense",
                 sink: bool = False):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = Attention(d_model, n_heads, dropout, impl, sink)
        self.ln2 = nn.LayerNorm(d_model)
        self.ffn = FeedForward(d_model, ffn_mult, dropout)

    def full(self, x, mask=None, bias=None, tau=None):
        """The layer over a full sequence x (B, N, d); mask, bias and tau as in ``Attention.full``."""
        return self._residual(x, self.attn(self.ln1(x), mask, bias, tau))

    def encode(self, x, past, plan: Plan, last: bool = False):
        """History tokens x (B, N, d) after P cached ones -> (x (B, N, d), or None when ``last``; the
        (k, v) of all P + N tokens), see ``Attention.encode``."""
        a, kv = self.attn(self.ln1(x), past, plan, last, step="encode")
        return (None if last else self._residual(x, a)), kv

    def score(self, x, kv, plan: Plan) -> torch.Tensor:
        """Candidate tokens x (B, C, d) against the history's (k, v) of this layer -> (B, C, d)."""
        return self._residual(x, self.attn(self.ln1(x), kv, plan, step="score"))

    def _residual(self, x, a):
        x = x + a
        return x + self.ffn(self.ln2(x))


def transformer_layer_flops(n: int, d: int, ffn_mult: int, sink: bool = False, pairs: int | None = None) -> int:
    """Forward FLOPs of one ``TransformerLayer`` over n query tokens: QKV and output projections, Q K^T and
    A V over ``pairs`` (query, key) scores (default n x n, the full masked matrix) plus the sink's, two FFN
    matmuls."""
    pairs = n * n if pairs is None else pairs
    return 2 * n * d * 3 * d + 2 * n * d * d + 2 * 2 * (pairs + n * sink) * d + 2 * 2 * n * d * ffn_mult * d


def structured_stack_flops(n_layers: int, L: int, C: int, d: int, ffn_mult: int, sink: bool = False) -> int:
    """Forward FLOPs of ``encode_layers`` + ``score_layers`` of a ``TransformerLayer`` stack over L history
    tokens (all real) and C candidates, as the tiled kernel computes them: the history through every layer
    but the last (causal tiles, ``causal_tile_pairs``), the last layer's K and V projections of the
    history, and the candidates through every layer against the L history keys (their own key is an
    elementwise product, not a matmul)."""
    history = (n_layers - 1) * transformer_layer_flops(L, d, ffn_mult, sink, causal_tile_pairs(L)) + 2 * L * d * 2 * d
    return history + n_layers * transformer_layer_flops(C, d, ffn_mult, sink, C * L)


class TableRows(torch.autograd.Function):
    """table[index] for a small table (R, H) and many indices (...): the rows' gradient is one index_add_.
    (F.embedding's backward sorts the indices on the CPU: 36% of a climber-small training step at history
    2,048, against about 1% this way.)"""

    @staticmethod
    def forward(ctx, table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:  # -> (..., H)
        ctx.save_for_backward(index)
        ctx.rows = table.shape[0]
        return F.embedding(index, table)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        flat = grad.reshape(-1, grad.shape[-1])  # (n, H)
        return flat.new_zeros(ctx.rows, flat.shape[1]).index_add_(0, index.reshape(-1), flat), None


class RelativeBias(nn.Module):
    """f_b: per-head learned biases of the bucketed relative position plus the bucketed relative time
    gap (query minus key), HSTU / T5 style, and with ``match_features`` F > 0 a per-head bias for each
    item side feature (category, topic, ...) on which query and key items agree (a soft, learned form
    of SIM's same-category hard search). Zero at initialisation (a plain layer to start with)."""

    def __init__(self, n_heads: int, pos_buckets: int, time_buckets: int, max_distance: int,
                 match_features: int = 0):
        super().__init__()
        self.pos_buckets, self.time_buckets = pos_buckets, time_buckets
        self.max_distance = max(max_distance, pos_buckets)  # > pos_buckets // 2, as the log spacing needs
        self.pos_bias = nn.Parameter(torch.zeros(pos_buckets, n_heads))
        self.time_bias = nn.Parameter(torch.zeros(time_buckets, n_heads))
        self.match_bias = nn.Parameter(torch.zeros(match_features, n_heads)) if match_features else None
        # the position bucket of every distance 0 .. max_distance (larger ones share the last): a lookup
        # per (query, key) pair instead of a log per pair; derived, so not in checkpoints
        distances = torch.arange(self.max_distance + 1)
        self.register_buffer("bucket_of_distance", relative_position_bucket(distances, pos_buckets, self.max_distance),
                             persistent=False)

    def forward(self, pos: torch.Tensor, ts: torch.Tensor, side=None) -> torch.Tensor:
        """The bias of a full sequence: pos (N,) int64 positions and ts (B, N) int64 seconds of its tokens;
        side (B, N, F) int64 side feature ids of their items (0 = unknown), needed with match_features
        -> (B, H, N, N)."""
        return self.pairs(pos, ts, pos, ts, side, side)

    def pairs(self, q_pos, q_ts, k_pos, k_ts, q_side=None, k_side=None) -> torch.Tensor:
        """Queries at q_pos (N,) with q_ts (B, N), keys at k_pos (M,) with k_ts (B, M); side ids q_side
        (B, N, F), k_side (B, M, F) with match_features -> (B, H, N, M). One gather from the table of
        (position bucket, time bucket) sums."""
        rel_pos = self.position_buckets(q_pos[:, None] - k_pos[None])  # (N, M)
        rel_time = time_bucket(q_ts[:, :, None] - k_ts[:, None], self.time_buckets)  # (B, N, M)
        bias = TableRows.apply(self.pair_table(), rel_pos * self.time_buckets + rel_time)  # (B, N, M, H)
        if self.match_bias is not None:
            bias = bias + side_matches(q_side, k_side).to(bias.dtype) @ self.match_bias
        return bias.permute(0, 3, 1, 2)

    def pair_table(self) -> torch.Tensor:
        """(pos_buckets * time_buckets, H): row p * time_buckets + t holds the bias of position bucket p and
        time bucket t."""
        return (self.pos_bias[:, None] + self.time_bias[None]).flatten(0, 1)

    def position_buckets(self, distance: torch.Tensor) -> torch.Tensor:
        """relative_position_bucket of query minus key positions distance (...) int64 -> (...) int64."""
        return self.bucket_of_distance[distance.clamp(0, self.max_distance)]

    def on_itself(self, side=None) -> torch.Tensor:
        """The bias of each query towards its own key (distance 0, gap 0, every known side value shared):
        side (B, N, F) with match_features, else None -> (B, H, N), or (1, H, 1) without side features."""
        bias = (self.pos_bias[0] + self.time_bias[0])[None, None]  # (1, 1, H)
        if self.match_bias is not None:
            bias = bias + (side > 0).to(bias.dtype) @ self.match_bias  # (B, N, H)
        return bias.permute(0, 2, 1)


class Temperature(nn.Module):
    """A learned positive temperature per id (e.g. per scenario; id 0 = padding has its own entry):
    tau = softplus(raw) + 0.05, initialised to 1."""

    FLOOR = 0.05

    def __init__(self, num_ids: int):
        super().__init__()
        init = math.log(math.expm1(1.0 - self.FLOOR))  # softplus^-1(0.95)
        self.raw = nn.Parameter(torch.full((num_ids,), init))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # ids (...) int64 -> tau (...) float
        return F.softplus(self.raw[ids]) + self.FLOOR


def init_weights(m: nn.Module) -> None:
    """GPT-style init for ``model.apply``: Linear and Embedding weights N(0, 0.02), biases 0, padding rows 0."""
    if isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Embedding):
        nn.init.normal_(m.weight, std=0.02)
        if m.padding_idx is not None:
            m.weight.data[m.padding_idx].zero_()


class ItemEmbedding(nn.Embedding):
    """An item id table plus one table per categorical item side feature (``item_*`` columns of the
    prepared data, e.g. category or topic): item i embeds to ``weight[i] + sum_f feature_f[ids_f[i]]``.
    ``feature_ids`` (num_items + 1, F) maps item id -> feature value ids; it is a buffer, saved in
    checkpoints, filled from the data by ``climber.models.build_model`` (0 = unknown).

    ``id_row`` (num_items + 1,) maps item id -> row of the id table: the identity, or, with
    ``train.item_vocab=train``, 0 (the unknown item, a zero vector) for items without a train event, whose
    own rows would never get a gradient (random vectors at test time), and for items with fewer than
    ``train.item_min_events``, whose rows would learn little beyond their few labels. Side features keep
    the item's own values either way.

    ``id_scale`` (num_items + 1,) scales each item's id vector: ones, or with ``train.item_id_shrink=k``
    n / (n + k), n the item's train events (``climber.models.item_id_scales``), so a rare item's vector,
    learned from a few labels, counts for little. Side features are not scaled.

    ``fold_rates`` (folds, num_items + 1), ``train.item_rate_folds`` (not saved; empty without): in
    training mode a candidate's rate bucket (the last side feature) comes from its user's fold's row,
    computed without that user's labels (``climber.models.fold_rate_buckets``); history tokens, and
    every lookup in eval mode, keep ``feature_ids``.

    ``id_dropout`` (``train.item_dropout``, set by the trainer; not saved): in training mode each lookup's
    id row becomes row 0 with this probability, drawn from torch's global generator, while its side
    features stay, so a model learns to rank an item by its side features and the history when its own
    vector is missing or barely trained."""

    id_dropout: float = 0.0

    def __init__(self, num_items: int, d_model: int, features: tuple = (), bags: tuple = ()):
        # features: ((column, vocab size), ...); bags: ((column, vocab size, longest bag), ...)
        super().__init__(num_items + 1, d_model, padding_idx=0)
        add_side_tables(self, num_items + 1, d_model, features, bags)
        self.register_buffer("id_row", torch.arange(num_items + 1))
        self.register_buffer("id_scale", torch.ones(num_items + 1))
        self.register_buffer("fold_rates", torch.zeros(0, num_items + 1, dtype=torch.long), persistent=False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints from before id_row (issue 21) were trained with every id on its own row
        state_dict.setdefault(prefix + "id_row", torch.arange(self.num_embeddings))
        state_dict.setdefault(prefix + "id_scale", torch.ones(self.num_embeddings))  # and from before id_scale
        state_dict.setdefault(prefix + "bag_ids", self.bag_ids)  # and from before bags (issue 19) had none
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def side_ids(self, ids: torch.Tensor) -> torch.Tensor:  # (...) -> (..., F) single-valued side feature value ids
        return self.feature_ids[ids]

    def forward(self, ids: torch.Tensor, users: torch.Tensor | None = None) -> torch.Tensor:
        # ids (B, ...) -> (B, ..., d); users (B,): the rows' users, given for candidates
        rows = self.id_row[ids]
        if self.training and self.id_dropout:
            rows = torch.where(torch.rand(rows.shape, device=rows.device) < self.id_dropout, 0, rows)
        values = None
        if self.training and users is not None and len(self.fold_rates):
            folds = fold_of(users, len(self.fold_rates)).view(-1, *([1] * (ids.dim() - 1))).expand_as(ids)
            values = self.feature_ids[ids].clone()  # (B, ..., F)
            values[..., -1] = self.fold_rates[folds, ids]
        return super().forward(rows) * self.id_scale[ids].unsqueeze(-1) + side_vector(self, ids, values)


class PopularityPrior(nn.Module):
    """A wide popularity term for a model's click logit: ``weight * prior[item]``, where ``prior`` is the
    item's smoothed train positive rate as log-odds, centred on the global rate's (the floor's score,
    ``climber.eval.floor``; 0 for an item without a train event and for padding), and ``weight`` a learned
    scalar that starts at 1, so a model starts from the floor's ranking and learns what to add to it.
    With ``count``, plus ``count_weight * log1p(the item's train events)``, ``count_weight`` learned from 0:
    how much an item's volume says beyond its rate. With ``fit``, ``climber.models.build_model`` starts
    the weights at their within-user fit on the train split (:func:`climber.models.fit_prior_weights`)
    instead of 1 and 0.

    ``logits`` (num_items + 1,) and ``log_counts`` are buffers, saved in checkpoints (serving needs no
    data), filled from the data by ``climber.models.build_model``. ``fold_logits`` and
    ``fold_log_counts`` (folds, num_items + 1) are not saved: in training mode a candidate of a user in
    fold k reads row k, computed without fold k's users (``climber.models.fold_prior_logits``), so no
    training label is part of its own prior, and an item only its own fold has seen counts 0 as an item
    unseen in train does at test time; eval mode (val, test, serving) reads the whole train split's.
    ``forward(items (B, C), users (B,))`` -> (B, C)."""

    def __init__(self, num_items: int, count: bool = False, fit: bool = False):
        super().__init__()
        self.fit = fit
        self.weight = nn.Parameter(torch.ones(1))
        self.register_buffer("logits", torch.zeros(num_items + 1))
        self.register_buffer("fold_logits", torch.zeros(0, num_items + 1), persistent=False)
        if count:
            self.count_weight = nn.Parameter(torch.zeros(1))
            self.register_buffer("log_counts", torch.zeros(num_items + 1))
            self.register_buffer("fold_log_counts", torch.zeros(0, num_items + 1), persistent=False)

    def forward(self, items: torch.Tensor, users: torch.Tensor) -> torch.Tensor:
        out_of_fold = self.training and len(self.fold_logits)
        rows = fold_of(users, len(self.fold_logits))[:, None] if out_of_fold else None  # (B, 1)

        def lookup(table, folds):
            return folds[rows, items] if out_of_fold else table[items]

        out = self.weight * lookup(self.logits, self.fold_logits)
        if hasattr(self, "count_weight"):
            out = out + self.count_weight * lookup(self.log_counts, self.fold_log_counts)
        return out


def fold_of(users, folds: int):
    """The fold of each dense user id for the out-of-fold item tables (``train.item_rate_folds``,
    :class:`PopularityPrior`): ``user mod folds`` (a tensor of ids, or a polars column)."""
    return users % folds


def add_side_tables(module: nn.Module, rows: int, d_model: int, features: tuple, bags: tuple) -> None:
    """Give ``module`` the tables of an id's features (an item's or a user's): ``features`` and ``bags``,
    one embedding table per single-valued feature and per bag feature, and the buffers filled from the
    data by ``climber.models.build_model`` and saved in checkpoints: ``feature_ids`` (rows, F), each
    id's value of each feature, and ``bag_ids`` (rows, Fb, K), each id's bag of values, right-padded
    with 0 (0 = unknown)."""
    module.features = nn.ModuleList(nn.Embedding(size + 1, d_model, padding_idx=0) for _, size in features)
    module.bags = nn.ModuleList(nn.Embedding(size + 1, d_model, padding_idx=0) for _, size, _ in bags)
    module.register_buffer("feature_ids", torch.zeros(rows, len(features), dtype=torch.long))
    longest = max((k for *_, k in bags), default=0)
    module.register_buffer("bag_ids", torch.zeros(rows, len(bags), longest, dtype=torch.long))


def side_vector(module: nn.Module, ids: torch.Tensor, values: torch.Tensor | None = None,
                bags: torch.Tensor | None = None) -> torch.Tensor:
    """(...) ids -> (..., d): the sum over ``module``'s features (:func:`add_side_tables`) of their
    value's vector, a bag's vector being the mean of its values' (zero for an empty bag). ``values``
    (..., F) and ``bags`` (..., Fb, K'), when given, replace the ids' rows of the tables (features given
    with a request rather than stored)."""
    out = 0.0
    values = module.feature_ids[ids] if values is None else values  # (..., F)
    for f, table in enumerate(module.features):
        out = out + table(values[..., f])
    bags = module.bag_ids[ids] if bags is None else bags  # (..., Fb, K)
    for f, table in enumerate(module.bags):
        bag = bags[..., f, :]  # (..., K)
        count = (bag > 0).sum(dim=-1, keepdim=True).clamp(min=1)  # (..., 1)
        out = out + table(bag).sum(dim=-2) / count  # padding rows are zero
    return out


class EventContext(nn.Module):
    """An event's context features (per-event ``ctx_*`` value ids and ``num_*`` values): the sum of one
    vector per ctx feature value and a linear map of the numbers, standardised with the train split's
    mean and std (``DataInfo.numeric_features``). ``forward(ctx (..., F_ctx), num (..., F_num), mask (...))``
    -> (..., d), zero at padding (mask False) and where the data has no such features."""

    def __init__(self, info, d_model: int):
        super().__init__()
        self.features = nn.ModuleList(nn.Embedding(size + 1, d_model, padding_idx=0) for _, size in info.ctx_features)
        numeric = info.numeric_features
        self.numbers = nn.Linear(len(numeric), d_model, bias=False) if numeric else None
        self.register_buffer("mean", torch.tensor([m for _, m, _ in numeric], dtype=torch.float32))
        self.register_buffer("std", torch.tensor([s for *_, s in numeric], dtype=torch.float32))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for buffer in ("mean", "std"):  # checkpoints from before issue 19: no numeric features
            state_dict.setdefault(prefix + buffer, getattr(self, buffer))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, ctx: torch.Tensor | None, num: torch.Tensor | None, mask: torch.Tensor):
        out = 0.0
        if len(self.features):
            if ctx is None:
                raise ValueError("the model reads ctx_* features, the batch carries none")
            for f, table in enumerate(self.features):
                out = out + table(ctx[..., f])
        if self.numbers is not None:
            if num is None:
                raise ValueError("the model reads num_* features, the batch carries none")
            out = out + self.numbers((num - self.mean) / self.std) * mask[..., None]  # padding stays zero
        return out


class UserFeatures(nn.Module):
    """The ``user_*`` features of each user id (:func:`add_side_tables`); a user the table lacks (new at
    serving time) has none. ``forward(user)`` (B,) -> (B, d)."""

    def __init__(self, num_users: int, d_model: int, features: tuple = (), bags: tuple = ()):
        super().__init__()
        add_side_tables(self, num_users + 1, d_model, features, bags)
        self.d = d_model

    def __bool__(self) -> bool:  # whether there is any feature to add
        return bool(len(self.features) or len(self.bags))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for buffer in ("feature_ids", "bag_ids"):  # checkpoints from before issue 19: no user features
            state_dict.setdefault(prefix + buffer, getattr(self, buffer))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, user: torch.Tensor, values: torch.Tensor | None = None, bags: torch.Tensor | None = None):
        """values (B, F), bags (B, Fb, K): the users' features given with the request (serving), in place
        of the stored ones."""
        user = torch.where(user < self.feature_ids.shape[0], user, 0)
        return side_vector(self, user, values, bags) + torch.zeros(*user.shape, self.d, device=user.device)


class IdEmbeddings(nn.Module):
    """The id lookup tables of a model, width d: item (with its side features), action, scenario, the
    user's features (``user_*`` columns; :class:`UserFeatures`), and with ``user`` a user id table. Ids
    start at 1; 0 is padding and embeds to the zero vector. A history token is item + action + scenario
    embedding, a candidate token item + scenario (its action is a target, never an input).

    Where the user's features go: with ``user`` (models with a user vector: DLRM, DIN, TWIN, Wukong,
    RankMixer, Climber with ``user_embedding``) they are part of that vector, ``user_vector(batch)``,
    which the model places; without (the Transformer, HSTU, Climber), they are added to every candidate
    token. Either way they enter per candidate, never the history, so a user's cached history stays
    valid whatever the request. The tables keep PyTorch's default init until the owner applies
    ``init_weights``."""

    def __init__(self, info, d_model: int, user: bool = False):  # info: climber.models.DataInfo
        super().__init__()
        if user:
            self.user = nn.Embedding(info.num_users + 1, d_model, padding_idx=0)
        self.item = ItemEmbedding(info.num_items, d_model, info.item_features, info.item_bags)
        self.action = nn.Embedding(info.num_actions + 1, d_model, padding_idx=0)
        self.scenario = nn.Embedding(info.num_scenarios + 1, d_model, padding_idx=0)
        self.user_features = UserFeatures(info.num_users, d_model, info.user_features, info.user_bags)
        self.context = EventContext(info, d_model)

    def history(self, seq) -> torch.Tensor:  # seq: Subsequence -> (B, L, d)
        return self.item(seq.item) + self.action(seq.action) + self.scenario(seq.scenario) + self.context(seq.ctx, seq.num, seq.mask)

    def candidate(self, batch) -> torch.Tensor:  # batch: Batch -> (B, C, d)
        tokens = self.candidate_item(batch) + self.candidate_scenario(batch)
        if self.user_features and not hasattr(self, "user"):
            tokens = tokens + self.user_features(batch.user, batch.user_values, batch.user_bags)[:, None]
        return tokens

    def candidate_item(self, batch) -> torch.Tensor:  # batch: Batch -> (B, C, d)
        """The candidates' item vectors (with ``train.item_rate_folds``, their out-of-fold rate in training)."""
        return self.item(batch.cand_item, batch.user)

    def candidate_scenario(self, batch) -> torch.Tensor:  # batch: Batch -> (B, C, d)
        """Where a candidate is shown: its scenario and its context features (ctx_*, num_*)."""
        return self.scenario(batch.cand_scenario) + self.context(batch.cand_ctx, batch.cand_num, batch.cand_mask)

    def user_vector(self, batch) -> torch.Tensor:  # batch: Batch -> (B, d), with ``user``: id + features
        out = self.user(batch.user)
        return out + self.user_features(batch.user, batch.user_values, batch.user_bags) if self.user_features else out


def zero_id_tables(model: nn.Module) -> None:
    """``train.id_init=zero``: the item id tables (:class:`ItemEmbedding`'s own rows, not its side
    features') and user id tables (:class:`IdEmbeddings` ``user``) of ``model`` start at zero, so an
    id's vector holds only what the batches that looked it up taught it, with no random part that
    differs from seed to seed (docs/results/robustness.md, seventh round)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, ItemEmbedding):
                module.weight.zero_()
            elif isinstance(module, IdEmbeddings) and hasattr(module, "user"):
                module.user.weight.zero_()


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x (B, L, d) over the positions where mask (B, L) is True -> (B, d); zero where none is."""
    m = mask.to(x.dtype)[..., None]
    return (x * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)


def mlp(sizes: list[int], dropout: float = 0.0, act=nn.ReLU) -> nn.Sequential:
    """Linear layers sizes[0] -> sizes[1] -> ... -> sizes[-1]; act and dropout after every layer but the last."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers += [act(), nn.Dropout(dropout)]
    return nn.Sequential(*layers)


def mlp_flops(sizes: list[int]) -> int:
    """Forward FLOPs of ``mlp(sizes)`` on one input vector."""
    return sum(2 * a * b for a, b in zip(sizes, sizes[1:]))


def candidate_logits(head: nn.Module, states: torch.Tensor, emb, batch) -> torch.Tensor:
    """Click logits of a sequence model from its final states over [history ; candidates] (or over the
    candidates alone): head([candidate state ; candidate item embedding]). states (B, L + C, d) -> (B, C)."""
    C = batch.cand_item.shape[1]
    h = states[:, -C:]  # (B, C, d)
    return head(torch.cat([h, emb.candidate_item(batch)], dim=-1)).squeeze(-1)
