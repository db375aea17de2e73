"""The one typed configuration of boltstream: every parameter, its default and its meaning.

Sources, later ones winning:

1. the defaults below;
2. a TOML file: ``$BOLTSTREAM_CONFIG`` if set, else ``./boltstream.toml`` if it exists, with one
   table per section (``[kafka]``, ``[producer]``, ``[stream]`` ...);
3. environment variables ``BOLTSTREAM_<SECTION>__<FIELD>``, e.g.
   ``BOLTSTREAM_STREAM__REWARD_TIMEOUT=45s`` or ``BOLTSTREAM_KAFKA__BOOTSTRAP_SERVERS=host:9092``;
4. when ``kafka.bootstrap_servers`` / ``clickhouse.read_url`` are left empty, the running local
   stack's state file (``<home>/stack.json``, written by ``boltstream up``) fills them in.

Secrets (fields marked :data:`SecretText`: passwords) come from the environment, from code, or from the
file a sibling ``<field>_file`` names; a config file holding one is refused, and :func:`settings_toml`
leaves them out, so no secret is written to a config file.

Loading converts each value to its field's type; constructing a section (loading, ``replace`` or a
direct call) checks it against the field's choices (``Literal``) and range (:class:`Range`). Either
refusal names the field, the value and what is allowed. Fields of seconds (:data:`Seconds`) also
accept a string with a unit: ``"250ms"``, ``"30s"``, ``"5m"``; no other number does. Lists accept TOML
arrays or comma-separated strings.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import tomllib
import typing
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal
from urllib.parse import urlsplit, urlunsplit

import tomli_w

if TYPE_CHECKING:
    import ssl

ENV_PREFIX = "BOLTSTREAM_"
TRACER_ENV = "AGENT_LIGHTNING_TRACER"
#: The model signing key's file under ``<home>`` when ``trainer.signing_key_file`` is empty.
DEFAULT_SIGNING_KEY_FILE = "model-signing.key"
_DURATION = re.compile(r"^\s*(?P<number>-?\d+(\.\d+)?)\s*(?P<unit>ms|s|m|h)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


class ConfigError(ValueError):
    """A configuration value that cannot be used, with the parameter named."""


def parse_duration(value: str | float | int) -> float:
    """Seconds from ``30``, ``"30s"``, ``"250ms"``, ``"5m"`` or ``"1h"``."""
    if isinstance(value, int | float):
        return float(value)
    match = _DURATION.match(value)
    if not match:
        raise ConfigError(f"not a duration: {value!r} (use e.g. 30s, 250ms, 5m)")
    return float(match["number"]) * _UNIT_SECONDS[match["unit"]]


class Duration:
    """Marks a float field of seconds: ``Annotated[float, Duration]`` also accepts ``"30s"``, ``"5m"``."""


class Secret:
    """Marks a str field as a secret (:data:`SecretText`): never read from nor written to a config file."""


@dataclass(frozen=True)
class Range:
    """The numbers a field allows, as ``Annotated[int, Range(at_least=1)]``; None leaves a bound out."""

    at_least: float | None = None
    above: float | None = None
    at_most: float | None = None

    def admits(self, value: object) -> bool:
        return (
            isinstance(value, int | float)
            and (self.at_least is None or value >= self.at_least)
            and (self.above is None or value > self.above)
            and (self.at_most is None or value <= self.at_most)
        )

    def __str__(self) -> str:
        if self.at_least is not None and self.at_most is not None and self.above is None:
            return f"in [{self.at_least}, {self.at_most}]"
        bounds = (("at least", self.at_least), ("above", self.above), ("at most", self.at_most))
        return " and ".join(f"{words} {bound}" for words, bound in bounds if bound is not None)


#: A rate, share, threshold or score.
ZeroToOne = Annotated[float, Range(at_least=0, at_most=1)]
#: A size, count or interval: at least one.
Count = Annotated[int, Range(at_least=1)]
#: A TCP port; 0 lets the system pick a free one.
Port = Annotated[int, Range(at_least=0, at_most=65535)]
#: A length of time in seconds: a number, or a string with a unit (``"250ms"``, ``"30s"``, ``"5m"``, ``"1h"``).
Seconds = Annotated[float, Duration, Range(at_least=0)]
#: A password: set by an environment variable or code, never by a config file; left out of reprs.
SecretText = Annotated[str, Secret]

Algorithm = Literal["grpo", "sft", "apo"]
CreditPolicy = Literal["final", "discounted", "per_step"]
Compression = Literal["lz4", "zstd", "snappy", "gzip", "none"]
SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]


class _Checked:
    """Base of the sections: constructing one (load_settings, ``replace``, directly) checks every
    field against its annotation's choices and range, so no code downstream sees an impossible value."""

    def __post_init__(self) -> None:
        section = _section_names()[type(self)]
        for name, annotation in _hints(type(self)).items():
            complaint = _complaint(getattr(self, name), annotation)
            if complaint:
                raise ConfigError(f"{section}.{name}: {complaint}")


def read_secret(name: str, value: str, file: str) -> str:
    """The secret ``name`` (e.g. ``kafka.sasl_password``): ``value``, else the content of ``file`` without
    its trailing newline (``echo`` and editors add one). Both set is refused: which one counts would be a guess."""
    if value and file:
        raise ConfigError(f"{name} and {name}_file are both set: give the secret one way")
    if not file:
        return value
    try:
        return Path(file).expanduser().read_text().rstrip("\r\n")
    except OSError as exc:
        raise ConfigError(f"{name}_file: cannot read {file}: {exc.strerror}") from None


