"""Scaling toolkit: FLOPs accounting (``flops``), grid sweeps over length x depth x width (``sweep``),
saturating power-law fits (``fit``), plots (``plot``) and equal-FLOPs advice (``advise``)."""
