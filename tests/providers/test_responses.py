"""Responses API requests: what bounds a call's cost, and what cannot be bounded."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from resgov.core.bounds import SEARCH_RESULT_TOKENS
from resgov.providers.responses import parse_responses


def raw(**fields: Any) -> bytes:
    return orjson.dumps({"model": "gpt-sim", "input": "find it", **fields})


@pytest.mark.parametrize("kind", ["web_search", "web_search_preview", "file_search"])
def test_each_search_call_allowed_adds_its_results_to_the_input_bound(kind: str) -> None:
    # The results are billed as input but are not in the body: max_tool_calls of them are allowed for.
    data = raw(tools=[{"type": kind}], max_tool_calls=3)
    req = parse_responses(data)
    assert req.web_searches == 3
    assert req.raw_size == len(data) + 3 * SEARCH_RESULT_TOKENS
    assert req.unbounded_tools == []
    # Without max_tool_calls nothing bounds the calls (refused by the proxy when they are priced).
    assert parse_responses(raw(tools=[{"type": kind}])).web_searches is None


def test_function_tools_add_nothing() -> None:
    data = raw(tools=[{"type": "function", "name": "lookup", "parameters": {"type": "object"}}])
    req = parse_responses(data)
    assert (req.web_searches, req.raw_size, req.unbounded_tools) == (0, len(data), [])


@pytest.mark.parametrize(
    "tool",
    [
        {"type": "mcp", "server_label": "gh", "server_url": "https://mcp.example"},
        {"type": "code_interpreter", "container": {"type": "auto"}},
        {"type": "image_generation", "size": "1024x1024"},
    ],
)
def test_tools_whose_results_nothing_bounds_are_reported(tool: dict[str, Any]) -> None:
    # Reported by the parser, refused by the proxy (403 unbounded_cost) before anything is reserved.
    req = parse_responses(raw(tools=[tool], max_tool_calls=1))
    assert req.unbounded_tools == [tool["type"]]
