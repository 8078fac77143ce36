"""The FlexAttention kernel of a structured-attention :class:`~climber.models.attention.Plan`
(``model.attention=flex``): one fused kernel per layer instead of the tiled kernel's query tiles.

The keys of a query are the plan's M history keys, then the N queries' own keys, then the sink key when
there is one; queries and keys are padded to multiples of BLOCK (128) so that a run compiles a handful
of shapes, not one per batch. The block mask is built from the plan's structure (the causal limits,
each query's own key, the sink) by arithmetic on blocks, with no N x M tensor; ``score_mod`` adds the
relative position / time / side-match bias (looked up from the RelativeBias tables), hides padding keys
and, with ``match_mask``, history keys of other side values, and divides by the query's temperature.

FlexAttention has no CPU backward in torch 2.13 and compiles each shape through inductor; on the CPU
the structured default runs the tiled kernel (measurements in docs/benchmarks.md). HSTU's pointwise
attention and attention dropout are not softmax-with-a-score-mod: the plan runs them tiled.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from climber.config import ConfigError

BLOCK = 128
_compiled = None


def _flex_attention():
    """flex_attention compiled once per process (static shapes: one kernel per padded shape)."""
    global _compiled
    if _compiled is None:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled = torch.compile(flex_attention, dynamic=False)
    return _compiled


def _round_up(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


def flex_attend(plan, q, k_self, v_self, k, v, sink) -> torch.Tensor:
    """q, k_self, v_self (B, H, N, dh); k, v (B, H, M, dh); sink (k, v) each (B, H, 1, dh) or None
    -> (B, H, N, dh), what the tiled kernel returns."""
    B, H, N, dh = q.shape
    if N == 0:
        return torch.zeros_like(q)
    if q.device.type == "cpu" and torch.is_grad_enabled() and q.requires_grad:
        raise ConfigError("model.attention=flex: FlexAttention has no CPU backward in torch 2.13; train on the "
                         "CPU with model.attention=structured (the tiled kernel)")
    M = k.shape[2]
    S = M + N + (sink is not None)  # keys: history, own, sink
    Np, Sp = _round_up(N), _round_up(S)
    rows = Np - N
    keys = F.pad(torch.cat([k, k_self, *([sink[0]] if sink else [])], dim=2), (0, 0, 0, Sp - S))
    values = F.pad(torch.cat([v, v_self, *([sink[1]] if sink else [])], dim=2), (0, 0, 0, Sp - S))
    # per query (Np,) / (B, Np); padded queries see their own (zero) padded key only
    limit = F.pad(plan.limit, (0, rows))
    q_pos = F.pad(plan.q_pos, (0, rows))
    q_ts = F.pad(plan.q_ts, (0, rows))
    tau = None if plan.tau is None else F.pad(plan.tau, (0, rows), value=1.0)
    # per key (Sp,) / (B, Sp): own keys carry their query's position and time (distance 0, gap 0)
    k_pos = F.pad(torch.cat([plan.k_pos, plan.q_pos]), (0, Sp - M - N))
    k_ts = F.pad(torch.cat([plan.k_ts, plan.q_ts], dim=1), (0, Sp - M - N))
    hidden = F.pad(~plan.k_mask, (0, Sp - M))  # (B, Sp): padding history keys
    # sizes as tensors, not Python ints: the compiled kernel is reused across batches of one padded shape
    m = torch.tensor(M, device=q.device)
    sink_at = torch.tensor(M + N if sink is not None else -1, device=q.device)
    bias = plan.rel_bias
    if bias is not None:
        table = bias.pair_table()  # (P * T, H)
        time_buckets = bias.time_buckets
    sides = plan.q_side is not None
    if sides:
        q_side = F.pad(plan.q_side, (0, 0, 0, rows))  # (B, Np, F)
        k_side = F.pad(torch.cat([plan.k_side, plan.q_side], dim=1), (0, 0, 0, Sp - M - N))  # (B, Sp, F)

    def score_mod(score, b, h, qi, kv):
        history = kv < m
        z = score
        if bias is not None:
            dt = (q_ts[b, qi] - k_ts[b, kv]).clamp(min=0)
            t = sum((dt >= (1 << e)).to(torch.int64) for e in range(time_buckets - 1))  # 1 + floor(log2 dt), capped
            p = bias.bucket_of_distance[(q_pos[qi] - k_pos[kv]).clamp(0, bias.max_distance)]
            z = z + torch.where(kv == sink_at, 0.0, table[p * time_buckets + t, h])
        hide = hidden[b, kv]
        if sides:
            every = history
            for f in range(q_side.shape[-1]):
                match = (q_side[b, qi, f] == k_side[b, kv, f]) & (k_side[b, kv, f] > 0)
                if bias is not None and bias.match_bias is not None:
                    z = z + torch.where(match & (kv != sink_at), bias.match_bias[f, h], 0.0)
                every = every & match
            if plan.match_mask:
                hide = hide | (history & ~every)
        if tau is not None:
            z = z / tau[b, qi]
        return torch.where(hide, float("-inf"), z)

    def mask_mod(b, h, qi, kv):
        return ((kv < m) & (kv < limit[qi])) | (kv == qi + m) | (kv == sink_at)

    block_mask = _block_mask(plan.limit.tolist(), M, N, Np, Sp, sink is not None, mask_mod, q.device)
    scale = 1.0 / dh**0.5
    out = _flex_attention()(F.pad(q, (0, 0, 0, rows)), keys, values, score_mod=score_mod, block_mask=block_mask,
                            scale=scale)
    return out[:, :, :N]


def _block_mask(limits: list[int], M: int, N: int, Np: int, Sp: int, sink: bool, mask_mod, device):
    """The BlockMask of the plan's structure: query block i sees the history key blocks below its largest
    limit, the blocks of its queries' own keys and the sink's block; every block is partial (mask_mod
    decides within it)."""
    from torch.nn.attention.flex_attention import BlockMask

    q_blocks, kv_blocks = Np // BLOCK, Sp // BLOCK
    lists = []
    for i in range(q_blocks):
        first, last = i * BLOCK, min(N, (i + 1) * BLOCK) - 1
        history = range(-(-limits[last] // BLOCK)) if first < N else range(0)
        own = range((M + first) // BLOCK, min(kv_blocks, (M + (i + 1) * BLOCK - 1) // BLOCK + 1))
        lists.append(sorted({*history, *own, *([(M + N) // BLOCK] if sink else [])}))
    indices = torch.zeros(1, 1, q_blocks, kv_blocks, dtype=torch.int32)
    for i, blocks in enumerate(lists):
        indices[0, 0, i, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
    counts = torch.tensor([[[len(x) for x in lists]]], dtype=torch.int32)
    return BlockMask.from_kv_blocks(counts.to(device), indices.to(device), BLOCK_SIZE=BLOCK, mask_mod=mask_mod,
                                    seq_lengths=(Np, Sp))
