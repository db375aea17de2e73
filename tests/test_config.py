"""The typed configuration: defaults, TOML file, env overrides, the local stack's state file."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from boltstream.infra.common.config import (
    ClickHouseConfig,
    ConfigError,
    KafkaConfig,
    PolicyConfig,
    ProducerConfig,
    Settings,
    TrainerConfig,
    load_settings,
    parse_duration,
    resolved_policies,
    secret_environment,
    secret_fields,
    settings_toml,
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
    ("kafka", "security_protocol", "TLS", "'TLS' is not one of PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL"),
    ("kafka", "sasl_mechanism", "GSSAPI", "'GSSAPI' is not one of PLAIN, SCRAM-SHA-256, SCRAM-SHA-512"),
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


# -- secured transport: Kafka SASL/TLS, ClickHouse logins and TLS ---------------------------------


def test_plaintext_adds_no_security_settings():
    assert KafkaConfig(bootstrap_servers="k:9092").client_config(acks="all") == {
        "bootstrap.servers": "k:9092",
        "message.max.bytes": 1024 * 1024,  # kafka.max_message_bytes, on every client
        "acks": "all",
    }


def test_sasl_ssl_becomes_librdkafka_settings_with_the_password_from_its_file(tmp_path):
    password = tmp_path / "kafka-password"
    password.write_text("s3cret\n")  # as `echo` writes it: the newline is not part of the password
    kafka = KafkaConfig(
        bootstrap_servers="k:9093",
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-256",
        sasl_username="boltstream",
        sasl_password_file=str(password),
        ssl_ca_location="/etc/kafka/ca.pem",
        ssl_certificate_location="/etc/kafka/client.pem",
        ssl_key_location="/etc/kafka/client.key",
        client_overrides={"client.id": "x"},
    )
    assert kafka.client_config(**{"group.id": "g"}) == {
        "bootstrap.servers": "k:9093",
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-256",
        "sasl.username": "boltstream",
        "sasl.password": "s3cret",
        "ssl.ca.location": "/etc/kafka/ca.pem",
        "ssl.certificate.location": "/etc/kafka/client.pem",
        "ssl.key.location": "/etc/kafka/client.key",
        "message.max.bytes": 1024 * 1024,
        "client.id": "x",
        "group.id": "g",
    }


def test_sasl_plaintext_sends_no_tls_settings(tmp_path):
    kafka = KafkaConfig(
        bootstrap_servers="k:9092", security_protocol="SASL_PLAINTEXT", sasl_username="u", sasl_password="p"
    )
    config = kafka.client_config()
    assert config["security.protocol"] == "SASL_PLAINTEXT" and config["sasl.password"] == "p"
    assert not [key for key in config if key.startswith("ssl.")]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"security_protocol": "SASL_SSL", "sasl_password": "p"}, "needs kafka.sasl_username and a password"),
        ({"security_protocol": "SASL_SSL", "sasl_username": "u"}, "needs kafka.sasl_username and a password"),
        (
            {"security_protocol": "SASL_SSL", "sasl_username": "u", "sasl_password": "p", "sasl_password_file": "f"},
            "kafka.sasl_password and kafka.sasl_password_file are both set",
        ),
        (
            {"security_protocol": "SASL_SSL", "sasl_username": "u", "sasl_password_file": "/nonexistent/password"},
            "kafka.sasl_password_file: cannot read /nonexistent/password",
        ),
        ({"security_protocol": "SSL", "ssl_certificate_location": "c.pem"}, "go together"),
    ],
)
def test_incomplete_security_settings_are_refused_when_a_client_is_built(fields, message):
    kafka = KafkaConfig(bootstrap_servers="k:9093", **fields)
    with pytest.raises(ConfigError, match=message):
        kafka.client_config()
    with pytest.raises(ConfigError, match=message):
        kafka.faust_credentials()


def test_faust_gets_the_same_login_and_a_verifying_tls_context(tmp_path):
    import ssl

    import faust

    kafka = KafkaConfig(
        bootstrap_servers="k:9093",
        security_protocol="SASL_SSL",
        sasl_mechanism="PLAIN",
        sasl_username="u",
        sasl_password="p",
    )
    credentials = kafka.faust_credentials()
    assert isinstance(credentials, faust.SASLCredentials)
    assert (credentials.username, credentials.password, credentials.mechanism.value) == ("u", "p", "PLAIN")
    assert credentials.protocol.value == "SASL_SSL"
    assert credentials.ssl_context.verify_mode == ssl.CERT_REQUIRED and credentials.ssl_context.check_hostname
    tls_only = KafkaConfig(bootstrap_servers="k:9093", security_protocol="SSL").faust_credentials()
    assert isinstance(tls_only, faust.SSLCredentials) and tls_only.context.verify_mode == ssl.CERT_REQUIRED
    assert KafkaConfig(bootstrap_servers="k:9092").faust_credentials() is None


def test_every_secret_has_a_file_field_and_stays_out_of_reprs():
    assert {("kafka", "sasl_password"), ("clickhouse", "password"), ("clickhouse", "read_password")} <= set(
        secret_fields()
    )
    settings = load_settings(environ={}, kafka={"sasl_password": "hunter2"}, clickhouse={"read_password": "pw2"})
    for section, name in secret_fields():
        assert hasattr(getattr(settings, section), f"{name}_file"), f"{section}.{name} has no {name}_file"
    assert "hunter2" not in repr(settings) and "pw2" not in repr(settings)


def test_a_config_file_holding_a_secret_is_refused(tmp_path):
    config = tmp_path / "boltstream.toml"
    config.write_text('[kafka]\nsasl_password = "hunter2"\n')
    with pytest.raises(ConfigError) as raised:
        load_settings(config, environ={"BOLTSTREAM_HOME": str(tmp_path)})
    assert str(raised.value) == (
        f"{config}: kafka.sasl_password is a secret, not for a config file: set "
        "BOLTSTREAM_KAFKA__SASL_PASSWORD or kafka.sasl_password_file"
    )


def test_secrets_come_from_the_environment_and_are_not_written_to_a_worker_file(tmp_path):
    environ = {
        "BOLTSTREAM_HOME": str(tmp_path),
        "BOLTSTREAM_KAFKA__SASL_PASSWORD": "hunter2",
        "BOLTSTREAM_CLICKHOUSE__PASSWORD": "writer-pw",
    }
    settings = load_settings(environ=environ, kafka={"sasl_username": "u"})
    assert settings.kafka.sasl_password == "hunter2"
    text = settings_toml(settings)
    assert "hunter2" not in text and "writer-pw" not in text
    written = tmp_path / "worker.toml"
    written.write_text(text)  # a worker reads it back (no refusal) and gets the secrets by its environment
    child = load_settings(written, environ={"BOLTSTREAM_HOME": str(tmp_path), **secret_environment(settings)})
    assert child == settings


def test_clickhouse_logins_come_from_fields_and_https_means_tls(tmp_path):
    reader_password = tmp_path / "reader-password"
    reader_password.write_text("read-pw\n")
    clickhouse = ClickHouseConfig(
        user="writer",
        password="write-pw",
        read_user="reader",
        read_password_file=str(reader_password),
        ca_cert="/etc/clickhouse/ca.pem",
    )
    # clickhouse-connect takes TLS from `secure`, not from the scheme of the URL: the scheme must become it.
    assert clickhouse.client_arguments("https://ch:8443", reading=True) == {
        "dsn": "https://ch:8443",
        "username": "reader",
        "password": "read-pw",
        "secure": True,
        "verify": True,
        "ca_cert": "/etc/clickhouse/ca.pem",
    }
    assert clickhouse.client_arguments("http://ch:8123", reading=False) == {
        "dsn": "http://ch:8123",
        "username": "writer",
        "password": "write-pw",
    }
    assert clickhouse.client_arguments("chdb:///data/clickhouse", reading=False) == {"dsn": "chdb:///data/clickhouse"}
    # Without fields of its own the URL's login stands (the local stack's read endpoint puts its token there).
    assert ClickHouseConfig().client_arguments("http://reader:t@127.0.0.1:9", reading=True) == {
        "dsn": "http://reader:t@127.0.0.1:9"
    }


def test_a_config_file_that_is_not_toml_is_a_config_error_naming_it(tmp_path: Path) -> None:
    broken = tmp_path / "boltstream.toml"
    broken.write_text("auto_trace = [not toml\n")
    with pytest.raises(ConfigError, match=r"boltstream\.toml is not valid TOML: Invalid value"):
        load_settings(broken, environ={})


def test_lenient_loading_leaves_out_only_the_values_that_cannot_be_used(tmp_path: Path) -> None:
    """The SDK's way (``on_invalid``): each bad value of the file or the environment is reported, naming its
    source and field, and its field keeps its default; every good value still counts."""
    config = tmp_path / "boltstream.toml"
    config.write_text(
        "[producer]\nlinger = 'soon'\nspan_buffer_size = 100\n"
        "[stream]\ncredit_assignment = 'sometimes'\nreward_timeout = '45s'\n"
        "[kafka]\nsasl_password = 'hunter2'\n"
        "[nonsense]\nx = 1\n"
    )
    environ = {
        "BOLTSTREAM_HOME": str(tmp_path),
        "BOLTSTREAM_CONFIG": str(config),
        "BOLTSTREAM_PRODUCER__SPAN_SAMPLING_RATE": "lots",
        "BOLTSTREAM_PRODUCER__MAX_PENDING_SPANS": "2000",
        "BOLTSTREAM_STREAM__DISCOUNT": "2",
        "AGENT_LIGHTNING_TRACER": "maybe",
    }
    complaints: list[str] = []
    settings = load_settings(environ=environ, on_invalid=complaints.append)
    defaults = load_settings(environ={"BOLTSTREAM_HOME": str(tmp_path)})
    assert settings.producer.span_buffer_size == 100 and settings.stream.reward_timeout == 45.0
    assert settings.producer.max_pending_spans == 2000
    assert settings.producer.linger == defaults.producer.linger
    assert settings.stream.credit_assignment == defaults.stream.credit_assignment
    assert settings.producer.span_sampling_rate == defaults.producer.span_sampling_rate
    assert settings.stream.discount == defaults.stream.discount
    assert settings.kafka.sasl_password == "" and settings.auto_trace is False
    named = [
        f"{config}: producer.linger: 'soon'",
        f"{config}: stream.credit_assignment: 'sometimes'",
        f"{config}: kafka.sasl_password is a secret",
        f"{config}: unknown parameter(s) ['nonsense']",
        "environment: producer.span_sampling_rate: 'lots'",
        "environment: stream.discount: 2.0 is not in [0, 1]",
        "AGENT_LIGHTNING_TRACER: auto_trace: 'maybe'",
    ]
    assert len(complaints) == len(named), complaints
    for start in named:
        assert any(complaint.startswith(start) for complaint in complaints), (start, complaints)
    with pytest.raises(ConfigError, match="sasl_password is a secret"):  # without on_invalid, as before: refused
        load_settings(environ=environ)


def test_lenient_loading_of_a_file_that_is_not_toml_keeps_the_environment(tmp_path: Path) -> None:
    config = tmp_path / "boltstream.toml"
    config.write_text("auto_trace = true\n[not toml\n")
    environ = {"BOLTSTREAM_HOME": str(tmp_path), "BOLTSTREAM_CONFIG": str(config), "BOLTSTREAM_PRODUCER__LINGER": "1s"}
    complaints: list[str] = []
    settings = load_settings(environ=environ, on_invalid=complaints.append)
    assert settings.auto_trace is False and settings.producer.linger == 1.0
    assert len(complaints) == 1 and complaints[0].startswith(f"{config} is not valid TOML"), complaints
    missing = {**environ, "BOLTSTREAM_CONFIG": str(tmp_path / "absent.toml")}
    assert load_settings(environ=missing, on_invalid=complaints.append).producer.linger == 1.0
    assert "absent.toml does not exist" in complaints[-1]


def test_overrides_from_code_stay_strict_when_loading_leniently(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"overrides: producer\.linger"):
        load_settings(environ={"BOLTSTREAM_HOME": str(tmp_path)}, on_invalid=print, producer={"linger": "soon"})


# -- several policies ---------------------------------------------------------------------------

TWO_POLICIES = """
[trainer]
lora_rank = 8
max_staleness = 4

