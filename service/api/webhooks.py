"""Webhook delivery, and the addresses a webhook may never reach.

A webhook URL is chosen by the client, so without a guard it aims the server at its own
network (SSRF): the database, the Ray dashboard, a cloud metadata service. `WebhookPolicy`
refuses loopback, private (RFC 1918, ULA), link-local, CGNAT, multicast, unspecified, reserved
and cloud-metadata addresses unless `webhook_allowed_hosts` names the host or a network holding
the address. A URL whose host is such an address (or a well-known internal name) is refused when
the request arrives; a host name is checked after resolution, on every address it resolves to,
and the POST then goes to that checked address with the name kept in the Host header and TLS
SNI, so a DNS answer that changes between check and connect (rebinding) cannot redirect it.
Redirects are never followed.

With a `webhook_secret`, every POST carries `X-Sdserve-Signature: t=<unix time>,v1=<hex>`, the
HMAC-SHA256 of `<t>.<body>` under the secret, so a receiver can tell sdserve's callbacks from
forged ones and refuse replays (`verify_signature`).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import re
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import httpx

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# webhook_status values (the job row's column and every job body)
DELIVERED = "success"
FAILED = "failed"
BLOCKED = "blocked"

# Names that mean "this machine" or a cloud's instance metadata, refused before any lookup.
INTERNAL_NAMES = frozenset(
    {
        "localhost",
        "metadata",
        "metadata.google.internal",
        "metadata.goog",
        "metadata.azure.internal",
        "instance-data",
        "instance-data.ec2.internal",
    }
)
# Instance metadata endpoints (AWS, GCP, Azure, OpenStack; ECS tasks; Alibaba; Oracle): most
# fall in the ranges below anyway, listed so the refusal says what they are.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",
        "169.254.170.2",
        "fd00:ec2::254",
        "100.100.100.200",
        "192.0.0.192",
    )
)
CGNAT = ipaddress.ip_network("100.64.0.0/10")
NAT64 = ipaddress.ip_network("64:ff9b::/96")
_HOST_NAME = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,62})(\.[a-z0-9_]([a-z0-9_-]{0,62}))*$")


class WebhookRefused(ValueError):
    """The webhook URL may not be used; the message names the field and the reason."""


def forbidden_reason(address: IPAddress) -> str | None:
    """Why a webhook may not reach `address`, or None when it is a public unicast address."""
    if isinstance(address, ipaddress.IPv6Address):
        # IPv6 forms that carry an IPv4 address reach that IPv4 address.
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address in NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            return forbidden_reason(embedded)
    if address in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if address.is_loopback:
        return "a loopback address"
    if address.is_unspecified:
        return "an unspecified address"
    if address.is_link_local:
        return "a link-local address"
    if address.is_multicast:
        return "a multicast address"
    if address.version == 4 and address in CGNAT:
        return "a shared (CGNAT) address"
    if address.is_reserved:
        return "a reserved address"
    if address.is_private:
        return "a private address"
    if not address.is_global:
        return "a reserved address"
    return None


def literal_address(host: str) -> IPAddress | None:
    """The address a URL host spells, in any form a resolver accepts (`127.1`, `2130706433`,
    `0x7f.0.0.1`, `[::ffff:127.0.0.1]`), or None for a name."""
    host = host.strip("[]")
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        pass
    if re.fullmatch(r"[0-9a-fx.]+", host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


@dataclass(frozen=True)
class WebhookTarget:
    """A parsed webhook URL: where to POST and the host name to resolve."""

    url: httpx.URL
    host: str  # lower-case ASCII (IDNA), no brackets, no trailing dot
    port: int


class WebhookPolicy:
    """Which webhook URLs and addresses are allowed; `allowed` holds host names, IP addresses
    and CIDR networks that may be reached although internal (`webhook_allowed_hosts`)."""

    def __init__(self, allowed: Iterable[str] = ()):
        self.allowed_hosts: set[str] = set()
        self.allowed_networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for entry in allowed:
            entry = entry.strip().lower().rstrip(".")
            try:
                self.allowed_networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
            except ValueError:
                self.allowed_hosts.add(entry)

    def address_allowed(self, address: IPAddress) -> bool:
        return forbidden_reason(address) is None or any(
            address in network for network in self.allowed_networks
        )

    def parse(self, url: str) -> WebhookTarget:
        """Check a webhook URL as a request gives it; raises WebhookRefused naming the rule.

        Refuses what can be known without DNS: a malformed URL, a host that is a forbidden
        address or an internal name. Names are checked again, resolved, at delivery.
        """
        rule = "webhook must be an http:// or https:// URL with a valid host and port"
        try:
            parsed = httpx.URL(url)
            raw_host = parsed.raw_host.decode("ascii")
            port = parsed.port or (443 if parsed.scheme == "https" else 80)
        except (httpx.InvalidURL, UnicodeError, ValueError):
            raise WebhookRefused(rule) from None
        host = raw_host.strip("[]").lower().rstrip(".")
        if parsed.scheme not in ("http", "https") or not host or not 0 < port < 65536:
            raise WebhookRefused(rule)
        target = WebhookTarget(parsed, host, port)
        if host in self.allowed_hosts:
            return target
        address = literal_address(host)
        if address is not None:
            if not self.address_allowed(address):
                raise WebhookRefused(
                    f"webhook must not point at {forbidden_reason(address)} ({address}); "
                    "webhooks reach public addresses only"
                )
            return target
        if not _HOST_NAME.match(host):
            raise WebhookRefused(rule)
        if host in INTERNAL_NAMES or host.endswith(".localhost"):
            raise WebhookRefused(
                f"webhook must not point at an internal host name ({host}); "
                "webhooks reach public addresses only"
            )
        return target

    def check_addresses(self, target: WebhookTarget, addresses: list[IPAddress]) -> str | None:
        """Why the resolved addresses may not be used (every one must pass), or None."""
        if target.host in self.allowed_hosts:
            return None
        for address in addresses:
            if not self.address_allowed(address):
                return f"{target.host} resolves to {forbidden_reason(address)} ({address})"
        return None


Resolver = Callable[[str, int], Awaitable[list[IPAddress]]]


async def resolve_host(host: str, port: int) -> list[IPAddress]:
    """Every address `host` resolves to, in the resolver's order, without duplicates."""
    literal = literal_address(host)
    if literal is not None and ":" in host:
        return [literal]
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses: list[IPAddress] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if address not in addresses:
            addresses.append(address)
    return addresses


