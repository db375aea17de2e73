"""The archive worker against the real broker and real chDB: exactly once after SIGKILL, DLQ, older schemas."""

from __future__ import annotations

import io
import time
import uuid
from collections.abc import Callable

import fastavro
import pytest
from confluent_kafka import Consumer, Producer

from boltstream.schemas.codec import codec, shipped_schemas
from boltstream.schemas.dead_letters import NAMESPACE as DEAD_LETTER_NAMESPACE
from tests.records import make_llm, make_span


def produce_span_batches(settings, rollouts: int, spans_per_rollout: int, prompt_tokens: int = 24) -> set[str]:
    """Produce one SpanBatch per rollout (half llm_call, half tool_call spans); return the event ids."""
    producer = Producer(settings.kafka.client_config(**{"linger.ms": 20, "compression.type": "lz4"}))
    batch_codec = codec("SpanBatch")
    llm = make_llm(prompt_tokens=prompt_tokens, completion_tokens=prompt_tokens // 2)
    event_ids: set[str] = set()
    for _ in range(rollouts):
        rollout_id = str(uuid.uuid4())
        spans = [
            make_span(rollout_id, kind="llm_call" if i % 2 == 0 else "tool_call", sequence=i)
            for i in range(spans_per_rollout)
        ]
        for span in spans:
            span["llm"] = llm if span["kind"] == "llm_call" else None
            event_ids.add(span["event_id"])
        batch = {"rollout_id": rollout_id, "producer_id": "test:1", "sent_at_us": 1, "spans": spans}
        producer.produce(settings.topics.spans, batch_codec.encode(batch), key=rollout_id.encode())
        producer.poll(0)
    assert producer.flush(30) == 0
    return event_ids


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def archive_among_bad_messages(settings, archive, producer, messages, dead_letters: int, spans: int):
    """Produce ``(key, value)`` messages in order to one partition, start the archive, wait for its
    ``dead_letters`` dead letters and ``spans`` spans; return a reader of the archive."""
    for key, value in messages:
        producer.produce(settings.topics.spans, value, key=key, partition=0)
    assert producer.flush(10) == 0
    archive.start()
    reader = archive.client()
    wait_for(lambda: reader.command("SELECT count() FROM dead_letters") >= dead_letters, 60, "the dead letters")
    wait_for(lambda: reader.command("SELECT count() FROM spans") >= spans, 30, f"{spans} spans")
    return reader


def test_the_worker_says_what_it_archives_where_and_how_to_stop_it(settings, archive):
    archive.start()
    wait_for(lambda: "stops on Ctrl-C" in archive.log_path.read_text(), 30, "the start lines")
    log = archive.log_path.read_text()
    topics, group = settings.topics, archive.env["BOLTSTREAM_CLICKHOUSE__ARCHIVE_GROUP"]
    assert f"boltstream archive: {topics.spans}, {topics.rewards}, " in log
    assert f"into chDB in {settings.home / 'clickhouse'} (consumer group {group})" in log
    assert f"read endpoint http://reader:<token>@127.0.0.1:{archive.port}, token as configured" in log
    assert archive.token not in log
    assert archive.stop() == 0  # SIGTERM: the current batch is finished, then a clean exit


def test_every_span_exactly_once_after_sigkill(settings, archive):
    event_ids = produce_span_batches(settings, rollouts=5000, spans_per_rollout=20)
    assert len(event_ids) == 100_000
    # Small batches, so the kill lands between committed batches with more to come.
    archive.env["BOLTSTREAM_STREAM__BATCH_SIZE"] = "50"
    archive.start()
    reader = archive.client()
    wait_for(lambda: reader.command("SELECT count() FROM spans_store") >= 10_000, 60, "the first batches")
    archived_before_kill = reader.command("SELECT count() FROM spans_store")
    archive.kill()
    assert archived_before_kill < 100_000, "the kill came after the end; nothing was tested"
    archive.start()  # same group: resumes from the last committed offsets
    reader = archive.client()
    wait_for(lambda: reader.command("SELECT count() FROM spans") >= 100_000, 90, "all 100,000 spans")
    time.sleep(1.0)  # anything still in flight would show up as an extra row now
    reader_count, distinct = reader.query("SELECT count(), uniqExact(event_id) FROM spans").result_rows[0]
    assert (reader_count, distinct) == (100_000, 100_000)
    archived = {row[0] for row in reader.query("SELECT event_id FROM spans").result_rows}
    assert archived == event_ids
    llm_row = reader.query(
        "SELECT length(llm_prompt_token_ids), length(llm_completion_logprobs), llm_model, attributes "
        "FROM spans WHERE kind = 'llm_call' LIMIT 1"
    ).result_rows[0]
    assert llm_row == (24, 12, "tiny-policy", {"tool": "calculator"})


def test_garbage_goes_to_the_dlq_and_good_messages_around_it_are_archived(settings, archive):
    producer = Producer(settings.kafka.client_config())
    batch_codec = codec("SpanBatch")
    good = [make_span(kind="tool_call") for _ in range(3)]
    backwards = make_span(kind="tool_call")
    backwards["end_time_us"] = backwards["start_time_us"] - 1  # violates the ends_after_start invariant

    def batch(span):
        return batch_codec.encode(
            {"rollout_id": span["rollout_id"], "spans": [span], "sent_at_us": 0, "producer_id": ""}
        )

    messages = [
        (b"k0", batch(good[0])),
        (b"garbage", b"definitely not avro"),
        (b"k1", batch(good[1])),
        (b"truncated", batch(good[1])[:-7]),
        (b"wrong-record", codec("Reward").encode(_reward())),
        (b"backwards", batch(backwards)),
        (b"k2", batch(good[2])),
    ]
    reader = archive_among_bad_messages(settings, archive, producer, messages, dead_letters=4, spans=3)
    assert sorted(r[0] for r in reader.query("SELECT event_id FROM spans").result_rows) == sorted(
        s["event_id"] for s in good
    )
    letters = {
        row[0]: row[1:]
        for row in reader.query(
            "SELECT key, error_type, reason, source_topic, source_partition, value, worker, event_id, source_offset"
            " FROM dead_letters"
        ).result_rows
    }
    assert set(letters) == {"garbage", "truncated", "wrong-record", "backwards"}
    assert letters["garbage"][0] == "decode_error" and "unknown magic bytes" in letters["garbage"][1]
    assert letters["truncated"][0] == "decode_error" and "truncated" in letters["truncated"][1]
    assert "expected a SpanBatch" in letters["wrong-record"][1]
    assert letters["backwards"][0] == "invariant_violation" and "ends_after_start" in letters["backwards"][1]
    assert all(row[2:4] == (settings.topics.spans, 0) and row[5] == "archive" for row in letters.values())
    # Dead-lettering is idempotent too: the id comes from the message's position, not from chance.
    for _, _, topic, partition, _, worker, event_id, offset in letters.values():
        assert event_id == str(uuid.uuid5(DEAD_LETTER_NAMESPACE, f"{worker}:{topic}:{partition}:{offset}"))
    assert letters["garbage"][4] == b"definitely not avro".decode()

    # The DLQ topic holds the same records, with the raw bytes and source offsets.
    consumer = Consumer(
        settings.kafka.client_config(
            **{"group.id": uuid.uuid4().hex, "auto.offset.reset": "earliest", "session.timeout.ms": 2000}
        )
    )
    consumer.subscribe([settings.topics.dlq])
    received = []
    deadline = time.monotonic() + 30
    while len(received) < 4 and time.monotonic() < deadline:
        message = consumer.poll(0.5)
        if message is not None and not message.error():
            received.append(codec("DeadLetter").decode(message.value()))
    consumer.close()
    by_key = {letter["key"]: letter for letter in received}
    assert by_key[b"garbage"]["value"] == b"definitely not avro"
    assert by_key[b"garbage"]["source_offset"] == 1 and by_key[b"backwards"]["source_offset"] == 5


def avro_long(value: int) -> bytes:
    """Avro's zig-zag varint."""
    value = (value << 1) ^ (value >> 63)
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    return bytes([*out, value])


def avro_string(value: str) -> bytes:
    return avro_long(len(value.encode())) + value.encode()


def test_older_schemas_multi_block_arrays_and_every_record_type_are_archived(settings, archive):
    producer = Producer(settings.kafka.client_config())
    old_batch_schema = shipped_schemas()["SpanBatch"][0]
    assert old_batch_schema.version == 1
    old_span = make_span(kind="llm_call")
    old_span.pop("server_id")  # Span v1 has no server_id
    body = io.BytesIO()
    fastavro.schemaless_writer(
        body, old_batch_schema.parsed, {"rollout_id": old_span["rollout_id"], "spans": [old_span]}
    )
    v1_message = b"\xc3\x01" + old_batch_schema.fingerprint + body.getvalue()
    producer.produce(settings.topics.spans, v1_message, key=old_span["rollout_id"].encode())

    # A writer other than fastavro may split the spans array into blocks, one with a byte size (count < 0).
    rollout_id = str(uuid.uuid4())
    spans = [make_span(rollout_id, kind="tool_call", sequence=i) for i in range(3)]
    span_schema = codec("Span").reader.parsed
    encoded = []
    for span in spans:
        buffer = io.BytesIO()
        fastavro.schemaless_writer(buffer, span_schema, span)
        encoded.append(buffer.getvalue())
    blocks = avro_long(2) + encoded[0] + encoded[1] + avro_long(-1) + avro_long(len(encoded[2])) + encoded[2]
    multi_block = avro_string(rollout_id) + avro_string("java:1") + avro_long(7) + blocks + avro_long(0)
    framed = codec("SpanBatch").encode({"rollout_id": rollout_id, "spans": []})[:10] + multi_block
    assert [s["event_id"] for s in codec("SpanBatch").decode(framed)["spans"]] == [s["event_id"] for s in spans]
    producer.produce(settings.topics.spans, framed, key=rollout_id.encode())

    reward = _reward(rollout_id=rollout_id)
    producer.produce(settings.topics.rewards, codec("Reward").encode(reward), key=rollout_id.encode())
    trajectory = {
        "trajectory_id": str(uuid.uuid5(uuid.NAMESPACE_URL, rollout_id)),
        "rollout_id": rollout_id,
        "status": "complete",
        "final_reward": 0.75,
        "rewards": [0.75],
        "span_event_ids": [s["event_id"] for s in spans],
    }
    producer.produce(settings.topics.trajectories, codec("Trajectory").encode(trajectory), key=rollout_id.encode())
    sample = {
        "sample_id": str(uuid.uuid4()),
        "trajectory_id": trajectory["trajectory_id"],
        "rollout_id": rollout_id,
        "task_id": "task-1",
        "span_event_id": spans[0]["event_id"],
        "step_index": 0,
        "step_count": 1,
        "prompt_token_ids": [1, 2, 3],
        "completion_token_ids": [4, 5],
        "completion_logprobs": [-0.25, -0.5],
        "return_value": 0.75,
        "final_reward": 0.75,
        "token_source": "retokenized",
        "call_text": '{"endpoint":"completions","prompt":"1+2=","completion":"3"}',
    }
    producer.produce(settings.topics.samples, codec("TrainingSample").encode(sample), key=b"task-1")
    assert producer.flush(10) == 0

    archive.start()
    reader = archive.client()
    wait_for(lambda: reader.command("SELECT count() FROM spans") == 4, 60, "the v1 span and the multi-block batch")
    wait_for(lambda: reader.command("SELECT count() FROM samples") == 1, 30, "the sample")
    assert reader.query(
        "SELECT server_id, llm_model_version FROM spans WHERE event_id = {e:String}",
        parameters={"e": old_span["event_id"]},
    ).result_rows == [("", "v1")]
    rows = reader.query(
        "SELECT event_id, producer_id, sent_at_us FROM spans WHERE rollout_id = {r:String} ORDER BY sequence",
        parameters={"r": rollout_id},
    ).result_rows
    assert rows == [(s["event_id"], "java:1", 7) for s in spans]
    assert reader.query("SELECT event_id, value, is_final FROM rewards").result_rows == [
        (reward["event_id"], 0.75, True)
    ]
    assert reader.query("SELECT status, final_reward, span_event_ids FROM trajectories").result_rows == [
        ("complete", 0.75, trajectory["span_event_ids"])
    ]
    assert reader.query(
        "SELECT prompt_token_ids, completion_logprobs, credit_policy, token_source, call_text FROM samples"
    ).result_rows == [([1, 2, 3], [-0.25, -0.5], "final", "retokenized", sample["call_text"])]


def _reward(rollout_id: str | None = None) -> dict:
    return {
        "event_id": str(uuid.uuid4()),
        "rollout_id": rollout_id or str(uuid.uuid4()),
        "value": 0.75,
        "timestamp_us": int(time.time() * 1e6),
    }


def test_container_files_are_standard_avro():
    from boltstream.stream_processors.archive import AvroContainer

    rewards = [_reward() for _ in range(3)]
    bodies = [codec("Reward").encode(reward)[10:] for reward in rewards]
    container = AvroContainer(codec("Reward").reader.json).file(bodies)
    assert list(fastavro.reader(io.BytesIO(container))) == [
        {**reward, "name": "final", "is_final": True, "source": "", "task_id": "", "agent_name": "", "attributes": {}}
        for reward in rewards
    ]


def test_confluent_framed_records_are_re_encoded_for_clickhouse():
    from boltstream.schemas.codec import AvroCodec
    from boltstream.stream_processors.archive import Archiver

    registry = f"mock://{uuid.uuid4().hex}"
    reward = _reward()
    framed = AvroCodec("Reward", registry_url=registry).encode(reward)
    assert framed[:1] == b"\x00"
    body = Archiver(client=None, registry_url=registry).body("Reward", framed)
    assert body == codec("Reward").encode(reward)[10:]


class DroppingServer:
    """Stands in for a ClickHouse server (none can run here) whose connection drops ``drops`` times."""

    def __init__(self, drops: int) -> None:
        self.drops, self.calls, self.inserted = drops, 0, []

    def raw_insert(self, table, column_names, data, settings, fmt):
        from clickhouse_connect.driver.exceptions import OperationalError

        self.calls += 1
        if self.calls <= self.drops:
            raise OperationalError("Error HTTPConnectionPool: connection reset by peer")
        self.inserted.append((table, fmt, data))


def test_inserts_wait_out_an_unreachable_server_with_bounded_doubling_waits_and_report_it():
    import threading

    from boltstream.stream_processors.archive import Archiver, Backoff, StopRequested, Table

    rewards = Table("Reward", "rewards")
    message = (None, codec("Reward").encode(_reward()))
    slept, states = [], []
    backoff = Backoff(3.0, sleep=slept.append, report=states.append)
    server = DroppingServer(drops=6)
    assert Archiver(server, backoff=backoff).write(rewards, [message]) == []  # never given up
    assert server.calls == 7 and [(t, f) for t, f, _ in server.inserted] == [("rewards_ingest", "Avro")]
    assert slept == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]  # doubling, bounded by clickhouse.retry_max_wait
    assert [state["state"] for state in states] == ["waiting"] * 6 + ["archiving"]
    assert [state["attempts"] for state in states[:-1]] == [1, 2, 3, 4, 5, 6]
    assert states[0]["problem"].startswith("inserting into rewards: ClickHouse unreachable: ")
    assert "connection reset by peer" in states[0]["problem"]

    # Asked to stop while it waits: it gives up this insert (nothing is committed), not before.
    stopping = threading.Event()
    backoff = Backoff(3.0, sleep=lambda _seconds: stopping.set(), stopping=stopping)
    server = DroppingServer(drops=100)
    with pytest.raises(StopRequested):
        Archiver(server, backoff=backoff).write(rewards, [message])
    assert server.calls == 1 and server.inserted == []


