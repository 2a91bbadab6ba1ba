"""`sdserve keys …` and `sdserve usage`: manage API keys and read the ledger from a shell.

Each command opens the configured database, migrates it, does one thing and prints a plain
table. `add_subcommands` registers them; the parsed namespace's `run(args)` runs one.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation

from sqlalchemy.orm import sessionmaker

from service.config import Settings, load_settings
from service.pricing import MAX_USD, Plan, format_usd, usd_to_micros
from service.store.db import make_sessionmaker
from service.store.errors import StoreError
from service.store.keys import KeyStore
from service.store.ledger import Ledger, usage_document

# How the key commands name a key. A name wins: a key named "7" is that key, never ID 7.
KEY_ARGUMENT_HELP = "the key's name, or its ID (keys list) when no key has that name"


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Register `keys create|list|expire|revoke|topup` and `usage` on the `sdserve` parser."""
    keys = subparsers.add_parser("keys", help="create, list, revoke and top up API keys")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")

    create = keys_commands.add_parser("create", help="create a key and print it (once)")
    create.add_argument("--name", required=True, help="unique name of the key's holder")
    create.add_argument("--plan", required=True, choices=[plan.value for plan in Plan])
    create.add_argument(
        "--balance",
        type=_usd,
        default=Decimal(0),
        help=f"first balance in USD (pay_per_use), at most {MAX_USD}",
    )
    create.add_argument("--admin", action="store_true", help="may call the enterprise endpoints")
    create.add_argument(
        "--expires",
        type=_expiry,
        help="stop working then: in N days (30d), hours (12h), or at "
        "an ISO time with zone (2027-01-31T00:00Z)",
    )
    create.set_defaults(run=keys_create)

    expire = keys_commands.add_parser("expire", help="set or clear a key's expiry")
    expire.add_argument("name", help=KEY_ARGUMENT_HELP)
    when = expire.add_mutually_exclusive_group(required=True)
    when.add_argument("--at", dest="expires", type=_expiry, help="30d, 12h or an ISO time")
    when.add_argument("--never", action="store_true", help="the key never expires")
    expire.set_defaults(run=keys_expire)

    keys_list = keys_commands.add_parser("list", help="list keys (never their secrets)")
    keys_list.set_defaults(run=keys_list_command)

    revoke = keys_commands.add_parser("revoke", help="stop a key at once")
    revoke.add_argument("name", help=KEY_ARGUMENT_HELP)
    revoke.set_defaults(run=keys_revoke)

    topup = keys_commands.add_parser("topup", help="add USD to a pay_per_use key's balance")
    topup.add_argument("name", help=KEY_ARGUMENT_HELP)
    topup.add_argument(
        "usd", type=_usd, help=f"USD to add; the balance stays at most {MAX_USD} USD"
    )
    topup.set_defaults(run=keys_topup)

    usage = subparsers.add_parser("usage", help="delivered images and their price per key/model")
    usage.add_argument("--key", help=f"only this key: {KEY_ARGUMENT_HELP}")
    usage.add_argument("--since", type=_date, help="settled on or after this UTC date")
    usage.add_argument("--json", action="store_true", help="print JSON instead of a table")
    usage.set_defaults(run=usage_command)


def keys_create(args: argparse.Namespace, settings: Settings | None = None) -> int:
    """Create a key and print its secret, which is shown this once only."""
    with _sessions(settings) as sessions:
        try:
            plaintext, key = KeyStore(sessions).create(
                args.name,
                Plan(args.plan),
                balance=args.balance,
                admin=args.admin,
                expires_at=args.expires,
            )
        except (StoreError, ValueError) as exc:
            return _fail(exc)
    balance = f", balance {format_usd(key.balance)} USD" if key.plan is Plan.PAY_PER_USE else ""
    admin = ", admin" if key.admin else ""
    expiry = f", expires {_when(key.expires_at)}" if key.expires_at else ""
    print(f"Created key {key.name!r} (id {key.id}, plan {key.plan}{balance}{admin}{expiry}).")
    print(f"API key: {plaintext}")
    print("Copy it now: only its hash is stored, it will not be shown again.")
    return 0


