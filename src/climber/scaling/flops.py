"""``climber flops``: a model's analytic forward FLOPs per row (``model.flops``) beside the FLOPs that
``torch.utils.flop_counter`` measures on one full row, the split of the measured count by kind of
module, and the parameters. Training costs 3 x forward (forward + backward of activations and weights).
"""

from __future__ import annotations

from torch import nn

from climber.bench import bench_model, count_flops, random_batch
from climber.config import ConfigError
from climber.models import SampleShape, parameter_counts
from climber.models.features import FeatureTokens
from climber.models.layers import Attention, FeedForward, IdEmbeddings

KINDS = {Attention: "attention", FeedForward: "ffn", IdEmbeddings: "embeddings", FeatureTokens: "embeddings",
         nn.Embedding: "embeddings"}  # module class -> kind; the rest counts as "head and other"


def _kind(module: nn.Module) -> str | None:
    from climber.models.hstu import HSTULayer  # its projections, pointwise attention and gating are one module

    if isinstance(module, HSTULayer):
        return "attention"
    return next((k for cls, k in KINDS.items() if isinstance(module, cls)), None)


def flops_report(model_name: str, overrides: list[str], candidates: int = 32, length: int | None = None) -> dict:
    """Analytic and measured forward FLOPs of one row (every subsequence full, ``candidates`` candidates),
    the measured split by kind, and the parameters. ``length`` sets every subsequence length (default:
    the preset's). Measured in train mode without dropout (every MoE expert runs, as the analytic count
    assumes) with the reference attention."""
    if length is not None and length < 1:
        raise ConfigError(f"flops: --length must be >= 1, got {length}")
    if candidates < 1:
        raise ConfigError(f"flops: --candidates must be >= 1, got {candidates}")
    model = bench_model(model_name, [*overrides, "model.dropout=0.0"], length).train()
    lengths = tuple(s.length for s in model.strategies())
    batch = random_batch(lengths, 1, candidates)
    total, per_module = count_flops(model, lambda: model(batch))
    prefix = type(model).__name__
    split = {"attention": 0, "ffn": 0, "embeddings": 0}
    for name, module in _outermost(model):
        split[_kind(module)] += per_module.get(f"{prefix}.{name}", 0)
    split["head and other"] = total - sum(split.values())
    analytic = model.flops(SampleShape(lengths, candidates))
    return {"model": model_name, "overrides": overrides, "lengths": list(lengths), "candidates": candidates,
            "forward_flops": {"analytic": analytic, "measured": total, "relative_difference": (analytic - total) / total},
            "train_flops_analytic": 3 * analytic, "per_candidate_forward_flops": analytic / candidates,
            "measured_split": split,
            "parameters": parameter_counts(model)}


def _outermost(model: nn.Module):
    """(name, module) of the modules with a kind that no module with a kind contains."""
    taken: list[str] = []
    for name, module in model.named_modules():
        if _kind(module) and not any(name.startswith(t + ".") for t in taken):
            taken.append(name)
            yield name, module
