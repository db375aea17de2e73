"""What the local stack runs, gathered as plain data (:func:`stack_status`, ``status --json``) and printed
as tables (:func:`print_status`): its processes, the broker's topics and consumer lag, the archive's tables
what the serving replicas serve, and the join workers' health counters."""

from __future__ import annotations

import socket
from dataclasses import replace
from pathlib import Path
from typing import Any

from boltstream.infra.common.config import Settings, redacted
from boltstream.infra.common.topics import admin_client
from boltstream.infra.stack.state import read_state

#: Tansu 0.6 answers ListOffsets(latest) with the first offset of a partition's last record batch + 1.
TANSU_LAG_NOTE = (
    "Tansu reports a partition's end as the first offset of its last record batch + 1, "
    "so lag can read up to one producer batch low"
)


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _reachable(bootstrap_servers: str, timeout: float) -> bool:
    host, _, port = bootstrap_servers.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def _kafka_status(settings: Settings, report: dict[str, Any], timeout: float) -> None:
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import ConfigResource, ResourceType

    admin = admin_client(settings)
    try:
        metadata = admin.list_topics(timeout=timeout)
    except KafkaException as exc:
        report["notes"].append(f"broker does not answer metadata requests: {exc.args[0].str()}")
        return
    report["broker"]["reachable"] = True
    names = sorted(name for name in metadata.topics if not name.startswith("__"))
    topics = {name: {"partitions": len(metadata.topics[name].partitions), "compacted": False} for name in names}
    report["topics"] = topics
    report["missing_topics"] = sorted(set(settings.topics.all()) - set(topics))
    try:
        resources = [ConfigResource(ResourceType.TOPIC, name) for name in names]
        configs = admin.describe_configs(resources, request_timeout=timeout) if resources else {}
        for resource, future in configs.items():
            policy = future.result().get("cleanup.policy")
            topics[resource.name]["compacted"] = policy is not None and "compact" in (policy.value or "")
    except KafkaException as exc:
        report["notes"].append(f"topic configs unavailable: {exc.args[0].str()}")

    try:
        report["consumer_groups"] = _consumer_lag(admin, metadata, timeout)
    except KafkaException as exc:
        report["notes"].append(f"consumer group lag unavailable: {exc.args[0].str()}")
        return
    if any(group["lag"] is not None for group in report["consumer_groups"].values()):
        report["notes"].append(TANSU_LAG_NOTE)


def _consumer_lag(admin: Any, metadata: Any, timeout: float) -> dict[str, dict[str, Any]]:
    """Per group: messages not yet committed, per topic it committed on (every partition counts;
    one never committed counts from its start). ``lag`` is None while a group has no commits."""
    from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition
    from confluent_kafka.admin import OffsetSpec

    groups = sorted(g.group_id for g in admin.list_consumer_groups(request_timeout=timeout).result().valid)
    committed: dict[str, dict[tuple[str, int], int]] = {}
    for group in groups:  # the admin API takes one group per request
        request = [ConsumerGroupTopicPartitions(group)]
        offsets = admin.list_consumer_group_offsets(request, request_timeout=timeout)[group].result()
        committed[group] = {(tp.topic, tp.partition): tp.offset for tp in offsets.topic_partitions if tp.offset >= 0}
    topics = {topic for offsets in committed.values() for topic, _ in offsets if topic in metadata.topics}
    partitions = [TopicPartition(topic, p) for topic in sorted(topics) for p in metadata.topics[topic].partitions]
    bounds: dict[str, dict[tuple[str, int], int]] = {"start": {}, "end": {}}
    for bound, spec in (("start", OffsetSpec.earliest()), ("end", OffsetSpec.latest())):
        if partitions:
            for tp, future in admin.list_offsets({tp: spec for tp in partitions}, request_timeout=timeout).items():
                bounds[bound][(tp.topic, tp.partition)] = future.result().offset
    lag: dict[str, dict[str, Any]] = {}
    for group, offsets in committed.items():
        per_topic: dict[str, int] = {}
        for topic in sorted({topic for topic, _ in offsets if topic in topics}):
            per_topic[topic] = sum(
                max(0, bounds["end"][(topic, p)] - offsets.get((topic, p), bounds["start"][(topic, p)]))
                for p in metadata.topics[topic].partitions
            )
        lag[group] = {"lag": sum(per_topic.values()) if per_topic else None, "topics": per_topic}
    return lag


def _serving_status(settings: Settings, report: dict[str, Any], timeout: float) -> None:
    """What each vLLM replica serves and the canary state (serving.serve), when serving topics exist."""
    from confluent_kafka import KafkaException

    from boltstream.infra.serving.serve import serving_status

    if settings.topics.served_versions not in report["topics"]:
        return
    try:
        report["serving"] = serving_status(settings, timeout)
    except (KafkaException, RuntimeError) as exc:
        report["notes"].append(f"serving status unavailable: {_one_line(exc)}")


