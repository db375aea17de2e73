"""What leaves the process: attribute values typed or turned into strings, secrets redacted, oversize values truncated.

Runs on the SpanProducer's background thread, never on the agent's. Secrets are replaced by
``[REDACTED]``: what a detector of :data:`CATALOGUE` finds (provider keys and tokens, private keys,
credentials in headers, URLs and connection strings, values of secret-named keys), the whole values of
attributes whose key names a secret (:meth:`Redactor.is_secret_key`), and every match of the configured
``producer.redact_patterns``. Values longer than ``producer.max_attribute_bytes`` (UTF-8) are cut and end
with ``…[truncated N bytes]``. :func:`url_without_credentials` is the form in which a server's URL is recorded.

Span attributes keep their type (SpanBatch v3): strings, 64-bit ints, floats and booleans stay what they are;
a nested mapping or sequence is flattened into dotted keys (:func:`flat_attribute_items`, the layout of
Agent Lightning's ``flatten_attributes`` with indexed lists, which its ``unflatten_attributes`` reverses);
anything else becomes JSON text. Reward attributes stay strings (the Reward schema has a string map).
"""

from __future__ import annotations

import binascii
import functools
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import orjson

REDACTED = "[REDACTED]"
TRUNCATION_MARKER = "…[truncated {} bytes]"


@dataclass(frozen=True)
class Detector:
    """One kind of secret: ``pattern`` matches it, and ``why`` says what it covers. What the pattern's first
    group matched, if it has one (a label such as ``Bearer `` or ``api_key=``), stays; the rest of the match
    becomes ``[REDACTED]``. The pattern runs only on text whose lower-cased form holds one of ``triggers``
    (each of its matches does). ``confirm``, when set, says whether a match is a secret after all, a test a
    regular expression cannot make. ``starts``, for a case-insensitive pattern, matches in the lower-cased text
    where the pattern's matches can start: the pattern is tried there only (a case-insensitive search tries
    every position, several times slower than a case-sensitive one that skips to its first letters)."""

    name: str
    triggers: tuple[str, ...]
    pattern: str
    why: str
    confirm: Callable[[re.Match[str]], bool] | None = None
    starts: str | None = None
    regex: re.Pattern[str] = field(init=False, repr=False, compare=False)
    _starts: re.Pattern[str] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "regex", re.compile(self.pattern))
        object.__setattr__(self, "_starts", None if self.starts is None else re.compile(self.starts))

    def redact(self, text: str, lowered: str) -> str:
        """``text`` with this kind of secret hidden; ``lowered`` is its lower-cased form (:func:`_fold`)."""
        if self._starts is None or len(lowered) != len(text):  # lower() changed the length: positions differ
            return self.regex.sub(self.hide, text)
        pieces, end = [], 0
        for start in self._starts.finditer(lowered):
            match = self.regex.match(text, start.start()) if start.start() >= end else None
            if match is not None:
                pieces += (text[end : match.start()], self.hide(match))
                end = match.end()
        return "".join((*pieces, text[end:])) if pieces else text

    def hide(self, match: re.Match[str]) -> str:
        """The replacement of ``match``: its label and ``[REDACTED]``, or itself when not confirmed."""
        if self.confirm is not None and not self.confirm(match):
            return match[0]
        return (match[1] if self.regex.groups else "") + REDACTED


def _value_of(match: re.Match[str]) -> str:
    return match[0][len(match[1]) :]


def _decodes_to_credentials(match: re.Match[str]) -> bool:
    """A ``Basic`` value is base64 of ``user:password``; the prose after the word "basic" is not."""
    try:
        return b":" in binascii.a2b_base64(_value_of(match), strict_mode=True)
    except binascii.Error:
        return False


#: What stands where a secret-named key's value goes but is none: empty values, flags and types.
_NOT_VALUES = frozenset(("null", "none", "nil", "true", "false", "undefined", "str", "string", "bytes", "required"))
#: Unquoted values that are code naming the secret, not the secret: attribute chains of identifiers in snake
#: case, camel case or capitals (``self.token``, ``os.environ``, ``process.env.OPENAI_KEY``, ``config.apiKey``),
#: and variables named after it (``api_key=api_key``, ``password=db_password``).
_IDENTIFIER = r"(?:[a-z_]+\d?|[A-Z_]+\d?|[a-z]+(?:[A-Z][a-z]+)+)"
_REFERENCE = re.compile(rf"{_IDENTIFIER}(?:\.{_IDENTIFIER})+|[a-z_]*(?:key|secret|pass|pwd|token|auth|cred)[a-z_]*")
#: Values standing for a secret to be filled in, or masked: ``${DB_PASSWORD}``, ``$API_KEY``, ``%(password)s``,
#: ``%TOKEN%``, ``{{ secrets.token }}``, ``{password}``, ``<your key>``, ``YOUR_API_KEY``, ``********``.
_PLACEHOLDER = re.compile(r"\$\{.*|\$[A-Z_][A-Z0-9_]*|%\(\w+\)s|%\w+%|\{.*|<.*|(?i:your)[-_ ].*|[*xX•]{4,}")


