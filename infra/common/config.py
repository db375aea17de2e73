"""The one typed configuration of boltstream: every parameter, its default and its meaning.

Sources, later ones winning:

1. the defaults below;
2. a TOML file: ``$BOLTSTREAM_CONFIG`` if set, else ``./boltstream.toml`` if it exists, with one
   table per section (``[kafka]``, ``[producer]``, ``[stream]`` ...);
3. environment variables ``BOLTSTREAM_<SECTION>__<FIELD>``, e.g.
   ``BOLTSTREAM_STREAM__REWARD_TIMEOUT=45s`` or ``BOLTSTREAM_KAFKA__BOOTSTRAP_SERVERS=host:9092``;
4. when ``kafka.bootstrap_servers`` / ``clickhouse.read_url`` are left empty, the running local
   stack's state file (``<home>/stack.json``, written by ``boltstream up``) fills them in.

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
from typing import Annotated, Any, Literal

import tomli_w

ENV_PREFIX = "BOLTSTREAM_"
TRACER_ENV = "AGENT_LIGHTNING_TRACER"
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

Algorithm = Literal["grpo", "sft", "apo"]
CreditPolicy = Literal["final", "discounted", "per_step"]
Compression = Literal["lz4", "zstd", "snappy", "gzip", "none"]


class _Checked:
    """Base of the sections: constructing one (load_settings, ``replace``, directly) checks every
    field against its annotation's choices and range, so no code downstream sees an impossible value."""

    def __post_init__(self) -> None:
        section = _section_names()[type(self)]
        for name, annotation in _hints(type(self)).items():
            complaint = _complaint(getattr(self, name), annotation)
            if complaint:
                raise ConfigError(f"{section}.{name}: {complaint}")


def default_home() -> Path:
    """Where the local stack keeps its state and data: ``$BOLTSTREAM_HOME`` or ``~/.boltstream``."""
    return Path(os.environ.get("BOLTSTREAM_HOME") or Path.home() / ".boltstream")


@dataclass(frozen=True)
class TopicConfig(_Checked):
    """Topic names and partition counts (DESIGN.md: Topics and records)."""

    spans: str = "boltstream.spans.v1"
    rewards: str = "boltstream.rewards.v1"
    trajectories: str = "boltstream.trajectories.v1"
    samples: str = "boltstream.samples.v1"
    dlq: str = "boltstream.dlq.v1"
    model_updates: str = "boltstream.model-updates.v1"
    prompt_updates: str = "boltstream.prompt-updates.v1"
    served_versions: str = "boltstream.served-versions.v1"
    #: Canary decisions (start, promote, rollback of a candidate version), keyed by model; every one is kept.
    canary_decisions: str = "boltstream.canary-decisions.v1"
    #: Partitions of the keyed event topics (spans, rewards, trajectories, samples, dlq). They bound
    #: how many workers of one consumer group share the load; spans and rewards must be equal
    #: (co-partitioned for the join).
    partitions: Count = 4
    #: Partitions of the compacted control topics (model-updates, prompt-updates, served-versions).
    control_partitions: Count = 1
    replication_factor: Count = 1

    def compacted(self) -> tuple[str, ...]:
        """Topics keyed by entity whose latest value is all that matters (cleanup.policy=compact)."""
        return (self.model_updates, self.prompt_updates, self.served_versions)

    def all(self) -> dict[str, int]:
        """Every topic with its partition count."""
        event = (self.spans, self.rewards, self.trajectories, self.samples, self.dlq, self.canary_decisions)
        return {**{t: self.partitions for t in event}, **{t: self.control_partitions for t in self.compacted()}}


