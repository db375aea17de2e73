"""A labelled corpus of agent text for the redactor, generated from a seed.

* :func:`secret_samples`: texts of the kinds agents produce (prompts, chat messages, tool arguments as JSON,
  tool results, logs, code, config and env files, shell commands, answers) with secrets planted in them, each
  labelled with its kind and the parts of it that must not survive redaction;
* :func:`ordinary_samples`: the same kinds of text without secrets, full of near-misses: UUIDs, hashes, git
  SHAs, base64 images, long hex ids, model names, token counts and logprobs, "password reset", Bearer and
  Basic in prose, secret-named keys given references or placeholders, URLs without credentials.

Secret formats are the providers' (prefixes, lengths, alphabets); values are random, so no test can pass by
knowing them. ``KINDS`` names every kind of planted secret.
"""

from __future__ import annotations

import base64
import json
import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote

ALNUM = string.ascii_letters + string.digits
BASE64 = ALNUM + "+/"
BASE64URL = ALNUM + "-_"
HEX = "0123456789abcdef"
UPPER_BASE32 = string.ascii_uppercase + "234567"


@dataclass(frozen=True)
class Planted:
    kind: str
    hidden: tuple[str, ...]  # the parts that must be gone from the redacted text


@dataclass(frozen=True)
class Sample:
    text: str
    planted: tuple[Planted, ...]  # empty for ordinary text


def _chars(rng: random.Random, alphabet: str, count: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(count))


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _password(rng: random.Random) -> str:
    """A password as people and password managers make them: words and digits, or random characters."""
    if rng.random() < 0.4:
        words = ["Summer", "dragon", "Coffee", "purple", "Falcon", "monkey", "Winter", "tiger", "Rocket", "bread"]
        return rng.choice(words) + rng.choice(words).lower() + str(rng.randint(1, 9999)) + rng.choice(["", "!", "#"])
    return _chars(rng, ALNUM, 1) + _chars(rng, ALNUM * 4 + "!@#%^*-_.~+", rng.randint(9, 23))


def _host(rng: random.Random) -> str:
    return rng.choice(["db", "pg-primary", "orders-db", "cache", "mq", "10.0.3.17", "analytics"]) + rng.choice(
        ["", ".internal", ".prod.example.com", ".eu-west-1.rds.amazonaws.com"]
    )


# -- secrets: each generator returns (fragment as it is written, parts to hide) ------------------------------------

Secret = tuple[str, tuple[str, ...]]


def _written(rng: random.Random, templates: list[str], **secrets: str) -> Secret:
    """One of ``templates`` filled in with ``secrets``; those it holds are to hide."""
    template = rng.choice(templates)
    return template.format(**secrets), tuple(value for name, value in secrets.items() if f"{{{name}}}" in template)


def _openai(rng: random.Random) -> str:
    half = rng.choice([58, 74])
    return rng.choice(
        [
            f"sk-proj-{_chars(rng, BASE64URL, half)}T3BlbkFJ{_chars(rng, BASE64URL, half)}",
            f"sk-svcacct-{_chars(rng, BASE64URL, half)}T3BlbkFJ{_chars(rng, BASE64URL, half)}",
            f"sk-{_chars(rng, ALNUM, 20)}T3BlbkFJ{_chars(rng, ALNUM, 20)}",
            f"sk-or-v1-{_chars(rng, HEX, 64)}",  # OpenRouter
            f"sk-{_chars(rng, HEX, 32)}",  # DeepSeek
        ]
    )


def _anthropic(rng: random.Random) -> str:
    kind = rng.choice(["api03", "api03", "admin01"])
    return f"sk-ant-{kind}-{_chars(rng, BASE64URL, 93)}AA"


def _aws_key_id(rng: random.Random) -> str:
    return rng.choice(["AKIA", "AKIA", "ASIA"]) + _chars(rng, UPPER_BASE32, 16)


def _huggingface(rng: random.Random) -> str:
    return "hf_" + _chars(rng, string.ascii_letters, 34)


def _google_api_key(rng: random.Random) -> str:
    return "AIza" + _chars(rng, BASE64URL, 35)


