"""Redaction's fast paths change nothing: the cheap secret test never misses a shape (with the C pre-scan
and with the pure-Python one that stands in for it), and a batch cleaned at once leaves the process byte
for byte as if each span had been cleaned alone."""

from __future__ import annotations

import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from boltstream.infra.common.config import Settings
from boltstream.infra.common.topics import ensure_topics
from boltstream.producers import redaction
from boltstream.producers.pending_span import ERROR
from boltstream.producers.redaction import REDACTED, Redactor, to_text
from boltstream.producers.span_producer import SpanProducer
from tests.producer_helpers import at_least, consume, sdk_environment, with_producer
from tests.records import make_llm
from tests.test_span_encoder import Rollout, flat

SHAPES = [re.compile(pattern, flags) for _trigger, pattern, flags in redaction._SHAPES]
KEYWORDS = ["authorization", "Proxy-Authorization", "api_key", "API-KEY", "apikey", "x-api-key", "secret",
            "client_secret", "password", "PASSWD", "access_token", "Refresh-Token", "Bearer", "bearer", "sk-", "AKIA",
            "ASIA", "ghp_", "gho_", "xoxb-", "xoxp-", "paſsword", "authorızation", "tasK"]  # fmt: skip
GLUE = ["", " ", "=", ":", '": "', "'='", " = ", "\u00a0=\u2003", "\x1c:", "\t:\n", "-", "_", "\x00", "…", "ü"]
BODIES = ["abcdefghijklmnopqrstuvwxyz0123", "ABCDEFGHIJKLMNOP", "Basic dXNlcjpwYXNzd29yZA==", "x", "tok.en-value/8+"]


def random_text(rng: random.Random) -> str:
    words = ["plain", "text", "key", "token", "ask", "desk", "the", "gh", "xox", "sk", "api", "{", "}", '"']
    parts = []
    for _ in range(rng.randint(1, 8)):
        parts.append(rng.choice(KEYWORDS) if rng.random() < 0.5 else rng.choice(words))
        parts.append(rng.choice(GLUE))
        if rng.random() < 0.5:
            parts.append(rng.choice(BODIES))
    return "".join(parts)


