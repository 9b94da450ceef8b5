"""OpenAI-format requests: provider-side search features whose cost nothing in the request bounds."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from resgov.providers.openai import parse_chat
from resgov.providers.responses import parse_responses


def raw(**fields: Any) -> bytes:
    body = {"model": "openrouter/openai/gpt-4o", "messages": [{"role": "user", "content": "hi"}], **fields}
    return orjson.dumps(body)


@pytest.mark.parametrize(
    ("fields", "unbounded"),
    [
        ({"model": "openrouter/openai/gpt-4o:online"}, [":online"]),
        ({"plugins": [{"id": "web", "max_results": 3}]}, ["plugins web"]),
        (
            {"tools": [{"type": "openrouter:web_search", "parameters": {"max_results": 2}}]},
            ["openrouter:web_search"],
        ),
        ({"tools": [{"type": "openrouter:image_generation"}]}, ["openrouter:image_generation"]),
        ({"web_search_options": {"search_context_size": "low"}}, ["web_search_options"]),
        ({"plugins": [{"id": "response-healing"}]}, []),
        ({"tools": [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]}, []),
        ({}, []),
    ],
)
def test_openrouter_features_nothing_bounds_are_reported(
    fields: dict[str, Any], unbounded: list[str]
) -> None:
    # Reported by the parser, refused by the proxy (403 unbounded_cost) before anything is reserved.
    assert parse_chat(raw(**fields)).unbounded_tools == unbounded
    responses = {k: v for k, v in fields.items() if k != "messages"}
    assert (
        parse_responses(
            orjson.dumps({"model": "openrouter/openai/gpt-4o", "input": "hi", **responses})
        ).unbounded_tools
        == unbounded
    )
