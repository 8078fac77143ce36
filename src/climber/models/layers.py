"""Shared building blocks: the one history subsequence of single-history models, the one mask builder
of "single user, multiple items" sequences and the positions of their tokens, attention with bias /
per-query temperature / mask (two paths that agree), feed-forward, pre-norm transformer layer (and its
FLOPs), relative position and time buckets, learned relative bias, per-scenario temperature, id
embeddings, weight init, masked mean and MLPs.

Layers also run "cached": with ``past`` the queries are the last N tokens only and the keys and values
of the P tokens before them come from a cache; with ``return_kv=True`` the layer also returns the keys
and values of all P + N tokens. Without either it is the plain forward (P = 0), the same code;
``climber.serve.engine`` uses the cached form to score candidates against a user's cached history.

Shapes: B batch, H heads, N tokens (queries), P cached tokens before them, d model width, dh = d / H.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from climber.data.batch import Batch, Subsequence
from climber.data.sequences import Strategy

IMPLS = ("reference", "sdpa")


def history_strategy(max_len: int) -> list[Strategy]:
    """The strategies of a single-history model: the max_len most recent events."""
    return [Strategy(name="history", kind="recency", length=max_len)]


def one_history(batch: Batch, model: str) -> Subsequence:
    """The history subsequence of a single-history model's batch; ValueError naming ``model`` otherwise."""
    if len(batch.seqs) != 1:
        raise ValueError(f"{model}: batch has {len(batch.seqs)} subsequences, model expects 1 (history)")
    return batch.seqs[0]


def history_candidate_mask(hist_mask: torch.Tensor, cand_mask: torch.Tensor, first: int = 0) -> torch.Tensor:
    """Who may attend to whom over the tokens [history (L) ; candidates (C)]; True = may attend.

    hist_mask (B, L) bool, cand_mask (B, C) bool -> (B, N - first, N) bool, N = L + C, rows are the
    queries first .. N - 1 (all with first = 0; the uncached ones of a cached forward otherwise).
    History token i sees real history tokens j <= i (so history states never depend on candidates);
    candidate c sees every real history token and itself, never another candidate; padding keys are
    hidden; every row keeps its own diagonal, so no row is empty (no NaN from an all -inf softmax).
    """
    L, dev = hist_mask.shape[1], hist_mask.device
    N = L + cand_mask.shape[1]
    q = torch.arange(first, N, device=dev)[:, None]  # (N - first, 1) query positions
    k = torch.arange(N, device=dev)[None]  # (1, N) key positions
    allowed = torch.where(q < L, k <= q, k < L)  # history: causal; candidates: the whole history
    real_key = torch.cat([hist_mask, cand_mask], dim=1)  # (B, N)
    return (allowed[None] & real_key[:, None, :]) | (k == q)[None]  # (B, N - first, N)


def side_matches(side: torch.Tensor, first: int = 0) -> torch.Tensor:
    """side (B, N, F) item side feature ids of the tokens (0 = unknown, never matches) -> (B, N - first,
    N, F) bool: query i (first .. N - 1) and key j hold the same known value of feature f."""
    return (side[:, first:, None] == side[:, None]) & (side[:, None] > 0)


def same_side_mask(side: torch.Tensor, first: int = 0) -> torch.Tensor:
    """side (B, N, F) item side feature ids of the tokens (0 = unknown) -> (B, N - first, N) bool: the
    key's item shares every known side value of the query's item (queries first .. N - 1); each query
    keeps its own diagonal."""
    N = side.shape[1]
    same = side_matches(side, first).all(dim=-1)
    diagonal = torch.arange(first, N, device=side.device)[:, None] == torch.arange(N, device=side.device)[None]
    return same | diagonal


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
    capped at num_buckets - 1. dt (...) int64 -> (...) int64."""
    dt = dt.clamp(min=0)
    b = torch.floor(torch.log2(dt.clamp(min=1).double())).long() + 1
    return b.masked_fill(dt == 0, 0).clamp(max=num_buckets - 1)


def attend(q, k, v, mask=None, bias=None, tau=None, dropout_p: float = 0.0, impl: str = "sdpa"):
    """Y = softmax((Q K^T / sqrt(dh) + bias) / tau) V over allowed keys.

    q (B, H, N, dh), k, v (B, H, M, dh); mask (B, N, M) bool, True = may attend (None: all); bias
    (B, H, N, M) float (None: 0); tau (B, N) positive temperature of each query (None: 1) -> (B, H, N, dh).
    "reference" is an explicit matmul / masked_fill / softmax; "sdpa" calls scaled_dot_product_attention
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
    if impl != "sdpa":
        raise ValueError(f"attention impl {impl!r} not one of {', '.join(IMPLS)}")
    attn_mask = None if mask is None else mask[:, None]  # (B, 1, N, M) bool: True takes part
    if bias is not None:
        attn_mask = bias if tau is None else bias / tau[:, None, :, None]
        if mask is not None:
            attn_mask = attn_mask.masked_fill(~mask[:, None], float("-inf"))
    if tau is not None:
        q = q / tau[:, None, :, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)


