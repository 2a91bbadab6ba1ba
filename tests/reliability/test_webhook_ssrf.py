"""Webhooks cannot be aimed at the server's own network: loopback, private, link-local, CGNAT,
multicast and metadata addresses are refused when the request names one, and blocked at delivery
when a name resolves to one; the POST goes to the address that was checked (DNS rebinding cannot
switch it) and redirects are not followed, unless `webhook_allowed_hosts` permits the target.

No test here resolves a real name: `resolve_host` is replaced by a table of fake DNS answers, and
every connection goes to a receiver on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket

import httpx
import pytest

from service.api import webhooks
from service.api.webhooks import WebhookPolicy, WebhookRefused, forbidden_reason
from tests.reliability.helpers import WebhookReceiver

# name -> the answers of successive lookups (the last one repeats)
FAKE_DNS: dict[str, list[list[str]]] = {
    "private.example": [["10.0.0.7"]],
    "metadata.example": [["169.254.169.254"]],
    "ula.example": [["fd00:ec2::254"]],
    "mapped.example": [["::ffff:127.0.0.1"]],
    "cgnat.example": [["100.64.1.2"]],
    "loopback.example": [["127.0.0.1"]],
    # one allowed address and one forbidden: every address is checked, so it is blocked
    "mixed.example": [["127.0.0.1", "10.0.0.1"]],
    # answers the allowed receiver first, then a private address (DNS rebinding)
    "rebind.example": [["127.0.0.1"], ["10.0.0.1"]],
}


@pytest.fixture(autouse=True)
def fake_dns(monkeypatch):
    """Replace name resolution (and refuse any real lookup of a name) for every test here."""
    lookups: list[str] = []

    async def resolve(host: str, port: int):
        lookups.append(host)
        literal = webhooks.literal_address(host)
        if literal is not None:
            return [literal]
        answers = FAKE_DNS.get(host)
        if answers is None:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        answer = answers[min(lookups.count(host), len(answers)) - 1]
        return [ipaddress.ip_address(a) for a in answer]

    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        if host is not None and webhooks.literal_address(str(host)) is None:
            raise AssertionError(f"a real DNS lookup of {host!r} was attempted")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(webhooks, "resolve_host", resolve)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return lookups


async def submit(api, **fields) -> dict:
    transport = httpx.ASGITransport(app=api.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        body = {"key": api.keys["alice"], "prompt": "x", "width": 64, "height": 64, **fields}
        response = await client.post("/api/v6/images/text2img", json=body)
    return response.json()


def deliver(api, webhook: str, **fields) -> tuple[dict, str]:
    """Generate with a webhook and wait for its delivery: (response body, webhook_status)."""

    async def scenario():
        body = await submit(api, webhook=webhook, **fields)
        await api.service.drain()
        return body

    body = asyncio.run(scenario())
    assert body["status"] == "success", body
    return body, api.service.jobs.get(body["id"]).webhook_status


REFUSED_AT_REQUEST = {
    "http://127.0.0.1/hook": "loopback",
    "http://127.1:8080/hook": "loopback",
    "http://2130706433/hook": "loopback",
    "http://0x7f.0.0.1/hook": "loopback",
    "http://[::1]:9000/hook": "loopback",
    "http://[::ffff:127.0.0.1]/hook": "loopback",
    "http://localhost:8000/hook": "internal host name",
    "http://api.localhost/hook": "internal host name",
    "http://10.1.2.3/hook": "private",
    "http://172.16.0.1/hook": "private",
    "http://192.168.1.1/hook": "private",
    "http://[fd12:3456::1]/hook": "private",
    "http://169.254.169.254/latest/meta-data/": "metadata",
    "http://[fd00:ec2::254]/latest/meta-data/": "metadata",
    "http://metadata.google.internal/computeMetadata/v1/": "internal host name",
    "http://[fe80::1]/hook": "link-local",
    "http://169.254.10.10/hook": "link-local",
    "http://100.64.0.1/hook": "CGNAT",
    "http://224.0.0.1/hook": "multicast",
    "http://[ff02::1]/hook": "multicast",
    "http://0.0.0.0:8000/hook": "unspecified",
    "http://0/hook": "unspecified",
    "http://[::]/hook": "unspecified",
    "http://240.0.0.1/hook": "reserved",
    "http://[64:ff9b::a00:1]/hook": "private",  # NAT64 of 10.0.0.1
    "http://example.com:99999/hook": "valid host and port",
    "http:///hook": "valid host and port",
    "gopher://example.com/": "http:// or https://",
}


def test_internal_addresses_are_refused_when_the_request_names_them(api, record):
    from fastapi.testclient import TestClient

    with TestClient(api.app) as client:
        for url, reason in REFUSED_AT_REQUEST.items():
            body = {"key": api.keys["alice"], "prompt": "x", "webhook": url}
            answer = client.post("/api/v6/images/text2img", json=body).json()
            assert answer["status"] == "error", (url, answer)
            assert answer["message"].startswith("webhook "), (url, answer)
            assert reason in answer["message"], (url, answer)
    assert api.engine.calls == [] and api.service.jobs.get(1) is None
    record(
        "security",
        f"webhook URL naming an internal address or name ({len(REFUSED_AT_REQUEST)} forms: "
        "loopback incl. 127.1 / 2130706433 / 0x7f.0.0.1 / ::ffff:127.0.0.1, RFC 1918, ULA, "
        "link-local, CGNAT, multicast, unspecified, reserved, NAT64, 169.254.169.254, "
        "fd00:ec2::254, localhost, metadata.google.internal; bad scheme or port)",
        'refused at request time: `status: "error"` naming `webhook` and the reason; '
        "no job, no charge",
    )


@pytest.mark.parametrize(
    "host, reason",
    [
        ("private.example", "private"),
        ("metadata.example", "metadata"),
        ("ula.example", "metadata"),
        ("mapped.example", "loopback"),
        ("cgnat.example", "CGNAT"),
        ("loopback.example", "loopback"),
    ],
)
def test_names_resolving_to_internal_addresses_are_blocked_at_delivery(
    api, record, caplog, host, reason
):
    body, status = deliver(api, f"http://{host}/hook", track_id="t1")
    assert status == "blocked"
    assert reason in caplog.text and "blocked" in caplog.text
    if host == "private.example":
        record(
            "security",
            "webhook host name resolving to a private, metadata, ULA, IPv4-mapped loopback, "
            "CGNAT or loopback address",
            'generation succeeds; nothing is sent; `webhook_status` = "blocked"',
        )


def test_every_resolved_address_is_checked(api, record):
    with WebhookReceiver() as receiver:
        api.service.settings = api.service.settings.model_copy(
            update={"webhook_allowed_hosts": ["127.0.0.1"]}
        )
        _, status = deliver(api, f"http://mixed.example:{receiver.port}/ok")
        assert status == "blocked" and receiver.requests == []
    record(
        "security",
        "webhook name resolving to an allowed and a forbidden address",
        'blocked: every address must pass; nothing sent (`webhook_status` = "blocked")',
    )


def test_the_post_goes_to_the_checked_address_with_the_name_kept(api, record, fake_dns):
    """DNS rebinding: the name is resolved once per attempt by the guard, the connection is
    made to that checked address (Host header keeps the name), and a later answer pointing
    elsewhere is checked again before anything is sent."""
    api.service.settings = api.service.settings.model_copy(
        update={"webhook_allowed_hosts": ["127.0.0.1"], "webhook_attempts": 2}
    )
    api.service.settings = api.service.settings.model_copy(update={"webhook_backoff_s": 0.05})
    with WebhookReceiver() as receiver:
        # first lookup: 127.0.0.1 (allowed) -> HTTP 500; second: 10.0.0.1 -> blocked
        _, status = deliver(api, f"http://rebind.example:{receiver.port}/error")
        assert receiver.count("/error") == 1
        assert receiver.requests[0]["host"] == f"rebind.example:{receiver.port}"
        assert status == "blocked"
        assert fake_dns.count("rebind.example") == 2  # once per attempt, by the guard alone
    record(
        "security",
        "DNS rebinding: a webhook name answering 127.0.0.1 (allowed) and then 10.0.0.1",
        "each attempt resolves once and connects to the address it checked (Host header keeps "
        'the name, no second lookup); the rebound answer is blocked (`webhook_status` = "blocked")',
    )


def test_redirects_are_not_followed(api, record):
    api.service.settings = api.service.settings.model_copy(
        update={"webhook_allowed_hosts": ["127.0.0.1"], "webhook_attempts": 2}
    )
    api.service.settings = api.service.settings.model_copy(update={"webhook_backoff_s": 0.05})
    with WebhookReceiver() as receiver:
        _, status = deliver(api, receiver.url("/redirect"))
        assert receiver.count("/redirect") == 2 and receiver.count("/ok") == 0
    assert status == "failed"
    record(
        "security",
        "webhook receiver answering 302 to another URL",
        "redirect not followed (the target never hit); bounded retries; "
        '`webhook_status` = "failed"',
    )


def test_the_allowlist_permits_hosts_and_networks(api, record):
    with WebhookReceiver() as receiver:
        # by default a receiver on this machine is out of reach, by name or by address
        _, status = deliver(api, f"http://loopback.example:{receiver.port}/ok")
        assert status == "blocked"
        refused = asyncio.run(submit(api, webhook=receiver.url("/ok")))
        assert refused["status"] == "error" and "loopback" in refused["message"]
        assert receiver.requests == []
        # a host name allowed by name, whatever it resolves to
        api.service.settings = api.service.settings.model_copy(
            update={"webhook_allowed_hosts": ["loopback.example"]}
        )
        _, status = deliver(api, f"http://loopback.example:{receiver.port}/ok")
        assert status == "success" and receiver.count("/ok") == 1
        # an address allowed by network
        api.service.settings = api.service.settings.model_copy(
            update={"webhook_allowed_hosts": ["127.0.0.0/8"]}
        )
        body, status = deliver(api, receiver.url("/ok"), track_id="order-7")
        assert status == "success" and receiver.count("/ok") == 2
        delivered = receiver.bodies("/ok")[-1]
        assert delivered["id"] == body["id"] and delivered["track_id"] == "order-7"
    record(
        "security",
        "webhook to a receiver on 127.0.0.1 with and without `webhook_allowed_hosts`",
        "refused/blocked by default; delivered once when the host name or a CIDR holding the "
        "address is allowed",
    )


@pytest.mark.parametrize(
    "address, reason",
    [
        ("8.8.8.8", None),
        ("2606:4700:4700::1111", None),
        ("127.0.0.53", "loopback"),
        ("10.255.255.255", "private"),
        ("172.31.0.1", "private"),
        ("192.168.0.1", "private"),
        ("100.100.100.200", "metadata"),
        ("169.254.170.2", "metadata"),
        ("192.0.0.192", "metadata"),
        ("fc00::1", "private"),
        ("::ffff:10.0.0.1", "private"),
        ("2002:7f00:1::", "loopback"),  # 6to4 of 127.0.0.1
        ("255.255.255.255", "reserved"),
    ],
)
def test_forbidden_reason(address, reason):
    found = forbidden_reason(ipaddress.ip_address(address))
    assert (found is None) if reason is None else (reason in found)


def test_policy_parses_the_allowlist():
    policy = WebhookPolicy(["127.0.0.1", "10.0.0.0/8", "Hooks.Corp.Example.", "[::1]"])
    assert policy.address_allowed(ipaddress.ip_address("10.9.8.7"))
    assert policy.address_allowed(ipaddress.ip_address("::1"))
    assert not policy.address_allowed(ipaddress.ip_address("192.168.0.1"))
    assert policy.parse("https://hooks.corp.example/x").host == "hooks.corp.example"
    with pytest.raises(WebhookRefused):
        policy.parse("http://192.168.0.1/x")


def test_https_keeps_the_name_for_tls_while_connecting_to_the_checked_address(monkeypatch, record):
    """No TLS receiver here: the client's POST is captured instead of sent."""
    FAKE_DNS["public.example"] = [["93.184.216.34"]]
    sent = []

    async def capture(self, url, **kwargs):
        sent.append((url, kwargs))
        return httpx.Response(204)

    monkeypatch.setattr(httpx.AsyncClient, "post", capture)
    sender = webhooks.WebhookSender(WebhookPolicy(), attempts=1, timeout_s=2, backoff_s=0)
    status = asyncio.run(sender.deliver("https://Public.Example:8443/hook?x=1", {"a": 1}))
    assert status == "success"
    [(url, kwargs)] = sent
    assert url.host == "93.184.216.34" and url.port == 8443 and url.scheme == "https"
    assert url.path == "/hook" and url.query == b"x=1"
    assert kwargs["headers"] == {
        "Host": "public.example:8443",
        "Content-Type": "application/json",  # the body goes as bytes: signed as sent
    }
    assert json.loads(kwargs["content"]) == {"a": 1}
    assert kwargs["extensions"] == {"sni_hostname": "public.example"}
    record(
        "security",
        "https webhook to a public name",
        "the TLS connection goes to the checked address, with the name as SNI (certificate "
        "checked against it) and in the Host header",
    )


def test_a_job_whose_run_stopped_unfinished_is_not_announced(api, record):
    """A run that stops before the job ends (its process is stopping, or it could not record
    the end) must not send a `processing` body: whoever takes the job over announces its end."""
    api.service.settings = api.service.settings.model_copy(
        update={"webhook_allowed_hosts": ["127.0.0.1"]}
    )
    api.engine.delay_s = 30

    async def scenario(url):
        body = await submit(api, webhook=url, instant_response="yes")
        await asyncio.sleep(0.1)
        for task in list(api.service._running.values()):
            task.cancel()  # what a stopping process does to its runs
        await api.service.drain()
        await asyncio.sleep(0.2)
        await api.service.drain()  # the notification the stopped run left
        return body

    with WebhookReceiver() as receiver:
        body = asyncio.run(scenario(receiver.url("/ok")))
        assert receiver.requests == []
    job = api.service.jobs.get(body["id"])
    assert job.status == "processing" and job.webhook_status == ""
    record(
        "fault",
        "a job's run stops before the job ends (process stopping, database gone) with a webhook",
        "no webhook is sent for the unfinished job; the sweep that takes it over announces its end",
    )
