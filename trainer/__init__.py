"""The continuous DeepSpeed trainer, its algorithms (GRPO, SFT, APO), checkpoints, artifacts and weight publishing."""