def cached_layers(layers, x: torch.Tensor, past, *args) -> tuple[torch.Tensor, list]:
    """x (B, N, d) through ``layer(x, *args, past=past_i, return_kv=True)`` of each layer in turn; past:
    one entry per layer (None: no cached tokens) -> (x (B, N, d), the (k, v) each layer returned)."""
    kvs = []
    for i, layer in enumerate(layers):
        x, kv = layer(x, *args, past=None if past is None else past[i], return_kv=True)
        kvs.append(kv)
    return x, kvs


class Attention(nn.Module):
    """Multi-head self-attention; bias, temperature and mask come from the caller (see ``attend``)."""

    def __init__(self, d_model: int, n_heads: int, dropout: float, impl: str = "sdpa", sink: bool = False):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        if impl not in IMPLS:
            raise ValueError(f"attention impl {impl!r} not one of {', '.join(IMPLS)}")
        self.n_heads, self.dropout, self.impl = n_heads, dropout, impl
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.resid_drop = nn.Dropout(dropout)
        # sink: a learned key and value per head that every query may attend to (bias 0, never masked).
        # Softmax weights then depend on how many keys match, not only on their share: with n keys
        # of score z the output is (e^z0 v0 + e^z sum v_i) / (e^z0 + n e^z), a mean shrunk towards v0
        # with the pseudo-count e^(z0 - z), as a posterior mean shrinks a rate seen over few events.
        self.sink = nn.Parameter(torch.zeros(2, n_heads, 1, d_model // n_heads)) if sink else None

    def forward(self, x, mask=None, bias=None, tau=None, past=None, return_kv: bool = False):
        """x (B, N, d) the query tokens; past (k, v) each (B, H, P, dh) of the P tokens before them, or
        None (P = 0); mask (B, N, P + N), bias (B, H, N, P + N), tau (B, N)
        -> (B, N, d), and with return_kv the (k, v) of all P + N tokens, each (B, H, P + N, dh)."""
        B, N, d = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)  # (B, H, N, dh)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)  # (B, H, P + N, dh)
        p = self.dropout if self.training else 0.0
        if self.sink is None:
            y = attend(q, k, v, mask, bias, tau, p, self.impl)  # (B, H, N, dh)
        else:  # the sink is key 0 of every query; the cache keeps only the tokens' own k, v
            sk, sv = (t.expand(B, -1, -1, -1) for t in self.sink)  # (B, H, 1, dh) each
            mask = None if mask is None else F.pad(mask, (1, 0), value=True)  # (B, N, 1 + P + N)
            bias = None if bias is None else F.pad(bias, (1, 0))  # (B, H, N, 1 + P + N)
            y = attend(q, torch.cat([sk, k], dim=2), torch.cat([sv, v], dim=2), mask, bias, tau, p, self.impl)
        y = self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, N, d)))
        return (y, (k, v)) if return_kv else y


class FeedForward(nn.Module):
    def __init__(self, d_model: int, mult: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d_model, mult * d_model), nn.GELU(), nn.Linear(mult * d_model, d_model), nn.Dropout(dropout)
        )

    def forward(self, x):
        return self.net(x)