def _github(rng: random.Random) -> str:
    if rng.random() < 0.3:
        return f"github_pat_{_chars(rng, ALNUM, 22)}_{_chars(rng, ALNUM, 59)}"
    return rng.choice(["ghp_", "ghp_", "gho_", "ghs_", "ghu_"]) + _chars(rng, ALNUM, 36)


def _gitlab(rng: random.Random) -> str:
    return rng.choice(["glpat-", "glpat-", "gldt-", "glrt-"]) + _chars(rng, BASE64URL, 20)


def _slack(rng: random.Random) -> str:
    digits = string.digits
    return rng.choice(
        [
            f"xoxb-{_chars(rng, digits, 12)}-{_chars(rng, digits, 13)}-{_chars(rng, ALNUM, 24)}",
            f"xoxp-{_chars(rng, digits, 12)}-{_chars(rng, digits, 12)}-{_chars(rng, digits, 13)}-"
            + _chars(rng, HEX, 32),
            f"xapp-1-A{_chars(rng, UPPER_BASE32, 10)}-{_chars(rng, digits, 13)}-{_chars(rng, HEX, 64)}",
        ]
    )


def _stripe(rng: random.Random) -> str:
    prefix = rng.choice(["sk_live_", "sk_live_", "rk_live_", "sk_test_"])
    if rng.random() < 0.2:
        return "whsec_" + _chars(rng, ALNUM, 32)
    return prefix + _chars(rng, ALNUM, rng.choice([24, 99]))


def _jwt(rng: random.Random) -> str:
    header = {"alg": rng.choice(["HS256", "RS256", "ES256"]), "typ": "JWT"}
    claims = {
        "sub": str(rng.randint(10**8, 10**9)),
        "iss": rng.choice(["https://auth.example.com/", "https://login.microsoftonline.com/tenant/v2.0"]),
        "exp": rng.randint(1_700_000_000, 1_800_000_000),
        "scope": rng.choice(["read:orders", "openid profile email", "api://default/.default"]),
    }
    signature = _b64url(rng.randbytes(256 if header["alg"] == "RS256" else 32))
    return ".".join([_b64url(json.dumps(header).encode()), _b64url(json.dumps(claims).encode()), signature])


def _azure_client_secret(rng: random.Random) -> str:
    return _chars(rng, ALNUM + "_~.", 3) + rng.choice("0123456789") + "Q~" + _chars(rng, ALNUM + "_~.-", 34)


def _pem_lines(rng: random.Random) -> list[str]:
    body = _b64(rng.randbytes(rng.choice([48 * 8, 48 * 20])))
    return [body[i : i + 64] for i in range(0, len(body), 64)]


