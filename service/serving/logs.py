"""The service's own log lines in a replica's Serve log, beside Serve's."""

from __future__ import annotations

import logging

APP_LOGGER = "service"


def route_service_logs_through_serve(level: int = logging.INFO) -> None:
    """Give the `service` loggers Serve's replica handlers (its log file, JSON with the
    request_id, and the console). Without them only WARNING and above reached the worker's
    stderr, through Python's last-resort handler, and INFO lines were lost."""
    serve_logger = logging.getLogger("ray.serve")
    app = logging.getLogger(APP_LOGGER)
    app.setLevel(level)
    if serve_logger.handlers:
        app.handlers = list(serve_logger.handlers)
        app.propagate = False
