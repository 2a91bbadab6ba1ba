"""Plans, prices and exact money: micro-dollars in, Decimal out, nothing rounded silently."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pytest

from service.config import Settings
from service.pricing import (
    MAX_MICROS,
    MAX_USD,
    Plan,
    PlanLimits,
    PriceList,
    format_usd,
    micros_to_usd,
    usd_to_micros,
)


@pytest.mark.parametrize(
    ("usd", "micros"),
    [
        (Decimal("0.0047"), 4_700),
        ("0.000001", 1),
        (Decimal("10"), 10_000_000),
        (3, 3_000_000),
        (Decimal("-0.5"), -500_000),
        (Decimal("0.004700000"), 4_700),
    ],
)
def test_usd_to_micros_is_exact(usd, micros):
    assert usd_to_micros(usd) == micros
    assert micros_to_usd(micros) == Decimal(usd)


@pytest.mark.parametrize(
    "usd",
    [Decimal("0.0000001"), "0.00470001", Decimal("1e-7"), "1.0000000000000000000000000000001"],
)
def test_sub_micro_amounts_are_refused_not_rounded(usd):
    with pytest.raises(ValueError, match="finer than a micro-dollar"):
        usd_to_micros(usd)


@pytest.mark.parametrize("bad", [0.0047, True])
def test_floats_are_not_money(bad):
    with pytest.raises(TypeError):
        usd_to_micros(bad)
    with pytest.raises(TypeError):
        micros_to_usd(bad)


@pytest.mark.parametrize("bad", ["abc", "NaN", "Infinity"])
def test_non_numbers_are_refused(bad):
    with pytest.raises(ValueError):
        usd_to_micros(bad)


def test_usd_is_printed_plainly():
    assert [format_usd(micros_to_usd(m)) for m in (9_400, 0, 10_000_000, 1)] == [
        "0.0094",
        "0",
        "10",
        "0.000001",
    ]


def test_price_list_defaults_to_the_hosted_price():
    models = {"stable-diffu": "models/tiny-sd2", "sdxl": "models/sdxl"}
    prices = PriceList.from_settings(Settings(models=models, prices_usd={"sdxl": Decimal("0.01")}))
    assert prices.price_per_image("stable-diffu") == Decimal("0.0047")
    assert prices.price_per_image("sdxl") == Decimal("0.01")
    assert prices.micros_per_image("sdxl") == 10_000
    assert prices.prices() == {"sdxl": Decimal("0.01")}


@pytest.mark.parametrize("bad", [Decimal("-0.01"), Decimal("0.00470001")])
def test_price_list_refuses_negative_or_sub_micro_prices(bad):
    with pytest.raises(ValueError):
        PriceList(Decimal("0.0047"), {"m": bad})


def test_plans():
    assert [plan.value for plan in Plan] == ["free", "pay_per_use", "premium"]
    assert [plan.charges_per_image for plan in Plan] == [False, True, False]
    assert Plan("premium") is Plan.PREMIUM


def test_plan_limits_from_settings():
    limits = PlanLimits.from_settings(
        Settings(
            max_concurrent_requests={"free": 1, "pay_per_use": 2, "premium": 3},
            free_images_per_month=7,
        )
    )
    assert [limits.concurrency(plan) for plan in Plan] == [1, 2, 3]
    assert limits.concurrency("premium") == 3 and limits.free_images_per_month == 7
    defaults = PlanLimits.from_settings(Settings())
    assert [defaults.concurrency(plan) for plan in Plan] == [5, 10, 15]
    assert defaults.free_images_per_month == 25


@pytest.mark.parametrize(
    "concurrency",
    [{"free": 1, "pay_per_use": 2}, {"free": 1, "pay_per_use": 2, "premium": 0}, {"gold": 1}],
)
def test_plan_limits_refuse_incomplete_or_unknown_plans(concurrency):
    with pytest.raises(ValueError):
        PlanLimits(max_concurrent=concurrency, free_images_per_month=25)


def test_free_allowance_window_is_the_utc_calendar_month():
    start = datetime(2026, 3, 1, tzinfo=UTC)
    assert PlanLimits.month_start(datetime(2026, 3, 31, 23, 59, tzinfo=UTC)) == start
    assert PlanLimits.month_start(start) == start
    # 00:30 on April 1st in UTC+2 is still March in UTC
    plus_two = timezone(timedelta(hours=2))
    assert PlanLimits.month_start(datetime(2026, 4, 1, 0, 30, tzinfo=plus_two)) == start


def test_amounts_beyond_any_balance_are_refused_promptly():
    with pytest.raises(ValueError, match="out of range"):
        usd_to_micros("12345678901234567890123456789.5")
    with pytest.raises(ValueError, match="out of range"):
        usd_to_micros("1e999999999")
    with pytest.raises(ValueError, match="out of range"):
        usd_to_micros("1" * 100_000)  # more digits than int() turns into a number
    with pytest.raises(ValueError, match="finer than a micro-dollar"):
        usd_to_micros("1e-999999999")
    assert usd_to_micros("0e-999999999") == 0


@pytest.mark.parametrize("sign", [1, -1])
def test_amounts_are_at_most_a_billion_usd_which_a_64_bit_column_holds(sign):
    assert (Decimal(10**9), 10**15) == (MAX_USD, MAX_MICROS)
    assert MAX_MICROS * 1000 < 2**63 - 1  # sums of a thousand such balances still fit
    assert usd_to_micros(sign * MAX_USD) == sign * MAX_MICROS
    assert usd_to_micros(sign * Decimal("999999999.999999")) == sign * (MAX_MICROS - 1)
    for beyond in ("1000000000.000001", "1e20", "9999999999999", "1000000001"):
        with pytest.raises(ValueError, match=r"out of range: amounts are at most 1000000000 USD"):
            usd_to_micros(sign * Decimal(beyond))


def test_a_price_beyond_the_largest_amount_is_refused():
    with pytest.raises(ValueError, match="out of range"):
        PriceList(Decimal("0.0047"), {"m": Decimal("1e10")})
