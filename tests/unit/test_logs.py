"""service/serving/logs.py alone, with stand-in Serve handlers."""

from __future__ import annotations

import logging

import pytest

from service.serving import logs
from service.serving.logs import route_service_logs_through_serve


class Recording(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def loggers(monkeypatch):
    monkeypatch.setattr(logs, "_in_replica", lambda: True)
    serve, app = logging.getLogger("ray.serve"), logging.getLogger("service")
    saved = [(lg, lg.handlers[:], lg.level, lg.propagate) for lg in (serve, app)]
    yield serve, app
    for lg, handlers, level, propagate in saved:
        lg.handlers, lg.level, lg.propagate = handlers, level, propagate


def test_service_lines_follow_serves_handlers_and_level(loggers):
    serve, app = loggers
    first = Recording()
    serve.handlers = [first]
    serve.setLevel(logging.INFO)
    route_service_logs_through_serve()
    route_service_logs_through_serve()  # a second replica class in the process: no duplicate
    logging.getLogger("service.api.text2img").info("ignored unknown fields: watermark")
    logging.getLogger("service.api.text2img").debug("not at INFO")
    assert first.messages == ["ignored unknown fields: watermark"]

    rebuilt = Recording()  # Serve rebuilds its handlers on a logging_config update
    serve.handlers = [rebuilt]
    serve.setLevel(logging.WARNING)
    logging.getLogger("service.serving").info("below the new level")
    logging.getLogger("service.serving").warning("replica lost")
    assert rebuilt.messages == ["replica lost"] and len(first.messages) == 1


def test_outside_a_replica_logging_is_left_alone(loggers):
    serve, app = loggers
    serve.handlers = []
    before = (app.handlers[:], app.level, app.propagate)
    route_service_logs_through_serve()
    assert (app.handlers, app.level, app.propagate) == before


def test_a_process_that_is_no_replica_is_left_alone(loggers, monkeypatch):
    """A unit test or the CLI building a Generator: pytest's and the CLI's logging stay."""
    serve, app = loggers
    serve.handlers = [Recording()]
    monkeypatch.setattr(logs, "_in_replica", lambda: False)
    before = (app.handlers[:], app.level, app.propagate)
    route_service_logs_through_serve()
    assert (app.handlers, app.level, app.propagate) == before