[[policies]]
name = "adder"
agent_selector = ["add-*"]
[policies.trainer]
max_staleness = 1
checkpoint_dir = "/ckpt/adder"

[[policies]]
name = "multiplier"
agent_selector = ["mul-*", "times"]
algorithm = "sft"
"""


def test_no_policy_configured_is_one_policy_from_the_trainer_and_stream_sections(tmp_path):
    settings = load_settings(
        environ={"BOLTSTREAM_HOME": str(tmp_path)},
        trainer={"model_name": "m", "algorithm": "sft"},
        stream={"agent_selector": "x-*"},
    )
    assert settings.policies == ()
    assert resolved_policies(settings) == (PolicyConfig("m", ("x-*",), "sft"),)
    assert settings.for_policy("m") == settings  # the existing single-policy setup runs as before


def test_policies_from_the_file_each_with_its_own_trainer_and_selector(tmp_path):
    config = tmp_path / "boltstream.toml"
    config.write_text(TWO_POLICIES)
    settings = load_settings(config, environ={"BOLTSTREAM_HOME": str(tmp_path)})
    assert [policy.name for policy in resolved_policies(settings)] == ["adder", "multiplier"]
    adder, multiplier = settings.for_policy("adder"), settings.for_policy("multiplier")
    assert adder.trainer.model_name == "adder" and multiplier.trainer.model_name == "multiplier"
    assert adder.stream.agent_selector == ("add-*",)
    assert multiplier.stream.agent_selector == ("mul-*", "times")
    assert (adder.trainer.max_staleness, multiplier.trainer.max_staleness) == (1, 4)  # override, else [trainer]
    assert adder.trainer.checkpoint_dir == "/ckpt/adder"
    assert (adder.trainer.lora_rank, multiplier.trainer.lora_rank) == (8, 8)
    assert (adder.trainer.algorithm, multiplier.trainer.algorithm) == ("grpo", "sft")
    assert adder.kafka == settings.kafka and adder.topics == settings.topics  # the rest is shared
    with pytest.raises(ConfigError, match=r"no policy named 'tiny'; the policies are \['adder', 'multiplier'\]"):
        settings.for_policy("tiny")


def test_policies_from_the_environment_as_json_with_values_converted(tmp_path):
    policies = [{"name": "a", "agent_selector": "a-*,b", "trainer": {"max_staleness": "2", "lora_rank": 4}}]
    settings = load_settings(environ={"BOLTSTREAM_HOME": str(tmp_path), "BOLTSTREAM_POLICIES": json.dumps(policies)})
    (policy,) = settings.policies
    assert policy.agent_selector == ("a-*", "b")
    assert policy.trainer == {"max_staleness": 2, "lora_rank": 4}  # "2" from the environment is the integer 2


def test_policies_survive_settings_toml(tmp_path):
    config = tmp_path / "boltstream.toml"
    config.write_text(TWO_POLICIES)
    settings = load_settings(config, environ={"BOLTSTREAM_HOME": str(tmp_path)})
    written = tmp_path / "written.toml"
    written.write_text(settings_toml(settings))
    assert load_settings(written, environ={"BOLTSTREAM_HOME": str(tmp_path)}) == settings
    assert "[[policies]]" in written.read_text()


@pytest.mark.parametrize(
    ("policies", "message"),
    [
        ([{"name": "a"}, {"name": "a"}], "policies: the name(s) ['a'] are used by more than one policy"),
        ([{"name": "a", "trainer": {"lora_rnak": 4}}], "unknown parameter(s) ['policies[a].trainer.lora_rnak']"),
        ([{"name": "a", "trainer": {"max_staleness": -1}}], "policies[a].trainer.max_staleness: -1 is not at least 0"),
        ([{"name": "a", "trainer": {"lora_rank": "big"}}], "policies[a].trainer.lora_rank: 'big' is not an integer"),
        (
            [{"name": "a", "trainer": {"model_name": "b"}}],
            "policies[a].trainer.model_name: a policy sets it as policies.name",
        ),
        ([{"name": "a", "algorithm": "ppo"}], "policies[a].algorithm: 'ppo' is not one of grpo, sft, apo"),
        ([{"name": "a", "agent_selector": []}], "policies[a].agent_selector: () is not a non-empty list"),
        ([{"name": "a/b"}], "policies: name 'a/b' is not a policy name"),
        ([{"agent_selector": ["x"]}], "policies: name '' is not a policy name"),
        ([{"name": "a", "selector": ["x"]}], "policies[0]: unknown parameter(s) ['selector']"),
        ({"name": "a"}, "is not an array of [[policies]] tables"),
    ],
)
def test_a_bad_policy_is_refused_naming_it(tmp_path, policies, message):
    with pytest.raises(ConfigError) as raised:
        load_settings(environ={"BOLTSTREAM_HOME": str(tmp_path), "BOLTSTREAM_POLICIES": json.dumps(policies)})
    assert str(raised.value).startswith("environment: ")
    assert message in str(raised.value)


def test_settings_built_in_code_check_their_policies_too():
    with pytest.raises(ConfigError, match="used by more than one policy"):
        Settings(policies=(PolicyConfig("a"), PolicyConfig("a")))
    with pytest.raises(ConfigError, match=r"policies\[a\]\.trainer\.group_size: 0 is not at least 1"):
        PolicyConfig("a", trainer={"group_size": 0})
