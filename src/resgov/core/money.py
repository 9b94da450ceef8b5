"""Money as integers: nano-units of the budget currency (1 unit = 10^9 nano).

Every amount in the ledger is an ``int``. Decimals appear only at the edges (the
``.rgf`` file, JSON bodies) and are converted here, once, rounding in the direction
that can never let spend slip past a budget.
"""

from __future__ import annotations

from decimal import ROUND_CEILING, Decimal, InvalidOperation

NANO = 1_000_000_000
#: Token prices are stored as nano-units per million tokens.
PER_MTOK = 1_000_000

_CURRENCY_SYMBOLS = {"USD": "$", "EUR": "€", "GBP": "£", "JPY": "¥"}


class AmountError(ValueError):
    """An amount that is not a finite, non-negative decimal number."""


def to_decimal(value: object) -> Decimal:
    """Parse ``value`` as a finite decimal without ever going through binary floats.

    Floats are accepted only through their shortest ``repr`` (what JSON and TOML
    parsers give for ``0.05``), which is the number the user wrote.
    """
    if isinstance(value, bool):
        raise AmountError("expected a number, got a boolean")
    if isinstance(value, Decimal):
        result = value
    elif isinstance(value, int):
        result = Decimal(value)
    elif isinstance(value, float):
        result = Decimal(repr(value))
    elif isinstance(value, str):
        try:
            result = Decimal(value.strip())
        except InvalidOperation as exc:
            raise AmountError(f"not a number: {value!r}") from exc
    else:
        raise AmountError(f"expected a number, got {type(value).__name__}")
    if not result.is_finite():
        raise AmountError("amount must be finite")
    return result


def parse_amount(value: object, *, allow_negative: bool = False) -> int:
    """Convert a user amount in currency units to nano-units, rounding up.

    Rounding up matters for costs (a charge is never under-stated); limits given
    with more than nine decimals are not meaningful and are rounded the same way.
    """
    amount = to_decimal(value)
    if amount < 0 and not allow_negative:
        raise AmountError("amount must not be negative")
    nano = (amount * NANO).to_integral_value(rounding=ROUND_CEILING)
    if abs(nano) > 10**27:
        raise AmountError("amount is absurdly large")
    return int(nano)


def price_per_mtok(value: object) -> int:
    """A token price in currency units per million tokens, as nano-units per MTok (rounded up)."""
    return parse_amount(value)


def token_cost(tokens: int, nano_per_mtok: int) -> tuple[int, int]:
    """The exact cost of ``tokens`` at a per-MTok price, as a fraction ``(numerator, PER_MTOK)``.

    Costs of several components are summed as fractions and rounded up once with
    :func:`ceil_div`, so a call is never charged more than one nano-unit of rounding.
    """
    return tokens * nano_per_mtok, PER_MTOK


def ceil_div(numerator: int, denominator: int) -> int:
    """Integer division rounding towards +infinity."""
    return -((-numerator) // denominator)


def to_units(nano: int) -> float:
    """Nano-units as a JSON number in currency units (``311_000_000`` → ``0.311``).

    Only for display: the float is the shortest decimal that round-trips, so it
    shows exactly the nano amount for any amount below 1 million units (10^15 nano).
    """
    # int / int is the correctly rounded quotient (what float(Decimal) gave, without its cost).
    return nano / NANO


def units_text(nano: int) -> str:
    """Nano-units as an exact decimal string in currency units (``311_000_000`` → ``"0.311"``)."""
    whole, frac = divmod(abs(nano), NANO)
    sign = "-" if nano < 0 else ""
    if not frac:
        return f"{sign}{whole}"
    return f"{sign}{whole}.{frac:09d}".rstrip("0")


def units_decimal(nano: int) -> Decimal:
    """Nano-units as an exact Decimal in currency units."""
    return Decimal(nano) / NANO


def format_money(nano: int, currency: str = "USD") -> str:
    """Human-readable amount for messages: ``$2.98``; more decimals only when needed.

    Rounded up for costs and limits alike would mislead in both directions, so the
    amount is shown exactly (up to nine decimals), with at least two.
    """
    symbol = _CURRENCY_SYMBOLS.get(currency.upper())
    quantized = units_decimal(nano)
    text = f"{quantized:.9f}".rstrip("0")
    whole, _, frac = text.partition(".")
    frac = frac.ljust(2, "0")
    body = f"{whole}.{frac}"
    if symbol:
        if body.startswith("-"):
            return f"-{symbol}{body[1:]}"
        return f"{symbol}{body}"
    return f"{body} {currency.upper()}"


def floor_tokens(nano: int, nano_per_mtok: int) -> int:
    """How many whole tokens ``nano`` buys at a per-MTok price (rounded down)."""
    if nano_per_mtok <= 0:
        raise ValueError("price must be positive")
    # Integer arithmetic: Decimal's 28-digit context would round large amounts.
    return (nano * PER_MTOK) // nano_per_mtok