def redacted(url: str) -> str:
    """``url`` with its password shown as ``***``, for messages and logs."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{parts.hostname}:{parts.port}"))


def default_home() -> Path:
    """Where the local stack keeps its state and data: ``$BOLTSTREAM_HOME`` or ``~/.boltstream``."""
    return Path(os.environ.get("BOLTSTREAM_HOME") or Path.home() / ".boltstream")


@dataclass(frozen=True)
class TopicConfig(_Checked):
    """Topic names and partition counts."""

    #: SpanBatch records of the agents, keyed by rollout_id.
    spans: str = "boltstream.spans.v1"
    #: Reward records, keyed by rollout_id; co-partitioned with spans.
    rewards: str = "boltstream.rewards.v1"
    #: Trajectory records the join closes, keyed by rollout_id.
    trajectories: str = "boltstream.trajectories.v1"
    #: TrainingSample records (one per LLM call of a complete trajectory), keyed by task_id.
    samples: str = "boltstream.samples.v1"
    #: DeadLetter records: input a worker could not use, with its raw bytes and the reason.
    dlq: str = "boltstream.dlq.v1"
    #: ModelUpdate records (published weight versions), keyed by model; compacted.
    model_updates: str = "boltstream.model-updates.v1"
    #: PromptUpdate records (APO's best template per agent), keyed by agent name; compacted.
    prompt_updates: str = "boltstream.prompt-updates.v1"
    #: ServedVersion records (what each vLLM replica serves of each policy), keyed by ``<server id>/<policy>``;
    #: compacted.
    served_versions: str = "boltstream.served-versions.v1"
    #: Canary decisions (start, promote, rollback of a candidate version), keyed by model; every one is kept.
    canary_decisions: str = "boltstream.canary-decisions.v1"
    #: RolloutTask records (rollouts an algorithm queued through the store API for the runners), keyed by rollout_id.
    rollout_tasks: str = "boltstream.rollout-tasks.v1"
    #: Experiment records (one per ``boltstream replay``: window, filters, overrides, counts), keyed by name.
    experiments: str = "boltstream.experiments.v1"
    #: Partitions of the keyed event topics (spans, rewards, trajectories, samples, dlq, canary-decisions). They bound
    #: how many workers of one consumer group share the load; spans and rewards must be equal
    #: (co-partitioned for the join).
    partitions: Count = 4
    #: Partitions of the compacted control topics (model-updates, prompt-updates, served-versions).
    control_partitions: Count = 1
    #: Copies of each partition the broker keeps when boltstream creates a topic (1 on one machine).
    replication_factor: Count = 1

    def compacted(self) -> tuple[str, ...]:
        """Topics keyed by entity whose latest value is all that matters (cleanup.policy=compact)."""
        return (self.model_updates, self.prompt_updates, self.served_versions)

    def all(self) -> dict[str, int]:
        """Every topic with its partition count."""
        event = (
            self.spans,
            self.rewards,
            self.trajectories,
            self.samples,
            self.dlq,
            self.canary_decisions,
            self.rollout_tasks,
            self.experiments,
        )
        return {**{t: self.partitions for t in event}, **{t: self.control_partitions for t in self.compacted()}}


#: librdkafka's default ``fetch.max.bytes``: what a consumer asks for per fetch when messages are smaller.
FETCH_MAX_BYTES = 50 * 1024 * 1024
#: librdkafka's largest ``receive.message.max.bytes``, the largest frame of the Kafka protocol.
RECEIVE_MAX_BYTES = 2_147_483_647


@dataclass(frozen=True)
class KafkaConfig(_Checked):
    """Where the broker is and how clients talk to it: every Kafka client of boltstream (librdkafka through
    :meth:`client_config`, Faust through :meth:`faust_credentials`) connects with these settings."""

    #: Broker list; empty means "the running local stack" (from its state file).
    bootstrap_servers: str = ""
    #: Confluent schema registry URL; empty means Avro single-object encoding with the shipped
    #: schemas (no registry). ``mock://name`` uses confluent-kafka's in-process test double.
    schema_registry_url: str = ""
    #: Consumer session timeout. Tansu completes a group join after about half of it, so the
    #: local stack keeps it short; raise it on real clusters with slow consumers.
    session_timeout_ms: Count = 6000
    #: PLAINTEXT (the local stack), SSL (TLS), SASL_SSL (TLS and a SASL login) or SASL_PLAINTEXT.
    security_protocol: SecurityProtocol = "PLAINTEXT"
    #: The SASL login of the SASL_* protocols.
    sasl_mechanism: SaslMechanism = "SCRAM-SHA-512"
    #: The SASL user name.
    sasl_username: str = ""
    #: From ``BOLTSTREAM_KAFKA__SASL_PASSWORD`` (or code); a config file holding it is refused.
    sasl_password: SecretText = field(default="", repr=False)
    #: A file holding the SASL password instead (a mounted Kubernetes Secret, a compose secret).
    sasl_password_file: str = ""
    #: PEM file of the CA(s) that sign the brokers' certificates (SSL, SASL_SSL); empty = the system's.
    ssl_ca_location: str = ""
    #: Client certificate and its private key (PEM files) for brokers that require mutual TLS.
    ssl_certificate_location: str = ""
    #: The private key of ``ssl_certificate_location`` (PEM file).
    ssl_key_location: str = ""
    #: Largest message (key, value and headers, as librdkafka counts them) of every topic: the producers
    #: refuse a bigger one, topics are created with it as ``max.message.bytes``, and the archive
    #: dead-letters (key, size and offset, without the value) a bigger one that reaches it anyway (the
    #: embedded broker does not enforce any limit).
    max_message_bytes: Annotated[int, Range(at_least=1000, at_most=1_000_000_000)] = 1024 * 1024
    #: Extra librdkafka settings applied to every client, e.g. {"client.rack": "eu-west-1a"}.
    client_overrides: dict[str, str] = field(default_factory=dict)

    @property
    def uses_sasl(self) -> bool:
        return self.security_protocol.startswith("SASL_")

    @property
    def uses_tls(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")

    def client_config(self, **extra: Any) -> dict[str, Any]:
        """librdkafka settings for a confluent-kafka client: the broker, the security settings, the
        overrides, then ``extra``."""
        if not self.bootstrap_servers:
            raise ConfigError(
                "kafka.bootstrap_servers is empty and no local stack is running: start one with "
                "`boltstream up` or set BOLTSTREAM_KAFKA__BOOTSTRAP_SERVERS"
            )
        security: dict[str, str] = {}
        if self.security_protocol != "PLAINTEXT":
            security["security.protocol"] = self.security_protocol
        if self.uses_sasl:
            username, password = self._sasl_login()
            security.update(
                {"sasl.mechanism": self.sasl_mechanism, "sasl.username": username, "sasl.password": password}
            )
        if self.uses_tls:
            certificate, key = self._client_certificate()
            files = {
                "ssl.ca.location": self.ssl_ca_location,
                "ssl.certificate.location": certificate,
                "ssl.key.location": key,
            }
            security.update({setting: path for setting, path in files.items() if path})
        limit = {"message.max.bytes": self.max_message_bytes}
        return {"bootstrap.servers": self.bootstrap_servers, **security, **limit, **self.client_overrides, **extra}

    def consumer_config(self, **extra: Any) -> dict[str, Any]:
        """:meth:`client_config` for a consumer: it fetches messages up to ``max_message_bytes`` and takes
        any fetch response the protocol allows, so a bigger message (the embedded broker accepts any)
        reaches the consumer, which can refuse it, instead of failing every fetch of its partition."""
        limits = {
            "fetch.message.max.bytes": self.max_message_bytes,
            "fetch.max.bytes": max(FETCH_MAX_BYTES, self.max_message_bytes),
            "receive.message.max.bytes": RECEIVE_MAX_BYTES,
        }
        return self.client_config(**{**limits, **extra})

    def faust_credentials(self) -> Any:
        """The same security for Faust (aiokafka): the ``broker_credentials`` of a ``faust.App``, None for
        PLAINTEXT. The TLS context verifies the broker's certificate and name, as librdkafka does."""
        import faust

        context = self._ssl_context() if self.uses_tls else None
        if self.uses_sasl:
            username, password = self._sasl_login()
            return faust.SASLCredentials(
                username=username, password=password, mechanism=self.sasl_mechanism, ssl_context=context
            )
        return faust.SSLCredentials(context) if context is not None else None

    def _sasl_login(self) -> tuple[str, str]:
        password = read_secret("kafka.sasl_password", self.sasl_password, self.sasl_password_file)
        if not (self.sasl_username and password):
            raise ConfigError(
                f"kafka.security_protocol {self.security_protocol} needs kafka.sasl_username and a password "
                "(BOLTSTREAM_KAFKA__SASL_PASSWORD or kafka.sasl_password_file)"
            )
        return self.sasl_username, password

    def _client_certificate(self) -> tuple[str, str]:
        if bool(self.ssl_certificate_location) != bool(self.ssl_key_location):
            raise ConfigError(
                "kafka.ssl_certificate_location and kafka.ssl_key_location go together: set both or neither"
            )
        return self.ssl_certificate_location, self.ssl_key_location

    def _ssl_context(self) -> ssl.SSLContext:
        import ssl

        try:
            context = ssl.create_default_context(cafile=self.ssl_ca_location or None)
            certificate, key = self._client_certificate()
            if certificate:
                context.load_cert_chain(certificate, key)
        except OSError as exc:  # ssl.SSLError included
            raise ConfigError(f"kafka TLS files: {exc}") from None
        return context


