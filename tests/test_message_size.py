"""One maximum message size (kafka.max_message_bytes) on the producers, the topics and the consumers."""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaError, KafkaException, Producer
from confluent_kafka.admin import ConfigResource, ResourceType

from boltstream.infra.common.config import RECEIVE_MAX_BYTES, load_settings
from boltstream.infra.common.topics import admin_client, ensure_topics


def test_every_client_gets_the_limit_and_consumers_can_take_any_fetch_response():
    kafka = load_settings(environ={}, kafka={"bootstrap_servers": "127.0.0.1:9", "max_message_bytes": 4096}).kafka
    assert kafka.client_config()["message.max.bytes"] == 4096
    consumer = kafka.consumer_config(**{"group.id": "g"})
    assert consumer["fetch.message.max.bytes"] == 4096 and consumer["group.id"] == "g"
    # A bigger message than the limit (the embedded broker takes any) must still come through a fetch,
    # for the consumer to refuse it; a response over receive.message.max.bytes fails every fetch for ever.
    assert consumer["receive.message.max.bytes"] == RECEIVE_MAX_BYTES
    big = load_settings(environ={}, kafka={"bootstrap_servers": "x:9", "max_message_bytes": 100_000_000}).kafka
    assert big.consumer_config()["fetch.max.bytes"] == 100_000_000  # never below one message


def test_topics_carry_the_limit_and_producers_refuse_bigger_messages(settings):
    from dataclasses import replace

    settings = replace(settings, kafka=replace(settings.kafka, max_message_bytes=20_000))
    ensure_topics(settings)
    admin = admin_client(settings)
    resource = ConfigResource(ResourceType.TOPIC, settings.topics.spans)
    configs = admin.describe_configs([resource])[resource].result()
    assert configs["max.message.bytes"].value == "20000"

    producer = Producer(settings.kafka.client_config())
    with pytest.raises(KafkaException) as refused:
        producer.produce(settings.topics.spans, b"x" * 20_001)
    assert refused.value.args[0].code() == KafkaError.MSG_SIZE_TOO_LARGE
    producer.produce(settings.topics.spans, b"x" * 10_000)
    assert producer.flush(10) == 0
