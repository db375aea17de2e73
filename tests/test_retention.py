"""The SDK's retention (producers/retention.py): what it keeps, when it sends it again, when it lets go."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from boltstream.infra.common.config import Settings, load_settings
from boltstream.producers import retention as retention_module
from boltstream.producers.retention import Retention
from boltstream.producers.spool import SpooledMessage


def retention_settings(home: Path, window: float = 0.4) -> Settings:
    settings = load_settings(environ={"BOLTSTREAM_HOME": str(home)}, kafka={"bootstrap_servers": "127.0.0.1:9"})
    # An hour between broker checks: the tests tell the retention what the broker said (observe()).
    return replace(settings, producer=replace(settings.producer, retention=window, broker_check_interval=3600))


def message(rollout: str, n: int) -> SpooledMessage:
    return SpooledMessage("spans", rollout.encode(), f"{rollout}-{n}".encode(), spans=1)


def test_a_new_incarnation_gets_every_retained_message_again_in_order(tmp_path: Path) -> None:
    retention = Retention(retention_settings(tmp_path), tmp_path / "retained")
    retention.observe("cluster-1", ready=True)
    sent = [message("a", 0), message("b", 0), message("a", 1)]
    for each in sent:
        retention.keep(each)
    assert retention.replay_due() is None  # same broker: nothing to send again
    retention.observe("cluster-1", ready=True)
    assert retention.replay_due() is None
    retention.observe("cluster-2", ready=True)
    assert retention.replay_due() == sent
    assert retention.replay_due() is None  # handed over once; their new acknowledgements retain them anew
    assert retention.stats.new_incarnations == 1
    retention.close()


def test_a_restoring_incarnation_holds_messages_back_until_the_stack_marks_it_ready(tmp_path: Path) -> None:
    retention = Retention(retention_settings(tmp_path), tmp_path / "retained")
    retention.observe("cluster-1", ready=True)
    retention.keep(message("a", 0))
    retention.observe("cluster-2", ready=False)  # the stack is still restoring its snapshot
    assert retention.holding and retention.replay_due() is None
    retention.observe("cluster-2", ready=True)
    assert not retention.holding and retention.replay_due() == [message("a", 0)]
    retention.close()


def test_a_broker_that_never_had_the_marker_is_used_as_soon_as_it_answers(tmp_path: Path) -> None:
    retention = Retention(retention_settings(tmp_path), tmp_path / "retained")
    retention.observe("kafka-a", ready=False)
    retention.keep(message("a", 0))
    retention.observe("kafka-b", ready=False)
    assert not retention.holding and retention.replay_due() == [message("a", 0)]
    retention.close()


def test_rollouts_are_released_whole_and_only_while_the_broker_is_confirmed(tmp_path: Path) -> None:
    window = 0.4
    retention = Retention(retention_settings(tmp_path, window), tmp_path / "retained")
    retention.observe("cluster-1", ready=True)
    retention.keep(message("done", 0))
    retention.keep(message("running", 0))
    time.sleep(window * 1.5)
    retention.keep(message("running", 1))  # a newer bucket; "running" is still active
    time.sleep(window * 0.5)
    retention.observe("cluster-1", ready=True)
    retention.replay_due()  # releases what is due: nothing, "running" pins the first bucket
    time.sleep(window * 1.2)
    retention.replay_due()  # the broker did not answer since: nothing ages out during an outage
    retention.observe("cluster-2", ready=True)
    assert retention.replay_due() == [message("done", 0), message("running", 0), message("running", 1)]
    retention.keep(message("later", 0))
    time.sleep(window * 1.2)
    retention.observe("cluster-2", ready=True)
    assert retention.replay_due() is None  # expired: older than the window at a confirmation
    retention.observe("cluster-3", ready=True)
    assert retention.replay_due() == []
    retention.close()


def test_a_restarted_agent_adopts_what_its_predecessor_retained(tmp_path: Path) -> None:
    settings = retention_settings(tmp_path, window=60)
    first = Retention(settings, tmp_path / "retained")
    first.observe("cluster-1", ready=True)
    first.keep(message("a", 0))
    first.close()
    second = Retention(settings, tmp_path / "retained")
    second.observe("cluster-1", ready=True)
    assert second.replay_due() is None
    second.observe("cluster-2", ready=True)  # the broker restarted while the agent was away
    assert second.replay_due() == [message("a", 0)]
    second.close()


def test_the_bound_releases_the_oldest_early_and_counts_it(tmp_path: Path) -> None:
    settings = retention_settings(tmp_path, window=0.2)
    settings = replace(settings, producer=replace(settings.producer, retention_max_bytes=4096))
    retention = Retention(settings, tmp_path / "retained")
    retention.observe("cluster-1", ready=True)
    for _ in range(3):
        retention.keep(SpooledMessage("spans", b"a", bytes(1500), spans=1))
        time.sleep(0.06)  # a bucket each
    retention.keep(SpooledMessage("spans", b"b", bytes(1500), spans=1))
    assert retention.stats.dropped_messages >= 1
    retention.observe("cluster-2", ready=True)
    assert len(retention.replay_due()) == 4 - retention.stats.dropped_messages
    retention.close()


def test_retention_off_keeps_nothing(tmp_path: Path) -> None:
    retention = Retention(retention_settings(tmp_path, window=0), tmp_path / "retained")
    retention.keep(message("a", 0))
    retention.observe("cluster-2", ready=True)
    assert retention.replay_due() is None and not (tmp_path / "retained").exists()
    retention.close()


def test_holding_back_ends_after_the_limit(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(retention_module, "HOLD_LIMIT", 0.2)
    retention = Retention(retention_settings(tmp_path), tmp_path / "retained")
    retention.observe("cluster-1", ready=True)
    retention.keep(message("a", 0))
    retention.observe("not-a-stack", ready=False)
    assert retention.holding
    time.sleep(0.3)
    retention.observe("not-a-stack", ready=False)  # never marked ready: sent to anyway, not held forever
    assert not retention.holding and retention.replay_due() == [message("a", 0)]
    retention.close()


def test_what_was_learnt_of_another_broker_address_does_not_count(tmp_path: Path) -> None:
    first = Retention(retention_settings(tmp_path, window=60), tmp_path / "retained")
    first.observe("stack-1", ready=True)
    first.close()
    elsewhere = retention_settings(tmp_path, window=60)
    elsewhere = replace(elsewhere, kafka=replace(elsewhere.kafka, bootstrap_servers="127.0.0.1:10"))
    second = Retention(elsewhere, tmp_path / "retained")
    second.observe("kafka-cluster", ready=False)  # a first contact, not a stack still restoring
    assert not second.holding and second.replay_due() is None
    second.close()