# Token-shaped secrets: recognised by their own form, wherever they stand.
TOKEN_KINDS: dict[str, tuple[Callable[[random.Random], str], tuple[str, ...]]] = {
    "openai_key": (_openai, ("OPENAI_API_KEY", "openai_api_key", "LLM_KEY")),
    "anthropic_key": (_anthropic, ("ANTHROPIC_API_KEY", "CLAUDE_KEY")),
    "aws_access_key_id": (_aws_key_id, ("AWS_ACCESS_KEY_ID", "aws_access_key_id")),
    "google_api_key": (_google_api_key, ("GOOGLE_API_KEY", "GEMINI_API_KEY", "MAPS_KEY")),
    "github_token": (_github, ("GITHUB_TOKEN", "GH_TOKEN")),
    "huggingface_token": (_huggingface, ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")),
    "gitlab_token": (_gitlab, ("GITLAB_TOKEN", "CI_DEPLOY_TOKEN")),
    "slack_token": (_slack, ("SLACK_BOT_TOKEN", "SLACK_APP_TOKEN")),
    "stripe_key": (_stripe, ("STRIPE_SECRET_KEY", "STRIPE_KEY")),
    "jwt": (_jwt, ("ID_TOKEN", "JWT")),
    "azure_client_secret": (_azure_client_secret, ("AZURE_CLIENT_SECRET", "clientSecret")),
}

#: How agents' text holds a token: alone in prose, in env files, JSON, code, headers, URLs, markdown.
_TOKEN_CONTEXTS = (
    "{t}",
    "the key is {t} — is it still valid?",
    "export {env}={t}",
    "{env}={t}",
    '{{"{env}": "{t}"}}',
    "{env}: {t}",
    'client = Client(api_key="{t}")',
    "Authorization: Bearer {t}",
    "`{t}`",
    "({t})",
    "'{t}',",
    "[{t}]",
    "{t}.",
    "token {t} expired at 12:00",
    "https://api.example.com/v1/items?token={t}&page=2",
)


def _token_secret(kind: str) -> Callable[[random.Random], Secret]:
    make, envs = TOKEN_KINDS[kind]

    def planted(rng: random.Random) -> Secret:
        token = make(rng)
        return rng.choice(_TOKEN_CONTEXTS).format(t=token, env=rng.choice(envs)), (token,)

    return planted


def _aws_secret_key(rng: random.Random) -> Secret:
    return _written(
        rng,
        [
            "aws_secret_access_key = {s}",
            "AWS_SECRET_ACCESS_KEY={s}",
            'export AWS_SECRET_ACCESS_KEY="{s}"',
            '"SecretAccessKey": "{s}"',
            "secret_access_key: {s}",
            's3 = boto3.client("s3", aws_access_key_id="{k}", aws_secret_access_key="{s}")',
            "User name,Password,Access key ID,Secret access key\nci-bot,,{k},{s}",
            "[default]\naws_access_key_id = {k}\naws_secret_access_key = {s}",
            "key id {k} / secret {s}",
            '{{"AccessKeyId": "{k}", "SecretAccessKey": "{s}", "SessionToken": null}}',
        ],
        k=_aws_key_id(rng),
        s=_chars(rng, BASE64, 40),
    )


def _gcp_service_account(rng: random.Random) -> Secret:
    lines = _pem_lines(rng)
    key = "-----BEGIN PRIVATE KEY-----\n" + "\n".join(lines) + "\n-----END PRIVATE KEY-----\n"
    project = rng.choice(["agent-prod", "rl-training-4711", "acme-data"])
    document = {
        "type": "service_account",
        "project_id": project,
        "private_key_id": _chars(rng, HEX, 40),
        "private_key": key,
        "client_email": f"trainer@{project}.iam.gserviceaccount.com",
        "client_id": _chars(rng, string.digits, 21),
        "token_uri": "https://oauth2.googleapis.com/token",
    }
    return json.dumps(document, indent=rng.choice([None, 2])), tuple(lines)


def _azure_storage(rng: random.Random) -> Secret:
    account = rng.choice(["agentlogs", "rlcheckpoints", "acmedata01"])
    key = _b64(rng.randbytes(64))
    shared_key = _b64(rng.randbytes(32))
    sig = _b64(rng.randbytes(32))
    fragments = [
        (
            f"DefaultEndpointsProtocol=https;AccountName={account};AccountKey={key};EndpointSuffix=core.windows.net",
            key,
        ),
        (f"AZURE_STORAGE_KEY={key}", key),
        (f'"accountKey": "{key}"', key),
        (
            f"Endpoint=sb://{account}.servicebus.windows.net/;SharedAccessKeyName=RootManageSharedAccessKey;"
            f"SharedAccessKey={shared_key}",
            shared_key,
        ),
        (
            f"https://{account}.blob.core.windows.net/runs/episode-7.jsonl?sv=2022-11-02&ss=b&srt=o&sp=r"
            f"&se=2025-06-01T00:00:00Z&spr=https&sig={quote(sig, safe='')}",
            quote(sig, safe=""),
        ),
    ]
    fragment, hidden = rng.choice(fragments)
    return fragment, (hidden,)


def _pem_private_key(rng: random.Random) -> Secret:
    label = rng.choice(["RSA PRIVATE KEY", "EC PRIVATE KEY", "OPENSSH PRIVATE KEY", "PRIVATE KEY"])
    lines = _pem_lines(rng)
    if rng.random() < 0.15:  # a tool result cut short in the middle of the key
        kept = lines[: len(lines) // 2]
        return f"-----BEGIN {label}-----\n" + "\n".join(kept) + "\n…(output truncated)", tuple(kept)
    block = f"-----BEGIN {label}-----\n" + "\n".join(lines) + f"\n-----END {label}-----"
    return rng.choice(["{b}", "$ cat ~/.ssh/id_rsa\n{b}", 'key = """{b}"""', "private_key: |\n  {b}"]).format(
        b=block
    ), tuple(lines)


def _basic_auth(rng: random.Random) -> Secret:
    user = rng.choice(["admin", "svc-agent", "jenkins", "alice@example.com", "api"])
    return _written(
        rng,
        [
            "Authorization: Basic {v}",
            "curl -H 'Authorization: Basic {v}' https://registry.example.com/v2/_catalog",
            '{{"headers": {{"Authorization": "Basic {v}"}}}}',
            "Proxy-Authorization: Basic {v}",
            "DEBUG sending credentials Basic {v} to upstream",
            'auth_header = "Basic {v}"',
        ],
        v=_b64(f"{user}:{_password(rng)}".encode()),
    )


def _bearer_token(rng: random.Random) -> Secret:
    token = rng.choice(
        [
            "ya29." + _chars(rng, BASE64URL, 120),
            _chars(rng, HEX, 40),
            _chars(rng, ALNUM, 32),
            _chars(rng, ALNUM, 43) + "." + _chars(rng, ALNUM, 12),
        ]
    )
    return _written(
        rng,
        [
            "Authorization: Bearer {t}",
            'curl -H "Authorization: Bearer {t}" https://api.example.com/v2/orders',
            '{{"Authorization": "Bearer {t}", "Accept": "application/json"}}',
            "headers = {{'Authorization': 'Bearer {t}'}}",
            "retrying with Bearer {t}",
            "AUTH=Bearer {t}",
        ],
        t=token,
    )


def _url_password(rng: random.Random) -> Secret:
    password = _password(rng)
    encoded = quote(password, safe="!*-_.~+")
    user = rng.choice(["app", "postgres", "admin", "agent_rw", "oauth2", "x-access-token", "deploy"])
    scheme, tail = rng.choice(
        [
            ("postgresql", ":5432/orders"),
            ("postgres", "/analytics?sslmode=require"),
            ("mysql+pymysql", ":3306/app"),
            ("mongodb+srv", "/?retryWrites=true&w=majority"),
            ("redis", ":6379/0"),
            ("amqp", ":5672/%2F"),
            ("https", "/acme/agent-tools.git"),
            ("http", ":3128"),
        ]
    )
    url = f"{scheme}://{user}:{encoded}@{_host(rng)}{tail}"
    fragment = rng.choice(
        [
            "{u}",
            "DATABASE_URL={u}",
            'engine = create_engine("{u}")',
            "git remote add origin {u}",
            "sqlalchemy.exc.OperationalError: could not connect to {u}",
            "https_proxy={u}",
        ]
    )
    return fragment.format(u=url), (encoded,)


def _connection_string_password(rng: random.Random) -> Secret:
    password = _password(rng).replace(";", "")
    user = rng.choice(["sa", "app_user", "reporting"])
    fragment = rng.choice(
        [
            "Server=tcp:{h}.database.windows.net,1433;Initial Catalog=orders;Persist Security Info=False;"
            "User ID={u};Password={p};MultipleActiveResultSets=False;Encrypt=True;",
            "Data Source={h};Initial Catalog=Agents;User Id={u};Password={p};",
            "Driver={{ODBC Driver 18 for SQL Server}};Server={h};Database=rl;Uid={u};Pwd={p};",
            '"ConnectionStrings": {{"Default": "Server={h};Database=app;User Id={u};Password={p};"}}',
        ]
    )
    return fragment.format(h=_host(rng), u=user, p=password), (password,)


def _secret_named_value(rng: random.Random) -> Secret:
    name = rng.choice(
        [
            "api_key",
            "API_KEY",
            "apiKey",
            "x-api-key",
            "client_secret",
            "clientSecret",
            "auth_token",
            "access_token",
            "refresh_token",
            "HF_TOKEN",
            "secret",
            "SECRET_KEY",
            "webhook_secret",
            "signing_key",
            "encryption_key",
            "credentials",
            "token",
            "session_token",
            "Ocp-Apim-Subscription-Key",
        ]
    )
    value = rng.choice([_chars(rng, HEX, 32), _chars(rng, ALNUM, rng.randint(20, 48)), _b64(rng.randbytes(33))])
    form = rng.choice(
        [
            "{n}={v}",
            "{n}: {v}",
            '"{n}": "{v}"',
            "{n} = '{v}'",
            '\\"{n}\\": \\"{v}\\"',
            "--{n}={v}",
            "{n} => '{v}'",
            "?page=2&{n}={v}&sort=asc",
        ]
    )
    return form.format(n=name, v=value), (value,)


def _password_assignment(rng: random.Random) -> Secret:
    password = _password(rng)
    name = rng.choice(["password", "PASSWORD", "DB_PASSWORD", "passwd", "db.password", "Password", "PGPASSWORD"])
    form = rng.choice(['{n}="{p}"', "{n}={p}", "{n}: {p}", '"{n}": "{p}"', "{n} = '{p}'", '\\"{n}\\": \\"{p}\\"'])
    return form.format(n=name, p=password), (password,)


def _cookie(rng: random.Random) -> Secret:
    return _written(
        rng,
        [
            "Cookie: sessionid={s}; csrftoken={c}",
            "Set-Cookie: session={s}; Path=/; HttpOnly; Secure; SameSite=Lax",
            '{{"cookie": "sessionid={s}; csrftoken={c}"}}',
            "cookies = 'sid={s}'",
        ],
        s=_chars(rng, ALNUM, 32),
        c=_chars(rng, HEX, 40),
    )


def _query_secret(rng: random.Random) -> Secret:
    key_id, signature = _aws_key_id(rng), _chars(rng, HEX, 64)
    api_key = _chars(rng, HEX, 32)
    fragments = [
        (
            f"https://agent-artifacts.s3.amazonaws.com/run-17/trace.json?X-Amz-Algorithm=AWS4-HMAC-SHA256"
            f"&X-Amz-Credential={key_id}%2F20240501%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=20240501T120000Z"
            f"&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&X-Amz-Signature={signature}",
            (key_id, signature),
        ),
        (f"GET https://api.weather.example/v1/forecast?city=Berlin&key={api_key}", (api_key,)),
        (
            f"https://cdn.example.com/video.mp4?Expires=1718000000&Signature={signature}&Key-Pair-Id=K2JCJMDEHXQW5F",
            (signature,),
        ),
    ]
    fragment, hidden = rng.choice(fragments)
    return fragment, hidden


KINDS: dict[str, Callable[[random.Random], Secret]] = {
    **{kind: _token_secret(kind) for kind in TOKEN_KINDS},
    "aws_secret_access_key": _aws_secret_key,
    "gcp_service_account_key": _gcp_service_account,
    "azure_storage_key": _azure_storage,
    "pem_private_key": _pem_private_key,
    "basic_auth": _basic_auth,
    "bearer_token": _bearer_token,
    "url_password": _url_password,
    "connection_string_password": _connection_string_password,
    "secret_named_value": _secret_named_value,
    "password_assignment": _password_assignment,
    "cookie": _cookie,
    "query_secret": _query_secret,
}


# -- ordinary agent text ---------------------------------------------------------------------------------------

_WORDS = (  # noqa: SIM905 (reads as the prose it imitates)
    "the agent retried the search with a narrower query and found three matching orders for the customer "
    "before it summarised the refund policy then it checked the shipping status opened the ticket and "
    "updated the spreadsheet with totals per region while the evaluator scored each step of the rollout"
).split()
_MODELS = (
    "gpt-4o-mini",
    "gpt-4.1",
    "o3-mini",
    "claude-3-5-sonnet-20241022",
    "claude-sonnet-4-20250514",
    "Qwen/Qwen2.5-7B-Instruct",
    "meta-llama/Llama-3.1-8B-Instruct",
    "text-embedding-3-small",
    "gemini-1.5-pro-002",
    "mistral-large-2411",
    "tiny-v3",
)


def _uuid(rng: random.Random) -> str:
    hexes = _chars(rng, HEX, 32)
    return f"{hexes[:8]}-{hexes[8:12]}-4{hexes[13:16]}-a{hexes[17:20]}-{hexes[20:]}"


def prose(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(words))


def _ordinary_fragment(rng: random.Random) -> str:
    """One piece of ordinary agent text, often a near-miss of a secret."""
    uuid, sha, model = _uuid(rng), _chars(rng, HEX, 64), rng.choice(_MODELS)
    n = rng.randint(1, 4096)
    fragments = [
        lambda: prose(rng, rng.randint(8, 40)),
        lambda: f"Token count: {n}. The prompt used {n // 2} tokens and the completion {n // 3}.",
        lambda: f'{{"usage": {{"prompt_tokens": {n}, "completion_tokens": {n // 7}, "total_tokens": {n + n // 7}}}}}',
        lambda: f'{{"model": "{model}", "max_tokens": {n}, "temperature": 0.7, "top_p": 0.95}}',
        lambda: json.dumps(
            {
                "logprobs": {
                    "content": [
                        {"token": t, "logprob": -rng.random(), "bytes": list(t.encode())}
                        for t in ("Hello", " world", "ization", " unbelievable", "!")
                    ]
                }
            }
        ),
        lambda: f'{{"token": "{rng.choice(["the", " Paris", "<|im_end|>", "ing", "Ġcat"])}", "logprob": -0.0{n}}}',
        lambda: (
            "To reset your password, open Settings → Security and click 'Forgot password'. A password reset "
            "link is valid for 24 hours."
        ),
        lambda: "Password requirements: at least 12 characters, one digit, one symbol.",
        lambda: "The API uses Bearer authentication: send the access token in the Authorization header.",
        lambda: "Basic setup takes five minutes; Basic authentication is disabled by default.",
        lambda: "Use HTTP Basic auth only over TLS. The Bearer token expires after one hour.",
        lambda: f"session_id={uuid} request_id={_uuid(rng)} trace_id={_chars(rng, HEX, 32)}",
        lambda: f'{{"session_id": "{uuid}", "idempotency_key": "{_uuid(rng)}", "cache_key": "user:{n}:profile"}}',
        lambda: (
            f"commit {_chars(rng, HEX, 40)}\nAuthor: Dana Reyes <dana@example.com>\nDate:   Tue May 7 10:12:44 2024"
        ),
        lambda: f"sha256:{sha}  model.safetensors",
        lambda: f"Downloaded {model} (revision {_chars(rng, HEX, 40)}) to /models/{uuid}",
        lambda: f'<img src="data:image/png;base64,{_b64(rng.randbytes(rng.randint(300, 1500)))}">',
        lambda: f'{{"image": "{_b64(rng.randbytes(600))}", "mime": "image/jpeg"}}',
        lambda: f"order id {_chars(rng, HEX, 24)} / invoice {_chars(rng, string.ascii_uppercase + string.digits, 20)}",
        lambda: f"object id {_chars(rng, HEX, 48)} stored at s3://agent-runs/{uuid}/trace.parquet",
        lambda: 'client = OpenAI(api_key=os.environ["OPENAI_API_KEY"])',
        lambda: 'api_key = os.getenv("ANTHROPIC_API_KEY")',
        lambda: "token = tokenizer.encode(text)\ntokens = token[:max_tokens]",
        lambda: "def login(username: str, password: str) -> Session:\n    token = self._auth.token_for(username)",
        lambda: "client = Client(base_url=url, api_key=api_key, token=token)",
        lambda: 'password = getpass.getpass("Password: ")',
        lambda: "const headers = { Authorization: `Bearer ${token}` };",
        lambda: 'curl -H "Authorization: Bearer $GITHUB_TOKEN" https://api.github.com/user',
        lambda: 'headers={"Authorization": f"Bearer {token}"}',
        lambda: "DB_PASSWORD=${DB_PASSWORD}\nAPI_KEY=<your-api-key>\nSECRET_KEY={{ secrets.SECRET_KEY }}",
        lambda: (
            "env:\n  - name: DB_PASSWORD\n    valueFrom:\n      secretKeyRef:\n        name: db-creds\n"
            "        key: password"
        ),
        lambda: "spec:\n  tls:\n    - hosts: [api.example.com]\n      secretName: api-tls",
        lambda: "interface User { id: string; email: string; password: string; token?: string }",
        lambda: '{"type": "object", "properties": {"password": {"type": "string", "minLength": 12}}}',
        lambda: f"https://example.com/search?q={rng.choice(_WORDS)}&page={n}&sort=desc",
        lambda: (
            "See https://medium.com/@dana/how-we-ship-agents-3f9a2 and https://en.wikipedia.org/wiki/Key_(cryptography)"
        ),
        lambda: f"http://localhost:{rng.randint(1024, 65535)}/v1/chat/completions",
        lambda: "postgresql://db.internal:5432/orders?sslmode=require",
        lambda: "git clone git@github.com:acme/agent-tools.git && cd agent-tools",
        lambda: "https://user@example.com/repo.git (the user name only; the credential helper supplies the rest)",
        lambda: "mailto:support@example.com?subject=Refund",
        lambda: f"GET /api/v2/orders?page={n}&per_page=50 200 OK {n % 300} ms",
        lambda: f"2024-05-01T12:{n % 60:02d}:07Z INFO [worker-3] task-{n} done in {n / 1000:.2f}s",
        lambda: (
            "Traceback (most recent call last):\n  File \"agent.py\", line 42, in run\n    raise KeyError('token')\n"
            "KeyError: 'token'"
        ),
        lambda: "The author: Dana Reyes. The session lasted 40 minutes; the authentication step failed twice.",
        lambda: "Keyboard shortcuts: press Ctrl+K to search. The primary key is (tenant_id, order_id).",
        lambda: f"task-{n} asked for a desk_lamp and a risk-free sk-learn tutorial (scikit-learn {n % 9}.{n % 7})",
        lambda: f"EAST ASIA revenue grew {n % 40}%; ASIA-PACIFIC and AKIA Corp. are listed.",
        lambda: f"Model {model} scored {rng.random():.3f} on the eval; next: {rng.choice(_MODELS)}.",
        lambda: "ünïcødé ✓ 数学 — ключи и токены; パスワードをリセットしてください。 🙂",
        lambda: f'{{"tool": "search", "args": {{"query": "{prose(rng, 5)}", "top_k": {n % 20}}}}}',
        lambda: f"SELECT id, token_count, created_at FROM spans WHERE rollout_id = '{uuid}' LIMIT {n};",
        lambda: f"| rollout | reward | tokens |\n|---|---|---|\n| {uuid[:8]} | {rng.random():.2f} | {n} |",
        lambda: "Public key: -----BEGIN PUBLIC KEY----- (the certificate chain follows: -----BEGIN CERTIFICATE-----)",
        lambda: f'eyJ0eXAiOiJ0ZXN0In0 is base64 of {{"typ":"test"}}; ETag: W/"{_chars(rng, HEX, 16)}"',
        lambda: "pk_live_51H8xY2eZvKYlo2C0aBcD is Stripe's publishable key format (public by design).",
        lambda: f"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI{_chars(rng, BASE64, 43)} dana@laptop",
        lambda: "Rotate the API key every 90 days; store the secret in the vault, never the repository.",
        lambda: f"x-request-id: {uuid}\ncontent-type: application/json\ncontent-length: {n}",
        lambda: "PWD=/home/agent/work\nHOME=/home/agent\nPATH=/usr/local/bin:/usr/bin",
        lambda: "pass: 12, fail: 0, skipped: 3",
        lambda: '{"api_key": "YOUR_API_KEY", "password": "********", "secret": false, "token_type": "bearer"}',
        lambda: (
            "steps:\n  - uses: actions/checkout@v4\n    with:\n      token: ${{ secrets.GITHUB_TOKEN }}\n"
            "    secrets: inherit"
        ),
        lambda: "fetch(url, { credentials: 'include', headers: { 'Content-Type': 'application/json' } })",
        lambda: f"POST /oauth/token grant_type=client_credentials&client_id={uuid}&scope=read 200",
        lambda: f"GET /authorize?response_type=code&redirect_uri=https://app.example.com/cb&state={sha[:16]} 302",
        lambda: "hashed_password = bcrypt.hashpw(password.encode(), bcrypt.gensalt())",
        lambda: f'{{"user": "dana", "password_hash": "$2b$12${_chars(rng, BASE64, 53)}"}}',
        lambda: '<input type="password" name="password" autocomplete="current-password">',
        lambda: "Authorization: Bearer <ACCESS_TOKEN>",
        lambda: '{"access_token": "string", "token_type": "bearer", "expires_in": 3600}',
        lambda: "kind: Secret\ntype: kubernetes.io/service-account-token",
        lambda: f"auth=ok user=bob latency={n}ms",
        lambda: "export HF_HOME=/data/hf TRANSFORMERS_CACHE=/data/hf",
        lambda: "Enter passphrase for key '/home/agent/.ssh/id_ed25519':",
        lambda: "sudo: a password is required. API key: not set.",
        lambda: "api_key: Optional[str] = None\nsecret_key = settings.SECRET_KEY\nSECRET_KEY = get_random_secret_key()",
        lambda: 'password=os.environ.get("DB_PASSWORD", "")',
        lambda: "session = requests.Session()\nsession.cookies.update({'theme': 'dark'})",
        lambda: f'{{"cookie_consent": "accepted", "tokens_per_second": {rng.random() * 90:.1f}}}',
        lambda: f"generate(max_new_tokens={n}, do_sample=False)",
        lambda: "https://docs.google.com/document/d/1W7KCxOxP-1Fy5EyF2lbJGE2WuKmu5v0suYqoHas1jRM/edit",
        lambda: "arn:aws:iam::123456789012:role/agent-runner (AWS access key ids start with AKIA)",
        lambda: "X-GitHub-Event: push\nX-Hub-Signature-256: sha256=" + sha,
        lambda: '{"x-api-key": "[REDACTED]", "Authorization": "[REDACTED]"}',
        lambda: f"The page token for the next page is in `next_page_token`; there are {n} results.",
    ]
    return rng.choice(fragments)()


# -- carriers: how a fragment lands in a span's text --------------------------------------------------------------


def _carry(rng: random.Random, fragments: list[str]) -> str:
    """``fragments`` (with ordinary text around them) as one text of a kind an agent produces."""
    parts = []
    for fragment in fragments:
        parts += [_ordinary_fragment(rng) for _ in range(rng.randint(0, 2))]
        parts.append(fragment)
    parts += [_ordinary_fragment(rng) for _ in range(rng.randint(0, 2))]
    body = rng.choice(["\n", " ", "\n\n"]).join(parts)
    carrier = rng.choice(
        [
            "prose",
            "chat",
            "tool_args",
            "tool_result",
            "log",
            "markdown",
            "answer",
        ]
    )
    if carrier == "chat":
        messages = [
            {"role": "system", "content": "You are a careful operations agent."},
            {"role": "user", "content": body},
        ]
        return json.dumps(messages, ensure_ascii=rng.random() < 0.5)
    if carrier == "tool_args":
        return json.dumps({"command": body, "timeout": rng.randint(5, 120)})
    if carrier == "tool_result":
        return json.dumps({"stdout": body, "stderr": "", "exit_code": 0})
    if carrier == "log":
        return "\n".join(f"2024-05-01T12:00:{i:02d}Z INFO agent: {line}" for i, line in enumerate(body.split("\n")))
    if carrier == "markdown":
        return f"Here is what I found:\n\n```\n{body}\n```\n"
    if carrier == "answer":
        return f"Sure — I checked the configuration. {body} Let me know if you need anything else."
    return body


def secret_samples(count: int, seed: int = 1, kinds: tuple[str, ...] = tuple(KINDS)) -> list[Sample]:
    """``count`` texts, each with one to three secrets of ``kinds`` planted in it (every kind equally often)."""
    rng = random.Random(seed)
    samples = []
    for index in range(count):
        chosen = [kinds[index % len(kinds)], *rng.choices(kinds, k=rng.choice([0, 0, 1, 2]))]
        planted, fragments = [], []
        for kind in chosen:
            fragment, hidden = KINDS[kind](rng)
            fragments.append(fragment)
            planted.append(Planted(kind, hidden))
        samples.append(Sample(_carry(rng, fragments), tuple(planted)))
    return samples


def ordinary_samples(count: int, seed: int = 2) -> list[Sample]:
    """``count`` texts of ordinary agent work: no secret, many near-misses."""
    rng = random.Random(seed)
    return [Sample(_carry(rng, [_ordinary_fragment(rng)]), ()) for _ in range(count)]


def written_forms(secret: str) -> tuple[str, ...]:
    """The ways ``secret`` is written in a text: as it is, JSON-escaped, JSON-escaped twice (JSON in a JSON string)."""
    once = json.dumps(secret)[1:-1]
    return secret, once, json.dumps(once)[1:-1]


def survives(secret: str, text: str) -> bool:
    """True when ``secret`` can still be read in ``text``."""
    return any(form in text for form in written_forms(secret))
