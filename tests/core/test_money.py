"""Money at the edges: decimal parsing, rounding up once, and display."""

from __future__ import annotations

import math
from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resgov.core.money import (
    NANO,
    PER_MTOK,
    AmountError,
    ceil_div,
    floor_tokens,
    format_money,
    parse_amount,
    to_units,
    units_decimal,
)


@pytest.mark.parametrize(
    ("value", "nano"),
    [
        ("3.00", 3 * NANO),
        ("0.05", 50_000_000),
        (Decimal("2.98"), 2_980_000_000),
        (0.1, 100_000_000),  # a float goes through its shortest repr, never its binary value
        (0.3, 300_000_000),
        (7, 7 * NANO),
        ("0", 0),
        (" 1.5 ", 1_500_000_000),
        ("0.000000001", 1),
        # More than nine decimals: rounded up (a cost is never under-stated).
        ("0.0000000001", 1),
        ("1.0000000001", NANO + 1),
        ("0.0000000010", 1),
        ("1e-9", 1),
        ("1E3", 1000 * NANO),
    ],
)
def test_parse_amount(value: object, nano: int) -> None:
    assert parse_amount(value) == nano
    assert isinstance(parse_amount(value), int)


@pytest.mark.parametrize(
    "value",
    [True, False, None, "abc", "", "nan", "NaN", "inf", "-inf", float("nan"), float("inf"), [1], {"a": 1}],
)
def test_parse_amount_rejects_non_numbers(value: object) -> None:
    with pytest.raises(AmountError):
        parse_amount(value)


def test_parse_amount_negative_and_absurd() -> None:
    with pytest.raises(AmountError):
        parse_amount("-0.01")
    with pytest.raises(AmountError):
        parse_amount(-1)
    # Ceiling rounds towards +infinity for negatives too.
    assert parse_amount("-0.0000000015", allow_negative=True) == -1
    assert parse_amount("-2.5", allow_negative=True) == -2_500_000_000
    with pytest.raises(AmountError):
        parse_amount("1e30")
    assert parse_amount("1e18") == 10**27


@given(
    st.decimals(min_value=0, max_value=Decimal(10) ** 12, allow_nan=False, allow_infinity=False, places=12)
)
@settings(max_examples=200, deadline=None)
def test_parse_amount_is_exact_ceiling(value: Decimal) -> None:
    nano = parse_amount(value)
    exact = Fraction(value) * NANO
    assert nano == math.ceil(exact)
    assert nano - 1 < exact <= nano


@given(st.integers(min_value=-(10**30), max_value=10**30), st.integers(min_value=1, max_value=10**15))
@settings(max_examples=300, deadline=None)
def test_ceil_div(numerator: int, denominator: int) -> None:
    assert ceil_div(numerator, denominator) == math.ceil(Fraction(numerator, denominator))


@given(st.integers(min_value=0, max_value=10**27), st.integers(min_value=1, max_value=10**15))
@settings(max_examples=300, deadline=None)
def test_floor_tokens_is_the_most_the_amount_buys(nano: int, price: int) -> None:
    """Over every amount ``parse_amount`` accepts (up to 10**27 nano)."""
    tokens = floor_tokens(nano, price)
    assert tokens * price <= nano * PER_MTOK < (tokens + 1) * price


def test_floor_tokens_rejects_free_price() -> None:
    with pytest.raises(ValueError):
        floor_tokens(10, 0)


@pytest.mark.parametrize(
    ("nano", "currency", "text"),
    [
        (3 * NANO, "USD", "$3.00"),
        (2_980_000_000, "USD", "$2.98"),
        (150_000_000, "USD", "$0.15"),
        (0, "USD", "$0.00"),
        (1, "USD", "$0.000000001"),
        (311_000_000, "USD", "$0.311"),
        (123_456_789_012, "USD", "$123.456789012"),
        (1_500_000_000, "EUR", "€1.50"),
        (1_500_000_000, "gbp", "£1.50"),
        (1_500_000_000, "CHF", "1.50 CHF"),
        (-5_000_000_000, "USD", "-$5.00"),
        (10**18, "USD", "$1000000000.00"),
    ],
)
def test_format_money(nano: int, currency: str, text: str) -> None:
    assert format_money(nano, currency) == text


@given(st.integers(min_value=0, max_value=10**21))
@settings(max_examples=300, deadline=None)
def test_format_money_is_exact(nano: int) -> None:
    """The message shows the exact amount: parsing it back gives the same nano-units."""
    text = format_money(nano)
    assert text.startswith("$")
    assert parse_amount(text[1:]) == nano
    assert len(text.split(".")[1]) >= 2


@given(st.integers(min_value=0, max_value=10**15))
@settings(max_examples=300, deadline=None)
def test_to_units_round_trips(nano: int) -> None:
    """JSON numbers at the edges show exactly the nano amount up to a million units.

    A float holds 15 significant digits for sure, so this is where exactness is
    guaranteed (the docstring's "~9 million" is the 2**53 limit, which is not enough:
    8_999_999_999_999_995 nano shows as 8999999.999999994).
    """
    units = to_units(nano)
    assert isinstance(units, float)
    assert parse_amount(units) == nano
    assert units_decimal(nano) * NANO == nano
