"""Nobody let in: every route that works or reads a job needs a valid key, a key reads only its
own jobs, enterprise routes need an admin key, keys never reach a log line or a response, image
and static routes never read outside their folders, output names cannot be guessed."""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from urllib.parse import unquote

import pytest
from fastapi.testclient import TestClient

from service.store import keys as keystore
from tests.reliability.helpers import ADMIN_KEY

SMALL = {"prompt": "x", "width": 64, "height": 64}
# GET routes anyone may read: nothing in them is a job, a key or a balance.
PUBLIC_GET = {
    "/",
    "/healthz",
    "/readyz",
    "/openapi.json",
    "/docs",
    "/docs/oauth2-redirect",
    "/redoc",
    "/llms.txt",
    "/static/{name}",
    "/static/docs/{name}",
    "/images/{name:path}",
    "/playground/config",
}
# Bodies that would do something if the key were good.
WORK_BODIES = {"model_id": "stable-diffu", "request_id": 1, **SMALL}


@pytest.fixture()
def client(api):
    with TestClient(api.app, raise_server_exceptions=False) as client:
        yield client


def routes(app) -> dict[str, set[str]]:
    """Every path the app serves and its methods, through included routers too."""
    found: dict[str, set[str]] = {}

    def walk(entries, prefix=""):
        for route in entries:
            if hasattr(route, "original_router"):  # an included router
                walk(route.original_router.routes, prefix + route.include_context.prefix)
                continue
            methods = getattr(route, "methods", None) or set()
            path = prefix + route.path
            found.setdefault(path, set()).update(methods - {"HEAD", "OPTIONS"})

    walk(app.routes)
    return found


def concrete(path: str, job_id: int = 1) -> str:
    return path.replace("{job_id}", str(job_id))


def test_every_route_that_works_or_reads_a_job_needs_a_valid_key(api, client, record):
    revoked, _ = api.service.keys.create("carol", "pay_per_use", balance=1)
    api.service.keys.revoke("carol")
    job = client.post("/api/v6/images/text2img", json={"key": api.keys["alice"], **SMALL}).json()
    assert job["status"] == "success" and job["id"] == 1
    calls = len(api.engine.calls)
    posts = sorted(path for path, methods in routes(api.app).items() if "POST" in methods)
    gets = {path for path, methods in routes(api.app).items() if "GET" in methods}
    assert gets <= PUBLIC_GET, f"new GET routes must be reviewed: {sorted(gets - PUBLIC_GET)}"
    assert len(posts) >= 25
    bad_keys = {
        "no key": ({}, {}),
        "wrong key": ({"key": "sk-wrong"}, {}),
        "revoked key": ({"key": revoked}, {}),
        "empty bearer": ({}, {"Authorization": "Bearer "}),
        "wrong key header": ({}, {"key": "sk-wrong"}),
        "key of another case": ({"key": ADMIN_KEY.upper()}, {}),
    }
    for path in posts:
        for what, (body, headers) in bad_keys.items():
            answer = client.post(concrete(path), json={**WORK_BODIES, **body}, headers=headers)
            assert answer.status_code == 200, (path, what, answer.text)
            assert answer.json()["status"] == "error", (path, what, answer.json())
            assert answer.json()["message"].startswith("Invalid API key"), (path, what)
    assert len(api.engine.calls) == calls and api.fleet.restarts == 0
    assert api.service.jobs.get(2) is None
    record(
        "security",
        f"every POST route ({len(posts)}) with no key, a wrong, revoked or re-cased key, an "
        "empty bearer and a wrong `key:` header",
        '"Invalid API key" (HTTP 200 envelope); no job, no generation, no fleet action; every '
        "GET route is on the reviewed public list",
    )


FETCH_FORMS = [
    ("/api/v6/images/fetch/{id}", {}),
    ("/api/v6/images/fetch", {"request_id": "{id}"}),
    ("/api/v7/images/fetch/{id}", {}),
    ("/api/v3/fetch/{id}", {}),
    ("/api/v4/dreambooth/fetch", {"request_id": "{id}"}),
    ("/api/v4/dreambooth/fetch/{id}", {}),
]


