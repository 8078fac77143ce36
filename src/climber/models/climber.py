"""Climber: multi-scale sequence extraction (MSE), adaptive transformer layers (ATL) and bit-wise gating
fusion (BGF), scoring C candidates of one user in one pass ("single user, multiple items").

    history_k (L_k) ; candidates (C) --[n_layers ATL, block k]--> candidate states   (B, C, d), k = 1..Nb
    stack                                                       -> E                  (B, C, Nb, d)
    BGF: ATL over the Nb tokens of each candidate, SE gate       -> Y                  (B, C, Nb * d)
    head MLP on [Y ; candidate item embedding]                   -> logits             (B, C)

Ablations: use_mse=False -> one block over the full recent history; use_atl=False -> no relative bias,
temperature fixed at 1; use_bgf=False -> mean of the block outputs into the same head.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from climber.data.batch import Batch, Subsequence
from climber.data.sequences import Strategy
from climber.models import DataInfo, SampleShape
from climber.models.base import ModelConfig
from climber.models.layers import (
    IMPLS,
    IdEmbeddings,
    RelativeBias,
    Temperature,
    TransformerLayer,
    cached_layers,
    history_candidate_mask,
    history_candidate_positions,
    init_weights,
    same_side_mask,
    transformer_layer_flops,
)


def _default_strategies() -> list[dict]:
    return [
        {"name": "recent", "kind": "recency", "length": 64},
        {"name": "positive", "kind": "positive", "length": 256},
    ]


@dataclass
class ClimberConfig(ModelConfig):
    d_model: int = 64
    n_heads: int = 2
    n_layers: int = 2  # ATLs per block
    ffn_mult: int = 4
    dropout: float = 0.1
    strategies: list[dict] = field(default_factory=_default_strategies)  # Strategy dicts, one block each
    use_atl: bool = True  # relative bias + per-(strategy, scenario) temperature
    use_bgf: bool = True  # bit-wise gating fusion of the block outputs (else their mean)
    use_mse: bool = True  # one block per strategy (else one block over the longest recent history)
    pos_buckets: int = 32
    time_buckets: int = 32
    user_embedding: bool = False  # add a learned user vector to candidate tokens
    item_bias: bool = False  # a learned scalar per item added to the click logit (first-order, "wide" term)
    action_heads: bool = False  # multi-task: one extra binary head per action (is the candidate's action a?)
    attention: str = "sdpa"  # "reference" | "sdpa"
    attention_sink: bool = False  # a learned null key/value per head in every block's ATLs (count-aware attention)
    match_bias: bool = False  # ATL bias per head where query and key items share an item side feature value
    match_mask: bool = False  # a token attends only to events whose items share all its side values (SIM hard search)

    def __post_init__(self):
        if not self.strategies:
            raise ValueError("ClimberConfig.strategies: need at least one strategy")
        self.strategies = [(s if isinstance(s, Strategy) else Strategy.from_dict(s)).to_dict() for s in self.strategies]
        names = [s["name"] for s in self.strategies]
        if len(set(names)) != len(names):
            raise ValueError(f"ClimberConfig.strategies: names must be unique, got {names}")
        if self.attention not in IMPLS:
            raise ValueError(f"ClimberConfig.attention: {self.attention!r} not one of {', '.join(IMPLS)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"ClimberConfig: d_model {self.d_model} not divisible by n_heads {self.n_heads}")
        self._at_least(1, "n_layers", "ffn_mult", "time_buckets")
        self._at_least(2, "pos_buckets")

    def block_strategies(self) -> list[Strategy]:
        """The strategies the loader must build, in block order."""
        given = [Strategy.from_dict(s) for s in self.strategies]
        if self.use_mse:
            return given
        return [Strategy(name="full", kind="recency", length=max(s.length for s in given))]


class Block(nn.Module):
    """One MSE strategy: n_layers ATLs over [history_k ; candidates], then a final LayerNorm. The relative
    bias and the temperature table (one entry per scenario) are shared by the block's layers."""

    def __init__(self, cfg: ClimberConfig, num_scenarios: int, max_distance: int, match_features: int):
        super().__init__()
        d = cfg.d_model
        self.layers = nn.ModuleList(
            TransformerLayer(d, cfg.n_heads, cfg.ffn_mult, cfg.dropout, cfg.attention, cfg.attention_sink)
            for _ in range(cfg.n_layers)
        )
        if cfg.use_atl:
            self.rel_bias = RelativeBias(cfg.n_heads, cfg.pos_buckets, cfg.time_buckets, max_distance,
                                         match_features if cfg.match_bias else 0)
            self.temperature = Temperature(num_scenarios + 1)
        self.use_atl, self.match_mask = cfg.use_atl, cfg.match_mask
        self.ln_f = nn.LayerNorm(d)

    def forward(self, x, mask, pos, ts, scenario, side, past=None, return_kv: bool = False):
        """The block over the query tokens x (B, N, d) that follow P cached tokens; past: per layer (k, v)
        of those, each (B, H, P, dh), or None (P = 0); mask (B, N, P + N) bool; pos (1, P + N),
        ts (B, P + N) and item side feature ids side (B, P + N, F) of all tokens; scenario (B, N) of the
        queries -> (B, N, d), and with return_kv per layer the (k, v) of all P + N tokens."""
        first = pos.shape[1] - x.shape[1]
        if self.match_mask:
            mask = mask & same_side_mask(side, first)
        bias = self.rel_bias(pos, ts, first, side) if self.use_atl else None  # (B, H, N, P + N)
        tau = self.temperature(scenario) if self.use_atl else None  # (B, N), by the query's scenario
        x, kvs = cached_layers(self.layers, x, past, mask, bias, tau)
        return (self.ln_f(x), kvs) if return_kv else self.ln_f(x)