def _is_literal(match: re.Match[str]) -> bool:
    """True when a secret-named key is given a value, not a placeholder or code standing for one
    (``api_key=os.getenv("KEY")``, ``token=self.token``, ``password: str``)."""
    label, value = match[1], _value_of(match)
    if _PLACEHOLDER.fullmatch(value) or value.lower() in _NOT_VALUES:
        return False
    if label.endswith(("'", '"', "`")):
        return True
    return match.string[match.end() : match.end() + 1] not in ("(", "[") and not _REFERENCE.fullmatch(value)


def _value(min_length: int, spaces: bool) -> str:
    """A value after a key, of ``min_length`` characters or more: a quoted one runs to its closing quote (and
    may hold ``spaces``, as passwords do), an unquoted one to a space, quote or delimiter. A quote followed by
    a closing bracket or delimiter closes a string instead (``getpass("Password: ")``)."""
    more = f"{{{min_length - 1},}}"
    alternatives = []
    for quote in "\"'":
        inside = rf"[^{quote}\\\r\n\x00]" if spaces else rf"[^{quote}\\\s\x00]"
        alternatives.append(rf"(?<={quote})[^{quote}\\\s)\]}},;\x00]{inside}{more}")
    alternatives.append(rf"[^\s\"'`\\,;&(){{}}\[\]<>\x00]{{{min_length},}}")
    return f"(?:{'|'.join(alternatives)})"


# The patterns below are written so that a search stops only where a literal matches: a test of what stands
# before it comes after it, as a lookbehind. (Led by a lookbehind or by alternatives, a search tries every
# position; the catalogue took several times longer.)


def _at_word_start(prefix: str, width: int) -> str:
    """``prefix`` (``width`` characters) where a word starts: not after a letter, digit or underscore, except
    in an escaped line break or tab (``\\n`` inside a JSON string, where tokens often start)."""
    return rf"{prefix}(?:(?<![A-Za-z0-9_].{{{width}}})|(?<=\\[nrt].{{{width}}}))"


def _key_after(qualifiers: tuple[str, ...]) -> str:
    """The word key after one of ``qualifiers`` and maybe a separator: api_key, API-KEY, apiKey, SecretAccessKey."""
    behind = [f"(?<={qualifier}{separator}key)" for qualifier in qualifiers for separator in (r"[_.\- ]", "")]
    return f"key(?:{'|'.join(behind)})"


# After a key's name: quotes (also JSON-escaped ones, inside a JSON string, and backticks), ':' or '=' (or
# '=>'), spaces, maybe an opening quote.
_SIGN = r"[\"'`\\]*\s*[:=]>?\s*[\"'`\\]*"
# Names of keys whose value is a credential, as the names end: api_key, OPENAI_API_KEY, SecretAccessKey (AWS),
# AccountKey and SharedAccessKey (Azure), client_secret, auth_token, credentials. "auth" must start a word (not
# "oauth") unless camel case starts one (basicAuth, OAuth).
_KEY_QUALIFIERS = ("api", "access", "secret", "private", "account", "storage", "signing", "encryption", "master",
                   "client", "subscription", "ssh", "deploy")  # fmt: skip
_SECRET_NAMES = "|".join(
    (
        _key_after(_KEY_QUALIFIERS),
        "secrets?",
        "token",
        "credentials?",
        _at_word_start("auth", 4),
        r"auth(?<=(?-i:[A-Za-z0-9]Auth))",
    )
)
_AWS_KEY_ID = rf"{_at_word_start('(?:AKIA|ASIA|ABIA|ACCA)', 4)}[A-Z0-9]{{16}}\b"
_PASSWORD_NAMES = r"passwords?|passwd|passphrase"
_HTTP_SCHEMES = r"Basic|Bearer|Token|Digest|Negotiate|NTLM|AWS4-HMAC-SHA256|SharedKey|ApiKey"