def test_a_key_reads_only_its_own_jobs(api, client, record):
    alice, bob = api.keys["alice"], api.keys["bob"]
    job = client.post("/api/v6/images/text2img", json={"key": alice, **SMALL}).json()
    missing = job["id"] + 1000

    def fetch(path, extra, key, job_id):
        body = {"key": key, **{k: v.format(id=job_id) for k, v in extra.items()}}
        return client.post(path.format(id=job_id), json=body)

    for path, extra in FETCH_FORMS:
        own = fetch(path, extra, alice, job["id"])
        assert own.json()["status"] == "success", (path, own.json())
        foreign = fetch(path, extra, bob, job["id"])
        absent = fetch(path, extra, bob, missing)
        assert foreign.status_code == absent.status_code == 200
        unify = lambda r, i: r.text.replace(str(i), "ID")  # noqa: E731
        assert unify(foreign, job["id"]) == unify(absent, missing), path
        assert set(foreign.headers) == set(absent.headers)
    # an admin key is no master key for jobs either
    admin = client.post(
        f"/api/v1/enterprise/images/fetch/{job['id']}", json={"key": ADMIN_KEY}
    ).json()
    assert admin["status"] == "error" and "not found" in admin["message"]
    count = client.post("/api/v6/processing/request_count", json={"key": bob}).json()
    assert count["processing_count"] == 0
    record(
        "security",
        "IDOR: another key fetches a job in all 6 fetch forms, and an admin key through the "
        "enterprise fetch",
        "the answer is byte for byte that of a missing id (status, body, headers)",
    )


def test_enterprise_routes_need_an_admin_key(api, client, record):
    api.engine.delay_s = 5  # a job that is still processing when clear_queue is tried
    pending = client.post(
        "/api/v6/images/text2img",
        json={"key": api.keys["bob"], **SMALL, "instant_response": "yes"},
    ).json()
    paths = sorted(
        path
        for path, methods in routes(api.app).items()
        if "POST" in methods and (path.startswith("/api/v1/enterprise/") or "reload" in path)
    )
    assert len(paths) >= 11
    for path in paths:
        for key in (api.keys["alice"], api.keys["free"]):
            answer = client.post(concrete(path), json={**WORK_BODIES, "key": key}).json()
            assert answer["status"] == "error", (path, answer)
            assert answer["message"] == "This endpoint needs an admin API key", (path, answer)
    assert api.fleet.restarts == 0
    assert api.service.jobs.get(pending["id"]).status == "processing"
    assert (
        client.post("/api/v1/enterprise/clear_queue", json={"key": ADMIN_KEY}).json()["cancelled"]
        == 1
    )
    record(
        "security",
        f"every enterprise route ({len(paths)}, incl. clear_queue, restart_server, usage, "
        "model_reload) with pay-per-use and free keys",
        '"This endpoint needs an admin API key"; nothing cancelled or restarted (the admin key '
        "then can)",
    )


def test_keys_never_reach_logs_or_responses(api, client, record, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    secrets = list(api.keys.values()) + ["sk-not-a-real-key-0123456789abcdef"]
    hashes = [keystore.hash_key(key) for key in api.keys.values()]
    alice = api.keys["alice"]
    api.service.settings = api.service.settings.model_copy(
        update={"webhook_allowed_hosts": ["127.0.0.1"]}
    )
    api.engine.fail = False
    texts: list[str] = []

    def keep(response):
        texts.append(response.text)
        texts.append(repr(dict(response.headers)))
        return response

    job = keep(client.post("/api/v6/images/text2img", json={"key": alice, **SMALL, "x": 1}))
    job_id = job.json()["id"]
    for key in secrets:
        keep(client.post("/api/v6/images/text2img", json={"key": key, **SMALL}))
        keep(client.post("/api/v6/images/text2img", json=SMALL, headers={"key": key}))
        keep(
            client.post(
                f"/api/v6/images/fetch/{job_id}",
                json={},
                headers={"Authorization": f"Bearer {key}"},
            )
        )
        keep(client.post("/api/v1/enterprise/usage", json={"key": key}))
        keep(client.post("/playground/account", json={"key": key}))
        keep(client.post("/api/v6/images/text2img", json={"key": key, "width": "wide"}))
        keep(client.post("/api/v6/images/text2img", json={"key": key, "prompt": "p" * 70000}))
        keep(client.post("/api/v6/images/text2img", content=f'{{"key": "{key}", "prompt"'))
    api.engine.fail = True
    keep(
        client.post(
            "/api/v6/images/text2img",
            json={"key": alice, **SMALL, "webhook": "http://127.0.0.1:9/hook"},
        )
    )
    asyncio.run(asyncio.sleep(0.3))
    logged = caplog.text + "".join(capfd.readouterr())
    assert "ignored unknown fields" in logged  # the logs were caught
    assert re.search(r"job \d+ failed", logged) and "webhook for job" in logged
    for secret in secrets + hashes:
        assert secret not in logged, "a key or its hash reached the logs"
        assert not any(secret in text for text in texts), "a key or its hash reached a response"
    record(
        "security",
        "keys (and their SHA-256) sent in the body, a `key:` header and a bearer token, valid "
        "or not, on success, error, 413, malformed-JSON, failed-generation and webhook paths",
        "never in a log line (all loggers at DEBUG, stdout, stderr) nor in any response body "
        "or header",
    )


def test_keys_are_compared_by_hash_in_constant_time(api, monkeypatch, record):
    compared = []
    real = keystore.hmac.compare_digest

    def spy(a, b):
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(keystore.hmac, "compare_digest", spy)
    assert api.service.keys.authenticate(api.keys["alice"]) is not None
    assert api.service.keys.authenticate("sk-guess") is None
    assert compared and all(len(a) == len(b) == 64 for a, b in compared)
    record(
        "security",
        "how a presented key is checked",
        "looked up by its SHA-256 (the plaintext is never compared or stored) and confirmed "
        "with hmac.compare_digest",
    )


def asgi_get(app, raw_path: str) -> tuple[int, bytes]:
    """GET a raw path as an HTTP server hands it to the app (percent-decoded once, dot
    segments kept), which a client library would have normalised away."""
    path, _, query = raw_path.partition("?")
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": unquote(path),
        "raw_path": path.encode("utf-8"),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(b"host", b"testserver")],
        "client": ("127.0.0.1", 1234),
        "server": ("testserver", 80),
    }
    sent = []
    requested = []

    async def receive():
        if not requested:
            requested.append(True)
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.Event().wait()  # the client stays connected until the answer is sent

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, body