@pytest.fixture(params=["c", "python"])
def pre_scan(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Redactor.may_hold_secret scanning with the C extension, then with its pure-Python stand-in."""
    if request.param == "c":
        scan = pytest.importorskip("boltstream.producers._secret_scan").may_hold_secret
    else:
        scan = redaction._scan_bytes_in_python
    monkeypatch.setattr(redaction, "_scan_bytes", scan)


@pytest.mark.usefixtures("pre_scan")
def test_the_cheap_test_finds_every_text_a_secret_shape_matches() -> None:
    rng = random.Random(11)
    matched = 0
    for _ in range(20_000):
        text = random_text(rng)
        if any(shape.search(text) for shape in SHAPES):
            matched += 1
            assert Redactor.may_hold_secret(text), text
    assert matched > 5_000  # the generator does produce secrets


@pytest.mark.usefixtures("pre_scan")
def test_the_cheap_test_finds_a_secret_at_any_offset() -> None:
    """The pre-scan (producers/_secret_scan.c) looks at 16 bytes at a time and reads ahead: a secret is
    found wherever it starts or ends in a block, and in the bytes after the last whole block."""
    secrets = ["api_key=abc123", "Authorization: Basic xyz", "BeArEr abcdefgh12345", "sk-" + "a" * 20,
               "AKIA" + "B" * 16, "ghp_" + "a" * 30, "xoxb-" + "a" * 12, 'password" : hunter2']  # fmt: skip
    for secret in secrets:
        for before in range(40):
            for after in (0, 1, 5, 17):
                text = "." * before + " " + secret + " " + "." * after
                assert any(shape.search(text) for shape in SHAPES), text
                assert Redactor.may_hold_secret(text), text


@pytest.mark.usefixtures("pre_scan")
def test_the_cheap_test_passes_ordinary_text() -> None:
    for text in [
        "The quick brown fox: jumps over the lazy dog; task-17 asked for a desk_lamp, top_k=5",
        '{"query": "what is the weather in Asia?", "top_k": 3, "filters": ["recent", "verified"]}',
        "ünïcødé ✓ 数学 — keys, tokens and passwords are words, not secrets",
    ]:
        assert not Redactor.may_hold_secret(text)
        assert Redactor().redact(text) == text


def test_the_python_pre_scan_answers_as_the_c_one() -> None:
    """Any bytes, not only the texts of secret shapes: key words in any case next to the signs, spaces, quotes
    and arbitrary bytes, at lengths around the C scan's 16-byte blocks and its 5-byte read-ahead."""
    c_scan = pytest.importorskip("boltstream.producers._secret_scan").may_hold_secret
    rng = random.Random(3)
    fragments = [b"key", b"authorization", b"secret", b"passwd", b"password", b"token", b"sk", b"xox", b"gh",
                 b"bearer", b"AKIA", b"ASIA", b"ke", b"beare", b"AKI", b"p", b"o", b"b", b"S", b":", b"=", b"-",
                 b"_", b" ", b"\t", b"\r", b"\x1c", b"\x1f", b"\x1b", b'"', b"'", b"a", b"9", b"\x00",
                 b"\xc4\xb1", b"\xff"]  # fmt: skip
    answers = []
    for _ in range(100_000):
        if rng.random() < 0.2:
            data = random_text(rng).encode("utf-8")
        else:
            pieces = [
                rng.choice(fragments) if rng.random() < 0.9 else rng.randbytes(1) for _ in range(rng.randint(0, 30))
            ]
            data = b"".join(piece.upper() if rng.random() < 0.2 else piece for piece in pieces)
        answer = c_scan(data)
        assert redaction._scan_bytes_in_python(data) == answer, data
        answers.append(answer)
    assert 0.2 < sum(answers) / len(answers) < 0.8  # both answers are common


def test_the_sdk_redacts_without_the_c_extension(settings: Settings) -> None:
    """An agent whose install has no C extension (its import fails) sends spans with their secrets redacted."""
    ensure_topics(settings)
    agent = (
        "import sys\n"
        "sys.modules['boltstream.producers._secret_scan'] = None  # importing it now raises ImportError\n"
        "from boltstream import agl\n"
        "from boltstream.producers import redaction\n"
        "assert redaction._scan_bytes is redaction._scan_bytes_in_python\n"
        "agl.emit_tool_call('http', args='Authorization: Bearer abcdefgh123', result='used sk-abcdefghijklmnop12')\n"
        "assert agl.flush(10)\n"
    )
    repo = Path(__file__).resolve().parents[1]
    env = sdk_environment(settings)
    done = subprocess.run([sys.executable, "-c", agent], env=env, cwd=repo, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    spans = consume(settings.kafka.bootstrap_servers, settings.topics.spans, at_least(2))  # and its implicit rollout
    tool_call = next(span for span in spans if span["kind"] == "tool_call")
    assert tool_call["attributes"] == {"args": f"Authorization: Bearer {REDACTED}", "result": f"used {REDACTED}"}


def test_non_ascii_whitespace_list_is_what_the_regex_engine_calls_whitespace() -> None:
    whitespace = {chr(c) for c in range(128, 0x110000) if chr(c).isspace()}
    assert whitespace == set(redaction._NON_ASCII_SPACES)
    assert {c for c in map(chr, range(128)) if c.isspace()} - set(" \t\n\r\f\v") == set("\x1c\x1d\x1e\x1f")


def test_secrets_behind_case_folds_and_unicode_spaces_are_redacted() -> None:
    redactor = Redactor()
    assert redactor.redact("paſsword=hunter2") == f"paſsword={REDACTED}"
    assert redactor.redact("api_key\u00a0=\u2003abc123") == f"api_key\u00a0=\u2003{REDACTED}"
    assert redactor.redact("AUTHORIZATION: Token abc") == f"AUTHORIZATION: Token {REDACTED}"


def pending_span(rng: random.Random, rollout: Rollout, sequence: int) -> tuple:
    """A span as emitted, with the attribute values agents produce: strings (some with secrets, some
    long), numbers, nested objects, occasionally a secret-named key or an llm record."""
    values = [random_text(rng), "plain words " * rng.randint(1, 40), "ü" * rng.randint(40, 60), 3, 0.5, True, None]
    values.append({"nested": ["a", 1]})
    keys = ["args", "result", "query", "password" if rng.random() < 0.1 else "note", 7]
    attributes = {rng.choice(keys): rng.choice(values) for _ in range(rng.randint(0, 4))}
    llm = make_llm(5, 3) if rng.random() < 0.1 else None
    if llm is not None and rng.random() < 0.5:
        llm["prompt_text"] = random_text(rng)
    error = rng.choice([None, None, "ValueError: bad", random_text(rng)])
    return (
        f"e-{sequence}",
        *rollout,
        "tool_call",
        "search",
        None,
        sequence,
        1,
        2,
        "ok",
        error,
        None,
        llm,
        "",
        *flat(attributes),
    )


@pytest.mark.parametrize("patterns", [(), (r"^plain.*$", r"acct-\d{6}")])
def test_a_batch_cleaned_at_once_equals_each_span_cleaned_alone(settings: Settings, patterns: tuple) -> None:
    producer = SpanProducer(with_producer(settings, redact_patterns=patterns, max_attribute_bytes=200))
    try:
        rng = random.Random(5)
        rollout: Rollout = ("r", "attempt-0", "t", "agent")
        clean_batches = 0
        for _ in range(2_000):
            spans = [pending_span(rng, rollout, i) for i in range(rng.randint(1, 6))]
            if rng.random() < 0.5:  # batches of ordinary spans, which take the fast path
                spans = [
                    (*s[:ERROR], None, None, None, "", "args", to_text({"q": "plain"}), "result", "ok") for s in spans
                ]
            batch = producer._clean_batch(spans)
            clean_batches += batch is spans
            assert batch == [producer._clean(span) for span in spans]
        if not patterns:  # configured patterns always clean value by value
            assert clean_batches > 500  # the fast path is taken when it may be
    finally:
        producer.close(1)
