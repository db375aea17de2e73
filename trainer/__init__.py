"""The continuous DeepSpeed trainer, its algorithms, checkpoints, weight publishing and the vLLM weight_sync sidecar."""
