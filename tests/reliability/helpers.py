"""Tools the reliability tests inject faults with: an in-process app with a fake engine and
fleet, a webhook receiver that counts attempts and misbehaves on request, and a TCP proxy that
can cut the service off from its database."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from dataclasses import dataclass, field
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from fastapi import FastAPI

from service.api.routes import create_app
from service.api.text2img import ImageService
from service.config import Settings
from service.engine.protocol import GenerationOutput, GenerationParams
from service.pricing import Plan
from service.serving.ingress import build_image_service
from tests.api.test_routes import write_model_configs

ADMIN_KEY = "sk-reliability-admin-0123456789abcdefghijklmnopqrstuv"


class TinyEngine:
    """A fake engine that draws 8x8 noise whatever the size asked (the HTTP layer never checks
    the size), so fuzzing thousands of requests stays fast; can fail or be slow on demand."""

    def __init__(self):
        self.calls: list[GenerationParams] = []
        self.fail = False
        self.delay_s = 0.0

    async def __call__(self, params: GenerationParams) -> GenerationOutput:
        self.calls.append(params)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.fail:
            raise RuntimeError("the GPU caught fire")
        rng = np.random.default_rng(params.seed)
        images = [rng.integers(0, 255, (8, 8, 3), dtype=np.uint8) for _ in range(params.samples)]
        truncated = len(params.prompt.split()) > 75
        return GenerationOutput(
            images=images, seed=params.seed, batch_size=params.samples, prompt_truncated=truncated
        )


class FakeFleet:
    """The generator fleet the enterprise routes act on, without Ray."""

    def __init__(self):
        self.restarts = 0

    async def ready(self) -> bool:
        return True

    async def details(self) -> dict:
        return {"device": "cpu", "loaded_models": ["stable-diffu"], "queue": 0}

    async def load_model(self, model_id: str, reload: bool) -> dict:
        return {"model_id": model_id, "reloaded": reload}

    async def clear_cache(self) -> dict:
        return {"unloaded": []}

    async def restart(self) -> dict:
        self.restarts += 1
        return {"replica": "fake"}


@dataclass
class InProcessApi:
    app: FastAPI
    service: ImageService
    engine: TinyEngine
    fleet: FakeFleet
    keys: dict[str, str] = field(default_factory=dict)  # name -> plaintext


def build_api(tmp: Path, database_url: str | None = None, **overrides) -> InProcessApi:
    """The real routes, database and image files, with TinyEngine and FakeFleet; keys `admin`
    (premium, admin), `alice` and `bob` (pay-per-use, 100 USD each) and `free` (free plan)."""
    write_model_configs(tmp / "model")
    settings = Settings(
        **{
            "models": {"stable-diffu": str(tmp / "model")},
            "database_url": database_url or f"sqlite:///{tmp}/db.sqlite",
            "image_store_url": str(tmp / "images"),
            "public_base_url": "http://testserver",
            "demo_key": "",
            "admin_key": ADMIN_KEY,
            "min_size": 64,
            "sync_window_s": 5,
            "webhook_attempts": 1,
            "webhook_timeout_s": 2,
            **overrides,
        }
    )
    engine = TinyEngine()
    service = build_image_service(settings, engine)
    fleet = FakeFleet()
    app = create_app(settings.max_body_bytes, settings.strict_http_status)
    app.state.service = service
    app.state.fleet = fleet
    api = InProcessApi(app, service, engine, fleet, {"admin": ADMIN_KEY})
    for name, plan, balance in (
        ("alice", Plan.PAY_PER_USE, Decimal(100)),
        ("bob", Plan.PAY_PER_USE, Decimal(100)),
        ("free", Plan.FREE, Decimal(0)),
    ):
        api.keys[name], _ = service.keys.create(name, plan, balance=balance)
    return api


# ---- a webhook receiver -----------------------------------------------------------------------


class WebhookReceiver:
    """An HTTP server on 127.0.0.1 whose paths behave as told: `/ok` answers 200, `/error` 500,
    `/slow` answers after `slow_s`, `/redirect` sends a 302 to `/ok`. Counts every request per
    path, with its body and Host header."""

    def __init__(self, slow_s: float = 3.0):
        self.slow_s = slow_s
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                with receiver._lock:
                    receiver.requests.append(
                        {
                            "path": self.path,
                            "host": self.headers.get("Host"),
                            "body": json.loads(body) if body else None,
                        }
                    )
                with contextlib.suppress(OSError):  # the sender may have given up
                    if self.path.startswith("/slow"):
                        time.sleep(receiver.slow_s)
                    if self.path.startswith("/error"):
                        self.send_response(500)
                    elif self.path.startswith("/redirect"):
                        self.send_response(302)
                        self.send_header("Location", f"http://127.0.0.1:{receiver.port}/ok")
                    else:
                        self.send_response(200)
                    self.send_header("Content-Length", "0")
                    self.end_headers()

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def count(self, path: str) -> int:
        with self._lock:
            return sum(1 for r in self.requests if r["path"] == path)

    def bodies(self, path: str) -> list[dict]:
        with self._lock:
            return [r["body"] for r in self.requests if r["path"] == path]

    def __enter__(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()


def closed_port() -> int:
    """A loopback port nothing listens on (a receiver that is down)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- a TCP proxy that can be cut ----------------------------------------------------------------


class TcpProxy:
    """Forwards 127.0.0.1:port to a target address, in its own thread and event loop. `cut()`
    drops every open connection and refuses new ones (a database that became unreachable);
    `restore()` forwards again."""

    def __init__(self, target_host: str, target_port: int):
        self.target = (target_host, target_port)
        self.port = 0
        self.refused = 0
        self._open = True
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._server: asyncio.Server | None = None

    def __enter__(self) -> TcpProxy:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def cut(self) -> None:
        self._call(self._set(False))

    def restore(self) -> None:
        self._call(self._set(True))

    def _call(self, coro) -> None:
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def start():
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
            self.port = self._server.sockets[0].getsockname()[1]
            self._ready.set()

        self._loop.run_until_complete(start())
        self._loop.run_forever()

    async def _set(self, open_: bool) -> None:
        self._open = open_
        if not open_:
            for writer in list(self._writers):
                writer.transport.abort()
            self._writers.clear()

    async def _shutdown(self) -> None:
        await self._set(False)
        if self._server is not None:
            self._server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self._open:
            self.refused += 1
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                dst.transport.abort()
                self._writers.discard(dst)

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
