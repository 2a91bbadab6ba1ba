"""The service's own log lines in a replica's Serve log, beside Serve's."""

from __future__ import annotations

import logging

APP_LOGGER = "service"
SERVE_LOGGER = "ray.serve"


class _ThroughServe(logging.Handler):
    """Hands each record to Serve's replica handlers as they are when it is logged: Serve
    rebuilds them when a deployment's logging_config changes, and its log level applies."""

    def emit(self, record: logging.LogRecord) -> None:
        serve = logging.getLogger(SERVE_LOGGER)
        if record.levelno < serve.getEffectiveLevel():
            return
        for handler in serve.handlers:
            if record.levelno >= handler.level:
                handler.handle(record)


def route_service_logs_through_serve() -> None:
    """Give the `service` loggers Serve's replica handlers (its log file, JSON with the
    request_id, and the console). Without them only WARNING and above reached the worker's
    stderr, through Python's last-resort handler, and INFO lines were lost. Idempotent."""
    app = logging.getLogger(APP_LOGGER)
    if not _in_replica() or not logging.getLogger(SERVE_LOGGER).handlers:
        return  # not in a Serve replica: leave logging as the process set it up
    app.handlers = [_ThroughServe()]
    app.setLevel(logging.DEBUG)  # the Serve logger's level decides, at each record
    app.propagate = False


def _in_replica() -> bool:
    from ray.serve.context import _get_internal_replica_context

    return _get_internal_replica_context() is not None
