"""A TLS terminator for the tests: TLS on a loopback port in front of a plain TCP server (the embedded
broker, the archive's read endpoint), with a CA and a server certificate made for the test run.

The embedded broker speaks neither TLS nor a usable SASL, so a client configured for a secured cluster
is tested here: it must complete a TLS handshake that trusts only the test CA, and a Kafka client's
requests are read as they pass, so a test sees the SASL handshake (and its mechanism) a client sends.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

#: Kafka API key of SaslHandshake, the request that names the client's SASL mechanism.
SASL_HANDSHAKE = 17


@dataclass(frozen=True)
class Certificates:
    """PEM files: the CA clients must trust, and the server certificate it signed, with its key."""

    ca: Path
    certificate: Path
    key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_certificates(directory: Path) -> Certificates:
    """A new CA and a server certificate for 127.0.0.1 and localhost, valid for a day, in ``directory``."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("boltstream test CA"))
        .issuer_name(_name("boltstream test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )  # certificate and CRL signing only
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    server = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    files = Certificates(directory / "ca.pem", directory / "server.pem", directory / "server-key.pem")
    files.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.certificate.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    files.key.chmod(0o600)
    return files


@dataclass(frozen=True)
class KafkaRequest:
    """One Kafka request a client sent through the terminator."""

    api_key: int
    client_id: str
    #: The mechanism a SaslHandshake request asks for; None for other requests.
    sasl_mechanism: str | None


def _string(data: bytes, at: int) -> tuple[str | None, int]:
    """A Kafka (non-compact) nullable string at ``at``, and the offset after it."""
    (length,) = struct.unpack_from(">h", data, at)
    if length < 0:
        return None, at + 2
    return data[at + 2 : at + 2 + length].decode(errors="replace"), at + 2 + length


def parse_request(frame: bytes) -> KafkaRequest:
    """The API key, client id and (SaslHandshake) mechanism of a request frame without its size prefix.

    Every request header from version 1 on starts with api_key, api_version, correlation_id and a
    non-compact client_id; a SaslHandshake body (no tagged fields) is the mechanism's name."""
    api_key, _version, _correlation = struct.unpack_from(">hhi", frame)
    client_id, end = _string(frame, 8)
    mechanism = _string(frame, end)[0] if api_key == SASL_HANDSHAKE else None
    return KafkaRequest(api_key, client_id or "", mechanism)


class TlsTerminator:
    """Accepts TLS on ``127.0.0.1:<port>`` and forwards the plain bytes to ``upstream`` (host, port).

    With ``kafka=True`` it also parses what clients send as Kafka requests and keeps them in
    :attr:`requests`. ``start()`` runs it on an event loop in a thread; ``stop()`` ends it."""

    def __init__(
        self, upstream: tuple[str, int], certificates: Certificates, *, port: int = 0, kafka: bool = True
    ) -> None:
        self.upstream, self.port, self.kafka = upstream, port, kafka
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(certificates.certificate, certificates.key)
        self.requests: list[KafkaRequest] = []
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="tls-terminator", daemon=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> TlsTerminator:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        async def close() -> None:
            assert self._server is not None
            self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def wait_for(self, predicate: Callable[[list[KafkaRequest]], bool], timeout: float = 20.0) -> list[KafkaRequest]:
        """The requests seen so far once ``predicate`` holds for them; AssertionError after ``timeout``."""
        deadline = time.monotonic() + timeout
        while not predicate(list(self.requests)):
            if time.monotonic() > deadline:
                raise AssertionError(f"not seen within {timeout}s; requests so far: {self.requests}")
            time.sleep(0.05)
        return list(self.requests)

    async def _listen(self) -> asyncio.Server:
        return await asyncio.start_server(
            self._connection, "127.0.0.1", self.port, ssl=self.context, ssl_handshake_timeout=10
        )

    async def _connection(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_writer.close()
            return
        to_upstream = self._requests(client_reader, upstream_writer) if self.kafka else None
        try:
            await asyncio.gather(
                to_upstream or self._pump(client_reader, upstream_writer), self._pump(upstream_reader, client_writer)
            )
        except (OSError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # one side hung up, or stop() ended the connection: both sides are closed below
        finally:
            for writer in (client_writer, upstream_writer):
                writer.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    async def _requests(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            size = await reader.readexactly(4)
            frame = await reader.readexactly(struct.unpack(">i", size)[0])
            self.requests.append(parse_request(frame))
            writer.write(size + frame)
            await writer.drain()
