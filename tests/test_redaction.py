"""Redaction: every kind of secret of the catalogue is found, ordinary agent text passes unchanged, and the fast
paths change nothing: the cheap pre-scan never misses a detector's match (with the C pre-scan and with the
pure-Python one that stands in for it), and a batch cleaned at once leaves the process byte for byte as if each
span had been cleaned alone.

Recall and false positives are measured on the labelled corpus of tests/secret_corpus.py;
tests/benchmarks/bench_redaction.py measures them on a larger one, with the SDK's throughput."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from boltstream.infra.common.config import Settings
from boltstream.infra.common.topics import ensure_topics
from boltstream.producers import redaction
from boltstream.producers.pending_span import ERROR
from boltstream.producers.redaction import CATALOGUE, REDACTED, Redactor, to_text, url_without_credentials
from boltstream.producers.span_producer import SpanProducer
from tests import secret_corpus
from tests.producer_helpers import at_least, consume, sdk_environment, with_producer
from tests.records import make_llm
from tests.test_span_encoder import Rollout, flat

DETECTORS = {detector.name: detector for detector in CATALOGUE}

#: For each detector: a text it finds a secret in, and the secret (values made up, in the providers' formats).
EXAMPLES = {
    "PEM private key": (
        "-----BEGIN RSA PRIVATE KEY-----\nMIIEow" + "Ab3+" * 14 + "xy\n" + "Qz9/" * 16
        + "\n-----END RSA PRIVATE KEY-----",
        "Qz9/" * 16,
    ),
    "AWS key id with its secret key": (
        "ci-bot,,AKIA2345BCDFGHJKLMNP,wJalrXUtnF3MI/K7MDENG/bPxRfiCY0123456789", "wJalrXUtnF3MI/K7MDENG"
    ),
    "AWS access key id": ("aws_access_key_id=ASIA2345BCDFGHJKLMNP", "ASIA2345BCDFGHJKLMNP"),
    "Anthropic key": ("key: sk-ant-api03-" + "x1Y_" * 23 + "zAA", "x1Y_x1Y_"),
    "OpenAI-style key": ("OPENAI_API_KEY=sk-proj-" + "Ab3-" * 15, "Ab3-Ab3-"),
    "Stripe key": ("stripe.api_key = 'sk_live_" + "51Hx" * 6 + "'", "51Hx51Hx"),
    "Google API key": ("gemini key AIzaSy" + "x7" * 16 + "a in the notebook", "Syx7x7x7"),
    "GitHub token": ("git push with ghp_" + "a1B2" * 9, "a1B2a1B2"),
    "GitLab token": ("CI_TOKEN glpat-" + "xY" * 5 + "0123456789", "xYxYxY0123"),
    "Slack token": ("posting with xoxb-123456789012-1234567890123-" + "a1b2" * 6, "123456789012-1234567890123"),
    "Hugging Face token": ("huggingface-cli login --token hf_abcdefghijklmnopqrstuvwxyzABCDEFGH", "hf_abcdefghij"),
    "Azure AD client secret": ("tenant secret abc8Q~" + "x1y2" * 8 + "zz", "8Q~x1y2x1y2"),
    "JSON web token": ("id token eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0In0.c2lnbmF0dXJlMTIz", "eyJzdWIiOiIxMjM0In0"),
    "password in a URL": ("DATABASE_URL=postgres://app:S3cret-pw@db:5432/orders", "S3cret-pw"),
    "Authorization header": ("Authorization: Token abcd1234efgh", "abcd1234efgh"),
    "Basic credentials": ("sending Basic dXNlcjpwYXNzd29yZA== upstream", "dXNlcjpwYXNzd29yZA"),
    "Bearer token": ("retrying with Bearer 0a1b2c3d4e5f6a7b", "0a1b2c3d4e5f6a7b"),
    "cookie": ("Cookie: sessionid=0a1b2c3d4e; theme=dark", "0a1b2c3d4e"),
    "secret query parameter": ("https://x.blob.core.windows.net/c/f?sv=2022-11-02&sig=AbC123%2Bdef%3D", "AbC123%2B"),
    "password": ("Server=db;User Id=app;Password=Tr0ub4dor3;Encrypt=true", "Tr0ub4dor3"),
    "value of a secret-named key": ('{"client_secret": "0a1b2c3d4e5f6a7b8c9d"}', "0a1b2c3d4e5f6a7b8c9d"),
}  # fmt: skip

#: Ordinary agent text that looks like a secret to a careless eye, and must leave unchanged.
NEAR_MISSES = [
    "Token count: 512. The prompt used 300 tokens; max_tokens=1024.",
    '{"usage": {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19}}',
    '{"token": " unbelievable", "logprob": -0.31, "bytes": [32, 117]}',
    "To reset your password, click 'Forgot password'. A password reset link was sent.",
    "The API uses Bearer authentication; Basic setup takes five minutes.",
    'client = OpenAI(api_key=os.environ["OPENAI_API_KEY"])',
    "client = Client(base_url=url, api_key=api_key, token=self.token)",
    'password = getpass.getpass("Password: ")',
    'curl -H "Authorization: Bearer $GITHUB_TOKEN" https://api.github.com/user',
    "const headers = { Authorization: `Bearer ${token}` };",
    "DB_PASSWORD=${DB_PASSWORD}\nAPI_KEY=<your-api-key>\nSECRET_KEY={{ secrets.SECRET_KEY }}",
    '{"api_key": "YOUR_API_KEY", "password": "********", "secret": false}',
    "interface User { id: string; password: string; token?: string }",
    "fetch(url, { credentials: 'include' })",
    "session_id=3f0c8a4e-9b1d-4f7a-a2c6-5d8e9f0a1b2c idempotency_key=7b2e1c9d",
    "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08  model.safetensors",
    "commit 3f9a2b7c1d4e5f60718293a4b5c6d7e8f9012345",
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==",
    "Models: gpt-4o-mini, claude-3-5-sonnet-20241022, Qwen/Qwen2.5-7B-Instruct; task-17 needs a desk_lamp.",
    "https://example.com/search?q=agents&page=2 and http://localhost:8000/v1 and git@github.com:acme/tools.git",
    "https://user@example.com/repo.git postgresql://db.internal:5432/orders mailto:support@example.com",
    "PWD=/home/agent/work\nHOME=/home/agent",
    "EAST ASIA revenue grew; AWS access key ids start with AKIA.",
    "pk_live_51H8xY2eZvKYlo2C0aBcD is a publishable key; -----BEGIN PUBLIC KEY----- is public too.",
    "ünïcødé ✓ 数学 — keys, tokens and passwords are words, not secrets",
]


def c_pre_scan():
    """The C pre-scan. It is optional only where nothing can compile it: with a compiler here, a missing
    build is a broken install and fails the test instead of skipping it."""
    try:
        from boltstream.producers import _secret_scan
    except ImportError:
        if shutil.which(os.environ.get("CC", "cc")):
            pytest.fail("the C pre-scan is not built although this machine has a C compiler: reinstall")
        pytest.skip("no C compiler on this machine, so the optional C pre-scan is not built")
    return _secret_scan.may_hold_secret


@pytest.fixture(params=["c", "python"])
def pre_scan(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Redactor.may_hold_secret scanning with the C extension, then with its pure-Python stand-in."""
    scan = c_pre_scan() if request.param == "c" else redaction._scan_bytes_in_python
    monkeypatch.setattr(redaction, "_scan_bytes", scan)


