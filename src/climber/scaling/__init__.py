"""Scaling toolkit: FLOPs accounting (``flops``), grid sweeps over length x depth x width (``sweep``),
saturating power-law fits (``fit``)."""
