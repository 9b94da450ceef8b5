"""Model prices and the two cost functions every part of ResGov uses.

``bound_cost`` prices the worst case a request can reach (for reservations);
``usage_cost`` prices what the provider reported (for finalization). Both live here
and nowhere else. Prices are integers: nano-units per million tokens.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from resgov.core.money import PER_MTOK, ceil_div, parse_amount, to_decimal


@dataclass(frozen=True, slots=True)
class Rate:
    """A per-MTok price, optionally tiered by the request's total input tokens.

    ``tiers`` holds ``(start, price)`` pairs, ascending; a tier applies when the
    request's input tokens are strictly above ``start`` (the providers' rule).
    """

    base: int
    tiers: tuple[tuple[int, int], ...] = ()

    def at(self, total_input_tokens: int) -> int:
        """The price that applies to a request with ``total_input_tokens`` input tokens."""
        price = self.base
        for start, tier_price in self.tiers:
            if total_input_tokens > start:
                price = tier_price
        return price

    def max_reachable(self, input_bound: int) -> int:
        """The highest price any request with at most ``input_bound`` input tokens can pay."""
        price = self.base
        for start, tier_price in self.tiers:
            if input_bound > start:
                price = max(price, tier_price)
        return price


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """Everything that can cost money on one model."""

    input: Rate
    output: Rate
    cache_read: Rate | None = None
    cache_write: Rate | None = None
    cache_write_1h: Rate | None = None
    input_audio: Rate | None = None
    output_audio: Rate | None = None
    #: Other input-side and output-side token prices (images, video, reasoning...):
    #: only used to keep the worst case a true upper bound.
    other_input: tuple[Rate, ...] = ()
    other_output: tuple[Rate, ...] = ()
    #: Fixed fee per request, nano-units (rounded up).
    per_request: int = 0
    #: Fee per provider-side web search, nano-units; ``None`` if the model has none.
    per_web_search: int | None = None
    context_window: int | None = None
    max_output_tokens: int | None = None
    source: str = "library"

    def max_input_rate(self, input_bound: int) -> int:
        """The highest per-MTok price any input token of the request can be charged."""
        rates = [self.input, *self.other_input]
        rates += [r for r in (self.cache_read, self.cache_write, self.cache_write_1h, self.input_audio) if r]
        return max(r.max_reachable(input_bound) for r in rates)

    def max_output_rate(self, input_bound: int) -> int:
        """The highest per-MTok price any output token of the request can be charged."""
        rates = [self.output, *self.other_output]
        if self.output_audio:
            rates.append(self.output_audio)
        return max(r.max_reachable(input_bound) for r in rates)


@dataclass(slots=True)
class Usage:
    """Token counts as a provider reports them, split by how each is priced.

    Not frozen: one is built per proxied call, and a frozen dataclass costs 2-3x as much to
    build in CPython 3.11 (see ``resgov.ledger.store``).

    ``input_tokens`` counts only input billed at the plain input rate; cache reads,
    cache writes and audio are separate so each gets its own price.
    """

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    cache_write_1h_tokens: int = 0
    input_audio_tokens: int = 0
    output_audio_tokens: int = 0
    web_searches: int = 0

    @property
    def total_input(self) -> int:
        """All input tokens, whatever their price (decides the price tier)."""
        return (
            self.input_tokens
            + self.cache_read_tokens
            + self.cache_write_tokens
            + self.cache_write_1h_tokens
            + self.input_audio_tokens
        )

    @property
    def total_output(self) -> int:
        """All output tokens, whatever their price."""
        return self.output_tokens + self.output_audio_tokens


def usage_cost(price: ModelPrice, usage: Usage) -> int:
    """The cost of a reported usage, in nano-units, rounded up once."""
    tier_basis = usage.total_input
    inp = price.input.at(tier_basis)
    parts = [
        usage.input_tokens * inp,
        usage.output_tokens * price.output.at(tier_basis),
        usage.cache_read_tokens * (price.cache_read or price.input).at(tier_basis),
        usage.cache_write_tokens * (price.cache_write or price.input).at(tier_basis),
        usage.cache_write_1h_tokens
        * (price.cache_write_1h or price.cache_write or price.input).at(tier_basis),
        # Audio priced at the larger of its own and the text rate when the library
        # has no audio price: never under-charge.
        usage.input_audio_tokens * max(inp, price.input_audio.at(tier_basis) if price.input_audio else 0),
        usage.output_audio_tokens
        * max(price.output.at(tier_basis), price.output_audio.at(tier_basis) if price.output_audio else 0),
    ]
    total = ceil_div(sum(parts), PER_MTOK) + price.per_request
    if usage.web_searches and price.per_web_search:
        total += usage.web_searches * price.per_web_search
    return total


def bound_cost(price: ModelPrice, input_bound: int, output_bound: int, web_searches: int = 0) -> int:
    """The most a request with these token bounds can cost, in nano-units, rounded up.

    Every input token is priced at the dearest input-side rate the request can reach
    (cache writes, higher tiers) and every output token at the dearest output rate.
    """
    numerator = input_bound * price.max_input_rate(input_bound) + output_bound * price.max_output_rate(
        input_bound
    )
    total = ceil_div(numerator, PER_MTOK) + price.per_request
    if web_searches:
        total += web_searches * (price.per_web_search or 0)
    return total


def affordable_output_tokens(price: ModelPrice, input_bound: int, budget_nano: int) -> int:
    """The largest output cap whose worst case still fits in ``budget_nano`` (0 if none).

    Exact: ``ceil(x / 10^6) + fee <= budget`` iff ``x <= (budget - fee) * 10^6``, so the answer
    is one integer division, with no second rounding to drift.
    """
    available = (budget_nano - price.per_request) * PER_MTOK - input_bound * price.max_input_rate(input_bound)
    if available < 0:
        return 0
    rate = price.max_output_rate(input_bound)
    if rate <= 0:
        return 1 << 30
    return available // rate


# --- price sources -------------------------------------------------------------------------------

_INPUT_KEYS = ("input_image_mtok", "input_video_mtok", "cache_audio_read_mtok", "cache_image_read_mtok")
_OUTPUT_KEYS = (
    "output_reasoning_mtok",
    "output_citation_mtok",
    "output_image_mtok",
    "output_video_mtok",
)


def _rate_from_library(value: Any) -> Rate | None:
    if value is None:
        return None
    if isinstance(value, Decimal | int | float | str):
        return Rate(parse_amount(value))
    tiers = tuple(sorted((int(t.start), parse_amount(t.price)) for t in value.tiers))
    return Rate(parse_amount(value.base), tiers)


def price_from_library(model_price: Any, context_window: int | None) -> ModelPrice | None:
    """Convert a genai-prices ``ModelPrice`` into ours; ``None`` if it is not token-priced."""
    attrs = {k: v for k, v in vars(model_price).items() if v is not None}
    inp = _rate_from_library(attrs.get("input_mtok"))
    out = _rate_from_library(attrs.get("output_mtok"))
    if inp is None or out is None:
        # Priced per character, per page or per hour: ResGov cannot bound that from tokens.
        return None
    per_request = 0
    if "requests_kcount" in attrs:
        per_request = ceil_div(parse_amount(attrs["requests_kcount"]), 1000)
    per_search = None
    if "web_searches_kcount" in attrs:
        per_search = ceil_div(parse_amount(attrs["web_searches_kcount"]), 1000)
    return ModelPrice(
        input=inp,
        output=out,
        cache_read=_rate_from_library(attrs.get("cache_read_mtok")),
        cache_write=_rate_from_library(attrs.get("cache_write_mtok")),
        cache_write_1h=_rate_from_library(attrs.get("cache_write_1h_mtok")),
        input_audio=_rate_from_library(attrs.get("input_audio_mtok")),
        output_audio=_rate_from_library(attrs.get("output_audio_mtok")),
        other_input=tuple(r for k in _INPUT_KEYS if (r := _rate_from_library(attrs.get(k)))),
        other_output=tuple(r for k in _OUTPUT_KEYS if (r := _rate_from_library(attrs.get(k)))),
        per_request=per_request,
        per_web_search=per_search,
        context_window=context_window,
        source="library",
    )


#: Provider names ResGov and genai-prices share; anything else is looked up by base URL.
LibraryLookup = Callable[[str, str, str, datetime], ModelPrice | None]


def genai_prices_lookup(provider: str, model: str, base_url: str, when: datetime) -> ModelPrice | None:
    """Look a model up in the genai-prices data bundled with the package (no network).

    The provider is matched by id first, then by the upstream's base URL; a model that
    neither identifies is unknown, never guessed from another provider's list.
    """
    from genai_prices.data_snapshot import get_snapshot

    snapshot = get_snapshot()
    for provider_id, api_url in ((provider, None), (None, base_url)):
        try:
            _, info = snapshot.find_provider_model(model, None, provider_id, api_url)
        except LookupError:
            continue
        try:
            library_price = info.get_prices(when)
        except (LookupError, ValueError):
            return None
        return price_from_library(library_price, info.context_window)
    return None


def genai_prices_models(provider: str, base_url: str) -> list[str]:
    """Model ids the price library knows for a provider (matched by id, then by base URL)."""
    from genai_prices.data_snapshot import get_snapshot

    snapshot = get_snapshot()
    for candidate in snapshot.providers:
        if candidate.id == provider:
            return [m.id for m in candidate.models]
    for candidate in snapshot.providers:
        pattern = getattr(candidate, "api_pattern", None)
        if pattern and re.match(pattern, base_url):
            return [m.id for m in candidate.models]
    return []


@dataclass
class PriceBook:
    """Resolves the price of a model: ``.rgf`` overrides, then refreshed prices, then the library.

    Library lookups are memoised per day (library prices change by date).
    """

    overrides: Mapping[str, ModelPrice] = field(default_factory=dict)
    refreshed: Mapping[str, ModelPrice] = field(default_factory=dict)
    library: LibraryLookup | None = genai_prices_lookup
    catalogue: Callable[[str, str], list[str]] | None = genai_prices_models
    _memo: dict[tuple[str, str, str, str], ModelPrice | None] = field(default_factory=dict)

    def known_models(self, provider: str, base_url: str) -> list[str]:
        """Model ids the library prices for this provider (empty when library prices are off)."""
        if self.library is None or self.catalogue is None:
            return []
        return self.catalogue(provider, base_url)

    def lookup(
        self,
        client_model: str,
        provider: str,
        upstream_model: str,
        base_url: str,
        when: datetime | None = None,
    ) -> ModelPrice | None:
        """The price for a call, or ``None`` when no source knows the model."""
        found = self.overrides.get(client_model) or self.overrides.get(f"{provider}/{upstream_model}")
        if found:
            return found
        found = self.refreshed.get(client_model) or self.refreshed.get(upstream_model)
        if found:
            return found
        if self.library is None:
            return None
        when = when or datetime.now(UTC)
        key = (provider, upstream_model, base_url, when.date().isoformat())
        if key not in self._memo:
            if len(self._memo) > 4096:
                self._memo.clear()
            self._memo[key] = self.library(provider, upstream_model, base_url, when)
        return self._memo[key]


def price_per_token_to_mtok(value: object) -> int:
    """An OpenRouter-style per-token price (``"0.000003"``) as nano-units per MTok, rounded up."""
    return parse_amount(to_decimal(value) * PER_MTOK)
