"""The demo's end-of-run report: one PNG and one HTML page, drawn from ClickHouse through the read endpoint.

It owns ``report.png`` and ``report.html`` in a demo's output directory. Every number comes from the
archive (spans, trajectories, samples, canary_decisions), read with the same clickhouse-connect client any
ClickHouse user has; only the weight-version events that are not archived (a version published on
``model-updates``, loaded by a replica on ``served-versions``) come from the run's ``timeline``, gathered
from Kafka while it ran. The panels:

* reward over time, each trajectory coloured by the version that answered it, with a rolling mean and
  the mean of the first and last window (the headline: by how much the reward rose, with counts);
* the version timeline: published -> served -> promoted or rolled back;
* the LLM latency histogram, throughput per stage (spans, trajectories, samples per second) and lag
  (span end -> archived, last span -> trajectory closed -> sample).
"""

from __future__ import annotations

import base64
import html
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Width of the time buckets of the throughput and lag panels, in seconds.
BUCKET_SECONDS = 5.0
#: Trajectories in the rolling mean of the reward curve.
ROLLING = 64


@dataclass(frozen=True)
class Window:
    """Mean reward of the complete trajectories that started in [start, end) seconds into the run."""

    start: float
    end: float
    count: int
    mean: float | None


def reward_windows(points: list[tuple[float, float]], duration: float) -> tuple[Window, Window]:
    """The first and the last fifth of the run (at least 15 s each) over (seconds, reward) points."""
    width = max(15.0, duration / 5)

    def window(start: float, end: float) -> Window:
        values = [r for t, r in points if start <= t < end]
        return Window(start, end, len(values), sum(values) / len(values) if values else None)

    return window(0.0, width), window(max(0.0, duration - width), duration + 1e-9)


def load(client: Any, began: float) -> dict[str, Any]:
    """The rows the report draws, times in seconds since ``began`` (a Unix time)."""
    origin = int(began * 1e6)

    def rows(sql: str) -> list[tuple]:
        return client.query(sql, parameters={"origin": origin}).result_rows

    return {
        "trajectories": rows(
            "SELECT (start_time_us - %(origin)s) / 1e6, final_reward, model_versions FROM trajectories"
            " WHERE status = 'complete' AND final_reward IS NOT NULL ORDER BY start_time_us"
        ),
        "statuses": rows("SELECT toString(status), count() FROM trajectories GROUP BY status ORDER BY status"),
        "spans": rows(
            "SELECT (end_time_us - %(origin)s) / 1e6, (toUnixTimestamp64Micro(archived_at) - end_time_us) / 1e6,"
            " toString(kind), llm_latency_ms FROM spans ORDER BY end_time_us"
        ),
        "samples": rows(
            "SELECT (s.created_at_us - %(origin)s) / 1e6,"
            " (toUnixTimestamp64Micro(s.archived_at) - r.timestamp_us) / 1e6 FROM samples AS s"
            " INNER JOIN (SELECT rollout_id, max(timestamp_us) AS timestamp_us FROM rewards WHERE is_final"
            " GROUP BY rollout_id) AS r ON s.rollout_id = r.rollout_id ORDER BY s.created_at_us"
        ),
        "closing": rows(
            "SELECT (t.closed_at_us - %(origin)s) / 1e6,"
            " (toUnixTimestamp64Micro(t.archived_at) - r.timestamp_us) / 1e6 FROM trajectories AS t"
            " INNER JOIN (SELECT rollout_id, max(timestamp_us) AS timestamp_us FROM rewards WHERE is_final"
            " GROUP BY rollout_id) AS r ON t.rollout_id = r.rollout_id ORDER BY t.closed_at_us"
        ),
        "decisions": rows(
            "SELECT (timestamp_us - %(origin)s) / 1e6, toString(action), candidate_version, reason"
            " FROM canary_decisions ORDER BY timestamp_us"
        ),
    }


def _rise(first: Window, last: Window) -> tuple[float, str]:
    """The rise of the mean reward from the first window to the last, and the sentence that says so."""
    if first.mean is None or last.mean is None:
        return 0.0, "not enough rewarded trajectories in the first or last window to measure a rise"
    rise = last.mean - first.mean
    return rise, (
        f"mean reward {first.mean:.3f} (first {first.end - first.start:.0f} s, n={first.count}) -> "
        f"{last.mean:.3f} (last {last.end - last.start:.0f} s, n={last.count}): {rise:+.3f}"
    )