@dataclass(frozen=True)
class ProducerConfig(_Checked):
    """The agent-side SDK (producers)."""

    #: Spans the SDK batches in memory before handing them to the Kafka client; never blocks the agent.
    span_buffer_size: Count = 512
    #: Share of rollouts kept, decided once per rollout by a hash of rollout_id (all-in or all-out).
    span_sampling_rate: ZeroToOne = 1.0
    #: Upper bound on time a span waits in memory before its batch is flushed, seconds.
    linger: Seconds = 0.05
    #: On-disk spool for batches the broker could not take (broker down or slow); empty means
    #: ``<home>/spool/<process>``.
    spool_dir: str = ""
    #: Bound of the spool in bytes; past it, the oldest sampled-out data goes first, then the oldest.
    spool_max_bytes: Count = 256 * 1024 * 1024
    #: Longest attribute / text value kept; longer ones are cut and end with a truncation marker.
    max_attribute_bytes: Count = 16 * 1024
    #: Extra regular expressions whose matches are redacted before spans leave the process.
    redact_patterns: tuple[str, ...] = ()
    #: Seconds ``flush()`` and interpreter exit wait for pending spans to be delivered.
    flush_timeout: Seconds = 10.0
    #: Kafka compression of span and reward messages.
    compression: Compression = "lz4"
    #: Seconds a message may wait for the broker's acknowledgement before it spills to the spool.
    delivery_timeout: Seconds = 5.0
    #: Spans held in memory at most while the sender catches up; past it new spans are dropped and counted.
    max_pending_spans: Count = 1_000_000
    #: An implicit rollout (spans emitted outside ``agl.rollout``) ends after this many idle seconds (and on
    #: ``flush()`` or at exit; never on a reward). Keep it below ``stream.reward_timeout``.
    implicit_rollout_idle: Seconds = 10.0
    #: Auto-tracing asks the server for the token ids of prompt and completion (vLLM's ``return_token_ids``),
    #: so each traced call can become a training sample; a server that rejects the parameter (a hosted API)
    #: is asked once more without it, and never again by this process.
    request_token_ids: bool = True
    #: Auto-tracing also asks for the completion's logprobs (the behaviour policy's, for the trainer's
    #: off-policy correction); off, the trainer computes them at training time (see README, "Token ids").
    request_logprobs: bool = False
    #: How long the SDK keeps each acknowledged span and reward message on disk (``<spool>/retained``) after
    #: the last acknowledged message of its rollout, to send it again when the broker turns out to be a new
    #: incarnation that may have lost it (a broker restarted after a crash: another cluster id). A rollout is
    #: kept or released whole. Make it longer than ``stream.reward_timeout`` plus the archive's lag; 0 = off.
    retention: Seconds = 120.0
    #: Bound of those retained messages in bytes; past it the oldest are released early (counted, logged).
    retention_max_bytes: Count = 256 * 1024 * 1024
    #: Seconds between the SDK's checks of the broker's cluster id (one metadata request each).
    broker_check_interval: Annotated[Seconds, Range(above=0)] = 1.0


@dataclass(frozen=True)
class ProxyConfig(_Checked):
    """The capture proxy (``boltstream proxy``)."""

    #: File holding the token ``POST /boltstream/rewards`` requires (``Authorization: Bearer <token>``);
    #: empty = ``<home>/proxy/rewards-token``, created (random, mode 0600) by the first proxy that starts.
    rewards_token_file: str = ""
    #: The smallest reward value ``POST /boltstream/rewards`` accepts; smaller ones are refused (400).
    reward_min: float = -1e6
    #: The largest reward value it accepts; larger ones, NaN and infinities are refused (400).
    reward_max: float = 1e6

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (
            math.isfinite(self.reward_min) and math.isfinite(self.reward_max) and self.reward_min < self.reward_max
        ):
            raise ConfigError(
                f"proxy.reward_min, proxy.reward_max: [{self.reward_min}, {self.reward_max}] is not a range of "
                "finite numbers, the smaller first"
            )