@dataclass(frozen=True)
class KafkaConfig(_Checked):
    """Where the broker is and how clients talk to it."""

    #: Broker list; empty means "the running local stack" (from its state file).
    bootstrap_servers: str = ""
    #: Confluent schema registry URL; empty means Avro single-object encoding with the shipped
    #: schemas (no registry). ``mock://name`` uses confluent-kafka's in-process test double.
    schema_registry_url: str = ""
    #: Consumer session timeout. Tansu completes a group join after about half of it, so the
    #: local stack keeps it short; raise it on real clusters with slow consumers.
    session_timeout_ms: Count = 6000
    #: Extra librdkafka settings applied to every client, e.g. {"security.protocol": "SASL_SSL"}.
    client_overrides: dict[str, str] = field(default_factory=dict)

    def client_config(self, **extra: Any) -> dict[str, Any]:
        """librdkafka settings for a confluent-kafka client: the broker, the overrides, then ``extra``."""
        if not self.bootstrap_servers:
            raise ConfigError(
                "kafka.bootstrap_servers is empty and no local stack is running: start one with "
                "`boltstream up` or set BOLTSTREAM_KAFKA__BOOTSTRAP_SERVERS"
            )
        return {"bootstrap.servers": self.bootstrap_servers, **self.client_overrides, **extra}


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
    #: An implicit rollout (spans emitted outside ``agl.rollout``) ends after this many idle seconds.
    implicit_rollout_idle: Seconds = 10.0


@dataclass(frozen=True)
class ProxyConfig(_Checked):
    """The capture proxy (``boltstream proxy``)."""

    #: File holding the token ``POST /boltstream/rewards`` requires (``Authorization: Bearer <token>``);
    #: empty = ``<home>/proxy/rewards-token``, created (random, mode 0600) by the first proxy that starts.
    rewards_token_file: str = ""
    #: The reward values ``POST /boltstream/rewards`` accepts, bounds included; others are refused (400).
    reward_min: float = -1e6
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

    #: How long a trajectory waits for its reward after it ended; then ``timed_out``, never trained on.
    reward_timeout: Annotated[Seconds, Range(above=0)] = 30.0
    #: Which agents' calls become training samples: ``all``, or names / glob patterns.
    agent_selector: tuple[str, ...] = ("all",)
    #: Credit assignment: ``final`` (final reward to every call), ``discounted`` or ``per_step``.
    credit_assignment: CreditPolicy = "final"
    #: Discount per step away from the end, for ``discounted``.
    discount: ZeroToOne = 0.9
    #: Messages a worker takes per batch, and the longest it waits to fill one, seconds.
    batch_size: Count = 5000
    batch_within: Seconds = 0.2
    #: Consumer group (and Faust app id) of the join workers; its state changelog topic is named after it.
    join_group: str = "boltstream-join"
    #: Extra stream time the join waits past a deadline before its timer closes a trajectory, so a
    #: reward read from the rewards topic slightly after spans of the same moment still counts.
    join_grace: Seconds = 1.0
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
    #: or ``http(s)://user:pass@host:8123/db`` for a server.
    url: str = ""
    #: Where every reader (sql, report, replay) reads: a ClickHouse HTTP URL. Empty means the
    #: running local stack's read endpoint (from its state file).
    read_url: str = ""
    database: str = "boltstream"
    #: Loopback port of the embedded store's read-only HTTP endpoint (0 = pick a free one).
    read_port: Port = 0
    #: Token of user ``reader`` on that endpoint; empty = a random one, printed when the archive starts.
    read_token: str = ""
    #: Consumer group of the archive worker; its committed offsets are what is durably archived.
    archive_group: str = "boltstream-archive"


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
    #: Where artifacts go (local directory or any fsspec URL); empty = ``<home>/artifacts``.
    artifact_store: str = ""
    #: Hugging Face model directory to train; empty = the tiny local model, built in ``<home>/models/tiny``.
    model_path: str = ""
    #: Model name: the key of its records on ``model-updates``.
    model_name: str = "tiny"
    #: DeepSpeed JSON config replacing the built-in CPU one (ZeRO stage, bf16, optimizer, clipping,
    #: gradient accumulation). The trainer fills in the batch sizes from ``group_size``/``groups_per_step``.
    deepspeed_config: str = ""
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
    #: Where the canary analyzer reaches the router to score the canary's tokens under the stable
    #: version; empty = ``http://127.0.0.1:<router_port>``.
    router_url: str = ""
    #: File holding the API key vLLM requires on every path but ``/health`` (held by ``serve``'s sidecar and
    #: router, and by a proxy given ``--upstream-key-file``); empty = ``<home>/serving/vllm-api-key``, created
    #: (random, mode 0600) by the first ``serve``, so every replica of one home shares it.
    api_key_file: str = ""