def policy_summaries(client: Any, policies: dict[str, str], began: float, duration: float) -> dict[str, Any]:
    """Per policy (``policies``: name -> the agent group it learns from): the reward windows and rise of its
    agents' trajectories, and its mean reward per version (``report_reward_by_policy_version``)."""
    summaries = {}
    for name, agent in policies.items():
        rows = client.query(
            "SELECT (start_time_us - {origin:Int64}) / 1e6, final_reward FROM trajectories"
            " WHERE status = 'complete' AND final_reward IS NOT NULL AND agent_name = {agent:String}",
            parameters={"origin": int(began * 1e6), "agent": agent},
        ).result_rows
        first, last = reward_windows([(t, float(r)) for t, r in rows], duration)
        rise, headline = _rise(first, last)
        versions = client.query(
            "SELECT model_version, rollouts, mean_reward FROM report_reward_by_policy_version"
            " WHERE policy = {policy:String}",
            parameters={"policy": name},
        ).result_rows
        summaries[name] = {
            "agent": agent,
            "first": first.__dict__,
            "last": last.__dict__,
            "rise": rise,
            "headline": f"{name}: {headline}",
            "versions": [(str(version), int(count), float(mean)) for version, count, mean in versions],
        }
    return summaries


def write_report(
    client: Any,
    out: Path,
    *,
    timeline: list[dict[str, Any]],
    began: float,
    ended: float,
    policies: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Write ``out/report.png`` and ``out/report.html``; the summary (windows, rise, counts, paths). With
    ``policies`` (name -> agent group, when there are several) it also has each policy's rise and reward per
    version, under ``policies``."""
    data = load(client, began)
    duration = ended - began
    points = [(t, float(r)) for t, r, _ in data["trajectories"]]
    first, last = reward_windows(points, duration)
    rise, headline = _rise(first, last)
    events = [{**e, "time": e["time"] - began} for e in timeline if e["event"] in ("published", "served", "failed")]
    events += [
        {
            "event": {"promote": "promoted", "rollback": "rolled back", "start": "canary"}[a],
            "version": v,
            "time": t,
            "detail": reason,
        }
        for t, a, v, reason in data["decisions"]
    ]
    png = out / "report.png"
    _draw(png, data, events, first, last, duration, headline)
    summary = {
        "first": first.__dict__,
        "last": last.__dict__,
        "rise": rise,
        "headline": headline,
        "trajectories": dict(data["statuses"]),
        "spans": len(data["spans"]),
        "samples": len(data["samples"]),
        "versions": _per_version(data["trajectories"]),
        "png": str(png),
        "html": str(out / "report.html"),
        "policies": policy_summaries(client, policies, began, duration) if policies else {},
    }
    (out / "report.html").write_text(_html(summary, events, png))
    return summary


def _version_of(versions: list[str]) -> int | None:
    """The one version that answered a trajectory (None when its calls mixed versions or had none)."""
    distinct = set(versions)
    if len(distinct) != 1:
        return None
    text = distinct.pop()
    return int(text) if text.isdigit() else 0 if text == "" else None


def _per_version(trajectories: list[tuple]) -> dict[int, dict[str, float]]:
    groups: dict[int, list[float]] = {}
    for _, reward, versions in trajectories:
        version = _version_of(versions)
        if version is not None:
            groups.setdefault(version, []).append(float(reward))
    return {v: {"count": len(r), "mean": sum(r) / len(r)} for v, r in sorted(groups.items())}


def _publish_to_serve(events: list[dict[str, Any]]) -> list[float]:
    published = {e["version"]: e["time"] for e in events if e["event"] == "published"}
    served = {e["version"]: e["time"] for e in events if e["event"] == "served"}
    return [served[v] - published[v] for v in published if v in served and served[v] >= published[v]]


def _buckets(times: list[float], duration: float) -> tuple[list[float], list[float]]:
    count = int(duration // BUCKET_SECONDS) + 1
    counts = [0] * count
    for t in times:
        if 0 <= t < count * BUCKET_SECONDS:
            counts[int(t // BUCKET_SECONDS)] += 1
    return [(i + 0.5) * BUCKET_SECONDS for i in range(count)], [c / BUCKET_SECONDS for c in counts]


def _median_per_bucket(pairs: list[tuple[float, float]], duration: float) -> tuple[list[float], list[float]]:
    groups: dict[int, list[float]] = {}
    for t, value in pairs:
        if 0 <= t <= duration + BUCKET_SECONDS and value is not None:
            groups.setdefault(int(t // BUCKET_SECONDS), []).append(value)
    keys = sorted(groups)
    return [(k + 0.5) * BUCKET_SECONDS for k in keys], [statistics.median(groups[k]) for k in keys]


def _draw(png: Path, data, events, first: Window, last: Window, duration: float, headline: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import cm

    plt.rcParams.update(
        {
            "font.size": 10,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "axes.grid": True,
            "grid.alpha": 0.25,
            "axes.titleweight": "bold",
            "axes.titlelocation": "left",
        }
    )
    figure = plt.figure(figsize=(15, 8.6), dpi=80, layout="constrained")
    grid = figure.add_gridspec(2, 3, height_ratios=[1.25, 1])
    reward_axes = figure.add_subplot(grid[0, :2])
    timeline_axes = figure.add_subplot(grid[0, 2])
    latency_axes, throughput_axes, lag_axes = (figure.add_subplot(grid[1, i]) for i in range(3))
    figure.suptitle(f"boltstream demo — {headline}", fontsize=13, fontweight="bold", x=0.01, ha="left")

    versions = sorted({v for v in (_version_of(t[2]) for t in data["trajectories"]) if v is not None} | {0})
    palette = cm.viridis
    top = max(versions[-1], 1)

    def colour(version: int):
        return palette(0.85 * version / top)

    # reward over time: the mean per time bin, each bar coloured by the version that answered most of it
    times = [t for t, *_ in data["trajectories"]]
    width = max(5.0, duration / 18)
    bins: dict[int, list[tuple[float, int]]] = {}
    for t, reward, answered in data["trajectories"]:
        bins.setdefault(int(t // width), []).append((float(reward), _version_of(answered) or 0))
    for index, members in sorted(bins.items()):
        mean = sum(r for r, _ in members) / len(members)
        major = statistics.mode(v for _, v in members)
        reward_axes.bar((index + 0.5) * width, mean, width=width * 0.92, color=colour(major), alpha=0.9)
        reward_axes.text(
            (index + 0.5) * width, mean + 0.015, f"{len(members)}", ha="center", fontsize=7, color="#555555"
        )
    for window, name in ((first, "first"), (last, "last")):
        if window.mean is not None:
            reward_axes.hlines(window.mean, window.start, window.end, colors="black", linewidths=2.5)
            reward_axes.annotate(
                f"{name} {window.end - window.start:.0f} s: {window.mean:.2f} (n={window.count})",
                (window.start + 1, window.mean + 0.07),
                fontsize=10,
                fontweight="bold",
                bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "none"},
            )
    for event in events:
        if event["event"] == "served":
            reward_axes.axvline(event["time"], color="#444444", alpha=0.5, linestyle=":")
            reward_axes.text(
                event["time"], 1.13, f"v{event['version']}", fontsize=8, ha="center", color=colour(event["version"])
            )
    reward_axes.set(xlim=(0, duration), ylim=(0, 1.2), xlabel="seconds into the run", ylabel="mean final reward")
    reward_axes.set_title(
        "reward: mean per time bin (number = trajectories), coloured by the version that answered; dotted = served",
        pad=16,
    )

    # version timeline: the version served over time (a step line), when each was published, its fate
    served = sorted((e["time"], e["version"]) for e in events if e["event"] == "served")
    if served:
        xs = [0.0] + [t for t, _ in served] + [duration]
        ys = [0] + [v for _, v in served] + [served[-1][1]]
        timeline_axes.step(xs, ys, where="post", color="#2ca02c", linewidth=2, label="served")
    markers = {
        "published": ("o", "#1f77b4", 0.0, 30),
        "promoted": ("*", "#ff7f0e", 0.45, 80),
        "rolled back": ("X", "#d62728", 0.45, 60),
        "failed": ("x", "#7f7f7f", -0.45, 40),
    }
    for name, (marker, tint, lift, size) in markers.items():
        chosen = [e for e in events if e["event"] == name]
        if chosen:
            timeline_axes.scatter(
                [e["time"] for e in chosen],
                [e["version"] + lift for e in chosen],
                marker=marker,
                facecolors="none" if marker == "o" else tint,
                edgecolors=tint,
                s=size,
                label=name,
                zorder=3,
            )
    timeline_axes.set(xlim=(0, duration), xlabel="seconds into the run", ylabel="weight version")
    timeline_axes.yaxis.get_major_locator().set_params(integer=True)
    delays = _publish_to_serve(events)
    if delays:
        timeline_axes.text(
            0.98,
            0.03,
            f"published → served: median {statistics.median(delays):.1f} s",
            transform=timeline_axes.transAxes,
            ha="right",
            fontsize=9,
        )
    timeline_axes.set_title("versions: published → served → promoted")
    timeline_axes.legend(loc="upper left", frameon=False, fontsize=8)

    # LLM latency
    latencies = [float(lat) for _, _, kind, lat in data["spans"] if kind == "llm_call" and lat is not None]
    if latencies:
        low, high = max(min(latencies), 1.0), max(max(latencies), 2.0)
        edges = [low * (high / low) ** (i / 40) for i in range(41)]
        latency_axes.hist(latencies, bins=edges, color="#4c72b0", alpha=0.85)
        latency_axes.set_xscale("log")
        ordered = sorted(latencies)
        for q, style in ((0.5, "-"), (0.95, "--"), (0.99, ":")):
            value = ordered[min(len(ordered) - 1, int(q * len(ordered)))]
            latency_axes.axvline(
                value, color="black", linestyle=style, linewidth=1, label=f"p{int(q * 100)} {value:.0f} ms"
            )
        latency_axes.legend(frameon=False, fontsize=8)
    latency_axes.set(xlabel="ms per call (log scale)", ylabel="calls")
    latency_axes.set_title(f"LLM latency ({len(latencies):,} calls through the router)")

    # throughput per stage
    stages = (
        ("spans", [t for t, *_ in data["spans"]], "#4c72b0"),
        ("trajectories", times, "#55a868"),
        ("training samples", [t for t, _ in data["samples"]], "#c44e52"),
    )
    for name, stamps, tint in stages:
        x, y = _buckets(stamps, duration)
        throughput_axes.plot(x, y, label=name, color=tint, linewidth=1.8)
    throughput_axes.set(xlim=(0, duration), xlabel="seconds into the run", ylabel="per second")
    throughput_axes.set_title("throughput per stage")
    throughput_axes.legend(frameon=False, fontsize=8)

    # lag
    lags = (
        ("span end → archived in ClickHouse", [(t, lag) for t, lag, _, _ in data["spans"]], "#4c72b0"),
        ("reward sent → trajectory archived", data["closing"], "#55a868"),
        ("reward sent → training sample archived", data["samples"], "#c44e52"),
    )
    for name, pairs, tint in lags:
        x, y = _median_per_bucket(pairs, duration)
        lag_axes.plot(x, y, label=name, color=tint, linewidth=1.8)
    lag_axes.set(xlim=(0, duration), xlabel="seconds into the run", ylabel="median seconds")
    lag_axes.set_title("lag per stage")
    lag_axes.legend(frameon=False, fontsize=8)

    figure.savefig(png, dpi=80)
    plt.close(figure)


def _html(summary: dict[str, Any], events: list[dict[str, Any]], png: Path) -> str:
    image = base64.b64encode(png.read_bytes()).decode()
    versions = "".join(
        f"<tr><td>v{v}</td><td>{s['count']:,}</td><td>{s['mean']:.3f}</td></tr>" for v, s in summary["versions"].items()
    )
    timeline = "".join(
        f"<tr><td>{e['time']:.1f}</td><td>v{e['version']}</td><td>{html.escape(e['event'])}</td>"
        f"<td>{html.escape(str(e.get('detail', '')))}</td></tr>"
        for e in sorted(events, key=lambda e: e["time"])
    )
    statuses = ", ".join(f"{k} {v:,}" for k, v in summary["trajectories"].items())
    policies = "".join(f"<p><b>{html.escape(policy['headline'])}</b></p>" for policy in summary["policies"].values())
    if summary["policies"]:
        rows = "".join(
            f"<tr><td>{html.escape(name)}</td><td>{html.escape(policy['agent'])}</td><td>v{html.escape(version)}</td>"
            f"<td>{count:,}</td><td>{mean:.3f}</td></tr>"
            for name, policy in summary["policies"].items()
            for version, count, mean in policy["versions"]
        )
        policies += (
            "<h2>mean reward per version per policy</h2><table><tr><th>policy</th><th>agents</th><th>version</th>"
            f"<th>rollouts</th><th>mean reward</th></tr>{rows}</table>"
        )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>boltstream demo report</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1250px}} table{{border-collapse:collapse}}
td,th{{border-bottom:1px solid #ddd;padding:3px 10px;text-align:left}} img{{max-width:100%}}</style></head>
<body><h1>boltstream demo</h1>
<p><b>{html.escape(summary["headline"])}</b></p>
<p>trajectories: {statuses}; spans archived: {summary["spans"]:,}; training samples: {summary["samples"]:,}</p>
{policies}
<img src="data:image/png;base64,{image}" alt="demo report">
<h2>mean reward per model version</h2><table><tr><th>version</th><th>trajectories</th><th>mean reward</th></tr>
{versions}</table>
<h2>version timeline</h2><table><tr><th>second</th><th>version</th><th>event</th><th>detail</th></tr>
{timeline}</table>
</body></html>
"""