def test_clickhouse_errors_are_told_apart_by_code():
    from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError

    from boltstream.stream_processors.archive import BATCH, RECORD, SERVER, classify, server_problem

    def error(code: int, text: str) -> DatabaseError:
        return DatabaseError(f"Code: {code}. DB::Exception: {text}", code=code)

    partitions = error(252, "Too many partitions for single INSERT block (more than 100). (TOO_MANY_PARTS)")
    parts = error(252, "Too many parts (3001) in partition 20260101. Merges are processing significantly slower")
    disk = error(243, "Cannot reserve 2.98 MiB, not enough space. (NOT_ENOUGH_SPACE)")
    memory = error(241, "Memory limit (total) exceeded. (MEMORY_LIMIT_EXCEEDED)")
    assert classify(partitions, 1) == classify(partitions, 50) == BATCH
    assert classify(parts, 50) == SERVER  # merges are behind: waiting helps, splitting does not
    assert classify(disk, 50) == classify(disk, 1) == SERVER
    assert (classify(memory, 50), classify(memory, 1)) == (BATCH, SERVER)  # one record is small enough
    assert classify(error(469, "Constraint `ends_after_start` ... is violated"), 1) == RECORD
    assert classify(error(60, "Table boltstream.spans_store does not exist. (UNKNOWN_TABLE)"), 5) == SERVER
    assert classify(OperationalError("connection refused"), 5) == SERVER
    assert server_problem(disk).startswith("disk full (code 243): Code: 243. DB::Exception: Cannot reserve")


