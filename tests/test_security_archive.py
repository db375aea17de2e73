"""Secrets never reach ClickHouse: the labelled secret corpus goes through the SDK and through the capture
proxy into the real archive, and not one planted secret (nor the proxy's upstream credentials, nor the
client's headers) is found in what the archive stores."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import httpx

from boltstream import agl
from boltstream.infra.common.config import Settings
from boltstream.infra.common.ports import free_port, wait_for_port
from tests.secret_corpus import KINDS, secret_samples
from tests.test_proxy import _GUARDED_UPSTREAM, ROLLOUT_HEADERS, start_proxy, stop_proxy

AGENT = "secret-agent"


def archived_rows(archive, expected: int, timeout: float = 60.0) -> list[str]:
    """Every archived span of the test agents, as JSON text, once ``expected`` of them are there."""
    client = archive.client()
    deadline = time.monotonic() + timeout
    while True:
        rows = client.query(f"SELECT * FROM spans WHERE agent_name IN ('{AGENT}', 'go-agent')").named_results()
        if len(list(rows)) >= expected or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    result = client.query(f"SELECT * FROM spans WHERE agent_name IN ('{AGENT}', 'go-agent')")
    return [json.dumps(dict(zip(result.column_names, row, strict=True)), default=str) for row in result.result_rows]


def test_the_secret_corpus_never_reaches_clickhouse(settings: Settings, archive, tmp_path: Path) -> None:
    archive.start()
    samples = secret_samples(3 * len(KINDS), seed=7)  # every kind at least three times
    agl.configure(settings)
    try:
        with agl.rollout(task_id="secrets", agent_name=AGENT):
            for sample in samples:
                agl.emit_message(sample.text)  # text of a message
                agl.emit_tool_call("shell", {"command": sample.text}, result=sample.text)  # tool args and result
                agl.emit_decision("configure", api_key=sample.planted[0].hidden[0])  # a secret-named attribute
        assert agl.flush(10), agl.stats()
    finally:
        agl.shutdown(5)

    # The proxy: the upstream URL carries a password, the client sends credentials, the prompt holds secrets.
    password, port = "s3cr@t pw/4", free_port()
    upstream = subprocess.Popen([sys.executable, "-c", _GUARDED_UPSTREAM, str(port), f"proxyuser:{password}"])
    client_headers = {"Authorization": "Bearer sk-proj-client0123456789abcdefghij", "Cookie": "session=c00k1e0123"}
    try:
        wait_for_port(port, timeout=30)
        process, url = start_proxy(settings, f"http://proxyuser:{quote(password, safe='')}@127.0.0.1:{port}")
        prompt = [{"role": "user", "content": "\n".join(sample.text for sample in samples[: len(KINDS)])}]
        answer = httpx.post(
            f"{url}/v1/chat/completions",
            json={"model": "tiny", "messages": prompt},
            headers={**client_headers, **ROLLOUT_HEADERS},
            timeout=30,
        )
        assert answer.status_code == 200, answer.text
        assert stop_proxy(process) == 0
    finally:
        upstream.terminate()
        upstream.wait(10)

    stored = archived_rows(archive, expected=3 * len(samples) + 2)
    assert len(stored) >= 3 * len(samples) + 2, f"only {len(stored)} spans archived"
    assert any('"llm_call"' in row for row in stored)  # the proxy's call is there
    text = "\n".join(stored)
    leaked = sorted(
        {
            planted.kind
            for sample in samples
            for planted in sample.planted
            for hidden in planted.hidden
            if hidden in text
        }
    )
    assert leaked == [], f"secrets of these kinds reached ClickHouse: {leaked}"
    for credential in ("s3cr", quote(password, safe=""), *client_headers.values()):
        assert credential not in text
    assert archive.client().query("SELECT count() FROM spans").result_rows[0][0] >= len(stored)  # still serving
