"""Climber: multi-scale sequence extraction (MSE), adaptive transformer layers (ATL) and bit-wise gating
fusion (BGF), scoring C candidates of one user in one pass ("single user, multiple items").

    history_k (L_k) ; candidates (C) --[n_layers ATL, block k]--> candidate states   (B, C, d), k = 1..Nb
    stack                                                       -> E                  (B, C, Nb, d)
    BGF: ATL over the Nb tokens of each candidate, SE gate       -> Y                  (B, C, Nb * d)
    head MLP on [Y ; candidate item embedding]                   -> logits             (B, C)
    (dot_head: + <W Y, candidate item embedding>, W (Nb * d -> d); context_features: block k's states
    + W_k [log1p(its history length), log1p(its last event's gap to the candidate) / 10], as DLRM's;
    popularity_prior: + w * the candidate item's smoothed train rate as log-odds, and popularity_count:
    + v * log1p(its train events), layers.PopularityPrior)

Ablations: use_mse=False -> one block over the full recent history; use_atl=False -> no relative bias,
temperature fixed at 1 (use_relative_bias=False / use_temperature=False: one of the two off);
use_bgf=False -> mean of the block outputs into the same head.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from climber.config import ConfigError
from climber.data.batch import Batch, Subsequence
from climber.data.sequences import Strategy
from climber.models import DataInfo, SampleShape
from climber.models.base import ModelConfig
from climber.models.attention import FULL_SEQUENCE, Keys, Plan, check_attention, full_sequence_impl, kernel_for
from climber.models.features import NUM_DENSE, history_dense_features
from climber.models.layers import (
    IdEmbeddings,
    PopularityPrior,
    RelativeBias,
    Temperature,
    TransformerLayer,
    encode_layers,
    history_candidate_mask,
    history_candidate_positions,
    init_weights,
    Steps,
    same_side_mask,
    score_layers,
    structured_stack_flops,
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
    use_relative_bias: bool = True  # with use_atl: the relative position / time bias (False: the -bias ablation)
    use_temperature: bool = True  # with use_atl: the learned temperatures, blocks and BGF (False: the -temperature ablation)
    use_bgf: bool = True  # bit-wise gating fusion of the block outputs (else their mean)
    use_mse: bool = True  # one block per strategy (else one block over the longest recent history)
    pos_buckets: int = 32
    time_buckets: int = 32
    user_embedding: bool = False  # add a learned user vector to candidate tokens
    item_bias: bool = False  # a learned scalar per item added to the click logit (first-order, "wide" term)
    popularity_prior: bool = False  # add w * the item's smoothed train positive rate as log-odds (out-of-fold in training) to the click logit
    popularity_count: bool = False  # with popularity_prior: + a learned weight (from 0) x log1p(the item's train events)
    popularity_fit: bool = False  # with popularity_prior: its weights start at their within-user fit on the train split (else 1, 0)
    dot_head: bool = False  # add <W Y, candidate item vector> to the click logit (an explicit interest x item product)
    context_features: bool = False  # add W_k [log1p(block k's history length), its gap to the candidate] to block k's states
    action_heads: bool = False  # multi-task: one extra binary head per action (is the candidate's action a?)
    attention: str = "structured"  # "structured" | "tiled" | "flex" | "dense" | "reference" (climber.models.attention)
    attention_sink: bool = False  # a learned null key/value per head in every block's ATLs (count-aware attention)
    match_bias: bool = False  # ATL bias per head where query and key items share an item side feature value
    match_mask: bool = False  # a token attends only to events whose items share all its side values (SIM hard search)

    def check(self) -> None:
        if not self.strategies:
            raise ConfigError("ClimberConfig.strategies: need at least one strategy")
        self.strategies = [Strategy.from_dict(s).to_dict() for s in self.strategies]
        names = [s["name"] for s in self.strategies]
        if len(set(names)) != len(names):
            raise ConfigError(f"ClimberConfig.strategies: names must be unique, got {names}")
        self.attention = check_attention("ClimberConfig", self.attention)
        if self.d_model % self.n_heads:
            raise ConfigError(f"ClimberConfig: d_model {self.d_model} not divisible by n_heads {self.n_heads}")
        self._at_least(1, "n_layers", "ffn_mult", "time_buckets")
        self._at_least(2, "pos_buckets")
        self._popularity_needs_prior()

    @property
    def has_relative_bias(self) -> bool:
        return self.use_atl and self.use_relative_bias

    @property
    def has_temperature(self) -> bool:
        return self.use_atl and self.use_temperature

    def block_strategies(self) -> list[Strategy]:
        """The strategies the loader must build, in block order."""
        given = [Strategy.from_dict(s) for s in self.strategies]
        if self.use_mse:
            return given
        return [Strategy(name="full", kind="recency", length=max(s.length for s in given))]


class Block(Steps):
    """One MSE strategy: n_layers ATLs over [history_k ; candidates], then a final LayerNorm. The relative
    bias and the temperature table (one entry per scenario) are shared by the block's layers. Runs over
    the full sequence (``full``, the dense / reference oracles) or in the two structured steps
    ``encode`` (history) and ``score`` (candidates)."""

    def __init__(self, cfg: ClimberConfig, num_scenarios: int, max_distance: int, match_features: int):
        super().__init__()
        d = cfg.d_model
        self.layers = nn.ModuleList(
            TransformerLayer(d, cfg.n_heads, cfg.ffn_mult, cfg.dropout, full_sequence_impl(cfg.attention),
                             cfg.attention_sink)
            for _ in range(cfg.n_layers)
        )
        self.has_bias, self.has_tau = cfg.has_relative_bias, cfg.has_temperature
        if self.has_bias:
            self.rel_bias = RelativeBias(cfg.n_heads, cfg.pos_buckets, cfg.time_buckets, max_distance,
                                         match_features if cfg.match_bias else 0)
        if self.has_tau:
            self.temperature = Temperature(num_scenarios + 1)
        self.match_mask = cfg.match_mask
        self.uses_side = cfg.match_mask or (self.has_bias and cfg.match_bias and match_features > 0)
        self.ln_f = nn.LayerNorm(d)

    def full(self, x, mask, pos, ts, scenario, side):
        """The block over a full sequence x (B, N, d): mask (B, N, N) bool; pos (1, N), ts (B, N), scenario
        (B, N) and item side feature ids side (B, N, F) of the tokens -> (B, N, d)."""
        if self.match_mask:
            mask = mask & same_side_mask(side)
        bias = self.rel_bias(pos[0], ts, side) if self.has_bias else None  # (B, H, N, N)
        tau = self.temperature(scenario) if self.has_tau else None  # (B, N), by the query's scenario
        for layer in self.layers:
            x = layer(x, mask, bias, tau)
        return self.ln_f(x)

    def encode(self, x, past, keys: Keys, scenario: torch.Tensor, kernel: str) -> list:
        """History tokens x (B, N, d) (scenario (B, N)) after P cached ones (past: per layer (k, v), or
        None); keys: the P + N history tokens -> per layer the (k, v) of all of them."""
        return encode_layers(self.layers, x, past, self._history_plan(keys, scenario, kernel))

    def score(self, x, kvs: list, keys: Keys, cand_ts, cand_side, cand_scenario, kernel: str) -> torch.Tensor:
        """Candidate tokens x (B, C, d) (ts, side ids, scenario (B, C)) against the per-layer (k, v) of
        the history ``keys`` -> (B, C, d)."""
        history = self._history_plan(keys, keys.ts[:, :0], kernel)  # no history queries: the keys alone
        plan = Plan.candidates(history, cand_ts, cand_side if self.uses_side else None, **self._atl(cand_scenario))
        return self.ln_f(score_layers(self.layers, x, kvs, plan))

    def _history_plan(self, keys: Keys, scenario: torch.Tensor, kernel: str) -> Plan:
        """The plan of the last N history tokens (scenario (B, N)) over the history ``keys`` (B, P + N)."""
        return Plan.history(keys.ts, keys.side if self.uses_side else None, keys.mask, keys.ts.shape[1] - scenario.shape[1],
                            kernel, match_mask=self.match_mask, **self._atl(scenario))

    def _atl(self, scenario) -> dict:
        """ATL's relative bias and per-query temperature (by scenario); None for a part that is off."""
        return {"tau": self.temperature(scenario) if self.has_tau else None,
                "rel_bias": self.rel_bias if self.has_bias else None}


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
        if cfg.context_features:
            self.context = nn.ModuleList(nn.Linear(NUM_DENSE, d) for _ in strategies)
        if cfg.use_bgf:
            self.fusion = TransformerLayer(d, cfg.n_heads, cfg.ffn_mult, cfg.dropout, full_sequence_impl(cfg.attention))
            if cfg.has_temperature:
                self.fusion_temperature = Temperature(info.num_scenarios + 1)
            self.fusion_ln = nn.LayerNorm(d)
            se_hidden = max(1, nb * d // 4)  # reduction ratio 4
            self.se = nn.Sequential(nn.Linear(nb * d, se_hidden), nn.ReLU(), nn.Linear(se_hidden, nb * d))
            head_in = nb * d + d
        else:
            head_in = 2 * d
        self.head = nn.Sequential(nn.Linear(head_in, d), nn.GELU(), nn.Dropout(cfg.dropout))  # shared trunk
        self.click_out = nn.Linear(d, 1)
        if cfg.dot_head:
            self.dot_proj = nn.Linear(head_in - d, d, bias=False)  # fused state Y -> the item vectors' space
        if cfg.item_bias:
            self.item_bias_emb = nn.Embedding(info.num_items + 1, 1, padding_idx=0)
        if cfg.popularity_prior:
            self.prior = PopularityPrior(info.num_items, cfg.popularity_count, cfg.popularity_fit)
        if cfg.action_heads:
            self.action_out = nn.Linear(d, info.num_actions)
        self.apply(init_weights)

    history_extends = True  # relative biases only: tokens appended to a cached history leave earlier K / V unchanged

    def head_logits(self, states: list, batch: Batch) -> torch.Tensor:
        """Click logits (B, C) from the candidates' states of each block (list of (B, C, d))."""
        return self.fuse(torch.stack(states, dim=2), batch)["click"]

    def strategies(self) -> list[Strategy]:
        return self.cfg.block_strategies()

    def _block_input(self, seq: Subsequence, batch: Batch, cand: torch.Tensor):
        """Tokens, mask, positions, timestamps, scenarios and item side feature ids of [history ;
        candidates] (N = L + C): the input of ``Block.forward``."""
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
            cand = cand + self.emb.user_vector(batch)[:, None]
        return cand

    def history_tokens(self, b: int, seq: Subsequence) -> torch.Tensor:  # -> (B, L, d), before dropout
        return self.emb.history(seq)

    @property
    def kernel(self) -> str:
        """The kernel of the structured steps ("tiled" | "flex")."""
        return kernel_for(self.cfg.attention)

    def encode(self, b: int, x: torch.Tensor, keys: Keys, scenario: torch.Tensor, past=None) -> list:
        """Block b over history tokens x (B, N, d) (scenario (B, N)) that follow P cached ones (past: per
        layer (k, v), or None); keys: the P + N history tokens -> per layer the (k, v) of all of them."""
        return self.blocks[b](x, past, keys, scenario, self.kernel, step="encode")

    def score(self, b: int, cand: torch.Tensor, kvs: list, keys: Keys, batch: Batch) -> torch.Tensor:
        """Block b's candidate states (B, C, d): the candidate tokens cand (B, C, d) of ``batch`` against
        the per-layer (k, v) of the history ``keys``."""
        states = self.blocks[b](cand, kvs, keys, batch.cand_ts, self.emb.item.side_ids(batch.cand_item),
                                batch.cand_scenario, self.kernel, step="score")
        return self.with_context(b, states, keys.ts, keys.mask, batch.cand_ts)

    def with_context(self, b: int, states, ts, mask, cand_ts) -> torch.Tensor:
        """Block b's candidate states (B, C, d), plus (context_features) a linear map of the dense features
        of its history (ts, mask (B, L)) for candidates at cand_ts (B, C): DLRM's two, per block."""
        if not self.cfg.context_features:
            return states
        return states + self.context[b](history_dense_features(ts, mask, cand_ts))

    def keys(self, ts, item, mask) -> Keys:
        """The history keys of a block from their ts, items and mask (B, M)."""
        return Keys(ts, mask, self.emb.item.side_ids(item))

    def block_states(self, batch: Batch) -> list[torch.Tensor]:
        """The candidates' final states of every block: list of (B, C, d). History states never depend on
        the candidates (the KV-cacheable part)."""
        if len(batch.seqs) != len(self.blocks):
            names = [s.name for s in self.strategies()]
            raise ValueError(f"Climber: batch has {len(batch.seqs)} subsequences, model expects {len(names)} ({names})")
        cand = self.candidate_tokens(batch)  # (B, C, d)
        C = cand.shape[1]
        if self.cfg.attention in FULL_SEQUENCE:
            return [self.with_context(b, block(*self._block_input(seq, batch, cand))[:, -C:], seq.ts, seq.mask,
                                      batch.cand_ts) for b, (block, seq) in enumerate(zip(self.blocks, batch.seqs))]
        states = []
        for b, seq in enumerate(batch.seqs):
            keys = self.keys(seq.ts, seq.item, seq.mask)
            kvs = self.encode(b, self.drop(self.history_tokens(b, seq)), keys, seq.scenario)
            states.append(self.score(b, self.drop(cand), kvs, keys, batch))
        return states

    def forward(self, batch: Batch) -> torch.Tensor:
        """-> logits (B, C); padding candidates get finite logits that callers mask out."""
        return self.forward_tasks(batch)["click"]

    def forward_tasks(self, batch: Batch) -> dict[str, torch.Tensor]:
        """{"click": (B, C)} and, with action_heads, {"action": (B, C, num_actions)} logits."""
        E = torch.stack(self.block_states(batch), dim=2)  # (B, C, Nb, d)
        return self.fuse(E, batch)

    def fuse(self, E: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        """BGF (or mean) fusion of the candidates' block outputs E (B, C, Nb, d) and the heads: the logits
        of ``forward_tasks``; reads the candidate fields of ``batch`` only."""
        B, C, nb, d = E.shape
        if self.cfg.use_bgf:
            g = E.reshape(B * C, nb, d)
            tau = None
            if self.cfg.has_temperature:  # by the candidate's scenario only
                tau = self.fusion_temperature(batch.cand_scenario).reshape(B * C, 1).expand(B * C, nb)
            g = self.fusion_ln(self.fusion(g, tau=tau)).reshape(B, C, nb * d)  # (B, C, Nb * d)
            g = g * torch.sigmoid(self.se(g))  # bit-wise (per element) squeeze-and-excitation gate
        else:
            g = E.mean(dim=2)  # (B, C, d)
        item = self.emb.candidate_item(batch)  # (B, C, d)
        h = self.head(torch.cat([g, item], dim=-1))  # (B, C, d)
        out = {"click": self.click_out(h).squeeze(-1)}
        if self.cfg.dot_head:
            out["click"] = out["click"] + (self.dot_proj(g) * item).sum(-1)
        if self.cfg.item_bias:
            out["click"] = out["click"] + self.item_bias_emb(batch.cand_item).squeeze(-1)
        if self.cfg.popularity_prior:
            out["click"] = out["click"] + self.prior(batch.cand_item, batch.user)
        if self.cfg.action_heads:
            out["action"] = self.action_out(h)  # (B, C, A)
        return out

    def flops(self, shape: SampleShape) -> int:
        """Analytic forward FLOPs of one row (2 m n k per matmul; lookups and elementwise ops count 0), as
        the configured attention path computes them: over the full (masked) N x N matrices (dense,
        reference) or structured (``structured_stack_flops``)."""
        cfg, d = self.cfg, self.cfg.d_model
        if len(shape.lengths) != len(self.blocks):
            raise ValueError(f"Climber.flops: {len(shape.lengths)} lengths given, model has {len(self.blocks)} blocks")
        C, nb = shape.candidates, len(shape.lengths)
        if cfg.attention in FULL_SEQUENCE:
            total = sum(cfg.n_layers * transformer_layer_flops(L + C, d, cfg.ffn_mult, cfg.attention_sink)
                        for L in shape.lengths)
        else:
            total = sum(structured_stack_flops(cfg.n_layers, L, C, d, cfg.ffn_mult, cfg.attention_sink)
                        for L in shape.lengths)
        if cfg.use_bgf:
            total += C * (transformer_layer_flops(nb, d, cfg.ffn_mult) + 2 * 2 * nb * d * max(1, nb * d // 4))
            head_in = nb * d + d
        else:
            head_in = 2 * d
        heads = 1 + (self.info.num_actions if cfg.action_heads else 0)
        dot = 2 * (head_in - d) * d if cfg.dot_head else 0
        context = nb * 2 * NUM_DENSE * d if cfg.context_features else 0
        return total + C * (2 * head_in * d + 2 * d * heads + dot + context)