#: Every kind of secret the redactor finds, in the order they are searched: a specific shape before a generic
#: one that would cut it short (a PEM key before the ``"private_key": "..."`` around it). Token formats
#: (prefixes, lengths, alphabets) are the providers', as gitleaks' rule set collects them.
CATALOGUE: tuple[Detector, ...] = (
    Detector(
        "PEM private key",
        ("-----begin",),
        r"(?s)(-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----)"
        r"(?:.*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----|(?:[^\"'<>\x00]*?[A-Za-z0-9+/=]{40,})*)",
        "RSA, EC, OpenSSH, PKCS#8 and PGP private keys, also JSON-escaped in a Google service-account key file; "
        "of a key cut short, all up to its last line of base64 before the string ends",
    ),
    Detector(
        "AWS key id with its secret key",
        ("akia", "asia", "abia", "acca"),
        _AWS_KEY_ID + r".{0,40}?(?<![A-Za-z0-9/+=])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])",
        "a key id and, on the same line, 40 base64 characters: a key pair (credentials.csv, JSON, 'id / secret' "
        "notes); what stands between them goes too",
    ),
    Detector(
        "AWS access key id",
        ("akia", "asia", "abia", "acca"),
        _AWS_KEY_ID,
        "long-term (AKIA), temporary (ASIA) and other AWS key ids",
    ),
    Detector(
        "Anthropic key",
        ("sk-ant-",),
        rf"{_at_word_start('sk-ant-', 7)}[a-z]+\d*-[A-Za-z0-9_\-]{{20,}}",
        "API (sk-ant-api03-), admin (sk-ant-admin01-) and OAuth (sk-ant-oat01-, sk-ant-ort01-) keys",
    ),
    Detector(
        "OpenAI-style key",
        ("sk-",),
        rf"{_at_word_start('sk-', 3)}(?=[A-Za-z0-9_\-]*\d)[A-Za-z0-9_\-]{{20,}}",
        "OpenAI keys (sk-proj-, sk-svcacct-, sk-admin-, legacy sk-) and those of OpenAI-compatible providers "
        "(DeepSeek, OpenRouter sk-or-v1-); a digit tells a key from hyphenated words",
    ),
    Detector(
        "Stripe key",
        ("sk_live_", "sk_test_", "rk_live_", "rk_test_", "whsec_"),
        rf"{_at_word_start('[sr]k_(?:live|test)_', 8)}[A-Za-z0-9]{{10,}}"
        rf"|{_at_word_start('whsec_', 6)}[A-Za-z0-9+/=]{{20,}}",
        "secret (sk_) and restricted (rk_) keys, webhook signing secrets (whsec_); not the public pk_ keys",
    ),
    Detector(
        "Google API key",
        ("aiza",),
        rf"{_at_word_start('AIza', 4)}[A-Za-z0-9_\-]{{35}}(?![A-Za-z0-9_\-])",
        "Google Cloud, Gemini, Maps and Firebase API keys",
    ),
    Detector(
        "GitHub token",
        ("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"),
        rf"{_at_word_start('gh[pousr]_', 4)}[A-Za-z0-9]{{30,}}|{_at_word_start('github_pat_', 11)}[A-Za-z0-9_]{{30,}}",
        "personal (classic and fine-grained), OAuth, user-to-server, server-to-server and refresh tokens",
    ),
    Detector(
        "GitLab token",
        ("glpat-", "gldt-", "glrt-", "glptt-", "glcbt-", "glft-", "glimt-", "glagent-", "gloas-", "glsoat-", "glffct-"),
        rf"{_at_word_start('gl', 2)}(?:pat|dt|rt|ptt|cbt|ft|imt|agent|oas|soat|ffct)-[A-Za-z0-9_.\-]{{20,}}",
        "personal, deploy, runner, pipeline-trigger, CI-job, feed, mail, agent, OAuth-app, SCIM and feature-flag "
        "tokens",
    ),
    Detector(
        "Slack token",
        ("xox", "xapp-"),
        rf"{_at_word_start('(?:xox[abeoprs]|xapp)-', 5)}[A-Za-z0-9\-]{{10,}}",
        "bot, user, app-level, configuration and legacy tokens",
    ),
    Detector(
        "Hugging Face token",
        ("hf_",),
        rf"{_at_word_start('hf_', 3)}[A-Za-z]{{34}}(?![A-Za-z0-9_])",
        "user access tokens: hf_ and 34 letters",
    ),
    Detector(
        "Azure AD client secret",
        ("q~",),
        r"(?:(?<![A-Za-z0-9_~.\-])|(?<=\\[nrt]))[A-Za-z0-9_~.]{3}\dQ~[A-Za-z0-9_~.\-]{31,34}(?![A-Za-z0-9_~\-])",
        "Entra ID application secrets: three characters, a digit, 'Q~' and 31 to 34 more",
    ),
    Detector(
        "JSON web token",
        ("eyj",),
        rf"{_at_word_start('eyJ', 3)}[A-Za-z0-9_\-]{{8,}}\.[A-Za-z0-9_\-]{{8,}}\.[A-Za-z0-9_\-]*",
        "a base64url JSON header ('eyJ' is '{\"'), a payload and a signature (empty when unsigned)",
    ),
    Detector(
        "password in a URL",
        ("://",),
        r"(://[^\s/?#:]*:)[^\s/?#]*(?=@)",
        "scheme://user:password@host in database URLs, git remotes and proxies; the user name stays",
    ),
    Detector(
        "Authorization header",
        ("authorization",),
        rf"(?i)({_at_word_start('authorization', 13)}{_SIGN}(?:(?:{_HTTP_SCHEMES})\s+)?+){_value(4, spaces=False)}",
        "the credential of any scheme; the scheme stays",
        _is_literal,
        starts="authorization",
    ),
    Detector(
        "Basic credentials",
        ("basic",),
        rf"(?i)({_at_word_start('Basic', 5)}\s+)[A-Za-z0-9+/]{{4,}}={{0,2}}(?![A-Za-z0-9+/=])",
        "base64 of user:password after 'Basic', wherever it stands (curl -H, logs, config)",
        _decodes_to_credentials,
        starts="basic",
    ),
    Detector(
        "Bearer token",
        ("bearer",),
        rf"(?i)({_at_word_start('Bearer', 6)}\s+)(?=[A-Za-z0-9._~+/=\-]*\d)[A-Za-z0-9._~+/=\-]{{8,}}",
        "an access token after 'Bearer', wherever it stands; a digit tells a token from prose",
        starts="bearer",
    ),
    Detector(
        "cookie",
        ("cookie",),
        rf"(?i)({_at_word_start('cookie', 6)}s?{_SIGN})"
        r"[^\s=;,\"'\\\x00]+=[^\s;\"'\\\x00]*(?:;[ \t]*[^\s=;\"'\\\x00]+(?:=[^\s;\"'\\\x00]*)?)*",
        "Cookie and Set-Cookie values, name=value pairs and attributes: sessions are credentials",
        starts="cookie",
    ),
    Detector(
        "secret query parameter",
        ("key=", "sig=", "signature="),
        r"(?i)([?&](?:key|sig|signature|x-amz-signature)=)[^&#\s\"'\\<>\x00]+",
        "?key= (Google), &sig= (Azure SAS), Signature= and X-Amz-Signature= (presigned S3 and CloudFront URLs)",
        starts="[?&](?:key|sig|signature|x-amz-signature)=",
    ),
    Detector(
        "password",
        ("passw", "pwd", "passphrase"),
        rf"(?i)((?:{_PASSWORD_NAMES}|;[ \t]*pwd(?=[ \t]*=[ \t]*[^/~\s])){_SIGN}){_value(4, spaces=True)}",
        'password=, "password": and DB_PASSWORD= in code, config and env files; Password= and Pwd= in ADO and '
        "ODBC connection strings (not PWD=/home/..., a shell's working directory)",
        _is_literal,
        starts=rf"pass(?:words?|wd|phrase)(?={_SIGN})|;",
    ),
    Detector(
        "value of a secret-named key",
        ("key", "secret", "token", "auth", "credential"),
        rf"(?i)((?:{_SECRET_NAMES}){_SIGN}){_value(12, spaces=False)}",
        "api_key=, client_secret:, aws_secret_access_key=, AccountKey= and SharedAccessKey= (Azure connection "
        'strings), auth_token=, credentials=: values of 12 characters or more (a logprob\'s "token": "Hello" '
        "is none)",
        _is_literal,
        starts=rf"(?:key|secrets?|token|credentials?|auth)(?={_SIGN})",
    ),
)

