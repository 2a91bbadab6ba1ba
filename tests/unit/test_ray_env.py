"""The Ray environment sdserve starts Ray with: every switch set before Ray starts, and an
operator's own value of any of them kept."""

import os

from service.serving.app import RAY_ENV, SINGLE_NODE_RAY_ENV, apply_ray_env


def test_sets_every_switch_and_keeps_the_operators_value(monkeypatch):
    for name in {**RAY_ENV, **SINGLE_NODE_RAY_ENV}:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RAY_SERVE_ENABLE_HA_PROXY", "0")

    apply_ray_env()

    assert os.environ["RAY_SERVE_ENABLE_HA_PROXY"] == "0"
    for name, value in {**RAY_ENV, **SINGLE_NODE_RAY_ENV}.items():
        if name != "RAY_SERVE_ENABLE_HA_PROXY":
            assert os.environ[name] == value
