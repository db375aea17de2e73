"""Ports chosen for listeners that bind later (workers, the broker, vLLM, the router)."""

from __future__ import annotations

import socket
from pathlib import Path

from boltstream.infra.common.ports import free_port


def test_a_chosen_port_is_free_and_outside_the_range_of_outgoing_connections() -> None:
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = {free_port() for _ in range(20)}
    assert all(port < low for port in ports), (ports, low)
    assert len(ports) > 10  # picked at random, so that two stacks starting together rarely collide
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))