#: Attribute keys whose values are hidden whole: keys ending in a secret's name (token, secret, password,
#: passwd, auth, authorization, api_key / apikey, private_key, bearer, credential(s), cookie, set-cookie,
#: session ...), in any case and with any separators; not counts or ids of them (max_tokens, session_id).
_SECRET_KEY = re.compile(
    rf"(?i)(?:{_SECRET_NAMES}|{_PASSWORD_NAMES}|authorization|bearer|cookies?|{_at_word_start('session', 7)}"
    r"|session(?<=(?-i:[A-Za-z0-9]Session)))$"
)
#: Query parameters of a recorded URL whose values are hidden, besides secret-named ones.
_SECRET_QUERY_PARAMETERS = frozenset(("key", "sig", "signature", "x-amz-signature", "x-amz-credential"))


@functools.lru_cache(maxsize=256)  # the few server URLs of a process, recorded with every LLM call
def url_without_credentials(url: str) -> str:
    """``url`` as it may be recorded: without user and password, the values of secret query parameters
    (``api_key=``, ``key=``, ``sig=`` ...) hidden."""
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    query = "&".join(
        f"{name}={REDACTED}" if value and _is_secret_parameter(unquote(name)) else f"{name}{sign}{value}"
        for name, sign, value in (pair.partition("=") for pair in parts.query.split("&"))
    )
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def _is_secret_parameter(name: str) -> bool:
    return name.lower() in _SECRET_QUERY_PARAMETERS or _SECRET_KEY.search(name) is not None


