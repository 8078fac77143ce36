"""Where a model runs and in which precision: ``--device auto|cpu|cuda|cuda:N|mps`` and
``train.precision=fp32|bf16``.

- :func:`resolve_device`: a device name -> ``torch.device``; "auto" is CUDA when available, else the CPU.
  A device this machine lacks is a ConfigError (one line, exit 2 on the command line).
- :func:`check_precision`: (the names are TrainConfig's) bf16 needs a GPU or a CPU with native bf16 (AVX512-BF16 / AMX); elsewhere
  bf16 matmuls run about 100x slower than fp32 (1 against 177 GFLOP/s measured on an AVX2 EPYC), so we
  refuse rather than crawl.
- :func:`autocast`: the forward's autocast context for a precision (bf16 matmuls, fp32 weights and
  optimizer state; nothing for fp32).
- :func:`flushed_denormals`: subnormal floats as zero on the CPU within (faster; every command uses it).
"""

from __future__ import annotations

import contextlib

import torch

from climber.config import ConfigError

DEVICES = "auto, cpu, cuda, cuda:N or mps"


def resolve_device(name="auto") -> torch.device:
    """The torch.device of ``name`` (see the module doc; a torch.device works too), checked against this
    machine."""
    name = str(name).strip().lower()
    if name == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError("device mps: no Apple GPU (MPS) is available on this machine; use --device cpu")
        return torch.device("mps")
    if name == "cuda" or name.startswith("cuda:"):
        index = name.partition(":")[2]
        if index and not index.isdigit():
            raise ConfigError(f"device {name!r}: expected cuda:N with N a GPU number, e.g. cuda:0")
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name}: no CUDA GPU is available (torch {torch.__version__}, "
                              f"CUDA build: {torch.version.cuda or 'no'}); use --device cpu or auto")
        if index and int(index) >= torch.cuda.device_count():
            raise ConfigError(f"device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                              f"numbered from 0")
        return torch.device(name)
    raise ConfigError(f"device must be {DEVICES}, got {name!r}")


@contextlib.contextmanager
def flushed_denormals():
    """Within: subnormal floats count as zero on the CPU (x86 FTZ / DAZ; restored to IEEE on exit). The exp
    of masked or far-below-max attention scores and tiny gradients land there and take a microcode slow
    path: an ML-100k Climber training step took 139 ms without and 94 ms with this. Numbers below 1.2e-38
    become 0. The state is per thread (threads started within inherit it) and also holds for Python and
    numpy floats, so it is scoped: every ``climber`` command, ``Trainer.fit``, the benchmark steps."""
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def native_bf16(device: torch.device) -> bool:
    """True where bf16 matmuls run at least as fast as fp32: CUDA, MPS, a CPU with AVX512-BF16 or AMX."""
    if device.type == "cpu":
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return True


def check_precision(precision: str, device: torch.device) -> None:
    """``precision`` (a name TrainConfig has checked) runs fast on ``device``, or a ConfigError."""
    if precision == "bf16" and not native_bf16(device):
        raise ConfigError(f"train.precision=bf16 on {device}: this CPU has no native bf16 (AVX512-BF16 or AMX) "
                          "and would run about 100x slower than fp32; use train.precision=fp32 or a GPU")


def autocast(device: torch.device, precision: str):
    """The autocast context of a forward in ``precision`` on ``device`` (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)
