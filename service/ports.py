"""Free TCP ports for the servers sdserve starts on one machine (HAProxy's, Serve's, tests').

Ports are looked for below the kernel's ephemeral range (32768-60999 by default), which it
hands to every bind to port 0 and every outgoing connection: a port found free there can be
taken by one of Ray's own processes in the seconds before our server binds it (it happened to
HAProxy: "cannot bind socket (Address already in use)"). Ports in PORT_RANGE are only taken by
asking for them. It sits above Ray's worker ports (10002-19999) and below Serve's ingress
replicas' (30000-31000).
"""

from __future__ import annotations

import contextlib
import random
import socket

PORT_RANGE = (20000, 29999)


def free_ports(count: int) -> list[int]:
    """`count` distinct ports free on all interfaces now, outside the ephemeral range (all held
    until each is chosen); the kernel's pick if that range has none left."""
    low, high = PORT_RANGE
    ephemeral = ephemeral_range()
    candidates = [p for p in range(low, high + 1) if not ephemeral[0] <= p <= ephemeral[1]]
    random.shuffle(candidates)
    with contextlib.ExitStack() as held:
        ports: list[int] = []
        for port in [*candidates, *[0] * count]:  # 0: the kernel's pick, as a last resort
            if len(ports) == count:
                break
            s = held.enter_context(socket.socket())
            try:
                s.bind(("", port))
            except OSError:
                continue
            ports.append(s.getsockname()[1])
        return ports


def free_port() -> int:
    return free_ports(1)[0]


def ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(part) for part in f.read().split())
            return low, high
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default