class Climber(nn.Module):
    def __init__(self, cfg: ClimberConfig, info: DataInfo):
        super().__init__()
        self.cfg, self.info = cfg, info
        d = cfg.d_model
        strategies = cfg.block_strategies()
        nb = len(strategies)
        self.emb = IdEmbeddings(info, d, user=cfg.user_embedding)
        self.cand_vec = nn.Parameter(0.02 * torch.randn(d))  # marks a candidate token (its action is unknown)
        self.drop = nn.Dropout(cfg.dropout)
        max_distance = max(s.length for s in strategies) + 1  # candidates sit at position L
        self.blocks = nn.ModuleList(Block(cfg, info.num_scenarios, max_distance, len(info.item_features))
                                    for _ in strategies)
        if cfg.use_bgf:
            self.fusion = TransformerLayer(d, cfg.n_heads, cfg.ffn_mult, cfg.dropout, cfg.attention)
            if cfg.use_atl:
                self.fusion_temperature = Temperature(info.num_scenarios + 1)
            self.fusion_ln = nn.LayerNorm(d)
            se_hidden = max(1, nb * d // 4)  # reduction ratio 4
            self.se = nn.Sequential(nn.Linear(nb * d, se_hidden), nn.ReLU(), nn.Linear(se_hidden, nb * d))
            head_in = nb * d + d
        else:
            head_in = 2 * d
        self.head = nn.Sequential(nn.Linear(head_in, d), nn.GELU(), nn.Dropout(cfg.dropout))  # shared trunk
        self.click_out = nn.Linear(d, 1)
        if cfg.item_bias:
            self.item_bias_emb = nn.Embedding(info.num_items + 1, 1, padding_idx=0)
        if cfg.action_heads:
            self.action_out = nn.Linear(d, info.num_actions)
        self.apply(init_weights)

    def strategies(self) -> list[Strategy]:
        return self.cfg.block_strategies()

    def _block_input(self, seq: Subsequence, batch: Batch, cand: torch.Tensor):
        """Tokens, mask, positions, timestamps, scenarios and item side feature ids of [history ;
        candidates] (N = L + C)."""
        x = self.drop(torch.cat([self.emb.history(seq), cand], dim=1))  # (B, N, d)
        mask = history_candidate_mask(seq.mask, batch.cand_mask)  # (B, N, N)
        pos, ts = history_candidate_positions(seq, batch)  # (1, N), (B, N)
        scenario = torch.cat([seq.scenario, batch.cand_scenario], dim=1)  # (B, N)
        side = self.emb.item.side_ids(torch.cat([seq.item, batch.cand_item], dim=1))  # (B, N, F)
        return x, mask, pos, ts, scenario, side

    def candidate_tokens(self, batch: Batch) -> torch.Tensor:
        """Candidate tokens, the same in every block: item + scenario + cand_vec (+ user): (B, C, d)."""
        cand = self.emb.candidate(batch) + self.cand_vec  # (B, C, d)
        if self.cfg.user_embedding:
            cand = cand + self.emb.user(batch.user)[:, None]
        return cand

    def block_states(self, batch: Batch) -> list[torch.Tensor]:
        """Final hidden states of every block over [history_k ; candidates]: list of (B, L_k + C, d).
        History states never depend on the candidates (the KV-cacheable part)."""
        if len(batch.seqs) != len(self.blocks):
            names = [s.name for s in self.strategies()]
            raise ValueError(f"Climber: batch has {len(batch.seqs)} subsequences, model expects {len(names)} ({names})")
        cand = self.candidate_tokens(batch)  # (B, C, d)
        return [block(*self._block_input(seq, batch, cand)) for block, seq in zip(self.blocks, batch.seqs)]

    def forward(self, batch: Batch) -> torch.Tensor:
        """-> logits (B, C); padding candidates get finite logits that callers mask out."""
        return self.forward_tasks(batch)["click"]

    def forward_tasks(self, batch: Batch) -> dict[str, torch.Tensor]:
        """{"click": (B, C)} and, with action_heads, {"action": (B, C, num_actions)} logits."""
        C = batch.cand_item.shape[1]
        E = torch.stack([h[:, h.shape[1] - C :] for h in self.block_states(batch)], dim=2)  # (B, C, Nb, d)
        return self.fuse(E, batch)

    def fuse(self, E: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        """BGF (or mean) fusion of the candidates' block outputs E (B, C, Nb, d) and the heads: the logits
        of ``forward_tasks``; reads the candidate fields of ``batch`` only."""
        B, C, nb, d = E.shape
        if self.cfg.use_bgf:
            g = E.reshape(B * C, nb, d)
            tau = None
            if self.cfg.use_atl:  # by the candidate's scenario only
                tau = self.fusion_temperature(batch.cand_scenario).reshape(B * C, 1).expand(B * C, nb)
            g = self.fusion_ln(self.fusion(g, tau=tau)).reshape(B, C, nb * d)  # (B, C, Nb * d)
            g = g * torch.sigmoid(self.se(g))  # bit-wise (per element) squeeze-and-excitation gate
        else:
            g = E.mean(dim=2)  # (B, C, d)
        h = self.head(torch.cat([g, self.emb.item(batch.cand_item)], dim=-1))  # (B, C, d)
        out = {"click": self.click_out(h).squeeze(-1)}
        if self.cfg.item_bias:
            out["click"] = out["click"] + self.item_bias_emb(batch.cand_item).squeeze(-1)
        if self.cfg.action_heads:
            out["action"] = self.action_out(h)  # (B, C, A)
        return out

    def flops(self, shape: SampleShape) -> int:
        """Analytic forward FLOPs of one row (2 m n k per matmul; lookups and elementwise ops count 0).
        Attention counts Q K^T and A V over the full (masked) N x N matrices, as computed."""
        cfg, d = self.cfg, self.cfg.d_model
        if len(shape.lengths) != len(self.blocks):
            raise ValueError(f"Climber.flops: {len(shape.lengths)} lengths given, model has {len(self.blocks)} blocks")
        C, nb = shape.candidates, len(shape.lengths)
        total = sum(cfg.n_layers * transformer_layer_flops(L + C, d, cfg.ffn_mult, cfg.attention_sink)
                    for L in shape.lengths)
        if cfg.use_bgf:
            total += C * (transformer_layer_flops(nb, d, cfg.ffn_mult) + 2 * 2 * nb * d * max(1, nb * d // 4))
            head_in = nb * d + d
        else:
            head_in = 2 * d
        heads = 1 + (self.info.num_actions if cfg.action_heads else 0)
        return total + C * (2 * head_in * d + 2 * d * heads)