@dataclass(frozen=True)
class StreamConfig(_Checked):
    """The stream processors (join, sampling, selection, credit assignment, archive)."""

    #: How long after a rollout's end its rewards are still joined (its reward window); with no final reward
    #: by then it is ``timed_out``, never trained on. See docs/architecture.md, "When a trajectory closes".
    reward_timeout: Annotated[Seconds, Range(above=0)] = 30.0
    #: Which agents' calls become training samples: ``all``, or names / glob patterns.
    agent_selector: tuple[str, ...] = ("all",)
    #: Credit assignment: ``final`` (final reward to every call), ``discounted`` or ``per_step``.
    credit_assignment: CreditPolicy = "final"
    #: Discount per step away from the end, for ``discounted``.
    discount: ZeroToOne = 0.9
    #: Most messages the archive and the join take in one batch.
    batch_size: Count = 5000
    #: Longest the archive waits to fill a batch (up to ``batch_size``), seconds; the join's is ``join_batch_within``.
    batch_within: Seconds = 0.2
    #: Consumer group (and Faust app id) of the join workers; its state changelog topic is named after it.
    join_group: str = "boltstream-join"
    #: Extra stream time the join waits past a deadline before its timer closes a trajectory, so a
    #: reward read from the rewards topic slightly after spans of the same moment still counts.
    join_grace: Seconds = 1.0
    #: How far a span's or reward's own time may lie after its broker timestamp (the Kafka record's
    #: timestamp). A record dated further ahead has a clock the join does not believe: it takes the broker
    #: timestamp as the record's time (counted, never dead-lettered), so one agent's wrong clock cannot move
    #: stream time, and close other agents' rollouts early. Keep it below ``join_grace``.
    max_event_time_skew: Seconds = 0.5
    #: How long (stream time) a closed trajectory's marker is kept to recognise duplicates and late inputs.
    closed_retention: Seconds = 3600.0
    #: Port of the join worker's HTTP endpoint (Prometheus ``/metrics``); 0 picks a free one (each worker
    #: then announces its URL in ``<home>/join/<pid>.json``).
    join_metrics_port: Port = 0
    #: Longest the join waits to fill a batch (up to ``batch_size``), seconds: bounds the latency it adds.
    join_batch_within: Seconds = 0.05
    #: Serve Faust's own pages on the join worker's port besides ``/metrics`` (``/router``, ``/table/rollouts``,
    #: ``/stats`` ...): live rollout state, for debugging only. Off, the port serves ``/metrics`` and Faust's
    #: bare ``/`` (``{"status": "OK"}``), and 404 to the rest.
    debug_web: bool = False


@dataclass(frozen=True)
class ClickHouseConfig(_Checked):
    """The span archive."""

    #: Where the archive worker writes: ``chdb:///path`` (embedded; empty = ``<home>/clickhouse``)
    #: or ``http(s)://host:port`` for a server, with its user and password in the fields below, not in
    #: the URL (URLs get printed).
    url: str = ""
    #: Where every reader (sql, report, replay) reads: a ClickHouse HTTP(S) URL. Empty means the
    #: running local stack's read endpoint (from its state file).
    read_url: str = ""
    #: ClickHouse database of the archive's tables and views (created when missing).
    database: str = "boltstream"
    #: Loopback port of the embedded store's read-only HTTP endpoint (0 = pick a free one).
    read_port: Port = 0
    #: Token of user ``reader`` on that endpoint; empty = a random one, printed when the archive starts.
    #: The local stack hands it to the archive worker in its private settings file, never on a command line.
    read_token: str = ""
    #: Limits of every query on that endpoint (the process that answers it also writes the archive);
    #: a reader cannot change them. A query over one fails with ClickHouse's error for it.
    read_max_execution_time: Annotated[Seconds, Range(above=0)] = 30.0
    #: Bytes of memory one query may use; up to ``read_max_concurrent_queries`` of them run at once.
    read_max_memory_usage: Count = 1024 * 1024 * 1024
    #: Rows and (uncompressed) bytes of one result: the endpoint holds a result in memory before it
    #: answers. Reading more (a replay of a large archive) takes raising them, or several queries.
    read_max_result_rows: Count = 1_000_000
    #: Uncompressed bytes of one result on that endpoint.
    read_max_result_bytes: Count = 256 * 1024 * 1024
    #: Queries the endpoint runs at once, each on its own chDB connection; more wait for a free one.
    read_max_concurrent_queries: Count = 4
    #: Consumer group of the archive worker; its committed offsets are what is durably archived.
    archive_group: str = "boltstream-archive"
    #: Days (table partitions) one archive insert may write. A batch over it is split; a single record
    #: whose spans fall on more days is dead-lettered: each day is a partition for good, and thousands of
    #: them slow every insert, merge and query of the table (ClickHouse's own default is 100).
    max_partitions_per_insert: Count = 1000
    #: Longest wait between two attempts of an insert the archive cannot make for a reason of the server
    #: (disk full, server away); the waits double from 0.5 s up to it, and the archive never gives up.
    retry_max_wait: Annotated[Seconds, Range(above=0)] = 30.0
    #: The archive worker's user on a server (``url``): one allowed to insert and to run the DDL.
    #: Empty = the URL's user, else ``default``.
    user: str = ""
    #: Its password, from ``BOLTSTREAM_CLICKHOUSE__PASSWORD`` (or code); a config file holding it is refused.
    password: SecretText = field(default="", repr=False)
    #: A file holding that password instead (a mounted Kubernetes Secret, a compose secret).
    password_file: str = ""
    #: The readers' user on a server (``read_url``), best a read-only one; empty = the URL's user.
    read_user: str = ""
    #: Its password, from ``BOLTSTREAM_CLICKHOUSE__READ_PASSWORD`` (or code), or from ``read_password_file``.
    read_password: SecretText = field(default="", repr=False)
    #: A file holding the readers' password instead.
    read_password_file: str = ""
    #: PEM file of the CA that signs the server's certificate (https:// URLs); empty = the system's CAs.
    ca_cert: str = ""

    def client_arguments(self, url: str, *, reading: bool) -> dict[str, Any]:
        """Keyword arguments of ``clickhouse_connect.get_client`` for ``url``: for a server, the readers'
        (``reading``) or the archive worker's user and password, and TLS with the server's certificate
        checked for an https:// URL. A password given here wins over one in the URL."""
        if not url.startswith(("http://", "https://")):
            return {"dsn": url}  # chdb:// is a directory of this machine: no login, no transport
        if reading:
            user = self.read_user
            password = read_secret("clickhouse.read_password", self.read_password, self.read_password_file)
        else:
            user = self.user
            password = read_secret("clickhouse.password", self.password, self.password_file)
        arguments: dict[str, Any] = {"dsn": url}
        if user:
            arguments["username"] = user
        if password:
            arguments["password"] = password
        # clickhouse-connect takes TLS from `secure` (or ports 443/8443), not from the URL's scheme.
        if url.startswith("https://"):
            arguments.update(secure=True, verify=True)
            if self.ca_cert:
                arguments["ca_cert"] = self.ca_cert
        return arguments