def test_a_dead_letter_fits_in_the_message_size_limit():
    from boltstream.stream_processors.archive import Rejected, fitting_dead_letter

    class Message:  # what dead_letter_of reads of a confluent-kafka Message
        def __init__(self, key: bytes, value: bytes) -> None:
            self._key, self._value = key, value

        def topic(self):
            return "spans"

        def partition(self):
            return 2

        def offset(self):
            return 41

        def key(self):
            return self._key

        def value(self):
            return self._value

    small = Message(b"k", b"v" * 100)
    record = fitting_dead_letter(small, Rejected(small, "rejected", "rejected"), 4096)
    assert (record["key"], record["value"], record["reason"]) == (b"k", b"v" * 100, "rejected")

    big = Message(b"k", b"v" * 10_000)
    record = fitting_dead_letter(big, Rejected(big, "rejected", "rejected"), 4096)
    assert record["value"] == b"" and record["key"] == b"k" and record["source_offset"] == 41
    assert record["reason"] == (
        "rejected; its value (10,000 bytes) is not kept: a dead letter must fit in kafka.max_message_bytes (4,096)"
    )
    assert len(codec("DeadLetter").encode(record)) < 4096

    big_key = Message(b"k" * 10_000, b"v")
    record = fitting_dead_letter(big_key, Rejected(big_key, "too large", "too_large", keep_value=False), 4096)
    assert record["key"] is None and record["value"] == b"" and "its key (10,000 bytes) is not kept" in record["reason"]