class TransformerLayer(nn.Module):
    """Pre-norm residual layer: x = x + Attn(LN(x)); x = x + FFN(LN(x)). With bias and tau from the
    caller it is Climber's adaptive transformer layer (ATL); without them a standard layer."""

    def __init__(self, d_model: int, n_heads: int, ffn_mult: int, dropout: float, impl: str = "sdpa",
                 sink: bool = False):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = Attention(d_model, n_heads, dropout, impl, sink)
        self.ln2 = nn.LayerNorm(d_model)
        self.ffn = FeedForward(d_model, ffn_mult, dropout)

    def forward(self, x, mask=None, bias=None, tau=None, past=None, return_kv: bool = False):
        """The layer over the query tokens x (B, N, d) that follow P cached tokens: past, mask, bias and
        tau as in ``Attention.forward`` -> (B, N, d), and with return_kv the (k, v) of all P + N tokens
        (after LN + qkv)."""
        a, kv = self.attn(self.ln1(x), mask, bias, tau, past=past, return_kv=True)
        x = x + a
        x = x + self.ffn(self.ln2(x))
        return (x, kv) if return_kv else x


def transformer_layer_flops(n: int, d: int, ffn_mult: int, sink: bool = False) -> int:
    """Forward FLOPs of one ``TransformerLayer`` over n tokens: QKV and output projections, Q K^T and A V
    over the full (masked) n x (n + sink) matrices, two FFN matmuls."""
    return 2 * n * d * 3 * d + 2 * n * d * d + 2 * 2 * n * (n + sink) * d + 2 * 2 * n * d * ffn_mult * d


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

    def forward(self, pos: torch.Tensor, ts: torch.Tensor, first: int = 0, side=None) -> torch.Tensor:
        """pos (B or 1, N) int64 positions, ts (B, N) int64 seconds of the keys; the queries are the keys
        first .. N - 1; side (B, N, F) int64 side feature ids of the keys' items (0 = unknown, never
        matches), needed with match_features -> (B, H, N - first, N)."""
        rel_pos = relative_position_bucket(pos[:, first:, None] - pos[:, None, :], self.pos_buckets, self.max_distance)
        rel_time = time_bucket(ts[:, first:, None] - ts[:, None, :], self.time_buckets)
        bias = self.pos_bias[rel_pos] + self.time_bias[rel_time]  # (B, N - first, N, H)
        if self.match_bias is not None:
            bias = bias + side_matches(side, first).to(bias.dtype) @ self.match_bias
        return bias.permute(0, 3, 1, 2)


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
    checkpoints, filled from the data by ``climber.models.build_model`` (0 = unknown)."""

    def __init__(self, num_items: int, d_model: int, features: tuple = ()):  # features: ((column, vocab size), ...)
        super().__init__(num_items + 1, d_model, padding_idx=0)
        self.features = nn.ModuleList(nn.Embedding(size + 1, d_model, padding_idx=0) for _, size in features)
        self.register_buffer("feature_ids", torch.zeros(num_items + 1, len(features), dtype=torch.long))

    def side_ids(self, ids: torch.Tensor) -> torch.Tensor:  # (...) -> (..., F) side feature value ids
        return self.feature_ids[ids]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (...) -> (..., d)
        out = super().forward(ids)
        side = self.side_ids(ids)
        for f, table in enumerate(self.features):
            out = out + table(side[..., f])
        return out


class IdEmbeddings(nn.Module):
    """The id lookup tables of a model, width d: item (with its side features), action, scenario, and
    with ``user`` a user table. Ids start at 1; 0 is padding and embeds to the zero vector. A history
    token is item + action + scenario embedding, a candidate token item + scenario (its action is a
    target, never an input). The tables keep PyTorch's default init until the owner applies ``init_weights``."""

    def __init__(self, info, d_model: int, user: bool = False):  # info: climber.models.DataInfo
        super().__init__()
        if user:
            self.user = nn.Embedding(info.num_users + 1, d_model, padding_idx=0)
        self.item = ItemEmbedding(info.num_items, d_model, info.item_features)
        self.action = nn.Embedding(info.num_actions + 1, d_model, padding_idx=0)
        self.scenario = nn.Embedding(info.num_scenarios + 1, d_model, padding_idx=0)

    def history(self, seq) -> torch.Tensor:  # seq: Subsequence -> (B, L, d)
        return self.item(seq.item) + self.action(seq.action) + self.scenario(seq.scenario)

    def candidate(self, batch) -> torch.Tensor:  # batch: Batch -> (B, C, d)
        return self.item(batch.cand_item) + self.scenario(batch.cand_scenario)


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
    return head(torch.cat([h, emb.item(batch.cand_item)], dim=-1)).squeeze(-1)
