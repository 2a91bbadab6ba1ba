"""The database becomes unreachable for a while, on the real Ray Serve app with the tiny model
and PostgreSQL: a TCP proxy between the service and the server is cut (open connections dropped,
new ones refused), then restored. Requests meanwhile get a clear temporary error and cost
nothing, jobs accepted before the cut are finished or taken over afterwards, and the service
recovers by itself."""

from __future__ import annotations

import threading
import time
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests
from sqlalchemy import select

from service.config import DEMO_API_KEY
from service.store.db import make_engine, make_sessionmaker
from service.store.jobs import Job
from service.store.keys import KeyStore
from service.store.ledger import Ledger
from tests.conftest import running_app
from tests.postgres import POSTGRES_ADMIN, postgres_database, postgres_url
from tests.reliability.helpers import TcpProxy

pytestmark = pytest.mark.slow

SLOW = {"width": 256, "height": 256, "num_inference_steps": 20, "samples": 2}
FAST = {"width": 64, "height": 64, "num_inference_steps": 2}
PRICE = Decimal("0.0047")


@pytest.fixture(scope="module")
def outage(tmp_path_factory, tiny_model_dir):
    server = urlsplit(POSTGRES_ADMIN)
    tmp = tmp_path_factory.mktemp("outage")
    with (
        postgres_database("outage") as (name, _admin),
        TcpProxy(server.hostname, server.port or 5432) as proxy,
    ):
        settings = {
            "database_url": postgres_url(name, "127.0.0.1", proxy.port),
            "heartbeat_interval_s": 0.5,
            "orphan_after_s": 2,
            "warmup": False,
        }
        direct = make_engine(postgres_url(name))
        try:
            with running_app(tmp, tiny_model_dir, settings=settings) as (base_url, app_settings):
                yield (
                    base_url,
                    proxy,
                    make_sessionmaker(direct),
                    Path(app_settings["image_store_url"]),
                )
        finally:
            direct.dispose()


def post(base_url: str, path: str, timeout: float = 120, **body) -> requests.Response:
    return requests.post(f"{base_url}{path}", json={"key": DEMO_API_KEY, **body}, timeout=timeout)


def jobs(sessions) -> list[Job]:
    with sessions() as session:
        return list(session.scalars(select(Job).order_by(Job.id)))


def test_database_unreachable_for_a_while(outage, record):
    base_url, proxy, sessions, images = outage
    before = KeyStore(sessions).find("demo").balance
    accepted = [
        post(base_url, "/api/v6/images/text2img", prompt=f"p{i}", instant_response="yes", **SLOW)
        for i in range(2)
    ]
    assert all(r.json()["status"] == "processing" for r in accepted), [r.text for r in accepted]
    futures = [link for r in accepted for link in r.json()["future_links"]]
    waiting: dict = {}

    def sync_request():
        waiting["response"] = post(base_url, "/api/v6/images/text2img", prompt="sync", **SLOW)

    sync = threading.Thread(target=sync_request)
    sync.start()
    deadline = time.monotonic() + 30
    while len(jobs(sessions)) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(jobs(sessions)) == 3

    proxy.cut()
    in_flight = [job.id for job in jobs(sessions) if job.status == "processing"]
    assert in_flight, "the jobs ended before the cut: make them slower"
    during = {
        "text2img": post(base_url, "/api/v6/images/text2img", prompt="x", **FAST),
        "fetch": post(base_url, f"/api/v6/images/fetch/{accepted[0].json()['id']}"),
        "system_load": post(base_url, "/api/v3/system_load"),
        "request_count": post(base_url, "/api/v6/processing/request_count"),
    }
    for what, response in during.items():
        assert response.status_code == 503, (what, response.text)
        body = response.json()
        assert body["status"] == "error" and "database" in body["message"], (what, body)
        assert body["retry_after"] > 0 and int(response.headers["Retry-After"]) >= 1
    assert requests.get(f"{base_url}/healthz", timeout=10).status_code == 200
    # Hold the cut until the jobs in flight have generated and stored their images, so their
    # ends fall into the outage.
    names = [link.rsplit("/images/", 1)[1] for link in futures]
    deadline = time.monotonic() + 120
    while not all((images / n).exists() for n in names) and time.monotonic() < deadline:
        time.sleep(0.2)
    sync.join(120)
    time.sleep(1.0)
    sync_answer = waiting["response"]
    # its job ended in the outage: answered with its id and fetch link, finished afterwards
    assert sync_answer.status_code == 200, sync_answer.text
    assert sync_answer.json()["status"] in ("processing", "success"), sync_answer.text
    accepted.append(sync_answer)
    assert len(jobs(sessions)) == 3, "a refused request left a job behind"
    assert KeyStore(sessions).find("demo").balance == before - 3 * 2 * PRICE  # reserved only
    proxy.restore()

    restored = time.monotonic()
    while True:
        answer = post(base_url, "/api/v6/images/text2img", prompt="after", timeout=60, **FAST)
        if answer.status_code == 200 and answer.json()["status"] == "success":
            break
        assert time.monotonic() - restored < 30, answer.text
        time.sleep(0.5)
    deadline = time.monotonic() + 90
    while any(job.status == "processing" for job in jobs(sessions)):
        assert time.monotonic() < deadline, [(j.id, j.status) for j in jobs(sessions)]
        time.sleep(0.5)
    final = jobs(sessions)
    assert [job.status for job in final] == ["success"] * len(final), [
        (j.id, j.status, j.message) for j in final
    ]
    for response in accepted:
        links = response.json().get("future_links") or response.json()["output"]
        fetched = post(base_url, f"/api/v6/images/fetch/{response.json()['id']}").json()
        assert fetched["status"] == "success" and fetched["output"] == links
        assert all(requests.get(url, timeout=30).status_code == 200 for url in fetched["output"])
    # every job in flight at the cut ended during it: its run could not record the end, and
    # the sweep re-ran it (same seed, same names)
    assert all(job.attempts == 2 for job in final if job.id in in_flight), [
        (j.id, j.attempts) for j in final
    ]
    print(f"in flight at the cut: {in_flight}; waiting request: {sync_answer.json()['status']}")
    delivered = sum(job.samples for job in final)
    assert before - KeyStore(sessions).find("demo").balance == delivered * PRICE
    assert Ledger(sessions).audit() == []
    record(
        "fault",
        "PostgreSQL unreachable (a TCP proxy drops every connection and refuses new ones) with "
        "3 jobs in flight (2 instant, 1 waiting), until the jobs have generated",
        "text2img, fetch, system_load, request_count: HTTP 503 + `retry_after` + Retry-After, "
        "no job row, no charge; /healthz stays 200; the request waiting for a job accepted "
        "before the cut is answered `processing` with its id and fetch link",
    )
    record(
        "fault",
        "PostgreSQL reachable again after the outage",
        "served again at once, without restart (pool pre-ping); the jobs whose end fell in the "
        "outage are taken over by the heartbeat sweep and succeed, same URLs, each image charged "
        "once (ledger audit clean)",
    )