def keys_list_command(args: argparse.Namespace, settings: Settings | None = None) -> int:
    """Print every key: id, name, plan, admin, balance, expiry and whether it still works."""
    with _sessions(settings) as sessions:
        keys = KeyStore(sessions).list()
    now = datetime.now(UTC)

    def status(key) -> str:
        return "revoked" if key.revoked else "expired" if key.expired(now) else "active"

    _print_table(
        ["ID", "NAME", "PLAN", "ADMIN", "BALANCE_USD", "EXPIRES", "STATUS"],
        [
            [
                key.id,
                key.name,
                key.plan,
                "yes" if key.admin else "no",
                format_usd(key.balance) if key.plan is Plan.PAY_PER_USE else "-",
                _when(key.expires_at) if key.expires_at else "never",
                status(key),
            ]
            for key in keys
        ],
    )
    return 0


def keys_expire(args: argparse.Namespace, settings: Settings | None = None) -> int:
    """Set when a key stops working, or that it never does."""
    with _sessions(settings) as sessions:
        try:
            key = KeyStore(sessions).set_expiry(args.name, None if args.never else args.expires)
        except (StoreError, ValueError) as exc:
            return _fail(exc)
    when = f"expires {_when(key.expires_at)}" if key.expires_at else "never expires"
    print(f"Key {key.name!r} (id {key.id}) {when}.")
    return 0


def keys_revoke(args: argparse.Namespace, settings: Settings | None = None) -> int:
    """Revoke a key by name; it stops working at once."""
    with _sessions(settings) as sessions:
        try:
            key = KeyStore(sessions).revoke(args.name)
        except StoreError as exc:
            return _fail(exc)
    print(f"Revoked key {key.name!r} (id {key.id}).")
    return 0


def keys_topup(args: argparse.Namespace, settings: Settings | None = None) -> int:
    """Add USD to a pay_per_use key and print its new balance."""
    with _sessions(settings) as sessions:
        try:
            key = KeyStore(sessions).topup(args.name, args.usd)
        except (StoreError, ValueError) as exc:
            return _fail(exc)
    print(
        f"Added {format_usd(args.usd)} USD to {key.name!r}: balance {format_usd(key.balance)} USD."
    )
    return 0


def usage_command(args: argparse.Namespace, settings: Settings | None = None) -> int:
    """Print delivered images and amounts per key and model, with a total."""
    with _sessions(settings) as sessions:
        try:
            rows = Ledger(sessions).usage(key=args.key, since=args.since)
        except StoreError as exc:
            return _fail(exc)
    if args.json:
        print(json.dumps(usage_document(rows), indent=2))
        return 0
    document = usage_document(rows)
    _print_table(
        ["KEY", "PLAN", "MODEL", "IMAGES", "AMOUNT_USD"],
        [[r.key_name, r.plan, r.model_id, r.images, format_usd(r.amount_usd)] for r in rows]
        + [["TOTAL", "", "", document["total_images"], document["total_amount_usd"]]],
    )
    return 0


@contextmanager
def _sessions(settings: Settings | None) -> Iterator[sessionmaker]:
    from service.cli import migrated_engine

    engine = migrated_engine((settings or load_settings()).database_url)
    try:
        yield make_sessionmaker(engine)
    finally:
        engine.dispose()


def _usd(text: str) -> Decimal:
    """A USD amount: exact to the micro-dollar and at most MAX_USD (pricing.usd_to_micros)."""
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"{text!r} is not a USD amount") from None
    try:
        usd_to_micros(text)  # its message quotes the amount as typed
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def _expiry(text: str) -> datetime:
    """`30d` / `12h` from now, or an ISO 8601 time with its zone (`Z` for UTC)."""
    text = text.strip()
    amount = re.fullmatch(r"(\d+(?:\.\d+)?)([dh])", text)
    if amount:
        unit = {"d": "days", "h": "hours"}[amount.group(2)]
        try:
            return datetime.now(UTC) + timedelta(**{unit: float(amount.group(1))})
        except OverflowError:
            raise argparse.ArgumentTypeError(_too_late(text)) from None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected 30d, 12h or an ISO time with a zone (2027-01-31T00:00Z)"
        )
    try:
        return moment.astimezone(UTC)
    except OverflowError:  # near the calendar's ends: 9999-12-31T23:00-05:00 is 10000 in UTC
        raise argparse.ArgumentTypeError(_too_late(text)) from None


def _too_late(text: str) -> str:
    return f"{text!r} is out of range: an expiry lies between now and {datetime.max:%Y-%m-%d} UTC"


def _when(moment: datetime) -> str:
    return f"{moment.astimezone(UTC):%Y-%m-%d %H:%M} UTC"


def _date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date (YYYY-MM-DD)") from None


def _fail(exc: Exception) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return 1


def _print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[str(cell) for cell in row] for row in [headers, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