def _table_status(settings: Settings, read_url: str, report: dict[str, Any], timeout: float) -> None:
    import clickhouse_connect

    try:
        client = clickhouse_connect.get_client(dsn=read_url, connect_timeout=timeout, send_receive_timeout=timeout)
        try:
            # Tables that store rows (not views, Null ingest tables): their counts are metadata, cheap at any size.
            result = client.query(
                "SELECT name, engine, total_rows FROM system.tables"
                " WHERE database = %(db)s AND has_own_data ORDER BY name",
                parameters={"db": settings.clickhouse.database},
            )
        finally:
            client.close()
    except Exception as exc:  # any failure of the read endpoint is reported, not raised
        report["notes"].append(f"ClickHouse tables unavailable at {redacted(read_url)}: {_one_line(exc)}")
        return
    report["tables"] = {name: {"engine": engine, "rows": rows} for name, engine, rows in result.result_rows}


def join_workers_status(settings: Settings, timeout: float) -> dict[str, dict[str, Any]]:
    """Per running join worker (by metrics URL): what it processed and the counters that must stay 0."""
    from boltstream.stream_processors.join import join_metrics_urls, join_status

    workers = {}
    for url in join_metrics_urls(settings):
        try:
            status = join_status(url, timeout)
        except Exception as exc:  # one unreachable worker must not hide the others
            workers[url] = {"error": _one_line(exc)}
            continue
        names = ("spans", "open_trajectories", "inputs_read_again", "internal_errors", "tombstones")
        workers[url] = {name: status.get(name, 0) for name in names}
    return workers


def stack_status(settings: Settings, timeout: float = 3.0) -> dict[str, Any]:
    """What the local stack under ``settings.home`` runs, as plain JSON-able data (``status --json``)."""
    state = read_state(settings)
    report: dict[str, Any] = {"running": False, "healthy": False, "state_file": str(settings.state_file), "notes": []}
    if state is None:
        report["notes"].append("no stack was started under this home (`boltstream up` starts one)")
        return report
    alive = state.alive()
    report.update(
        running=any(alive.values()),
        home=state.home,
        started_at=state.started_at,
        data_dir=state.data_dir,
        bootstrap_servers=state.bootstrap_servers,
        clickhouse_read_url=redacted(state.clickhouse_read_url),
        broker={
            "pid": state.broker.pid,
            "alive": alive["broker"],
            "reachable": False,
            "log": state.broker.log,
            "restarts": state.restarts.get("broker", 0),
        },
        workers={
            n: {"pid": r.pid, "alive": alive[n], "log": r.log, "restarts": state.restarts.get(n, 0)}
            for n, r in state.workers.items()
        },
        supervisor=None
        if state.supervisor is None
        else {"pid": state.supervisor.pid, "alive": state.supervisor.alive()},
        topics={},
        missing_topics=[],
        tables=None,
        archive=[],
        consumer_groups=None,
        join_workers=join_workers_status(settings, timeout),
    )
    supervised = report["supervisor"] is not None and report["supervisor"]["alive"]
    report["healthy"] = all(alive.values()) and (state.supervisor is None or supervised)
    if not report["running"]:
        report["notes"].append("stale state file: every process of the stack has exited")
        return report
    dead = [name for name, up in alive.items() if not up]
    if dead:
        what = "the supervisor restarts them (logs/supervisor.log)" if supervised else "`down` then `up` restarts them"
        report["notes"].append(f"not running: {', '.join(dead)}; {what}")
    if state.supervisor is not None and not supervised:
        report["notes"].append("the supervisor has exited: nothing restarts a part that exits")
    from boltstream.stream_processors.archive import read_archive_states

    report["archive"] = read_archive_states(Path(state.home))  # what it does: archiving, or waiting for what
    if alive["broker"] and _reachable(state.bootstrap_servers, timeout):
        stack_kafka = replace(settings.kafka, bootstrap_servers=state.bootstrap_servers)
        _kafka_status(replace(settings, kafka=stack_kafka), report, timeout)
        if report["broker"]["reachable"]:
            _serving_status(replace(settings, kafka=stack_kafka), report, timeout)
    else:
        report["notes"].append(f"broker at {state.bootstrap_servers} is not reachable")
    if state.clickhouse_read_url:
        _table_status(settings, state.clickhouse_read_url, report, timeout)
    return report


