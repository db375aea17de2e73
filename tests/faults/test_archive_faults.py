"""Fault scenarios of the archive: real traffic through the real broker into the real archive process (chDB),
with a fault on the way; every acknowledged span must be in the deduplicated views exactly once.

- the archive SIGKILLed three times while the SDK sends;
- a valid SpanBatch whose spans fall on 150 days (ClickHouse refuses more than 100 partitions per insert
  by default);
- a 200 MB message (the embedded broker accepts it), then 4,000 good spans;
- the chDB data directory on a tmpfs that fills up, then gets space again.
"""

from __future__ import annotations

import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Producer

from boltstream import agl
from boltstream.infra.stack.broker import EmbeddedBroker
from boltstream.schemas.codec import codec
from boltstream.stream_processors.archive import describe_archive_state, read_archive_states
from tests.conftest import archive_process, isolated_settings
from tests.faults.table import FaultRow, record_fault
from tests.records import make_span
from tests.test_archive import span_batch_over_days, wait_for


class Acknowledged:
    """Event ids of the spans the broker acknowledged, from the delivery reports of their messages."""

    def __init__(self) -> None:
        self.ids: set[str] = set()
        self._lock = threading.Lock()
        self._codec = codec("SpanBatch")

    def __len__(self) -> int:
        with self._lock:
            return len(self.ids)

    def add(self, value: bytes) -> None:
        ids = [span["event_id"] for span in self._codec.decode(value)["spans"]]
        with self._lock:
            self.ids.update(ids)

    def report(self, error, message) -> None:
        """A confluent-kafka delivery report."""
        if error is None:
            self.add(message.value())


def produce_span_batches(settings, values: list[bytes], acknowledged: Acknowledged, **config) -> None:
    """Produce SpanBatch messages with acks=all and count what the broker acknowledged."""
    producer = Producer(settings.kafka.client_config(**{"acks": "all", "enable.idempotence": True, **config}))
    for value in values:
        producer.produce(settings.topics.spans, value, key=value[10:26], on_delivery=acknowledged.report)
        producer.poll(0)
    assert producer.flush(60) == 0


def span_batches(batches: int, spans_per_batch: int) -> list[bytes]:
    """Valid SpanBatch messages of one rollout each (tool_call spans of now)."""
    batch_codec, values = codec("SpanBatch"), []
    for _ in range(batches):
        rollout_id = str(uuid.uuid4())
        spans = [make_span(rollout_id, kind="tool_call", sequence=i) for i in range(spans_per_batch)]
        batch = {"rollout_id": rollout_id, "producer_id": "fault", "sent_at_us": 0, "spans": spans}
        values.append(batch_codec.encode(batch))
    return values


class SdkTraffic:
    """Rollouts sent through the SDK (``agl``) from a thread until :meth:`stop`; the acknowledged spans counted."""

    def __init__(self, settings, pause: float = 0.01) -> None:
        self.settings, self.pause = settings, pause
        self.acknowledged = Acknowledged()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sdk-traffic", daemon=True)

    def start(self) -> SdkTraffic:
        spans_topic = self.settings.topics.spans

        def delivered(topic: str, value: bytes, error) -> None:
            if topic == spans_topic and error is None:
                self.acknowledged.add(value)

        agl.configure(self.settings, on_delivery=delivered)
        self._thread.start()
        return self

    def _run(self) -> None:
        number = 0
        while not self._stop.is_set():
            with agl.rollout(task_id=f"task-{number}", agent_name="fault-agent"):
                for step in range(9):
                    agl.emit_tool_call("calculator", {"expression": f"{number} * {step}"}, result=number * step)
            number += 1
            time.sleep(self.pause)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        try:
            assert agl.flush(60), agl.stats()
        finally:
            agl.shutdown(10)