TRAVERSALS = [
    "../db.sqlite",
    "..%2Fdb.sqlite",
    "..%2fdb.sqlite",
    "%2e%2e/db.sqlite",
    "%2e%2e%2fdb.sqlite",
    "%252e%252e%252fdb.sqlite",
    "..%5cdb.sqlite",
    "..\\db.sqlite",
    "....//db.sqlite",
    "..;/db.sqlite",
    "temp/../../db.sqlite",
    "temp/..%2f..%2fdb.sqlite",
    "%2Fetc%2Fpasswd",
    "/etc/passwd",
    "//etc/passwd",
    "..%00.png",
    "%c0%ae%c0%ae/db.sqlite",
    "\uff0e\uff0e/db.sqlite",
    "{name}/../../db.sqlite",
    "../images/{name}",
    "{name}.partial",
    "../secret.txt",
    "..%2F..%2F..%2F..%2F..%2Fetc%2Fpasswd",
]


def test_image_and_static_routes_never_leave_their_folders(api, client, tmp_path, record):
    (tmp_path / "secret.txt").write_text("TOP-SECRET")
    job = client.post("/api/v6/images/text2img", json={"key": api.keys["alice"], **SMALL}).json()
    name = job["output"][0].rsplit("/images/", 1)[1]
    assert asgi_get(api.app, f"/images/{name}")[0] == 200
    assert asgi_get(api.app, "/static/favicon.svg")[0] == 200
    tried = 0
    for raw in TRAVERSALS:
        raw = raw.replace("{name}", name)
        for prefix in ("/images/", "/static/", "/static/docs/"):
            status, body = asgi_get(api.app, prefix + raw)
            tried += 1
            assert status == 404, (prefix + raw, status)
            for leak in (b"TOP-SECRET", b"SQLite format", b"root:", b"import "):
                assert leak not in body, (prefix + raw, body[:80])
    record(
        "security",
        f"path traversal on /images/, /static/ and /static/docs/ ({tried} paths: ../, "
        "%2F, %2e%2e, double-encoded, backslash, ..;/, overlong UTF-8, full-width dots, NUL, "
        "newline, absolute paths, an output name plus ../)",
        "404 every time, nothing read outside the store or the static folder; served names "
        "still answer 200",
    )


def test_output_names_are_unguessable(api, client, record):
    names = []
    for _ in range(40):
        body = {"key": api.keys["alice"], **SMALL, "samples": 2}
        answer = client.post("/api/v6/images/text2img", json=body).json()
        names += [url.rsplit("/images/", 1)[1] for url in answer["output"]]
        assert answer["meta"]["file_prefix"] != answer["meta"]["request_id"].replace("-", "")
    prefixes = {name.split("-", 1)[0] for name in names}
    assert len(prefixes) == 40
    for name in names:
        assert re.fullmatch(r"[0-9a-f]{32}-[01]\.png", name), name
        parsed = uuid.UUID(hex=name.split("-", 1)[0])
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122
    record(
        "security",
        "output file names of 80 images (40 jobs)",
        "`{uuid4 hex}-{i}.png`: a fresh random UUID per job (122 random bits from the OS "
        "CSPRNG), unrelated to the job id; never repeated",
    )