@dataclass(frozen=True)
class Settings:
    """Every boltstream parameter. Build with :func:`load_settings`."""

    home: Path = field(default_factory=default_home)
    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    topics: TopicConfig = field(default_factory=TopicConfig)
    producer: ProducerConfig = field(default_factory=ProducerConfig)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    clickhouse: ClickHouseConfig = field(default_factory=ClickHouseConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    #: ``AGENT_LIGHTNING_TRACER=1`` turns on auto-tracing of OpenAI-compatible calls, no code change.
    auto_trace: bool = False

    @property
    def state_file(self) -> Path:
        return self.home / "stack.json"

    @property
    def archive_url(self) -> str:
        return self.clickhouse.url or f"chdb://{self.home / 'clickhouse'}"


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


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Turn a TOML/env value into the annotated type, or raise ConfigError naming ``where``."""
    base, metadata = _split(annotation)
    kind = Duration if Duration in metadata else typing.get_origin(base) or base
    convert, expected = _CONVERSIONS[kind]
    try:
        return convert(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {value!r} is not {expected}") from None


def _apply(obj: Any, values: dict[str, Any], where: str = "") -> Any:
    """``obj`` with ``values`` (a table per section) coerced into its fields; ``where`` prefixes the names."""
    hints = _hints(type(obj))
    known = {f.name for f in fields(obj)}
    unknown = set(values) - known
    if unknown:
        names = sorted(where + name for name in unknown)
        raise ConfigError(f"unknown parameter(s) {names}; known: {sorted(known)}")
    changes = {}
    for name, value in values.items():
        current = getattr(obj, name)
        if is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}{name}: expected a table")
            changes[name] = _apply(current, value, f"{where}{name}.")
        else:
            changes[name] = _coerce(value, hints[name], f"{where}{name}")
    return replace(obj, **changes)


def _apply_source(settings: Settings, values: dict[str, Any], source: str) -> Settings:
    """``settings`` with the values of one source; an error names the source before the field."""
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


def _fill_from_stack(settings: Settings) -> Settings:
    """Point empty broker / read URLs at the running local stack, if its state file exists."""
    if settings.kafka.bootstrap_servers and settings.clickhouse.read_url:
        return settings
    try:
        state = json.loads(settings.state_file.read_text())
    except (OSError, ValueError):
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
    **overrides: Any,
) -> Settings:
    """Defaults, then the TOML file, then ``BOLTSTREAM_*`` env vars, then ``overrides`` (same shape)."""
    environ = os.environ if environ is None else environ
    settings = Settings(home=Path(environ.get("BOLTSTREAM_HOME") or default_home()))
    config_path = Path(path or environ.get("BOLTSTREAM_CONFIG") or "boltstream.toml")
    if config_path.exists():
        with config_path.open("rb") as handle:
            settings = _apply_source(settings, tomllib.load(handle), str(config_path))
    elif path or environ.get("BOLTSTREAM_CONFIG"):
        raise ConfigError(f"config file {config_path} does not exist")
    settings = _apply_source(settings, _env_values(environ), "environment")
    if environ.get(TRACER_ENV):
        settings = _apply_source(settings, {"auto_trace": environ[TRACER_ENV]}, TRACER_ENV)
    if overrides:
        settings = _apply_source(settings, overrides, "overrides")
    return _fill_from_stack(settings)


# -- writing ---------------------------------------------------------------------------------


def _toml_table(items: list[tuple[str, Any]]) -> dict[str, Any]:
    # TOML has no path type (tuples are written as arrays, which read back as tuples).
    return {key: str(value) if isinstance(value, Path) else value for key, value in items}


def settings_toml(settings: Settings) -> str:
    """``settings`` as a TOML file that ``load_settings`` reads back to an equal Settings."""
    header = "# Written by boltstream: the settings its worker processes run with.\n"
    return header + tomli_w.dumps(asdict(settings, dict_factory=_toml_table))