def test_every_detector_has_an_example() -> None:
    assert set(EXAMPLES) == set(DETECTORS)


@pytest.mark.usefixtures("pre_scan")
@pytest.mark.parametrize("name", list(EXAMPLES))
def test_each_detector_finds_its_secret(name: str) -> None:
    text, secret = EXAMPLES[name]
    assert secret in text and DETECTORS[name].regex.search(text), "the example shows what the detector finds"
    assert Redactor.may_hold_secret(text)
    redacted = Redactor().redact(text)
    assert secret not in redacted and REDACTED in redacted, redacted


@pytest.mark.parametrize("kind", list(secret_corpus.KINDS))
def test_each_kind_of_secret_is_redacted_wherever_agents_write_it(kind: str) -> None:
    """300 texts of each kind: in prompts, chat messages, JSON tool arguments and results, logs, code."""
    redactor = Redactor()
    caught = total = 0
    for sample in secret_corpus.secret_samples(300, seed=list(secret_corpus.KINDS).index(kind), kinds=(kind,)):
        redacted = redactor.redact(sample.text)
        for planted in sample.planted:
            total += 1
            caught += not any(secret_corpus.survives(secret, redacted) for secret in planted.hidden)
    assert caught / total >= 0.99, f"{kind}: {total - caught} of {total} survived"