@dataclass(frozen=True)
class TrainerConfig(_Checked):
    """The continuous trainer."""

    #: Training algorithm; ``apo`` optimises prompt templates instead of weights.
    algorithm: Algorithm = "grpo"
    #: Samples from a version more than this many versions older than the trainer's are dropped.
    max_staleness: Annotated[int, Range(at_least=0)] = 4
    #: A candidate version is published only if its policy_stability_score reaches this.
    weight_sync_threshold: ZeroToOne = 0.85
    #: How often APO re-ranks prompt templates, in spans.
    template_update_interval: Count = 1000
    #: Where artifacts go (local directory or any fsspec URL); empty = ``<home>/artifacts``. Serving
    #: replicas load only artifacts inside it.
    artifact_store: str = ""
    #: File holding the secret that signs model updates (the trainer) and verifies them (every serving
    #: replica): at least 32 bytes, shared by all of them, never in a record, command line or log.
    #: Empty = ``<home>/model-signing.key``, which ``boltstream up`` and ``demo`` create when missing.
    signing_key_file: str = ""
    #: Hugging Face model directory to train; empty = the tiny local model, built in ``<home>/models/tiny``.
    model_path: str = ""
    #: Model name: the key of its records on ``model-updates``.
    model_name: str = "tiny"
    #: DeepSpeed JSON config replacing the built-in CPU one (ZeRO stage, bf16, optimizer, clipping,
    #: gradient accumulation). The trainer fills in the batch sizes from ``group_size``/``groups_per_step``.
    deepspeed_config: str = ""
    #: Let DeepSpeed JIT-build (with g++) and use its shared-memory all-reduce op; off, gloo does that job.
    deepspeed_shm_comm: bool = False
    #: Samples per GRPO group (attempts of one task); a group trains once it has this many.
    group_size: Count = 8
    #: Groups per optimizer step: the global batch is ``group_size * groups_per_step`` samples.
    groups_per_step: Count = 4
    #: PPO clip range of the ratio between the updated and the step-start (proximal) policy.
    clip_epsilon: ZeroToOne = 0.2
    #: Cap of the truncated importance weight proximal/behaviour policy that corrects stale samples.
    importance_weight_cap: Annotated[float, Range(above=0)] = 2.0
    #: Optimizer updates per batch (>1 makes the PPO clip bite); the batch is trained in full each time.
    updates_per_batch: Count = 1
    #: Weight of the KL penalty to the reference (initial) policy; 0 = no reference model.
    kl_coef: Annotated[float, Range(at_least=0)] = 0.0
    #: SFT (rejection sampling): only samples whose return reaches this are trained on.
    sft_min_return: float = 1.0
    #: LoRA rank; 0 trains and publishes full weights, >0 a peft LoRA adapter.
    lora_rank: Annotated[int, Range(at_least=0)] = 0
    #: Steps between DeepSpeed checkpoints (offsets are committed only after a checkpoint).
    checkpoint_interval: Count = 10
    #: Steps between candidate exports (each one is scored and published or held).
    publish_interval: Count = 10
    #: Where checkpoints go; empty = ``<home>/checkpoints/<model_name>``.
    checkpoint_dir: str = ""
    #: Prompts in the probe set of policy_stability_score (the first distinct prompts seen).
    probe_size: Count = 16
    #: Tokens generated greedily per probe prompt by the serving policy; the KL is taken over them.
    probe_tokens: Count = 8
    #: APO: JSON file ``{"agent": ["template", ...]}`` of candidate prompt templates.
    apo_templates: str = ""
    #: APO: UCB exploration weight when ranking templates (0 = pure exploitation).
    apo_exploration: Annotated[float, Range(at_least=0)] = 1.0


@dataclass(frozen=True)
class ServeConfig(_Checked):
    """Serving: weight sync and canary deployments."""

    #: A candidate version counts as stable for promotion when its policy_stability_score exceeds this.
    promotion_stability: ZeroToOne = 0.8
    #: Share of traffic sent to the newest version while it runs as a canary.
    canary_share: ZeroToOne = 0.05
    #: The candidate's mean reward may be at most this much below the stable version's to be promoted.
    reward_margin: Annotated[float, Range(at_least=0)] = 0.05
    #: Rewarded trajectories of the candidate (and of the stable version) needed before a decision.
    canary_window: Count = 50
    #: Sampled tokens of the candidate scored against the stable version before a decision
    #: (policy_stability_score = exp(-KL) over them).
    stability_tokens: Count = 200
    #: Seconds a newer version waits for a running canary's decision; a canary still undecided then is
    #: rolled back and the newest waiting version starts (0 = a newer version supersedes the canary at once).
    canary_max_wait: Annotated[float, Range(at_least=0)] = 300.0
    #: Replica id of this server in ServedVersion records; empty = ``<hostname>-<vLLM port>``.
    server_id: str = ""
    #: Where the sidecar keeps fetched versions and the ``current`` link vLLM loads from;
    #: empty = ``<home>/serving/<server_id>``.
    serving_dir: str = ""
    #: Port of the vLLM server ``boltstream serve`` starts (0 = a free one; left at 8000, a free one when
    #: 8000 is taken).
    vllm_port: Port = 8000
    #: Port of the router (the OpenAI-compatible endpoint agents call) ``boltstream serve`` starts (0 = a
    #: free one; left at 8400, a free one when 8400 is taken).
    router_port: Port = 8400
    #: Address the router listens on. Loopback by default; ``0.0.0.0`` inside a container or pod, whose
    #: network is the boundary, so that the published port and the Service reach it.
    router_host: str = "127.0.0.1"
    #: Where the canary analyzer reaches the router to score the canary's tokens under the stable
    #: version; empty = ``http://127.0.0.1:<router_port>``.
    router_url: str = ""
    #: File holding the API key vLLM requires on every path but ``/health`` (held by ``serve``'s sidecar and
    #: router, and by a proxy given ``--upstream-key-file``); empty = ``<home>/serving/vllm-api-key``, created
    #: (random, mode 0600) by the first ``serve``, so every replica of one home shares it.
    api_key_file: str = ""


