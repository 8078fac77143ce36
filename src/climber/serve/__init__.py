"""Serving: an inference engine with a KV cache of each user's history (engine.py)."""