def test_recall_and_false_positives_on_the_labelled_corpus() -> None:
    """Recall ≥ 99% of planted secrets; ≤ 0.1% of ordinary texts altered."""
    redactor = Redactor()
    missed: Counter[str] = Counter()
    planted = 0
    for sample in secret_corpus.secret_samples(3000, seed=11):
        redacted = redactor.redact(sample.text)
        for secret in sample.planted:
            assert any(secret_corpus.survives(part, sample.text) for part in secret.hidden)  # really planted
            planted += 1
            missed[secret.kind] += any(secret_corpus.survives(part, redacted) for part in secret.hidden)
    ordinary = secret_corpus.ordinary_samples(10_000, seed=12)
    altered = [sample.text for sample in ordinary if redactor.redact(sample.text) != sample.text]
    assert 1 - missed.total() / planted >= 0.99, missed
    assert len(altered) / len(ordinary) <= 0.001, altered[:5]


def test_a_detector_runs_wherever_it_can_match() -> None:
    """Each detector runs only on text holding one of its triggers: every match in the corpus holds one."""
    texts = [sample.text for sample in secret_corpus.secret_samples(2000, seed=13)]
    texts += [sample.text for sample in secret_corpus.ordinary_samples(2000, seed=14)]
    texts += [text for text, _secret in EXAMPLES.values()]
    for text in texts:
        lowered = redaction._fold(text)
        for detector in CATALOGUE:
            if detector.regex.search(text):
                assert any(trigger in lowered for trigger in detector.triggers), (detector.name, text)


def test_a_detector_tried_only_where_its_matches_start_finds_what_a_search_finds() -> None:
    """Detectors with ``starts`` try their pattern only there: the same result as a search of every position."""
    texts = [sample.text for sample in secret_corpus.secret_samples(2000, seed=17)]
    texts += [sample.text for sample in secret_corpus.ordinary_samples(2000, seed=18)]
    texts += [text for text, _secret in EXAMPLES.values()] + NEAR_MISSES + ["Basic İ dXNlcjpwYXNzd29yZA=="]
    for text in texts:
        lowered = redaction._fold(text)
        for detector in CATALOGUE:
            assert detector.redact(text, lowered) == detector.regex.sub(detector.hide, text), (detector.name, text)


@pytest.mark.usefixtures("pre_scan")
@pytest.mark.parametrize("text", NEAR_MISSES)
def test_near_misses_pass_unchanged(text: str) -> None:
    assert Redactor().redact(text) == text


def test_attributes_named_after_a_secret_are_hidden_whole() -> None:
    hidden = ["token", "auth", "Authorization", "private_key", "bearer", "api_key", "apiKey", "x-api-key", "APIKEY",
              "secret", "client_secret", "password", "db.password", "PASSWD", "credentials", "credential", "cookie",
              "Set-Cookie", "session", "http.request.header.authorization", "github_token", "basicAuth",
              "passphrase"]  # fmt: skip
    kept = ["max_tokens", "token_count", "tokens", "session_id", "author", "oauth_flow", "key", "cache_key",
            "password_reset_url", "secret_name", "cookie_consent", "possession", "tokenizer"]  # fmt: skip
    redactor = Redactor()
    assert redactor.attributes({key: "plain value" for key in hidden}) == dict.fromkeys(hidden, REDACTED)
    assert redactor.attributes({key: "plain value" for key in kept}) == dict.fromkeys(kept, "plain value")


