"""service/ports.py: free ports outside the range the kernel hands to anyone binding port 0."""

import socket

import service.ports as ports
from service.ports import PORT_RANGE, ephemeral_range, free_ports


def test_ports_are_free_distinct_and_outside_the_ephemeral_range():
    chosen = free_ports(3)
    low, high = ephemeral_range()
    assert len(set(chosen)) == 3
    for port in chosen:
        assert PORT_RANGE[0] <= port <= PORT_RANGE[1] and not low <= port <= high
        with socket.socket() as s:
            s.bind(("", port))  # still free


def test_a_taken_port_is_skipped_and_the_kernel_picks_when_none_is_left(monkeypatch):
    with socket.socket() as probe:
        probe.bind(("", 0))
        free = probe.getsockname()[1]
    monkeypatch.setattr(ports, "PORT_RANGE", (free, free))
    monkeypatch.setattr(ports, "ephemeral_range", lambda: (0, 0))
    assert free_ports(1) == [free]
    with socket.socket() as taken:
        taken.bind(("", free))
        chosen = free_ports(1)
    assert len(chosen) == 1 and chosen != [free]
