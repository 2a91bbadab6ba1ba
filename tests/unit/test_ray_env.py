"""The Ray environment sdserve starts Ray with: every switch set before Ray starts, an
operator's own value of any of them kept, and HAProxy's ports free ones on this machine."""

import os
import socket

import pytest

from service.ports import PORT_RANGE, ephemeral_range
from service.serving.app import (
    HAPROXY_PORT_VARIABLES,
    RAY_ENV,
    SINGLE_NODE_RAY_ENV,
    apply_ray_env,
)


def test_sets_every_switch_and_keeps_the_operators_value(monkeypatch):
    for name in {**RAY_ENV, **SINGLE_NODE_RAY_ENV, **dict.fromkeys(HAPROXY_PORT_VARIABLES)}:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RAY_SERVE_ENABLE_HA_PROXY", "0")

    apply_ray_env()

    assert os.environ["RAY_SERVE_ENABLE_HA_PROXY"] == "0"
    for name, value in {**RAY_ENV, **SINGLE_NODE_RAY_ENV}.items():
        if name != "RAY_SERVE_ENABLE_HA_PROXY":
            assert os.environ[name] == value


def test_haproxy_ports_are_free_ones_not_rays_fixed_ones(monkeypatch):
    for name in HAPROXY_PORT_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    # what a first sdserve on this machine holds: Ray's fixed ports
    held = []
    for port in (9101, 8404):
        s = socket.socket()
        try:
            s.bind(("", port))
            held.append(s)
        except OSError:
            s.close()  # already taken by something else: just as good for this test

    try:
        apply_ray_env()
        ports = [int(os.environ[name]) for name in HAPROXY_PORT_VARIABLES]
        assert len(set(ports)) == 2 and not {9101, 8404} & set(ports)
        # outside the range the kernel hands out to anyone binding port 0 in the meantime
        low, high = ephemeral_range()
        assert not any(low <= port <= high for port in ports)
        assert all(PORT_RANGE[0] <= port <= PORT_RANGE[1] for port in ports)
        for port in ports:
            with socket.socket() as s:
                s.bind(("", port))  # still free
    finally:
        for s in held:
            s.close()


def test_serve_starts_again_once_when_its_proxy_never_became_ready(monkeypatch):
    """A proxy that hangs at start (Serve raises TimeoutError, or the proxy actor is killed):
    Serve is shut down and started once more; a second failure, or any other error, is raised."""
    from ray.exceptions import ActorDiedError

    from service.serving import app

    calls: list[str] = []

    def start_failing(*failures):
        pending = list(failures)

        def start(http_options):
            calls.append(f"start {http_options['port']}")
            if pending:
                raise pending.pop(0)

        return start

    monkeypatch.setattr(app.serve, "shutdown", lambda: calls.append("shutdown"))
    monkeypatch.setattr(app.serve, "start", start_failing(TimeoutError("proxies")))
    app.start_serve({"port": 1})
    assert calls == ["start 1", "shutdown", "start 1"]

    calls.clear()
    monkeypatch.setattr(app.serve, "start", start_failing(ActorDiedError(), ActorDiedError()))
    with pytest.raises(ActorDiedError):
        app.start_serve({"port": 2})
    assert calls == ["start 2", "shutdown", "start 2"]

    calls.clear()
    monkeypatch.setattr(app.serve, "start", start_failing(ValueError("bad http_options")))
    with pytest.raises(ValueError):
        app.start_serve({"port": 3})
    assert calls == ["start 3"]
