"""Prices from a source in OpenRouter's ``GET /api/v1/models`` format. Pure: the fetch is elsewhere.

Each model looks like::

    {"id": "openai/gpt-4o", "context_length": 128000,
     "pricing": {"prompt": "0.0000025", "completion": "0.00001", "request": "0",
                 "input_cache_read": "0.00000125", "input_cache_write": "0", "web_search": "0",
                 "internal_reasoning": "0"},
     "top_provider": {"max_completion_tokens": 16384}}

Prices are per token (or per request / per search) in USD, as decimal strings; they are parsed
as decimals, never floats, and rounded up to nano-units per million tokens. A model whose prompt
or completion price is missing, negative (OpenRouter's ``"-1"`` = variable, e.g. ``openrouter/auto``)
or not a number is skipped: ResGov never guesses a price.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from resgov.core.money import AmountError, parse_amount, to_decimal
from resgov.core.pricing import ModelPrice, Rate, price_per_token_to_mtok

#: A source answering more than this many models is not a price list (or is hostile).
MAX_MODELS = 20_000


class PriceSourceError(ValueError):
    """The source's answer cannot be used; the message says why (shown to the admin)."""


def _per_token(value: Any) -> int | None:
    """A per-token price as nano-units per MTok; None when absent, negative or not a number."""
    if value is None or isinstance(value, bool):
        return None
    try:
        if to_decimal(value) < 0:
            return None
        return price_per_token_to_mtok(value)
    except (AmountError, ArithmeticError):
        return None


def _per_unit(value: Any) -> int | None:
    """A per-request or per-search fee in nano-units (rounded up); None when absent or unusable."""
    if value is None or isinstance(value, bool):
        return None
    try:
        amount = parse_amount(value)
    except (AmountError, ArithmeticError):
        return None
    return amount


def _positive_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def parse_openrouter(payload: Any) -> dict[str, ModelPrice]:
    """Every usable price of an OpenRouter ``/models`` answer, by model id; raises :class:`PriceSourceError`."""
    if not isinstance(payload, Mapping) or not isinstance(payload.get("data"), list):
        raise PriceSourceError("the answer is not an OpenRouter model list (no 'data' array)")
    models = payload["data"]
    if len(models) > MAX_MODELS:
        raise PriceSourceError(f"the answer lists {len(models)} models (more than {MAX_MODELS})")
    out: dict[str, ModelPrice] = {}
    for item in models:
        if not isinstance(item, Mapping):
            continue
        model_id, pricing = item.get("id"), item.get("pricing")
        if (
            not isinstance(model_id, str)
            or not model_id
            or len(model_id) > 256
            or not isinstance(pricing, Mapping)
        ):
            continue
        prompt, completion = _per_token(pricing.get("prompt")), _per_token(pricing.get("completion"))
        if prompt is None or completion is None:
            continue
        cache_read = _per_token(pricing.get("input_cache_read"))
        cache_write = _per_token(pricing.get("input_cache_write"))
        reasoning = _per_token(pricing.get("internal_reasoning"))
        per_request = _per_unit(pricing.get("request")) or 0
        per_search = _per_unit(pricing.get("web_search"))
        top = item.get("top_provider")
        max_out = _positive_int(top.get("max_completion_tokens")) if isinstance(top, Mapping) else None
        out[model_id] = ModelPrice(
            input=Rate(prompt),
            output=Rate(completion),
            # A zero cache price means "not offered" in OpenRouter's list, not "free".
            cache_read=Rate(cache_read) if cache_read else None,
            cache_write=Rate(cache_write) if cache_write else None,
            other_output=(Rate(reasoning),) if reasoning else (),
            per_request=per_request,
            per_web_search=per_search if per_search else None,
            context_window=_positive_int(item.get("context_length")),
            max_output_tokens=max_out,
            source="refreshed",
        )
    if not out:
        raise PriceSourceError("the answer has no model with a usable prompt and completion price")
    return out