def test_urls_are_recorded_without_credentials() -> None:
    assert url_without_credentials("http://user:pa%40ss@vllm:8000/v1") == "http://vllm:8000/v1"
    assert url_without_credentials("https://token@proxy.example.com") == "https://proxy.example.com"
    assert (
        url_without_credentials("https://gw.example.com/openai?api-version=2024-02-01&api_key=abc&key=def&sig=x%2B")
        == f"https://gw.example.com/openai?api-version=2024-02-01&api_key={REDACTED}&key={REDACTED}&sig={REDACTED}"
    )
    assert url_without_credentials("http://127.0.0.1:8000") == "http://127.0.0.1:8000"


# -- the pre-scan -----------------------------------------------------------------------------------------------

KEYWORDS = ["authorization", "Proxy-Authorization", "api_key", "API-KEY", "apiKey", "x-api-key", "AccountKey",
            "SecretAccessKey", "secret", "client_secret", "secrets", "password", "PASSWD", "passphrase", ";Pwd",
            "access_token", "token", "auth", "basicAuth", "credentials", "cookie", "Set-Cookie", "?key", "&sig",
            "Signature", "Bearer", "bearer", "Basic", "sk-", "sk-ant-api03-", "sk_live_", "rk_test_", "whsec_", "hf_",
            "ghp_", "gho_", "github_pat_", "glpat-", "gldt-", "xoxb-", "xoxp-", "xapp-", "AKIA", "ASIA", "ABIA",
            "ACCA", "AIza", "eyJ", "abc7Q~", "-----BEGIN RSA PRIVATE KEY-----", "https://user:", "@", "\\n", "\\t",
            "paſsword", "authorızation", "tasK", "monkey"]  # fmt: skip
GLUE = [
    "",
    " ",
    "=",
    ":",
    '": "',
    "'='",
    " = ",
    "\u00a0=\u2003",
    "\x1c:",
    "\t:\n",
    "-",
    "_",
    "\x00",
    "…",
    "ü",
    "\\",
    "`",
]
BODIES = ["abcdefghijklmnopqrstuvwxyz0123", "ABCDEFGHIJKLMNOP", "dXNlcjpwYXNzd29yZA==", "x", "tok.en-value/8+",
          "abcdefghijklmnopqrstuvwxyzABCDEFGH", "abcdefgh12.ijklmnop34.sig", "x1y2x1y2x1y2x1y2x1y2x1y2x1y2x1y2zz",
          "Sy" + "x7" * 16 + "a", "pw@host", "sid=abc123; theme=dark", "MIIEow" + "Ab3+" * 12,
          "ABCDEFGHIJKLMNOP,wJalrXUtnF3MI/K7MDENG/bPxRfiCY0123456789",
          " hf_abcdefghijklmnopqrstuvwxyzABCDEFGH "]  # fmt: skip


def random_text(rng: random.Random) -> str:
    words = ["plain", "text", "key", "token", "ask", "desk", "the", "gh", "xox", "sk", "api", "{", "}", '"', "n"]
    parts = []
    for _ in range(rng.randint(1, 8)):
        parts.append(rng.choice(KEYWORDS) if rng.random() < 0.5 else rng.choice(words))
        parts.append(rng.choice(GLUE))
        if rng.random() < 0.5:
            parts.append(rng.choice(BODIES))
    return "".join(parts)


@pytest.mark.usefixtures("pre_scan")
def test_the_cheap_test_finds_every_text_a_detector_matches() -> None:
    rng = random.Random(11)
    matched: Counter[str] = Counter()
    for _ in range(30_000):
        text = random_text(rng)
        found = [detector.name for detector in CATALOGUE if detector.regex.search(text)]
        if found:
            matched.update(found)
            assert Redactor.may_hold_secret(text), (found, text)
    assert set(matched) == set(DETECTORS)  # the generator makes every detector match
    assert matched.total() > 10_000


