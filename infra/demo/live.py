"""The demo's live view: what it follows while the loop runs, and the rich table that shows it.

:class:`Watch` follows the versions published, served and decided on (model-updates, served-versions,
canary-decisions), the trainer's ledger and the join's counters; its timeline of versions goes into the report.
:func:`progress_table` draws them with the fleet's counters and the archive's mean reward per version.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

from boltstream.infra.common.config import Settings
from boltstream.infra.demo.fleet import Agents


class Watch:
    """Follows model-updates, served-versions and canary-decisions, the trainer's ledger and the join, of the
    policy ``settings.trainer.model_name`` (``settings`` of one policy: ``for_policy``)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # Of several policies, only this one's records; a single one takes every record, as before policies.
        self.policy = settings.trainer.model_name if settings.policies else None
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
            self.settings.kafka.consumer_config(**{"group.id": "demo-watch", "enable.auto.commit": False})
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
                if self.policy is None or record["model"] == self.policy:
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


def progress_table(
    watch: Watch,
    agents: Agents,
    rewards: dict[str, tuple[int, float]],
    started: float,
    duration: float,
    policy: str = "",
):
    """The live view's table: join throughput, trajectories, the fleet's rollouts and errors, trainer step,
    versions published and served, and the reward, recent and per version (``rewards``, from the archive);
    ``policy`` names the policy (and agent group) it shows, when there are several."""
    from rich.table import Table

    counters = agents.counters
    join = watch.join
    spans = join.get("spans", 0)
    elapsed = time.time() - started
    with counters.lock:
        recent = list(counters.recent)
        rollouts, errors, last_error = counters.rollouts, counters.errors, counters.last_error
    of_policy = f" — policy {policy} (agents {agents.agent_name})" if policy else ""
    table = Table(
        title=f"boltstream demo — {elapsed:5.0f} s of {duration:.0f} s{of_policy}",
        title_justify="left",
        show_header=False,
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


def reward_per_version(client: Any, policy: str = "") -> dict[str, tuple[int, float]]:
    """Mean final reward per model version from the archive (the report view of the foundation issue); of one
    ``policy``'s rollouts when there are several (``report_reward_by_policy_version``)."""
    if policy:
        rows = client.query(
            "SELECT model_version, rollouts, mean_reward FROM report_reward_by_policy_version"
            " WHERE policy = {policy:String}",
            parameters={"policy": policy},
        ).result_rows
    else:
        query = "SELECT model_version, rewards, mean_reward FROM report_reward_by_model_version"
        rows = client.query(query).result_rows
    return {str(version or 0): (int(n), float(mean)) for version, n, mean in rows}
