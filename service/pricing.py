"""Plans, the price list and exact money: USD as Decimal at the edges, micro-dollars inside.

The database stores integer micro-dollars (1 USD = 1_000_000) so sums are exact on every
engine; these helpers refuse amounts finer than a micro-dollar instead of rounding them away.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from types import MappingProxyType

from service.config import Settings

MICROS_PER_USD = 1_000_000
_MICRO = Decimal(MICROS_PER_USD)


class Plan(enum.StrEnum):
    """What a key pays: free images per month, a prepaid balance, or nothing per image."""

    FREE = "free"
    PAY_PER_USE = "pay_per_use"
    PREMIUM = "premium"

    @property
    def charges_per_image(self) -> bool:
        """Only pay-per-use keys are debited; free and premium images cost them nothing."""
        return self is Plan.PAY_PER_USE


# The largest amount of money sdserve holds: a balance, a top-up, a price, a setting. One billion
# USD, 10**15 micro-dollars: a signed 64-bit column (BIGINT, SQLite's INTEGER) holds 9.2 * 10**18,
# so a request's price (a price times its images) and a sum over thousands of keys' balances
# stay exact integers on every engine.
MAX_USD = Decimal(1_000_000_000)
MAX_MICROS = int(MAX_USD) * MICROS_PER_USD


def usd_to_micros(usd: Decimal | int | str) -> int:
    """Exact micro-dollars of `usd`; ValueError for sub-micro precision or a magnitude above
    MAX_USD, TypeError for floats."""
    if isinstance(usd, float | bool):
        raise TypeError(f"money must be a Decimal, int or str, not {type(usd).__name__}")
    try:
        value = Decimal(usd)
    except InvalidOperation:
        raise ValueError(f"{usd!r} is not an amount of USD") from None
    if not value.is_finite():
        raise ValueError(f"{usd!r} is not an amount of USD")
    # On the digits, not with Decimal arithmetic, which rounds to the context's 28 digits and
    # would turn a sub-micro amount with more digits into a silently rounded one.
    sign, digits, exponent = value.as_tuple()
    digits, shift = list(digits), exponent + 6
    while shift < 0 and digits and digits[-1] == 0:  # 0.004700000: zeros are not precision
        digits.pop()
        shift += 1
    if not any(digits):
        return 0
    if shift < 0:
        raise ValueError(f"{usd} USD is finer than a micro-dollar (0.000001 USD)")
    # the digits have no leading zero: the amount is at least 10**(len + shift - 1) micros, so
    # a huge one is refused before its digits are turned into a number
    if len(digits) + shift > len(str(MAX_MICROS)):
        raise ValueError(f"{usd} USD is out of range: amounts are at most {MAX_USD} USD")
    micros = int("".join(map(str, digits))) * 10**shift
    if micros > MAX_MICROS:
        raise ValueError(f"{usd} USD is out of range: amounts are at most {MAX_USD} USD")
    return -micros if sign else micros


def micros_to_usd(micros: int) -> Decimal:
    """USD of an integer number of micro-dollars, without trailing zeros (0.0047, 10)."""
    if isinstance(micros, bool) or not isinstance(micros, int):
        raise TypeError(f"micro-dollars must be an int, not {type(micros).__name__}")
    return Decimal(micros) / _MICRO


def format_usd(usd: Decimal) -> str:
    """Plain notation for messages and tables: '0.0094', never '9.4E-3'."""
    return f"{usd:f}"


class PriceList:
    """Price of one image per model_id; models without their own price use the default."""

    def __init__(self, default_usd: Decimal, prices_usd: Mapping[str, Decimal] | None = None):
        self._default = _price_micros("default price", default_usd)
        self._prices = {
            model_id: _price_micros(f"price of {model_id}", usd)
            for model_id, usd in (prices_usd or {}).items()
        }

    @classmethod
    def from_settings(cls, settings: Settings) -> PriceList:
        own_prices = {
            model_id: spec.price_per_image_usd
            for model_id, spec in settings.model_specs().items()
            if spec.price_per_image_usd is not None
        }
        return cls(settings.default_price_per_image_usd, {**settings.prices_usd, **own_prices})

    def price_per_image(self, model_id: str) -> Decimal:
        """USD per image of `model_id`."""
        return micros_to_usd(self.micros_per_image(model_id))

    def micros_per_image(self, model_id: str) -> int:
        return self._prices.get(model_id, self._default)

    def prices(self) -> dict[str, Decimal]:
        """The explicitly priced models (for metrics and docs)."""
        return {model_id: micros_to_usd(m) for model_id, m in self._prices.items()}


def _price_micros(what: str, usd: Decimal) -> int:
    micros = usd_to_micros(usd)
    if micros < 0:
        raise ValueError(f"{what} must not be negative, got {usd} USD")
    return micros


@dataclass(frozen=True)
class PlanLimits:
    """Per-plan concurrency (requests queued or running per key) and the free monthly allowance."""

    max_concurrent: Mapping[Plan, int] = field(
        default_factory=lambda: {Plan.FREE: 5, Plan.PAY_PER_USE: 10, Plan.PREMIUM: 15}
    )
    free_images_per_month: int = 25

    def __post_init__(self):
        unknown = [plan for plan in self.max_concurrent if plan not in Plan._value2member_map_]
        if unknown:
            raise ValueError(
                f"max_concurrent_requests names unknown plan(s) {unknown}; plans: "
                f"{', '.join(plan.value for plan in Plan)}"
            )
        limits = {Plan(plan): int(n) for plan, n in self.max_concurrent.items()}
        missing = [plan.value for plan in Plan if plan not in limits]
        if missing:
            raise ValueError(f"max_concurrent_requests has no limit for plan(s) {missing}")
        if any(n < 1 for n in limits.values()):
            raise ValueError("max_concurrent_requests must be at least 1 for every plan")
        if self.free_images_per_month < 0:
            raise ValueError("free_images_per_month must not be negative")
        object.__setattr__(self, "max_concurrent", MappingProxyType(limits))

    @classmethod
    def from_settings(cls, settings: Settings) -> PlanLimits:
        return cls(
            max_concurrent=settings.max_concurrent_requests,
            free_images_per_month=settings.free_images_per_month,
        )

    def concurrency(self, plan: Plan | str) -> int:
        """Most requests a key of `plan` may have processing at once."""
        return self.max_concurrent[Plan(plan)]

    @staticmethod
    def month_start(now: datetime) -> datetime:
        """Start of the calendar month (UTC) that `now` falls in: the free allowance's window."""
        now = now.astimezone(UTC) if now.tzinfo else now.replace(tzinfo=UTC)
        return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