def span_batch_over_days(days: int, first_day_ago: int = 0) -> tuple[bytes, list[str]]:
    """A valid SpanBatch of one rollout whose spans start on ``days`` different days; and its event ids."""
    rollout_id = str(uuid.uuid4())
    now_us = int(time.time() * 1e6)
    spans = []
    for day in range(days):
        span = make_span(rollout_id, kind="tool_call", sequence=day)
        span["start_time_us"] = now_us - (first_day_ago + day) * 86_400_000_000
        span["end_time_us"] = span["start_time_us"] + 1500
        spans.append(span)
    batch = {"rollout_id": rollout_id, "producer_id": "test:1", "sent_at_us": now_us, "spans": spans}
    return codec("SpanBatch").encode(batch), [span["event_id"] for span in spans]


def test_a_batch_over_more_days_than_an_insert_may_write_is_split_and_only_an_oversized_record_is_dead_lettered(
    settings, archive
):
    # 100 days per insert (ClickHouse's default); two records of 60 days each archive in one insert only
    # when split, a record of 150 days never does.
    archive.env["BOLTSTREAM_CLICKHOUSE__MAX_PARTITIONS_PER_INSERT"] = "100"
    producer = Producer(settings.kafka.client_config())
    first, first_ids = span_batch_over_days(60)
    second, second_ids = span_batch_over_days(60, first_day_ago=60)
    wide, _ = span_batch_over_days(150, first_day_ago=200)
    good, good_ids = span_batch_over_days(1)
    messages = ((b"first", first), (b"wide", wide), (b"second", second), (b"good", good))
    reader = archive_among_bad_messages(settings, archive, producer, messages, dead_letters=1, spans=121)
    archived = {row[0] for row in reader.query("SELECT event_id FROM spans").result_rows}
    assert archived == {*first_ids, *second_ids, *good_ids}
    assert reader.command("SELECT uniqExact(toDate(fromUnixTimestamp64Micro(start_time_us))) FROM spans") >= 120
    ((key, error_type, reason, offset),) = reader.query(
        "SELECT key, error_type, reason, source_offset FROM dead_letters"
    ).result_rows
    assert (key, error_type, offset) == ("wide", "too_many_partitions", 1)
    assert reason.startswith("its records fall on more than 100 days (clickhouse.max_partitions_per_insert): ")
    assert "Too many partitions for single INSERT block" in reason
    assert archive.process.poll() is None  # still running


def test_a_message_over_the_size_limit_is_dead_lettered_without_its_value(settings, archive):
    archive.env["BOLTSTREAM_KAFKA__MAX_MESSAGE_BYTES"] = "20000"
    producer = Producer(settings.kafka.client_config(**{"message.max.bytes": 1_000_000}))  # a foreign producer
    before, before_ids = span_batch_over_days(1)
    after, after_ids = span_batch_over_days(1)
    huge = b"\xc3\x01" + b"x" * 50_000
    messages = ((b"before", before), (b"huge", huge), (b"after", after))
    reader = archive_among_bad_messages(settings, archive, producer, messages, dead_letters=1, spans=2)
    assert {row[0] for row in reader.query("SELECT event_id FROM spans").result_rows} == {*before_ids, *after_ids}
    ((key, error_type, reason, value, offset),) = reader.query(
        "SELECT key, error_type, reason, value, source_offset FROM dead_letters"
    ).result_rows
    assert (key, error_type, value, offset) == ("huge", "too_large", "", 1)
    assert reason == "message of 50,006 bytes is larger than kafka.max_message_bytes (20,000); value not kept"
