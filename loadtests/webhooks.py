"""The webhook receiver the load test runs itself, and the record of what it received.

The receiver is a gevent WSGI server inside the locust process (127.0.0.1 by default). The URL
the service is told to call is configurable apart from where the receiver listens: when the
service refuses loopback or private webhook targets, or runs on a cluster, point it at an
address the service may reach (`--webhook-url`).

With a secret (SDSERVE_LOADTEST_WEBHOOK_SECRET, the service's SDSERVE_WEBHOOK_SECRET; a local
run sets both) every POST's X-Sdserve-Signature is verified, as a receiver in production would.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from service.api.webhooks import verify_signature

HOOK_PATH = "/hook"
SECRET_VARIABLE = "SDSERVE_LOADTEST_WEBHOOK_SECRET"


@dataclass
class Delivery:
    job_id: int
    status: str
    track_id: str | None
    received_at: float
    attempts: int = 1
    problem: str | None = None


class Deliveries:
    """Webhook bodies received, by job id; duplicates (a retried delivery) count once."""

    def __init__(self):
        self._by_job: dict[int, Delivery] = {}
        self._unreadable = 0
        self._lock = threading.Lock()

    def record(self, payload: Any, signed: bool | None = None) -> Delivery | None:
        """Store one POST body; None (and counted as unreadable) when it names no job.
        `signed`: whether its signature verified (None: not checked)."""
        if not isinstance(payload, dict) or not isinstance(payload.get("id"), int):
            with self._lock:
                self._unreadable += 1
            return None
        with self._lock:
            found = self._by_job.get(payload["id"])
            if found is not None:
                found.attempts += 1
                return None
            delivery = Delivery(
                job_id=payload["id"],
                status=str(payload.get("status")),
                track_id=payload.get("track_id"),
                received_at=time.monotonic(),
            )
            if signed is False:
                delivery.problem = "missing or wrong X-Sdserve-Signature"
            elif delivery.status not in ("success", "failed"):
                delivery.problem = f"webhook status {delivery.status!r}"
            elif delivery.status == "success" and not payload.get("output"):
                delivery.problem = "success webhook without output"
            self._by_job[delivery.job_id] = delivery
            return delivery

    def get(self, job_id: int) -> Delivery | None:
        with self._lock:
            return self._by_job.get(job_id)

    def summary(self, expected: list[tuple[int, str | None]]) -> dict[str, Any]:
        """Against the webhook jobs accepted, as (job id, track_id) pairs."""
        with self._lock:
            delivered = [self._by_job[j] for j, _ in expected if j in self._by_job]
            wrong_track = sum(
                1
                for j, track in expected
                if j in self._by_job and self._by_job[j].track_id != track
            )
            bad = sum(1 for d in delivered if d.problem) + wrong_track
            duplicates = sum(d.attempts - 1 for d in self._by_job.values())
            unreadable = self._unreadable
        count = len(expected)
        return {
            "expected": count,
            "delivered": len(delivered),
            "ratio": round(len(delivered) / count, 4) if count else None,
            "bad_payloads": bad,
            "duplicates": duplicates,
            "unreadable": unreadable,
        }


class WebhookReceiver:
    """A WSGI server answering 200 to `POST /hook`; each body goes to `on_body`."""

    def __init__(
        self,
        host: str,
        port: int,
        on_body: Callable[[Any, bool | None], None],
        secret: str | None = None,
    ):
        self.host = host
        self.port = port
        self._on_body = on_body
        self.secret = secret
        self._server = None

    def start(self) -> int:
        """Listen (in greenlets, without blocking); returns the port (a free one for 0)."""
        from gevent.pywsgi import WSGIServer

        self._server = WSGIServer((self.host, self.port), self._app, log=None, error_log=None)
        self._server.start()
        self.port = self._server.server_port
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(timeout=1)
            self._server = None

    def _app(self, environ, start_response):
        if environ["REQUEST_METHOD"] != "POST" or environ["PATH_INFO"] != HOOK_PATH:
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found"]
        length = int(environ.get("CONTENT_LENGTH") or 0)
        raw = environ["wsgi.input"].read(length)
        try:
            payload = json.loads(raw or b"null")
        except ValueError:
            payload = None
        signed = None
        if self.secret:
            header = environ.get("HTTP_X_SDSERVE_SIGNATURE", "")
            signed = verify_signature(self.secret, header, raw)
        self._on_body(payload, signed)
        start_response("200 OK", [("Content-Type", "application/json")])
        return [b'{"ok": true}']
