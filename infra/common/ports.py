"""Loopback ports: finding a free one, telling whether one is taken, waiting for a listener."""

from __future__ import annotations

import random
import socket
import time
from pathlib import Path

#: Where listeners' ports are picked from when the kernel's ephemeral range starts above it.
_LISTENER_PORTS_FROM = 10000


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now, outside the kernel's ephemeral range when possible.

    A port is usually bound a few seconds after it is chosen (by a worker process that has to start). A
    port of the ephemeral range (where ``bind(0)`` picks) can meanwhile become the source port of any
    outgoing connection on the machine, and the listener then fails with "Address already in use"; a
    port below that range is never given to an outgoing connection.
    """
    low, _ = _ephemeral_range()
    for _ in range(50):
        port = random.randrange(_LISTENER_PORTS_FROM, low) if low > _LISTENER_PORTS_FROM + 1000 else 0
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return sock.getsockname()[1]
    with socket.socket() as sock:  # a crowded range: let the kernel pick
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):  # not Linux: the IANA range, which macOS and Windows use
        return 49152, 65535


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """True when ``port`` cannot be bound on ``host`` (someone listens there)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def wait_for_port(port: int, host: str = "127.0.0.1", timeout: float = 15.0) -> None:
    """Return once something accepts connections on ``host:port``; TimeoutError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            sock.settimeout(0.2)
            if sock.connect_ex((host, port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f}s")