# Before the catalogue runs, one cheap test says whether any detector can match (``Redactor.may_hold_secret``):
# a single pass in C over the UTF-8 bytes (producers/_secret_scan.c says what it looks for), or the same test
# in a few passes of Python's bytes methods and regular expressions where the C extension was not built (it is
# optional: the SDK installs without a C compiler). Text with non-ASCII characters is scanned twice: as it is
# (for the case-sensitive marks: AKIA, AIza, eyJ ...), and folded first in the str domain, where the non-ASCII
# whitespace ``\s`` matches becomes a space and the letters an IGNORECASE regex equates with ASCII ones but
# ``str.lower()`` leaves alone (``re._casefix``: dotless ı, long ſ) become those ASCII letters; so the test
# stays a superset.
_NON_ASCII_SPACES = (
    "\x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)
_NON_ASCII_SPACE = re.compile(f"[{_NON_ASCII_SPACES}]")  # a regex: str.translate with a dict is ~10x slower

# The Python scan reads the bytes folded as the C scan compares them, and partly backwards: what must stand
# before a ':' or '-' then follows it, which a regular expression can say (a lookbehind cannot: its width is
# fixed), and each search starts at one literal byte, which the re module finds quickly.
_FOLD = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ=_", b"abcdefghijklmnopqrstuvwxyz:-")
_SPACE = rb"[ \t-\r\x1c-\x1f]"
# An assignment (a key word, quotes, backticks or backslashes, spaces, ':'), backwards; "key" after '?', '&' or
# a qualifier and maybe a separator.
_ASSIGNMENT_BACKWARDS = re.compile(
    rb":" + _SPACE + rb"*[\"'`\\]*(?:s?terces|s?drowssap|dwssap|dwp|esarhpssap|nekot|htua|s?laitnederc|s?eikooc"
    rb"|noitazirohtua|gis|erutangis|yek(?:[?&]|[-. ]?(?:ipa|ssecca|terces|etavirp|tnuocca|egarots|gningis"
    rb"|noitpyrcne|retsam|tneilc|noitpircsbus|hss|yolped)))"
)
# A token prefix: a whole word before a dash (an underscore folded): sk, rk, hf, whsec, xapp, xox?, gh?, gl + 2 to 5
# letters (GitLab), or "pat" after "github-"; backwards. A word starts after a byte that is no letter or digit,
# or after an escaped line break or tab ("\n" in a JSON string).
_TOKEN_PREFIX_BACKWARDS = re.compile(
    rb"-(?:ks|kr|fh|ceshw|ppax|[abeoprs]xox|[pousr]hg|[a-z]{2,5}lg|tap-buhtig)(?:(?![a-z0-9])|(?=[nrt]\\))"
)
# scheme://user:password@ : a ':' and then an '@' in the bytes after "://" up to a space, '/', '?' or '#'.
_USERINFO = re.compile(rb"://[^ \t-\r\x1c-\x1f/?#]*:[^ \t-\r\x1c-\x1f/?#]*@")
# Marks compared unfolded: AWS key ids and Google keys, Azure client secrets (a digit before "Q~"); and "eyJ".
_AWS_AND_GOOGLE_MARKS = re.compile(rb"A(?:[KSB]IA|CCA|Iza)")
_AZURE_MARK = re.compile(rb"Q~(?<=[0-9]Q~)")


def _scan_bytes_in_python(data: bytes) -> bool:
    """The C pre-scan's ``may_hold_secret(data)`` in Python: the same answer for any bytes, about 10-20 times
    slower."""
    folded = data.translate(_FOLD)
    backwards = folded[::-1]
    return (
        _ASSIGNMENT_BACKWARDS.search(backwards) is not None
        or _TOKEN_PREFIX_BACKWARDS.search(backwards) is not None
        or b"-----begin" in folded
        or b"bearer" in folded
        or b"basic" in folded
        or _USERINFO.search(folded) is not None
        or _AWS_AND_GOOGLE_MARKS.search(data) is not None
        or b"eyJ" in data
        or _AZURE_MARK.search(data) is not None
    )


try:
    from boltstream.producers._secret_scan import may_hold_secret as _scan_bytes
except ImportError:  # installed without a C compiler
    _scan_bytes = _scan_bytes_in_python


# Attribute values that are not strings are snapshotted on the agent's thread as compact JSON. orjson
# writes a 1 KB tool-argument dict in ~0.2 µs where the json module takes ~1.5 µs (the largest share
# of an emit call). What orjson refuses (ints beyond 64 bits, keys it cannot turn into strings, values
# nested deeper than 254 levels, lone surrogates) goes through the json module in the same format.
# Differences from the json module: NaN and infinities become null; dataclasses, datetimes, UUIDs and
# enums are written as JSON values (ISO dates) instead of their str().
_ORJSON_OPTIONS = orjson.OPT_NON_STR_KEYS
_json = json.JSONEncoder(ensure_ascii=False, default=str, separators=(",", ":")).encode


def to_text(value: Any) -> str:
    """A string for any attribute value: strings as they are, everything else as JSON (``str`` as a last resort)."""
    if isinstance(value, str):
        return value
    try:
        return orjson.dumps(value, default=str, option=_ORJSON_OPTIONS).decode()
    except TypeError:  # orjson.JSONEncodeError is one
        pass
    try:
        return _json(value)
    except (TypeError, ValueError, RecursionError):  # e.g. circular references
        return str(value)


_LONG_MIN, _LONG_MAX = -(1 << 63), (1 << 63) - 1
#: A nested value is flattened only this deep and into at most this many keys; past either bound it is
#: kept whole as JSON text under its own key (a 10,000-item list must not become 10,000 attributes).
MAX_FLATTEN_DEPTH = 8
MAX_FLATTENED_KEYS = 128


def is_wire_scalar(value: Any) -> bool:
    """True when ``value`` leaves the process as it is: a string, a float, a bool or an int of 64 bits."""
    kind = type(value)
    return kind is str or kind is float or kind is bool or (kind is int and _LONG_MIN <= value <= _LONG_MAX)


def flat_attribute_items(key: str, value: Any) -> list[Any]:
    """``key, value, key, value, ...`` whose values are wire scalars: ``value`` itself when it is one, a
    mapping or a sequence flattened into ``key.sub`` / ``key.0`` keys (empty ones, and ones too deep or too
    large, kept whole as JSON text), anything else as JSON text (None as ``null``, an int beyond 64 bits as
    its digits). Runs on the agent's thread (the snapshot of a value it may change later): one loop over
    the leaves with exact type checks, no call per leaf."""
    flat: list[Any] = []
    append_flat_attribute(flat, key, value)
    return flat


def append_flat_attribute(flat: list[Any], key: str, value: Any) -> None:
    """Append :func:`flat_attribute_items` of ``key`` and ``value`` to ``flat`` (no list of its own)."""
    kind = type(value)
    if kind is str or kind is float or kind is bool or (kind is int and _LONG_MIN <= value <= _LONG_MAX):
        flat.append(key)
        flat.append(value)
        return
    if (kind is dict or kind is list or kind is tuple or isinstance(value, Mapping)) and value:
        start = len(flat)
        if _flatten_leaves(key, value, flat):
            return
        del flat[start:]  # a bound was passed: the value goes whole, as JSON text
    flat.append(key)
    flat.append(to_text(value))


#: The flattened keys made so far: for each prefix, its sub-keys' full names. Frameworks send the same shapes
#: again and again: a lookup instead of a new string per leaf, and the same string object every time, whose
#: hash the encoder's and the redactor's lookups then find computed. Bounded (cleared when full).
_flat_keys: dict[str, dict[Any, str]] = {}
_MAX_FLAT_PREFIXES, _MAX_FLAT_SUBKEYS = 4096, 256


def _flatten(prefix: str, value: Any, depth: int, flat: list[Any], base: int) -> bool:
    """Append the leaves of ``value`` under ``prefix`` to ``flat``, which held ``base`` items before; False when a
    bound is passed (what was appended is then void)."""
    if depth >= MAX_FLATTEN_DEPTH:
        return False
    names = _flat_keys.get(prefix)
    if names is None:
        if len(_flat_keys) >= _MAX_FLAT_PREFIXES:
            _flat_keys.clear()
        names = _flat_keys[prefix] = {}
    append = flat.append  # two appends, not ``flat += (key, item)``: no tuple per leaf for the GC to count
    kind = type(value)
    for sub, item in enumerate(value) if kind is list or kind is tuple else value.items():
        if type(sub) is str or type(sub) is int:  # not 1.0 nor True, which a dict finds as 1
            name = names.get(sub)
            if name is None:
                if len(names) >= _MAX_FLAT_SUBKEYS:
                    names.clear()
                name = names[sub] = f"{prefix}.{sub}"
        else:
            name = f"{prefix}.{sub}"
        kind = type(item)
        if kind is str or kind is float or kind is bool or (kind is int and _LONG_MIN <= item <= _LONG_MAX):
            append(name)
            append(item)
        elif (kind is dict or kind is list or kind is tuple or isinstance(item, Mapping)) and item:
            if not _flatten(name, item, depth + 1, flat, base):
                return False
        else:
            append(name)
            append(to_text(item))
        if len(flat) - base > 2 * MAX_FLATTENED_KEYS:
            return False
    return True


def flatten_in_python(prefix: str, value: Any, flat: list[Any]) -> bool:
    """:func:`_flatten` from the top: what ``_attributes.flatten`` (C) does when that extension is not built."""
    return _flatten(prefix, value, 0, flat, len(flat))


def strings_if_wire_scalars_in_python(values: list[Any]) -> list[str] | None:
    """The strings among ``values`` if every value is a wire scalar (:func:`is_wire_scalar`), else None."""
    if not all(map(is_wire_scalar, values)):
        return None
    return [value for value in values if type(value) is str]


try:  # the same in C (producers/_attributes.c), ~10x faster; optional like _secret_scan
    from boltstream.producers._attributes import flatten as _flatten_leaves
    from boltstream.producers._attributes import setup as _setup_flatten
    from boltstream.producers._attributes import strings_if_wire_scalars
except ImportError:  # installed without a C compiler
    _flatten_leaves = flatten_in_python
    strings_if_wire_scalars = strings_if_wire_scalars_in_python
else:
    _setup_flatten(
        _flat_keys, to_text, Mapping, MAX_FLATTEN_DEPTH, MAX_FLATTENED_KEYS, _MAX_FLAT_PREFIXES, _MAX_FLAT_SUBKEYS
    )


class Redactor:
    """Redacts and truncates strings and attribute maps according to the producer settings."""

    def __init__(self, extra_patterns: Iterable[str] = (), max_bytes: int = 16 * 1024) -> None:
        self.max_bytes = max_bytes
        try:
            self._extra = [re.compile(p) for p in extra_patterns]
        except re.error as exc:
            raise ValueError(f"producer.redact_patterns: invalid regular expression: {exc}") from exc
        self._secret_key: dict[str, bool] = {}

    @staticmethod
    def may_hold_secret(text: str) -> bool:
        """False when no detector of the catalogue matches anywhere in ``text``; True means "look closer".

        A superset test, several times cheaper than searching each detector's triggers: text without
        secrets (the usual case) costs one pass at C speed over its bytes.
        """
        if text.isascii():
            return _scan_bytes(text.encode("ascii"))
        folded = _NON_ASCII_SPACE.sub(" ", _fold(text)).encode("utf-8", "surrogatepass")
        return _scan_bytes(folded) or _scan_bytes(text.encode("utf-8", "surrogatepass"))

    def redact(self, text: str) -> str:
        """``text`` with every secret replaced by ``[REDACTED]``."""
        if self.may_hold_secret(text):
            lowered = _fold(text)
            for detector in CATALOGUE:
                if any(trigger in lowered for trigger in detector.triggers):
                    redacted = detector.redact(text, lowered)
                    if redacted != text:
                        text, lowered = redacted, _fold(redacted)
        for pattern in self._extra:
            text = pattern.sub(REDACTED, text)
        return text

    def truncate(self, text: str) -> str:
        """``text`` cut to ``max_bytes`` of UTF-8, with a marker saying how much was cut."""
        if len(text) * 4 <= self.max_bytes:  # cannot exceed the bound whatever the characters
            return text
        raw = text.encode("utf-8")
        if len(raw) <= self.max_bytes:
            return text
        kept = raw[: self.max_bytes].decode("utf-8", errors="ignore")
        return kept + TRUNCATION_MARKER.format(len(raw) - len(kept.encode("utf-8")))

    def clean(self, value: Any) -> str:
        """Any value as a redacted, bounded string."""
        return self.truncate(self.redact(to_text(value)))

    def is_secret_key(self, key: str) -> bool:
        """True when an attribute named ``key`` holds a secret as a whole (its value is hidden)."""
        secret = self._secret_key.get(key)
        if secret is None:
            secret = _SECRET_KEY.search(key) is not None
            if len(self._secret_key) < 10_000:  # attribute keys repeat: remember the verdict
                self._secret_key[key] = secret
        return secret

    def plain_keys(self, keys: Iterable[Any]) -> bool:
        """True when :meth:`attributes` keeps these keys and the values under them (but for redaction inside
        them): strings naming no secret."""
        return all(type(key) is str and not self.is_secret_key(key) for key in keys)

    def fits(self, text: str) -> bool:
        """True when :meth:`truncate` leaves ``text`` as it is; long non-ASCII text is left to it."""
        return len(text) * 4 <= self.max_bytes or (len(text) <= self.max_bytes and text.isascii())

    def finds_nothing_in(self, text: str) -> bool:
        """True when redaction leaves ``text`` as it is (the one search of a batch's joined texts).

        Configured patterns may be anchored (``^...$``), so they are never run on joined texts: with
        any configured, the answer is False and each value is cleaned on its own.
        """
        return not self._extra and not (self.may_hold_secret(text) and self.redact(text) != text)

    def attributes(self, attributes: Mapping[str, Any] | None) -> dict[str, str]:
        """A string map fit to leave the process; values of secret-named keys are hidden whole.

        The secret search runs once over all values together; only when it finds something is each
        value redacted on its own.
        """
        if not attributes:
            return {}
        cleaned = {}
        for key, value in attributes.items():
            key = key if type(key) is str else str(key)
            cleaned[key] = REDACTED if self.is_secret_key(key) else value if type(value) is str else to_text(value)
        joined = "\x00".join(cleaned.values())
        if not self.finds_nothing_in(joined):
            return {key: self.clean(value) for key, value in cleaned.items()}
        if len(joined) * 4 > self.max_bytes:
            return {key: self.truncate(value) for key, value in cleaned.items()}
        return cleaned

    def typed_attributes(self, attributes: Mapping[str, Any] | None) -> dict[str, Any]:
        """A span's attribute map fit to leave the process: wire scalars kept (strings redacted and bounded),
        nested values flattened (:func:`flat_attribute_items`), values of secret-named keys hidden whole."""
        if not attributes:
            return {}
        cleaned: dict[str, Any] = {}
        for key, value in attributes.items():
            key = key if type(key) is str else str(key)
            flat = flat_attribute_items(key, value)
            for flat_key, flat_value in zip(flat[::2], flat[1::2], strict=True):
                cleaned[flat_key] = REDACTED if self.is_secret_key(flat_key) else flat_value
        texts = [value for value in cleaned.values() if type(value) is str]
        joined = "\x00".join(texts)
        if not self.finds_nothing_in(joined):
            return {key: self.clean(value) if type(value) is str else value for key, value in cleaned.items()}
        if len(joined) * 4 > self.max_bytes:
            return {key: self.truncate(value) if type(value) is str else value for key, value in cleaned.items()}
        return cleaned


def _fold(text: str) -> str:
    """``text`` lower-cased so that a trigger is found in it whatever case the detector's regex ignores."""
    lowered = text.lower()
    return lowered if text.isascii() else lowered.replace("\u0131", "i").replace("\u017f", "s")
