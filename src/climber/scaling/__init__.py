"""Scaling toolkit: FLOPs accounting (``flops``) and grid sweeps over length x depth x width (``sweep``)."""
