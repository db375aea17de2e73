"""DeepSpeed for the trainer: the built-in CPU config, batch-size bookkeeping and process-group setup.

The user replaces the built-in config with any DeepSpeed JSON (``trainer.deepspeed_config``): ZeRO
stage 0-3, bf16, the optimizer and its learning rate, gradient clipping, gradient accumulation. The
trainer owns only the batch sizes, because a batch is made of complete GRPO groups: it sets
``train_batch_size`` and ``train_micro_batch_size_per_gpu`` from the global batch, the world size and
the config's ``gradient_accumulation_steps``.

On CPU two things would otherwise need a C++ toolchain at run time, and both are avoided:

* the optimizer: ``"torch_adam": true`` makes DeepSpeed use ``torch.optim.Adam(W)`` instead of its
  compiled CPU Adam;
* the shared-memory all-reduce op (``deepspeed_shm_comm``), which DeepSpeed JIT-builds with g++ when
  it sets up torch.distributed on CPU. It only speeds up intra-node all-reduce; gloo does the same
  job without it. :func:`init_distributed` marks it incompatible before the process group starts
  (``trainer.deepspeed_shm_comm = true`` keeps DeepSpeed's default, for machines with a compiler that want it).

Multi-process training runs under ``torchrun`` (which sets RANK/WORLD_SIZE/MASTER_ADDR); a plain
``python`` process is a world of one on a free loopback port.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

from boltstream.infra.common.config import ConfigError

#: The built-in config: ZeRO stage 0 on CPU, torch Adam, clipping at 1.0, fp32.
DEFAULT_DEEPSPEED_CONFIG: dict[str, Any] = {
    "gradient_accumulation_steps": 1,
    "gradient_clipping": 1.0,
    "optimizer": {
        "type": "Adam",
        "params": {"lr": 1e-4, "betas": [0.9, 0.99], "eps": 1e-8, "weight_decay": 0.0, "torch_adam": True},
    },
    "zero_optimization": {"stage": 0},
    "bf16": {"enabled": False},
    "steps_per_print": 10**9,
}


def load_deepspeed_config(source: str | Path | dict[str, Any] | None) -> dict[str, Any]:
    """The DeepSpeed config from a JSON file path, a dict, or the built-in default when empty."""
    if source is None or source == "":
        return copy.deepcopy(DEFAULT_DEEPSPEED_CONFIG)
    if isinstance(source, dict):
        return copy.deepcopy(source)
    try:
        return json.loads(Path(source).read_text())
    except OSError as exc:
        raise ConfigError(f"trainer.deepspeed_config: cannot read {source}: {exc}") from None
    except ValueError as exc:
        raise ConfigError(f"trainer.deepspeed_config: {source} is not JSON: {exc}") from None


def with_batch_sizes(config: dict[str, Any], global_batch: int, world_size: int) -> dict[str, Any]:
    """``config`` with the batch sizes DeepSpeed needs for ``global_batch`` samples per optimizer step."""
    accumulation = int(config.get("gradient_accumulation_steps", 1))
    per_step = world_size * accumulation
    if global_batch % per_step:
        raise ConfigError(
            f"the global batch ({global_batch} samples = group_size x groups_per_step) must divide evenly over "
            f"{world_size} rank(s) x {accumulation} gradient accumulation step(s)"
        )
    derived = {"train_batch_size": global_batch, "train_micro_batch_size_per_gpu": global_batch // per_step}
    for key, value in derived.items():
        if key in config and int(config[key]) != value:
            raise ConfigError(f"deepspeed config sets {key}={config[key]}, but the trainer's batch makes it {value}")
    return {**config, **derived, "gradient_accumulation_steps": accumulation}


def init_distributed(shm_comm: bool = False) -> tuple[int, int]:
    """Start (or join) the torch.distributed process group; return (rank, world_size). ``shm_comm`` lets
    DeepSpeed build and use its shared-memory all-reduce op (see the module docstring)."""
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        if not shm_comm:
            # Probed lazily and cached in a module dict, so this edit is what TorchBackend sees.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        backend = "gloo" if not _has_accelerator() else None
        if "RANK" in os.environ:  # torchrun (or another launcher) set the world up
            deepspeed.init_distributed(dist_backend=backend, verbose=False)
        else:  # a plain process: a world of one, without touching the environment children inherit
            from boltstream.infra.common.ports import free_port

            os.environ.setdefault("LOCAL_RANK", "0")  # the engine insists on reading it
            deepspeed.init_distributed(
                dist_backend=backend,
                auto_mpi_discovery=False,
                init_method=f"tcp://127.0.0.1:{free_port()}",
                rank=0,
                world_size=1,
                verbose=False,
            )
    return dist.get_rank(), dist.get_world_size()


def _has_accelerator() -> bool:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() != "cpu"


def build_engine(model, config: dict[str, Any]):
    """``deepspeed.initialize`` on the trainable parameters of ``model``; returns the engine."""
    import deepspeed

    parameters = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=parameters, config=config)
    return engine