@dataclass(frozen=True)
class StackConfig(_Checked):
    """The local stack (``boltstream up``, and the private stacks of ``demo`` and ``Trainer.fit``)."""

    #: Address the embedded broker listens on and gives its clients. Loopback by default; a routable
    #: address of this machine lets agents and ``Trainer.fit`` runners on other machines join (the broker
    #: then takes plaintext connections from that network: keep it a private one).
    broker_host: str = "127.0.0.1"

    #: Restart a part of the stack (a worker, the broker) that exits; off, a dead part stays dead and
    #: ``boltstream status`` exits non-zero until ``down`` and ``up``.
    supervise: bool = True
    #: First wait before restarting a part that exited; it doubles with each exit in a row.
    restart_backoff: Annotated[Seconds, Range(above=0)] = 1.0
    #: Longest wait between restarts of a part that keeps exiting.
    restart_backoff_max: Annotated[Seconds, Range(above=0)] = 60.0
    #: A part that has run this long since its last restart counts as healthy: its next exit waits
    #: ``restart_backoff`` again.
    healthy_after: Seconds = 60.0


#: What a policy's name may hold: it names the policy's consumer group, checkpoint directory, served model.
_POLICY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
#: Trainer fields a policy sets by its own fields, not by its ``trainer`` table.
_POLICY_OWN_FIELDS = {"model_name": "name", "algorithm": "algorithm"}


@dataclass(frozen=True)
class PolicyConfig:
    """One policy trained side by side with others: a ``[[policies]]`` table of the config file."""

    #: The policy's name: the key of its versions on ``model-updates``, the model name agents call, and
    #: part of its trainer's consumer group and checkpoint directory. Letters, digits, ``.``, ``_``, ``-``.
    name: str = ""
    #: Which agents' calls train this policy: ``all``, or names / glob patterns (as ``stream.agent_selector``).
    agent_selector: tuple[str, ...] = ("all",)
    #: Training algorithm of this policy; empty = ``trainer.algorithm``.
    algorithm: Literal["", "grpo", "sft", "apo"] = ""
    #: ``[trainer]`` parameters this policy sets otherwise (``model_path``, ``lora_rank``, ``max_staleness``,
    #: ``checkpoint_dir`` ...), over the ``[trainer]`` section; the rest come from that section.
    trainer: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not _POLICY_NAME.match(self.name):
            raise ConfigError(
                f"policies: name {self.name!r} is not a policy name (1 to 64 letters, digits, '.', '_', '-', "
                "starting with a letter or digit)"
            )
        where = f"policies[{self.name}]"
        if isinstance(self.agent_selector, str) or not self.agent_selector:
            raise ConfigError(f"{where}.agent_selector: {self.agent_selector!r} is not a non-empty list of strings")
        if self.algorithm not in typing.get_args(_hints(PolicyConfig)["algorithm"]):
            raise ConfigError(f"{where}.algorithm: {self.algorithm!r} is not one of grpo, sft, apo (or empty)")
        if not isinstance(self.trainer, dict):
            raise ConfigError(f"{where}.trainer: expected a table of [trainer] parameters")
        for own, instead in _POLICY_OWN_FIELDS.items():
            if own in self.trainer:
                raise ConfigError(f"{where}.trainer.{own}: a policy sets it as policies.{instead}")
        try:
            trainer = _apply(TrainerConfig(), self.trainer, f"{where}.trainer.")
        except ConfigError as exc:  # a range or choice refused by TrainerConfig names "trainer.<field>"
            message = str(exc)
            raise ConfigError(f"{where}.{message}" if message.startswith("trainer.") else message) from None
        # The overrides kept in their fields' types ("3" from the environment becomes 3).
        object.__setattr__(self, "trainer", {name: getattr(trainer, name) for name in self.trainer})

    def trainer_section(self, base: TrainerConfig) -> TrainerConfig:
        """``base`` (the ``[trainer]`` section) with this policy's overrides, name and algorithm."""
        return replace(base, **self.trainer, model_name=self.name, algorithm=self.algorithm or base.algorithm)