def measured_row(archive, acknowledged: Acknowledged, scenario: str, note: str, timeout: float = 120) -> FaultRow:
    """Wait until the archive holds every acknowledged span (or ``timeout``), then count from its views."""
    reader = archive.client()
    expected = len(acknowledged)
    wait_for(lambda: reader.command("SELECT count() FROM spans") >= expected, timeout, f"{expected:,} spans")
    time.sleep(1.0)  # anything still in flight would show up as an extra row now
    archived_ids = {row[0] for row in reader.query("SELECT event_id FROM spans").result_rows}
    rows, distinct = reader.query("SELECT count(), uniqExact(event_id) FROM spans").result_rows[0]
    return FaultRow(
        scenario=scenario,
        acknowledged=expected,
        archived=len(acknowledged.ids & archived_ids),
        duplicated=rows - distinct,
        trajectories_identical=None,
        note=note,
    )


def dead_letters(archive) -> list[tuple]:
    return archive.client().query("SELECT key, error_type, reason, value, source_offset FROM dead_letters").result_rows


def test_archive_sigkilled_three_times_during_traffic(settings, archive):
    archive.env["BOLTSTREAM_STREAM__BATCH_SIZE"] = "20"  # small batches: each kill lands between commits
    archive.start()
    reader = archive.client()
    traffic = SdkTraffic(settings).start()
    kills = 0
    try:
        for _ in range(3):
            target = reader.command("SELECT count() FROM spans_store") + 500
            wait_for(lambda: archive.client().command("SELECT count() FROM spans_store") >= target, 90, "progress")  # noqa: B023
            archive.kill()  # SIGKILL: no batch finished, nothing flushed
            kills += 1
            archive.start()  # same group: resumes from the last committed offsets
            reader = archive.client()
        wait_for(lambda: len(traffic.acknowledged) >= reader.command("SELECT count() FROM spans") + 500, 60, "more")
    finally:
        traffic.stop()
    assert kills == 3
    row = measured_row(archive, traffic.acknowledged, "archive SIGKILL x3 during SDK traffic", "3 kills, 3 restarts")
    # The killed workers' state files are gone too: status shows the one running.
    states = list((settings.home / "run").glob("archive-*.json"))
    assert [path.name for path in states] == [f"archive-{archive.process.pid}.json"]
    record_fault(row)


def test_a_valid_batch_over_150_days_is_archived(settings, archive):
    archive.start()
    acknowledged = Acknowledged()
    wide, wide_ids = span_batch_over_days(150)
    produce_span_batches(settings, [*span_batches(50, 20), wide, *span_batches(50, 20)], acknowledged)
    row = measured_row(archive, acknowledged, "poison: one SpanBatch over 150 days", "")
    reader = archive.client()
    days = reader.command("SELECT uniqExact(toDate(fromUnixTimestamp64Micro(start_time_us))) FROM spans")
    assert {row[0] for row in reader.query("SELECT event_id FROM spans").result_rows} >= set(wide_ids)
    letters = dead_letters(archive)
    assert letters == []
    record_fault(FaultRow(**{**row.__dict__, "note": f"spans on {days} days archived; {len(letters)} dead letters"}))


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[EmbeddedBroker]:
    """A broker of the test's own: the 200 MB message leaves with it (the embedded broker keeps all in memory)."""
    broker = EmbeddedBroker(log_path=tmp_path / "broker.log").start()
    yield broker
    broker.stop()


