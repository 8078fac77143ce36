"""Scaling toolkit: FLOPs accounting (``flops``)."""
