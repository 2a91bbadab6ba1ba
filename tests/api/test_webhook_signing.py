"""Signed webhooks: a receiver verifies the callback came from this server, unaltered and
recent, with the shared secret."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from service.api.webhooks import (
    DELIVERED,
    SIGNATURE_HEADER,
    WebhookPolicy,
    WebhookSender,
    sign,
    verify_signature,
)

SECRET = "whsec-test-0123456789"


@pytest.fixture()
def receiver():
    received: list[tuple[dict, bytes]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's name)
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((dict(self.headers), body))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/hook", received
    server.shutdown()


def deliver(url: str, payload: dict, secret: str | None) -> str:
    sender = WebhookSender(
        WebhookPolicy(["127.0.0.1"]), attempts=1, timeout_s=5, backoff_s=0, secret=secret
    )
    return asyncio.run(sender.deliver(url, payload))


def test_each_post_is_signed_and_verifies(receiver):
    url, received = receiver
    payload = {"status": "success", "id": 7, "output": ["https://x/é.png"], "track_id": "t-1"}
    assert deliver(url, payload, SECRET) == DELIVERED
    [(headers, body)] = received
    assert json.loads(body) == payload
    assert headers["Content-Type"] == "application/json"
    signature = headers[SIGNATURE_HEADER]
    assert verify_signature(SECRET, signature, body)
    # another secret, an altered body, a stale timestamp, or garbage: all refused
    assert not verify_signature("another-secret", signature, body)
    assert not verify_signature(SECRET, signature, body.replace(b"7", b"8"))
    assert not verify_signature(SECRET, signature, body, now=time.time() + 301)
    assert not verify_signature(SECRET, "v1=abc", body)
    assert not verify_signature(SECRET, "t=x,v1=abc", body)


def test_the_signature_is_hmac_sha256_of_timestamp_dot_body():
    # what a receiver in any language recomputes (README): hex HMAC-SHA256 of "<t>.<body>"
    expected = hmac.new(b"key", b'1700000000.{"a":1}', hashlib.sha256).hexdigest()
    assert sign("key", b'{"a":1}', 1700000000) == f"t=1700000000,v1={expected}"


def test_without_a_secret_nothing_is_signed(receiver):
    url, received = receiver
    assert deliver(url, {"status": "failed", "id": 1}, None) == DELIVERED
    [(headers, _)] = received
    assert SIGNATURE_HEADER not in headers