SIGNATURE_HEADER = "X-Sdserve-Signature"


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The signature header's value for `body` sent at `timestamp` (unix seconds)."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={digest.hexdigest()}"


def verify_signature(
    secret: str, header: str, body: bytes, tolerance_s: float = 300, now: float | None = None
) -> bool:
    """Whether `header` (the X-Sdserve-Signature value) signs `body` under `secret`, at most
    `tolerance_s` ago: what a receiver checks before it trusts a callback."""
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    try:
        timestamp = int(fields["t"])
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance_s:
        return False
    expected = sign(secret, body, timestamp).split("v1=", 1)[1]
    return hmac.compare_digest(expected, fields.get("v1", ""))


class WebhookSender:
    """POSTs a payload to a webhook: a bounded number of attempts with doubling backoff, each
    within `timeout_s` (resolution, connection and answer together); a 2xx is delivered.

    Returns the webhook_status: "success", "failed" (every attempt failed: timeout,
    unreachable, non-2xx, redirect) or "blocked" (the URL reaches a forbidden address; nothing
    was sent)."""

    def __init__(
        self,
        policy: WebhookPolicy,
        *,
        attempts: int,
        timeout_s: float,
        backoff_s: float,
        resolver: Resolver | None = None,
        secret: str | None = None,
    ):
        self.policy = policy
        self.secret = secret
        self.attempts = max(1, attempts)
        self.timeout_s = timeout_s
        self.backoff_s = backoff_s
        self._resolve = resolver or resolve_host

    async def deliver(self, url: str, payload: dict, label: str = "") -> str:
        try:
            target = self.policy.parse(url)
        except WebhookRefused as exc:
            log.warning("webhook %s blocked: %s", label, exc)
            return BLOCKED
        body = json.dumps(payload, separators=(",", ":")).encode()
        delay = self.backoff_s
        async with httpx.AsyncClient(
            timeout=self.timeout_s, follow_redirects=False, trust_env=False
        ) as client:
            for attempt in range(1, self.attempts + 1):
                try:
                    outcome = await asyncio.wait_for(
                        self._attempt(client, target, body), self.timeout_s
                    )
                except TimeoutError:
                    outcome = "timed out"
                except Exception as exc:  # unreachable, refused, reset, bad answer: retried
                    outcome = f"unreachable ({type(exc).__name__})"
                if outcome in (DELIVERED, BLOCKED):
                    return outcome
                log.warning(
                    "webhook %s attempt %d of %d failed: %s", label, attempt, self.attempts, outcome
                )
                if attempt < self.attempts:
                    await asyncio.sleep(delay)
                    delay *= 2
        return FAILED

    async def _attempt(self, client: httpx.AsyncClient, target: WebhookTarget, body: bytes) -> str:
        addresses = await self._resolve(target.host, target.port)
        if not addresses:
            return "unreachable (no address)"
        reason = self.policy.check_addresses(target, addresses)
        if reason is not None:
            log.warning("webhook blocked: %s", reason)
            return BLOCKED
        headers = {"Host": target.url.netloc.decode("ascii"), "Content-Type": "application/json"}
        if self.secret:
            headers[SIGNATURE_HEADER] = sign(self.secret, body, int(time.time()))
        extensions = {"sni_hostname": target.host} if target.url.scheme == "https" else {}
        last_error: Exception | None = None
        for address in addresses:
            # Connect to the address just checked, never to a second lookup of the name.
            pinned = target.url.copy_with(host=str(address))
            try:
                response = await client.post(
                    pinned, content=body, headers=headers, extensions=extensions
                )
            except httpx.ConnectError as exc:
                last_error = exc
                continue
            if 200 <= response.status_code < 300:
                return DELIVERED
            return f"HTTP {response.status_code}"
        raise last_error or httpx.ConnectError("no address answered")
