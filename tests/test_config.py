"""The typed configuration: defaults, TOML file, env overrides, the local stack's state file."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from boltstream.infra.common.config import (
    ConfigError,
    ProducerConfig,
    TrainerConfig,
    load_settings,
    parse_duration,
)


def test_defaults_are_the_design_parameters(tmp_path):
    settings = load_settings(environ={"BOLTSTREAM_HOME": str(tmp_path)})
    assert settings.producer.span_buffer_size == 512
    assert settings.stream.reward_timeout == 30.0
    assert settings.producer.span_sampling_rate == 1.0
    assert settings.stream.agent_selector == ("all",)
    assert settings.trainer.template_update_interval == 1000
    assert settings.trainer.weight_sync_threshold == 0.85
    assert settings.serve.promotion_stability == 0.8
    assert settings.auto_trace is False
    assert settings.topics.spans == "boltstream.spans.v1"
    assert set(settings.topics.compacted()) == {
        "boltstream.model-updates.v1",
        "boltstream.prompt-updates.v1",
        "boltstream.served-versions.v1",
    }


def test_file_then_env_then_overrides(tmp_path):
    config = tmp_path / "boltstream.toml"
    config.write_text(
        '[stream]\nreward_timeout = "45s"\nagent_selector = ["math-*", "sql"]\n[topics]\npartitions = 8\n'
    )
    environ = {
        "BOLTSTREAM_HOME": str(tmp_path),
        "BOLTSTREAM_CONFIG": str(config),
        "BOLTSTREAM_TOPICS__PARTITIONS": "12",
        "BOLTSTREAM_PRODUCER__SPAN_SAMPLING_RATE": "0.25",
        "AGENT_LIGHTNING_TRACER": "1",
    }
    settings = load_settings(environ=environ, stream={"credit_assignment": "discounted"})
    assert settings.stream.reward_timeout == 45.0
    assert settings.stream.agent_selector == ("math-*", "sql")
    assert settings.topics.partitions == 12  # env beats file
    assert settings.producer.span_sampling_rate == 0.25
    assert settings.stream.credit_assignment == "discounted"
    assert settings.auto_trace is True


def test_stack_state_fills_in_empty_addresses(tmp_path):
    (tmp_path / "stack.json").write_text(
        json.dumps({"bootstrap_servers": "127.0.0.1:1234", "clickhouse_read_url": "http://reader:t@127.0.0.1:9"})
    )
    settings = load_settings(environ={"BOLTSTREAM_HOME": str(tmp_path)})
    assert settings.kafka.bootstrap_servers == "127.0.0.1:1234"
    assert settings.clickhouse.read_url == "http://reader:t@127.0.0.1:9"
    explicit = load_settings(
        environ={"BOLTSTREAM_HOME": str(tmp_path), "BOLTSTREAM_KAFKA__BOOTSTRAP_SERVERS": "k:9092"}
    )
    assert explicit.kafka.bootstrap_servers == "k:9092"


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"BOLTSTREAM_STREAM__REWARD_TIMOUT": "3s"}, "unknown parameter(s) ['stream.reward_timout']"),
        ({"BOLTSTREAM_STREAM__REWARD_TIMEOUT": "soon"}, "stream.reward_timeout: 'soon' is not a duration"),
        ({"BOLTSTREAM_CONFIG": "/nonexistent/boltstream.toml"}, "does not exist"),
    ],
)
def test_bad_configuration_names_the_parameter(tmp_path, environ, message):
    with pytest.raises(ConfigError) as raised:
        load_settings(environ={"BOLTSTREAM_HOME": str(tmp_path), **environ})
    assert message in str(raised.value)


#: Values each source refuses, as (section, field, value, the message's end: the value and what is allowed).
REFUSED = [
    ("trainer", "algorithm", "ppo", "'ppo' is not one of grpo, sft, apo"),
    ("stream", "credit_assignment", "last", "'last' is not one of final, discounted, per_step"),
    ("producer", "compression", "brotli", "'brotli' is not one of lz4, zstd, snappy, gzip, none"),
    ("producer", "span_sampling_rate", 2, "2.0 is not in [0, 1]"),
    ("serve", "canary_share", -0.5, "-0.5 is not in [0, 1]"),
    ("producer", "span_sampling_rate", "5m", "'5m' is not a number"),  # a unit only on durations
    ("producer", "span_buffer_size", -1, "-1 is not at least 1"),
    ("trainer", "group_size", 0, "0 is not at least 1"),
    ("serve", "router_port", 65536, "65536 is not in [0, 65535]"),
    ("stream", "reward_timeout", "0s", "0.0 is not above 0"),
    ("stream", "join_grace", -1, "-1.0 is not at least 0"),
]


@pytest.mark.parametrize(("section", "name", "value", "refusal"), REFUSED)
def test_a_refusal_names_the_source_the_field_the_value_and_what_is_allowed(tmp_path, section, name, value, refusal):
    home = {"BOLTSTREAM_HOME": str(tmp_path)}
    config = tmp_path / "boltstream.toml"
    config.write_text(f"[{section}]\n{name} = {json.dumps(value)}\n")
    env = {f"BOLTSTREAM_{section.upper()}__{name.upper()}": str(value)}
    sources = [
        (str(config), lambda: load_settings(config, environ=home)),
        ("environment", lambda: load_settings(environ={**home, **env})),
        ("overrides", lambda: load_settings(environ=home, **{section: {name: value}})),
    ]
    for source, load in sources:
        with pytest.raises(ConfigError) as raised:
            load()
        assert str(raised.value) == f"{source}: {section}.{name}: {refusal}"


def test_a_field_of_seconds_takes_a_unit(tmp_path):
    settings = load_settings(environ={"BOLTSTREAM_HOME": str(tmp_path)}, stream={"reward_timeout": "5m"})
    assert settings.stream.reward_timeout == 300.0


def test_a_count_with_a_fraction_is_refused_not_cut(tmp_path):
    with pytest.raises(ConfigError, match=r"trainer\.group_size: 8\.5 is not an integer$"):
        load_settings(environ={"BOLTSTREAM_HOME": str(tmp_path)}, trainer={"group_size": 8.5})


def test_constructing_a_section_checks_it_too():
    trainer = TrainerConfig()
    with pytest.raises(ConfigError) as raised:
        replace(trainer, algorithm="ppo")
    assert str(raised.value) == "trainer.algorithm: 'ppo' is not one of grpo, sft, apo"
    with pytest.raises(ConfigError, match=r"^producer\.span_sampling_rate: 1\.5 is not in \[0, 1\]$"):
        ProducerConfig(span_sampling_rate=1.5)


def test_client_config_without_a_broker_says_how_to_get_one(tmp_path):
    with pytest.raises(ConfigError, match="boltstream up"):
        load_settings(environ={"BOLTSTREAM_HOME": str(tmp_path)}).kafka.client_config()


@pytest.mark.parametrize(("text", "seconds"), [("30s", 30.0), ("250ms", 0.25), ("5m", 300.0), ("2", 2.0), (1.5, 1.5)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds
