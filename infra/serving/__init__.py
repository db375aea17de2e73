"""Serving: the vLLM launcher, the weight_sync sidecar, the canary router and analysis, and ``boltstream serve``."""