def test_a_200_mb_message_is_dead_lettered_and_the_next_4000_spans_archived(own_broker, tmp_path):
    settings = isolated_settings(own_broker, tmp_path)
    archive = archive_process(settings, tmp_path / "archive.log")
    try:
        archive.start()
        acknowledged = Acknowledged()
        # A foreign producer (not the SDK, which refuses it) with a limit far above the stack's.
        huge = Producer(settings.kafka.client_config(**{"message.max.bytes": 300_000_000, "acks": "all"}))
        huge_acks = []
        huge.produce(
            settings.topics.spans,
            b"\xc3\x01" + bytes(200_000_000),
            key=b"huge",
            partition=0,
            on_delivery=lambda error, message: huge_acks.append((error, message.offset())),
        )
        assert huge.flush(120) == 0 and huge_acks[0][0] is None
        del huge
        started = time.monotonic()
        produce_span_batches(settings, span_batches(200, 20), acknowledged)
        assert len(acknowledged) == 4000
        row = measured_row(archive, acknowledged, "poison: a 200 MB message, then 4,000 spans", "", timeout=180)
        took = time.monotonic() - started
        letters = dead_letters(archive)
        assert [(key, error_type, value, offset) for key, error_type, _, value, offset in letters] == [
            ("huge", "too_large", "", huge_acks[0][1])
        ]
        assert letters[0][2].startswith("message of 200,000,006 bytes is larger than kafka.max_message_bytes")
        assert archive.process.poll() is None
        note = f"1 dead letter (key, size, offset; no value); the 4,000 spans archived {took:.0f} s after the message"
        record_fault(FaultRow(**{**row.__dict__, "note": note}))
    finally:
        archive.stop()


@pytest.fixture
def small_disk(settings) -> Iterator[Path]:
    """A 40 MiB tmpfs as the archive's chDB data directory; skipped where mounting is not permitted."""
    data = Path(settings.home) / "clickhouse"
    data.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(data)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        why = mounted.stderr.strip() or f"mount exited with {mounted.returncode}"
        pytest.skip(f"cannot mount a small tmpfs for the data directory: {why}")
    yield data
    subprocess.run(["umount", "-l", str(data)], check=False)


def fill(directory: Path) -> Path:
    """Write a file into ``directory`` until its filesystem is full."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as out:
        try:
            while True:
                out.write(bytes(1024 * 1024))
        except OSError:  # ENOSPC: full
            pass
    return filler


def test_the_data_directory_on_a_full_disk_waits_and_archives_everything_when_space_returns(
    settings, archive, small_disk
):
    archive.env["BOLTSTREAM_CLICKHOUSE__RETRY_MAX_WAIT"] = "2"
    archive.start()
    acknowledged = Acknowledged()
    produce_span_batches(settings, span_batches(50, 20), acknowledged)
    reader = archive.client()
    wait_for(lambda: reader.command("SELECT count() FROM spans") >= 1000, 60, "the first 1,000 spans")

    filler = fill(small_disk)
    produce_span_batches(settings, span_batches(150, 20), acknowledged)
    pid = archive.process.pid

    def state_of(pid: int) -> dict:
        """What `boltstream status` shows of the archive worker ``pid``."""
        return next((state for state in read_archive_states(settings.home) if state["pid"] == pid), {})

    def waiting_on_disk() -> bool:
        state = state_of(pid)  # the pid of the archive running at the time of the call
        return state.get("state") == "waiting" and state["attempts"] >= 3

    wait_for(waiting_on_disk, 60, "the archive to wait on the full disk")
    state = state_of(pid)
    assert "disk full (code 243" in state["problem"] and "NOT_ENOUGH_SPACE" in state["problem"]
    assert describe_archive_state(state).startswith("waiting since ")
    assert archive.process.poll() is None  # no crash, so no crash loop
    # Stopped while it waits and started again on the still full disk: it comes up and waits again.
    assert archive.stop() == 0
    archive.start()
    pid = archive.process.pid
    wait_for(waiting_on_disk, 60, "the restarted archive to wait on the full disk")

    filler.unlink()
    row = measured_row(archive, acknowledged, "ClickHouse data directory on a full disk", "")
    wait_for(lambda: state_of(pid).get("state") == "archiving", 30, "the state to clear")
    assert archive.process.poll() is None
    record_fault(
        FaultRow(**{**row.__dict__, "note": "40 MiB tmpfs filled, then freed; waited in status, a restart waited too"})
    )