@pytest.mark.usefixtures("pre_scan")
def test_the_cheap_test_finds_a_secret_at_any_offset() -> None:
    """The pre-scan (producers/_secret_scan.c) looks at 16 bytes at a time and reads ahead: a secret is
    found wherever it starts or ends in a block, and in the bytes after the last whole block."""
    for name, (secret, _hidden) in EXAMPLES.items():
        for before in range(40):
            for after in (0, 1, 5, 17):
                text = "." * before + " " + secret + " " + "." * after
                assert DETECTORS[name].regex.search(text), (name, text)
                assert Redactor.may_hold_secret(text), (name, text)


@pytest.mark.usefixtures("pre_scan")
def test_the_cheap_test_passes_ordinary_text() -> None:
    for text in [
        "The quick brown fox: jumps over the lazy dog; task-17 asked for a desk_lamp, top_k=5",
        '{"query": "what is the weather in Asia?", "top_k": 3, "filters": ["recent", "verified"]}',
        '{"usage": {"prompt_tokens": 12, "completion_tokens": 7}, "cache_key": "user:1", "max_tokens": 64}',
        "ünïcødé ✓ 数学 — keys, tokens and passwords are words, not secrets",
    ]:
        assert not Redactor.may_hold_secret(text)
        assert Redactor().redact(text) == text


def test_the_python_pre_scan_answers_as_the_c_one() -> None:
    """Any bytes, not only the texts of secrets: key words in any case next to the signs, spaces, quotes, escapes
    and arbitrary bytes, at lengths around the C scan's 16-byte blocks and its 5-byte read-ahead."""
    c_scan = c_pre_scan()
    rng = random.Random(3)
    fragments = [b"key", b"api", b"access", b"secret", b"secrets", b"password", b"pwd", b"token", b"tokens", b"auth",
                 b"cookie", b"cookies", b"sig", b"signature", b"authorization", b"sk", b"rk", b"hf", b"xox", b"b",
                 b"gh", b"p", b"gl", b"pat", b"github", b"whsec", b"xapp", b"bearer", b"basic", b"-----begin", b"-----",
                 b"://", b"@", b"AKIA", b"ASIA", b"AIza", b"ACCA", b"eyJ", b"Q~", b"7", b"\\n", b"\\", b"n", b"t", b"?",
                 b"&", b":", b"=", b"-", b"_", b" ", b".", b'"', b"'", b"`", b"\t", b"\r", b"\x1c", b"\x1f", b"\x1b",
                 b"a", b"9", b"\x00", b"\xc4\xb1", b"\xff", b"/", b"#"]  # fmt: skip
    answers = []
    for _ in range(200_000):
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
        "agl.emit_tool_call('http', args='Authorization: Bearer abcdefgh123',\n"
        "                   result='used sk-proj-abcdefghijklmnop12')\n"
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
    assert redactor.redact("api_key\u00a0=\u2003abc123def456") == f"api_key\u00a0=\u2003{REDACTED}"
    assert redactor.redact("AUTHORIZATION: Token abcd1234") == f"AUTHORIZATION: Token {REDACTED}"
    assert redactor.redact("ünï AKIA2345BCDFGHJKLMNP") == f"ünï {REDACTED}"


# -- a batch at once ---------------------------------------------------------------------------------------------

#: Texts of the corpus, with and without secrets, for the spans of the batch test.
CORPUS_TEXTS = [sample.text for sample in secret_corpus.secret_samples(100, seed=15)]
CORPUS_TEXTS += [sample.text for sample in secret_corpus.ordinary_samples(100, seed=16)]


def pending_span(rng: random.Random, rollout: Rollout, sequence: int) -> tuple:
    """A span as emitted, with the attribute values agents produce: strings (some with secrets, some
    long), numbers, nested objects, occasionally a secret-named key or an llm record."""
    values = [
        random_text(rng),
        rng.choice(CORPUS_TEXTS),
        "plain words " * rng.randint(1, 40),
        "ü" * rng.randint(40, 60),
    ]
    values += [3, 0.5, True, None, {"nested": ["a", 1]}]
    keys = ["args", "result", "query", rng.choice(["password", "token", "note"]) if rng.random() < 0.1 else "note", 7]
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