def print_status(report: dict[str, Any]) -> None:
    """Print a :func:`stack_status` report as tables, then its notes."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if "broker" not in report:
        console.print("[bold]nothing running[/bold]")
    else:
        state = "[green]running[/green]" if report["running"] else "[red]not running[/red]"
        console.print(f"[bold]boltstream stack[/bold] {state} since {report['started_at']}")
        console.print(f"home {report['home']} (logs in {Path(report['broker']['log']).parent})")
        processes = Table("process", "pid", "state", "restarts", title="processes", title_justify="left")
        supervisor = report["supervisor"]
        restarting = supervisor is not None and supervisor["alive"]
        broker = report["broker"]
        reach = ", reachable" if broker["reachable"] else ", unreachable" if broker["alive"] else ""
        processes.add_row(
            f"broker {report['bootstrap_servers']}",
            str(broker["pid"]),
            _alive(broker["alive"], restarting) + reach,
            str(broker["restarts"]),
        )
        for name, worker in report["workers"].items():
            processes.add_row(name, str(worker["pid"]), _alive(worker["alive"], restarting), str(worker["restarts"]))
        if supervisor is not None:
            processes.add_row("supervisor", str(supervisor["pid"]), _alive(supervisor["alive"]), "")
        console.print(processes)
        for archive in report.get("archive", []):
            from boltstream.stream_processors.archive import describe_archive_state

            line = describe_archive_state(archive)
            shown = f"[yellow]{line}[/yellow]" if archive.get("state") == "waiting" else line
            console.print(f"archive (pid {archive['pid']}): {shown}")
        if report["topics"]:
            topics = Table("topic", "partitions", "compacted", title="topics", title_justify="left")
            for name, topic in report["topics"].items():
                topics.add_row(name, str(topic["partitions"]), "yes" if topic["compacted"] else "")
            for name in report["missing_topics"]:
                topics.add_row(name, "[red]missing[/red]", "")
            console.print(topics)
        if report["tables"] is not None:
            tables = Table("table", "engine", "rows", title=f"ClickHouse {report['data_dir']}", title_justify="left")
            for name, table in report["tables"].items():
                tables.add_row(name, table["engine"], "" if table["rows"] is None else f"{table['rows']:,}")
            console.print(tables)
        serving = report.get("serving")
        if serving and (serving["replicas"] or serving["canary"]["last_decision"]):  # nothing served: no table
            print_serving(console, serving)
        if report.get("join_workers"):
            joins = Table("join worker", "spans", "open", "inputs read again", "errors", title="join workers")
            for url, worker in report["join_workers"].items():
                if "error" in worker:
                    joins.add_row(url, f"[red]{worker['error']}[/red]", "", "", "")
                    continue
                again = worker["inputs_read_again"]
                joins.add_row(
                    url,
                    f"{worker['spans']:,}",
                    f"{worker['open_trajectories']:,}",
                    f"[red]{again}[/red]" if again else "0",
                    f"[red]{worker['internal_errors']}[/red]" if worker["internal_errors"] else "0",
                )
            console.print(joins)
        if report["consumer_groups"]:
            groups = Table("consumer group", "topic", "lag", title="consumer groups", title_justify="left")
            for group, info in report["consumer_groups"].items():
                for topic, lag in info["topics"].items():
                    groups.add_row(group, topic, f"{lag:,}")
                if not info["topics"]:
                    groups.add_row(group, "", "[dim]nothing committed yet[/dim]")
            console.print(groups)
    for note in report["notes"]:
        console.print(f"[dim]note: {note}[/dim]")


def print_serving(console: Any, serving: dict[str, Any]) -> None:
    """Print what each replica serves and the canary state (:func:`boltstream.infra.serving.serve.serving_status`)."""
    from rich.table import Table

    state = serving["canary"]
    canary = f", canary version {state['canary']}" if state["canary"] is not None else ""
    title = f"serving {state['model']}: stable version {state['stable']}{canary}"
    replicas = Table("replica", "version", "format", "served name", "last load", title=title, title_justify="left")
    for server_id, replica in serving["replicas"].items():
        last = (
            replica["status"]
            if replica["status"] == "serving"
            else f"[red]failed v{replica['attempted_version']}[/red]"
        )
        replicas.add_row(server_id, str(replica["version"]), replica["format"], replica["served_name"], last)
    console.print(replicas)
    if state["last_decision"]:
        decision = state["last_decision"]
        console.print(
            f"last decision: {decision['action']} version {decision['candidate_version']}: {decision['reason']}"
        )


def _alive(alive: bool, restarting: bool = False) -> str:
    if alive:
        return "[green]alive[/green]"
    return "[yellow]exited, restarting[/yellow]" if restarting else "[red]dead[/red]"