@dataclass(frozen=True)
class Settings:
    """Every boltstream parameter. Build with :func:`load_settings`."""

    #: The state directory of the local stack and of every process on this machine: ``$BOLTSTREAM_HOME``,
    #: else ``~/.boltstream``.
    home: Path = field(default_factory=default_home)
    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    topics: TopicConfig = field(default_factory=TopicConfig)
    producer: ProducerConfig = field(default_factory=ProducerConfig)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    clickhouse: ClickHouseConfig = field(default_factory=ClickHouseConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    stack: StackConfig = field(default_factory=StackConfig)
    #: ``AGENT_LIGHTNING_TRACER=1`` turns on auto-tracing of OpenAI-compatible calls, no code change.
    auto_trace: bool = False
    #: Policies trained side by side, each on its own agents (``[[policies]]`` tables in the file; a JSON
    #: array of them in ``BOLTSTREAM_POLICIES``); none = one policy, ``trainer.model_name``, trained on
    #: ``stream.agent_selector`` with the ``[trainer]`` section.
    policies: tuple[PolicyConfig, ...] = ()

    def __post_init__(self) -> None:
        names = [policy.name for policy in self.policies]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ConfigError(f"policies: the name(s) {repeated} are used by more than one policy")

    def for_policy(self, name: str) -> Settings:
        """These settings as the policy ``name`` runs with: its trainer section (``[trainer]`` with the
        policy's overrides, ``model_name`` = its name) and its ``stream.agent_selector``, so code written for
        one policy runs per policy unchanged."""
        policies = {policy.name: policy for policy in resolved_policies(self)}
        if name not in policies:
            raise ConfigError(f"no policy named {name!r}; the policies are {sorted(policies)}")
        policy = policies[name]
        return replace(
            self,
            trainer=policy.trainer_section(self.trainer),
            stream=replace(self.stream, agent_selector=policy.agent_selector),
        )

    @property
    def state_file(self) -> Path:
        return self.home / "stack.json"

    @property
    def archive_url(self) -> str:
        return self.clickhouse.url or f"chdb://{self.home / 'clickhouse'}"

    @property
    def artifact_store_url(self) -> str:
        return self.trainer.artifact_store or str(self.home / "artifacts")

    @property
    def signing_key_path(self) -> Path:
        return Path(self.trainer.signing_key_file or self.home / DEFAULT_SIGNING_KEY_FILE).expanduser()


def resolved_policies(settings: Settings) -> tuple[PolicyConfig, ...]:
    """The policies ``settings`` train, never none: ``settings.policies``, else the one policy of a setup that
    names none (``trainer.model_name`` on ``stream.agent_selector`` with the ``[trainer]`` section)."""
    if settings.policies:
        return settings.policies
    trainer = settings.trainer
    return (PolicyConfig(trainer.model_name, settings.stream.agent_selector, trainer.algorithm),)


# -- checking and loading ----------------------------------------------------------------------


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


@functools.cache
def _section_names() -> dict[type, str]:
    """Each section class with its name in Settings (``ProducerConfig`` -> ``producer``)."""
    return {hint: name for name, hint in _hints(Settings).items() if is_dataclass(hint)}


def _split(annotation: Any) -> tuple[Any, tuple[Any, ...]]:
    """The type under an ``Annotated[...]`` and its metadata; a bare type has none."""
    if typing.get_origin(annotation) is Annotated:
        return annotation.__origin__, annotation.__metadata__
    return annotation, ()


def _complaint(value: Any, annotation: Any) -> str | None:
    """Why ``value`` is outside the choices or the range of ``annotation``; None when it is not."""
    base, metadata = _split(annotation)
    if typing.get_origin(base) is Literal:
        choices = typing.get_args(base)
        return None if value in choices else f"{value!r} is not one of {', '.join(choices)}"
    for rule in metadata:
        if isinstance(rule, Range) and not rule.admits(value):
            return f"{value!r} is not {rule}"
    return None


def _to_bool(value: Any) -> bool:
    if not isinstance(value, str):
        return bool(value)
    word = value.strip().lower()
    if word in ("1", "true", "yes", "on"):
        return True
    if word in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(value)


def _to_int(value: Any) -> int:
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(value)  # int() would cut 8.5 to 8
    return int(value)


def _to_tuple(value: Any) -> tuple[str, ...]:
    items = [s.strip() for s in value.split(",") if s.strip()] if isinstance(value, str) else value
    return tuple(str(item) for item in items)


def _to_dict(value: Any) -> dict[str, Any]:
    return dict(json.loads(value) if isinstance(value, str) else value)


#: How a TOML or env value becomes a field of each kind, and what that kind is called in an error.
_CONVERSIONS: dict[Any, tuple[Callable[[Any], Any], str]] = {
    bool: (_to_bool, "true or false"),
    int: (_to_int, "an integer"),
    float: (float, "a number"),
    Duration: (parse_duration, "a duration (seconds, or e.g. 250ms, 30s, 5m, 1h)"),
    str: (str, "a string"),
    Literal: (str, "a string"),
    Path: (lambda value: Path(value).expanduser(), "a path"),
    tuple: (_to_tuple, "a list of strings"),
    dict: (_to_dict, "a table"),
}


def _to_policies(value: Any) -> tuple[PolicyConfig, ...]:
    """``[[policies]]`` tables (or a JSON array of them, from the environment) as PolicyConfigs."""
    tables = json.loads(value) if isinstance(value, str) else value
    if not isinstance(tables, list | tuple):
        raise ValueError(value)
    policies = []
    for index, table in enumerate(tables):
        if isinstance(table, PolicyConfig):
            policies.append(table)
            continue
        if not isinstance(table, dict):
            raise ValueError(table)
        known = {f.name for f in fields(PolicyConfig)}
        if set(table) - known:
            raise ConfigError(
                f"policies[{index}]: unknown parameter(s) {sorted(set(table) - known)}; known: {sorted(known)}"
            )
        values = dict(table)
        if "agent_selector" in values:
            values["agent_selector"] = _to_tuple(values["agent_selector"])
        if "trainer" in values:
            values["trainer"] = _to_dict(values["trainer"])
        policies.append(PolicyConfig(**values))
    return tuple(policies)


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Turn a TOML/env value into the annotated type, or raise ConfigError naming ``where``."""
    base, metadata = _split(annotation)
    if base == tuple[PolicyConfig, ...]:
        try:
            return _to_policies(value)
        except (TypeError, ValueError) as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"{where}: {value!r} is not an array of [[policies]] tables") from None
    kind = Duration if Duration in metadata else typing.get_origin(base) or base
    convert, expected = _CONVERSIONS[kind]
    try:
        return convert(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {value!r} is not {expected}") from None


#: Told each value that cannot be used (its message names the source and the field) when loading goes on
#: without it; see :func:`load_settings`.
Complaints = Callable[[str], None]


def _apply(obj: Any, values: dict[str, Any], where: str = "", on_invalid: Complaints | None = None) -> Any:
    """``obj`` with ``values`` (a table per section) coerced into its fields; ``where`` prefixes the names.

    A value that cannot be used raises ConfigError, or with ``on_invalid`` is reported to it and left out,
    so that its field keeps what it had (other fields still change)."""
    hints = _hints(type(obj))
    known = {f.name for f in fields(obj)}
    unknown = set(values) - known
    if unknown:
        names = sorted(where + name for name in unknown)
        _refuse(f"unknown parameter(s) {names}; known: {sorted(known)}", on_invalid)
    changes = {}
    for name, value in values.items():
        if name not in known:
            continue
        current = getattr(obj, name)
        try:
            if is_dataclass(current):
                if not isinstance(value, dict):
                    raise ConfigError(f"{where}{name}: expected a table")
                changes[name] = _apply(current, value, f"{where}{name}.", on_invalid)
            else:
                changes[name] = _coerce(value, hints[name], f"{where}{name}")
        except ConfigError as exc:
            _refuse(str(exc), on_invalid)
    try:
        return replace(obj, **changes)
    except ConfigError:  # a value outside its field's choices or range, or at odds with another field
        if on_invalid is None:
            raise
    for name, change in changes.items():  # one at a time: only the values the section refuses are left out
        try:
            obj = replace(obj, **{name: change})
        except ConfigError as exc:
            on_invalid(str(exc))
    return obj


def _refuse(complaint: str, on_invalid: Complaints | None) -> None:
    if on_invalid is None:
        raise ConfigError(complaint)
    on_invalid(complaint)


def _apply_source(
    settings: Settings, values: dict[str, Any], source: str, on_invalid: Complaints | None = None
) -> Settings:
    """``settings`` with the values of one source; an error names the source before the field."""
    if on_invalid is not None:
        return _apply(settings, values, on_invalid=lambda complaint: on_invalid(f"{source}: {complaint}"))
    try:
        return _apply(settings, values)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _env_values(environ: typing.Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for key, value in environ.items():
        if not key.startswith(ENV_PREFIX) or key in ("BOLTSTREAM_CONFIG", "BOLTSTREAM_HOME"):
            continue
        path = key[len(ENV_PREFIX) :].lower().split("__")
        target = values
        for part in path[:-1]:
            target = target.setdefault(part, {})
        target[path[-1]] = value
    return values


@functools.cache
def secret_fields() -> tuple[tuple[str, str], ...]:
    """Every secret field (:data:`SecretText`) as (section, field), e.g. ``("kafka", "sasl_password")``."""
    return tuple(
        (section, name)
        for cls, section in _section_names().items()
        for name, annotation in _hints(cls).items()
        if Secret in _split(annotation)[1]
    )


def secret_environment(settings: Settings) -> dict[str, str]:
    """The secrets ``settings`` hold, as the environment variables that set them: how a process hands them
    to a child that reads everything else from a file written by :func:`settings_toml`."""
    return {
        f"{ENV_PREFIX}{section.upper()}__{name.upper()}": value
        for section, name in secret_fields()
        if (value := getattr(getattr(settings, section), name))
    }


def _refuse_secrets(values: dict[str, Any], source: str, on_invalid: Complaints | None = None) -> None:
    """Refuse a config file that holds a secret: files get copied, committed and read by others. With
    ``on_invalid``, the secret is reported to it and left out of ``values`` instead."""
    for section, name in secret_fields():
        table = values.get(section)
        if isinstance(table, dict) and name in table:
            _refuse(
                f"{source}: {section}.{name} is a secret, not for a config file: set "
                f"{ENV_PREFIX}{section.upper()}__{name.upper()} or {section}.{name}_file",
                on_invalid,
            )
            del table[name]


def fill_from_stack(settings: Settings) -> Settings:
    """Point empty broker / read URLs at the running local stack, if its state file exists."""
    if settings.kafka.bootstrap_servers and settings.clickhouse.read_url:
        return settings
    try:
        state = json.loads(settings.state_file.read_text())
    except (OSError, ValueError):
        return settings
    if not isinstance(state, dict):
        return settings
    kafka, clickhouse = settings.kafka, settings.clickhouse
    if not kafka.bootstrap_servers and state.get("bootstrap_servers"):
        kafka = replace(kafka, bootstrap_servers=state["bootstrap_servers"])
    if not clickhouse.read_url and state.get("clickhouse_read_url"):
        clickhouse = replace(clickhouse, read_url=state["clickhouse_read_url"])
    return replace(settings, kafka=kafka, clickhouse=clickhouse)


def load_settings(
    path: str | Path | None = None,
    environ: typing.Mapping[str, str] | None = None,
    *,
    on_invalid: Complaints | None = None,
    **overrides: Any,
) -> Settings:
    """Defaults, then the TOML file, then ``BOLTSTREAM_*`` env vars, then ``overrides`` (same shape).

    A value that cannot be used raises ConfigError. With ``on_invalid`` (the agent-side SDK, which must
    never fail an agent) each such value of the file or the environment is reported to it instead,
    naming the source and the field, and its field keeps its default; a file that is not TOML at all
    is reported and left out whole. ``overrides`` come from code and are always checked strictly.
    """
    environ = os.environ if environ is None else environ
    settings = Settings(home=Path(environ.get("BOLTSTREAM_HOME") or default_home()))
    config_path = Path(path or environ.get("BOLTSTREAM_CONFIG") or "boltstream.toml")
    values = _read_config_file(config_path, bool(path or environ.get("BOLTSTREAM_CONFIG")), on_invalid)
    if values is not None:
        _refuse_secrets(values, str(config_path), on_invalid)
        settings = _apply_source(settings, values, str(config_path), on_invalid)
    settings = _apply_source(settings, _env_values(environ), "environment", on_invalid)
    if environ.get(TRACER_ENV):
        settings = _apply_source(settings, {"auto_trace": environ[TRACER_ENV]}, TRACER_ENV, on_invalid)
    if overrides:
        settings = _apply_source(settings, overrides, "overrides")
    return fill_from_stack(settings)


def _read_config_file(config_path: Path, named: bool, on_invalid: Complaints | None) -> dict[str, Any] | None:
    """The tables of the config file, None when there is none (or, with ``on_invalid``, none that can be read)."""
    try:
        with config_path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        if named:
            _refuse(f"config file {config_path} does not exist", on_invalid)
    except tomllib.TOMLDecodeError as exc:
        _refuse(f"{config_path} is not valid TOML: {exc}", on_invalid)
    except OSError as exc:
        _refuse(f"config file {config_path} cannot be read: {exc.strerror}", on_invalid)
    return None


def with_values(settings: Settings, values: dict[str, Any], source: str) -> Settings:
    """``settings`` with ``values`` (a table per section, as in the config file) coerced in, checked like
    the config file; an error names ``source``."""
    return _apply_source(settings, values, source)


# -- writing ---------------------------------------------------------------------------------


def _toml_table(items: list[tuple[str, Any]]) -> dict[str, Any]:
    # TOML has no path type (tuples are written as arrays, which read back as tuples).
    return {key: str(value) if isinstance(value, Path) else value for key, value in items}


def settings_toml(settings: Settings) -> str:
    """``settings`` as a TOML file that ``load_settings`` reads back to an equal Settings, but for the
    secrets: they are left out (a child process gets them by :func:`secret_environment`)."""
    header = "# Written by boltstream: the settings its worker processes run with.\n"
    tables = asdict(settings, dict_factory=_toml_table)
    for section, name in secret_fields():
        del tables[section][name]
    return header + tomli_w.dumps(tables)
