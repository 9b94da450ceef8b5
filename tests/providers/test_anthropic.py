"""Anthropic Messages: request checks, usage (cache tokens priced right), the stream scanner."""

from __future__ import annotations

import itertools
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resgov.core.bounds import SEARCH_RESULT_TOKENS, input_bound
from resgov.core.errors import BadRequest, Forbidden, InvalidValue
from resgov.core.policy import ProviderPolicy
from resgov.core.pricing import ModelPrice, Rate, Usage, usage_cost
from resgov.providers.anthropic import (
    MAX_OUTPUT_CAP,
    Messages,
    MessagesEvents,
    MessagesStreamScanner,
    messages_path,
    parse_messages,
    usage_from_anthropic,
)
from resgov.providers.sse import decode_event, event_data


def raw(**fields: Any) -> bytes:
    body: dict[str, Any] = {
        "model": "anthropic/claude-sonnet-4-6",
        "max_tokens": 256,
        "messages": [{"role": "user", "content": "hello"}],
    }
    body.update(fields)
    return orjson.dumps({k: v for k, v in body.items() if v is not ...})


# --- parse -----------------------------------------------------------------------------------------


def test_parse_minimal() -> None:
    data = raw()
    req = parse_messages(data)
    assert req.model == "anthropic/claude-sonnet-4-6"
    assert req.output_cap == 256
    assert req.n == 1
    assert not req.stream
    assert req.message_count == 1
    assert req.raw_size == len(data)
    assert req.tools == []
    assert req.web_searches == 0


def test_parse_system_counts_as_a_message_and_is_walked_for_media() -> None:
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "A" * 5000}}
    system = [{"type": "text", "text": "be brief"}, image]
    data = raw(system=system, stream=True)
    req = parse_messages(data)
    assert req.stream
    assert req.message_count == 2
    bound = input_bound(req.raw_size, req.media_root, req.message_count, False, None)
    assert bound.media_parts == 1
    # The 5,000 base64 bytes are replaced by the per-image ceiling, not counted as text.
    assert bound.tokens < len(data) + 20_000


def test_parse_documents_in_messages_and_tool_results_are_found() -> None:
    doc = {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBER"}}
    image = {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}}
    messages = [
        {"role": "user", "content": [doc, {"type": "text", "text": "summarise"}]},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "look", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": [image]}]},
    ]
    req = parse_messages(raw(messages=messages))
    bound = input_bound(req.raw_size, req.media_root, req.message_count, True, 200_000)
    assert (bound.media_parts, bound.document_parts) == (1, 1)


@pytest.mark.parametrize(
    ("fields", "error", "needle"),
    [
        ({"max_tokens": ...}, BadRequest, "'max_tokens' is required"),
        ({"max_tokens": None}, BadRequest, "'max_tokens' is required"),
        ({"max_tokens": "100"}, BadRequest, "integer"),
        ({"max_tokens": True}, BadRequest, "integer"),
        ({"max_tokens": 0}, InvalidValue, "between"),
        ({"max_tokens": -5}, InvalidValue, "between"),
        ({"max_tokens": MAX_OUTPUT_CAP + 1}, InvalidValue, "between"),
        ({"model": ...}, BadRequest, "model"),
        ({"model": 3}, BadRequest, "model"),
        ({"messages": "hi"}, BadRequest, "messages"),
        ({"messages": ["hi"]}, BadRequest, "messages[0]"),
        ({"messages": [{"role": 1, "content": "x"}]}, BadRequest, "role"),
        ({"messages": [{"role": "system", "content": "x"}]}, InvalidValue, "role"),
        ({"messages": [{"role": "user", "content": 5}]}, BadRequest, "content"),
        ({"messages": [{"role": "user", "content": ["x"]}]}, BadRequest, "blocks"),
        ({"system": 5}, BadRequest, "system"),
        ({"stream": "yes"}, BadRequest, "stream"),
        ({"thinking": "on"}, BadRequest, "thinking"),
        ({"thinking": {"type": 1}}, BadRequest, "thinking.type"),
        ({"thinking": {"type": "enabled", "budget_tokens": "2000"}}, BadRequest, "budget_tokens"),
        ({"thinking": {"type": "enabled", "budget_tokens": 0}}, InvalidValue, "budget_tokens"),
        ({"tools": {}}, BadRequest, "tools"),
        ({"tools": [5]}, BadRequest, "tools[0]"),
        ({"tools": [{"description": "nameless"}]}, BadRequest, "name"),
        (
            {"tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": "3"}]},
            BadRequest,
            "max_uses",
        ),
        (
            {"tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 0}]},
            InvalidValue,
            "max_uses",
        ),
        (
            {
                "tools": [
                    {
                        "type": "web_fetch_20250910",
                        "name": "web_fetch",
                        "max_uses": 2,
                        "max_content_tokens": 1.5,
                    }
                ]
            },
            BadRequest,
            "max_content_tokens",
        ),
        (
            {
                "tools": [
                    {
                        "type": "web_fetch_20250910",
                        "name": "web_fetch",
                        "max_uses": 0,
                        "max_content_tokens": 9,
                    }
                ]
            },
            InvalidValue,
            "max_uses",
        ),
        ({"tool_choice": "auto"}, BadRequest, "tool_choice"),
        ({"tool_choice": {"type": "tool"}}, BadRequest, "tool_choice.name"),
        ({"mcp_servers": {}}, BadRequest, "mcp_servers"),
    ],
)
def test_parse_refusals(fields: dict[str, Any], error: type[Exception], needle: str) -> None:
    with pytest.raises(error) as info:
        parse_messages(raw(**fields))
    assert needle in str(info.value)
    # 400 for types, 422 for values: as the rest of ResGov.
    assert info.value.status == (400 if error is BadRequest else 422)  # type: ignore[attr-defined]


def test_parse_invalid_json() -> None:
    for data in (b"{", b"[]", b'"x"'):
        with pytest.raises(BadRequest):
            parse_messages(data)


def test_thinking_lives_inside_max_tokens() -> None:
    req = parse_messages(raw(max_tokens=16_000, thinking={"type": "enabled", "budget_tokens": 10_000}))
    assert req.output_cap == 16_000


def test_tool_names_server_tools_and_web_search_bound() -> None:
    tools = [
        {"name": "get_weather", "description": "d", "input_schema": {"type": "object"}},
        {"type": "custom", "name": "lookup", "input_schema": {"type": "object"}},
        {"type": "web_search_20250305", "name": "web_search", "max_uses": 3},
        {"type": "bash_20250124", "name": "bash"},
    ]
    data = raw(tools=tools, tool_choice={"type": "tool", "name": "get_weather"})
    req = parse_messages(data)
    assert req.tools == ["get_weather", "lookup", "web_search", "bash"]
    assert req.web_searches == 3
    # Search results are input the body does not hold: allowed for per search.
    assert req.raw_size == len(data) + 3 * SEARCH_RESULT_TOKENS


def test_web_search_without_max_uses_is_unbounded() -> None:
    tools = [{"type": "web_search_20250305", "name": "web_search"}]
    assert parse_messages(raw(tools=tools)).web_searches is None


def test_web_fetch_pages_are_in_the_input_bound() -> None:
    tools = [
        {"type": "web_fetch_20250910", "name": "web_fetch", "max_uses": 2, "max_content_tokens": 5_000},
        {"type": "web_search_20250305", "name": "web_search", "max_uses": 1},
    ]
    data = raw(tools=tools)
    req = parse_messages(data)
    assert req.tools == ["web_fetch", "web_search"]
    # Fetched pages are input the body does not hold: up to max_uses pages of max_content_tokens.
    assert req.raw_size == len(data) + 1 * SEARCH_RESULT_TOKENS + 2 * 5_000


@pytest.mark.parametrize("limits", [{}, {"max_uses": 3}, {"max_content_tokens": 4_000}])
def test_web_fetch_without_both_limits_is_unbounded_and_refused(limits: dict[str, int]) -> None:
    tools = [{"type": "web_fetch_20250910", "name": "web_fetch", **limits}]
    with pytest.raises(Forbidden) as info:
        parse_messages(raw(tools=tools))
    assert info.value.status == 403 and info.value.reason == "unbounded_cost"
    assert "max_content_tokens" in info.value.message and "max_uses" in info.value.message


@pytest.mark.parametrize(
    ("fields", "unbounded"),
    [
        (
            {"tools": [{"type": "code_execution_20250825", "name": "code_execution"}]},
            ["code_execution_20250825"],
        ),
        ({"mcp_servers": [{"type": "url", "url": "https://a", "name": "gh"}]}, ["mcp_servers"]),
        ({"tools": [{"type": "mcp_toolset", "mcp_server_name": "gh"}]}, ["mcp_toolset"]),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 2}]}, []),
        ({"tools": [{"name": "lookup", "input_schema": {"type": "object"}}]}, []),
        ({"mcp_servers": []}, []),
    ],
)
def test_server_tools_nothing_bounds_are_reported(fields: dict[str, Any], unbounded: list[str]) -> None:
    # The parser reports them; the proxy refuses them (403 unbounded_cost) before reserving.
    assert parse_messages(raw(**fields)).unbounded_tools == unbounded


def test_forced_tool_not_offered_is_still_checked() -> None:
    req = parse_messages(raw(tool_choice={"type": "tool", "name": "rm_rf"}))
    assert req.tools == ["rm_rf"]


def test_mcp_server_tools_are_named() -> None:
    servers = [
        {
            "type": "url",
            "url": "https://a",
            "name": "gh",
            "tool_configuration": {"allowed_tools": ["issues"]},
        },
        {"type": "url", "url": "https://b", "name": "drive"},
    ]
    assert parse_messages(raw(mcp_servers=servers)).tools == ["issues", "drive"]


# --- build_upstream --------------------------------------------------------------------------------


def provider(base_url: str = "https://api.anthropic.com") -> ProviderPolicy:
    return ProviderPolicy(name="anthropic", base_url=base_url, format="anthropic")


def test_build_upstream_renames_model_and_sets_cap() -> None:
    adapter = Messages()
    req = adapter.parse(raw(max_tokens=1000, metadata={"user_id": "u"}))
    path, body = adapter.build_upstream(req, 600, "claude-sonnet-4-6", provider())
    sent = orjson.loads(body)
    assert path == "/v1/messages"
    assert sent["model"] == "claude-sonnet-4-6"
    assert sent["max_tokens"] == 600
    assert sent["metadata"] == {"user_id": "u"}
    # A base URL that already ends in /v1 is not doubled.
    assert adapter.build_upstream(req, 600, "m", provider("https://proxy.example/v1"))[0] == "/messages"
    assert messages_path(provider("https://x/v1/")) == "/messages"


def test_shrunk_cap_keeps_a_thinking_budget_valid() -> None:
    adapter = Messages()
    req = adapter.parse(raw(max_tokens=20_000, thinking={"type": "enabled", "budget_tokens": 10_000}))
    _, body = adapter.build_upstream(req, 8_000, "m", provider())
    assert orjson.loads(body)["thinking"] == {"type": "enabled", "budget_tokens": 7_999}
    _, body = adapter.build_upstream(req, 20_000, "m", provider())
    assert orjson.loads(body)["thinking"]["budget_tokens"] == 10_000


def test_identity_body_and_error() -> None:
    adapter = Messages()
    assert adapter.client_body(b'{"a":1}', {"a": 1}, parse_messages(raw())) == b'{"a":1}'
    assert adapter.client_error(429, b"x") == b"x"


# --- usage -----------------------------------------------------------------------------------------


def test_usage_plain() -> None:
    usage = usage_from_anthropic({"input_tokens": 10, "output_tokens": 5})
    assert usage == Usage(input_tokens=10, output_tokens=5)


def test_usage_cache_without_split_is_all_five_minute() -> None:
    usage = usage_from_anthropic(
        {
            "input_tokens": 10,
            "output_tokens": 5,
            "cache_read_input_tokens": 100,
            "cache_creation_input_tokens": 40,
        }
    )
    assert usage == Usage(input_tokens=10, output_tokens=5, cache_read_tokens=100, cache_write_tokens=40)
    assert usage is not None and usage.total_input == 150


def test_usage_cache_split_and_web_searches() -> None:
    usage = usage_from_anthropic(
        {
            "input_tokens": 10,
            "output_tokens": 5,
            "cache_read_input_tokens": None,
            "cache_creation_input_tokens": 70,
            "cache_creation": {"ephemeral_5m_input_tokens": 30, "ephemeral_1h_input_tokens": 40},
            "server_tool_use": {"web_search_requests": 2, "web_fetch_requests": 1},
        }
    )
    assert usage == Usage(
        input_tokens=10, output_tokens=5, cache_write_tokens=30, cache_write_1h_tokens=40, web_searches=2
    )


def test_usage_total_above_split_is_never_lost() -> None:
    usage = usage_from_anthropic(
        {
            "input_tokens": 1,
            "output_tokens": 1,
            "cache_creation_input_tokens": 100,
            "cache_creation": {"ephemeral_5m_input_tokens": 10, "ephemeral_1h_input_tokens": 40},
        }
    )
    assert usage is not None
    assert (usage.cache_write_tokens, usage.cache_write_1h_tokens) == (60, 40)


@pytest.mark.parametrize(
    "bad",
    [
        None,
        "usage",
        [],
        {"input_tokens": -1, "output_tokens": 1},
        {"input_tokens": "3", "output_tokens": 1},
        {"input_tokens": 1, "output_tokens": True},
        {"input_tokens": 1, "output_tokens": 1.5},
        {"input_tokens": 1, "output_tokens": 1, "cache_creation": 5},
        {"input_tokens": 1, "output_tokens": 1, "cache_creation": {"ephemeral_1h_input_tokens": -2}},
        {"input_tokens": 1, "output_tokens": 1, "server_tool_use": "x"},
    ],
)
def test_usage_malformed(bad: Any) -> None:
    assert usage_from_anthropic(bad) is None


def test_cache_tokens_priced_at_their_own_rates() -> None:
    """Sonnet-like prices: input $3, output $15, cache read $0.30, 5m write $3.75, 1h write $6."""
    price = ModelPrice(
        input=Rate(3_000_000_000),
        output=Rate(15_000_000_000),
        cache_read=Rate(300_000_000),
        cache_write=Rate(3_750_000_000),
        cache_write_1h=Rate(6_000_000_000),
    )
    usage = usage_from_anthropic(
        {
            "input_tokens": 1_000,
            "output_tokens": 2_000,
            "cache_read_input_tokens": 10_000,
            "cache_creation_input_tokens": 3_000,
            "cache_creation": {"ephemeral_5m_input_tokens": 1_000, "ephemeral_1h_input_tokens": 2_000},
        }
    )
    assert usage is not None
    # 1000*3 + 2000*15 + 10000*0.3 + 1000*3.75 + 2000*6 = 51,750 $/MTok-tokens = $0.05175.
    assert usage_cost(price, usage) == 51_750_000
    # Without the split every write is priced at the 5-minute rate.
    flat = usage_from_anthropic(
        {
            "input_tokens": 1_000,
            "output_tokens": 2_000,
            "cache_read_input_tokens": 10_000,
            "cache_creation_input_tokens": 3_000,
        }
    )
    assert flat is not None and usage_cost(price, flat) == 3_000_000 + 30_000_000 + 3_000_000 + 11_250_000


def test_adapter_usage_and_content_bytes() -> None:
    adapter = Messages()
    response = {
        "id": "msg_1",
        "content": [
            {"type": "thinking", "thinking": "hmm", "signature": "sig" * 50},
            {"type": "text", "text": "héllo"},
            {"type": "tool_use", "id": "t", "name": "f", "input": {"a": 1}},
        ],
        "usage": {"input_tokens": 3, "output_tokens": 4},
    }
    assert adapter.usage(response) == Usage(input_tokens=3, output_tokens=4)
    assert adapter.usage(None) is None
    assert adapter.content_bytes(response) == 3 + 6 + len(b'{"a":1}')
    assert adapter.content_bytes(None) == 0


# --- stream scanner --------------------------------------------------------------------------------


def ev(name: str, payload: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


def sample_stream(crlf: bool = False) -> bytes:
    start_usage = {
        "input_tokens": 25,
        "output_tokens": 1,
        "cache_read_input_tokens": 100,
        "cache_creation_input_tokens": 50,
        "cache_creation": {"ephemeral_5m_input_tokens": 20, "ephemeral_1h_input_tokens": 30},
    }
    message = {"id": "msg_abc", "type": "message", "role": "assistant", "model": "claude-x", "content": []}
    events = [
        ev("message_start", {"type": "message_start", "message": {**message, "usage": start_usage}}),
        ev(
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "thinking", "thinking": ""},
            },
        ),
        ev("ping", {"type": "ping"}),
        ev(
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "thinking_delta", "thinking": "let me see"},
            },
        ),
        ev(
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "signature_delta", "signature": "S" * 40},
            },
        ),
        ev("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ev(
            "content_block_start",
            {"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}},
        ),
        ev(
            "content_block_delta",
            {"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "Hé, "}},
        ),
        ev(
            "content_block_delta",
            {"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "world"}},
        ),
        ev("content_block_stop", {"type": "content_block_stop", "index": 1}),
        ev(
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 2,
                "content_block": {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}},
            },
        ),
        ev(
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 2,
                "delta": {"type": "input_json_delta", "partial_json": '{"q": '},
            },
        ),
        ev(
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 2,
                "delta": {"type": "input_json_delta", "partial_json": '"x"}'},
            },
        ),
        ev("content_block_stop", {"type": "content_block_stop", "index": 2}),
        ev(
            "message_delta",
            {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 40}},
        ),
        ev(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "tool_use"},
                "usage": {
                    "output_tokens": 42,
                    "input_tokens": 25,
                    "server_tool_use": {"web_search_requests": 1},
                },
            },
        ),
        ev("message_stop", {"type": "message_stop"}),
    ]
    data = b"".join(events)
    return data.replace(b"\n", b"\r\n") if crlf else data


EXPECTED_USAGE = Usage(
    input_tokens=25,
    output_tokens=42,
    cache_read_tokens=100,
    cache_write_tokens=20,
    cache_write_1h_tokens=30,
    web_searches=1,
)
#: "let me see" + "Hé, " + "world" + the tool input fragments.
EXPECTED_BYTES = 10 + 5 + 5 + len('{"q": ') + len('"x"}')


def run(scanner: MessagesStreamScanner, pieces: list[bytes]) -> bytes:
    out = b"".join(scanner.feed(p) for p in pieces)
    return out + scanner.finish()


def test_scanner_reads_usage_id_and_content() -> None:
    scanner = MessagesStreamScanner()
    data = sample_stream()
    forwarded = scanner.feed(data)
    assert scanner.done
    assert scanner.usage == EXPECTED_USAGE
    assert scanner.upstream_id == "msg_abc"
    assert scanner.content_bytes == EXPECTED_BYTES
    # message_stop is held back until the call is settled.
    assert b"message_stop" not in forwarded
    assert data.startswith(forwarded)
    tail = scanner.finish()
    assert forwarded + tail == data
    assert event_data(tail) == b'{"type":"message_stop"}'
    assert scanner.finish() == b""


def test_scanner_byte_by_byte_is_identity() -> None:
    for crlf in (False, True):
        data = sample_stream(crlf)
        scanner = MessagesStreamScanner()
        assert run(scanner, [data[i : i + 1] for i in range(len(data))]) == data
        assert scanner.usage == EXPECTED_USAGE
        assert scanner.content_bytes == EXPECTED_BYTES


@settings(max_examples=200, deadline=None)
@given(
    cuts=st.lists(st.integers(min_value=0, max_value=len(sample_stream(True))), max_size=40),
    crlf=st.booleans(),
)
def test_scanner_any_split_is_identity(cuts: list[int], crlf: bool) -> None:
    data = sample_stream(crlf)
    points = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    pieces = [data[a:b] for a, b in itertools.pairwise(points)]
    scanner = MessagesStreamScanner()
    assert run(scanner, pieces) == data
    assert scanner.usage == EXPECTED_USAGE
    assert scanner.upstream_id == "msg_abc"
    assert scanner.content_bytes == EXPECTED_BYTES
    assert scanner.done


def test_scanner_cut_before_message_delta_has_no_usage() -> None:
    """message_start's placeholder output count must never settle a cut stream."""
    data = sample_stream()
    cut = data.index(b"event: message_delta")
    scanner = MessagesStreamScanner()
    assert scanner.feed(data[:cut]) == data[:cut]
    assert scanner.usage is None
    assert not scanner.done
    assert scanner.content_bytes == EXPECTED_BYTES
    assert scanner.finish() == b""


def test_scanner_unterminated_last_event_is_flushed() -> None:
    data = sample_stream().rstrip(b"\n")
    scanner = MessagesStreamScanner()
    assert run(scanner, [data]) == data
    assert scanner.done


def test_scanner_usage_never_lowered_by_a_stale_delta() -> None:
    scanner = MessagesStreamScanner()
    scanner.feed(
        ev(
            "message_start",
            {
                "type": "message_start",
                "message": {"id": "m", "usage": {"input_tokens": 9, "output_tokens": 1}},
            },
        )
    )
    scanner.feed(ev("message_delta", {"type": "message_delta", "delta": {}, "usage": {"output_tokens": 30}}))
    scanner.feed(
        ev(
            "message_delta",
            {"type": "message_delta", "delta": {}, "usage": {"output_tokens": 12, "input_tokens": 3}},
        )
    )
    assert scanner.usage == Usage(input_tokens=9, output_tokens=30)


def test_scanner_survives_junk() -> None:
    scanner = MessagesStreamScanner()
    data = b": comment\n\ndata: not json\n\nevent: x\ndata: [1]\n\n" + sample_stream()
    assert run(scanner, [data]) == data
    assert scanner.usage == EXPECTED_USAGE


def test_error_event_shape() -> None:
    out = MessagesStreamScanner().error_event("upstream_cut", "Upstream stream was cut")
    assert out.startswith(b"event: error\n")
    assert out.endswith(b"\n\n")
    assert orjson.loads(event_data(out)) == {
        "type": "error",
        "error": {"type": "upstream_cut", "message": "Upstream stream was cut"},
    }


# -- the forwarding scanner against an eager decode of every event ----------------------------------

_TEXT = st.lists(st.sampled_from(["a", "é", '"', "\\", "\n", "€", "content_block_delta"]), max_size=5).map(
    "".join
)


def _sse(name: str, payload: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


@st.composite
def _anthropic_event(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["start", "block", "delta", "delta", "delta", "ping", "stop_block",
                                 "message_delta", "odd"]))  # fmt: skip
    if kind == "start":
        usage = {"input_tokens": draw(st.integers(0, 50)), "output_tokens": 1}
        return _sse("message_start", {"type": "message_start", "message": {"id": "msg_1", "model": "m",
                                                                          "usage": usage}})  # fmt: skip
    if kind == "block":
        block = draw(st.sampled_from([{"type": "text", "text": draw(_TEXT)},
                                      {"type": "tool_use", "id": "t", "name": "f", "input": {}}]))  # fmt: skip
        return _sse(
            "content_block_start", {"type": "content_block_start", "index": 0, "content_block": block}
        )
    if kind == "delta":
        delta = draw(st.sampled_from([{"type": "text_delta", "text": draw(_TEXT)},
                                      {"type": "input_json_delta", "partial_json": draw(_TEXT)},
                                      {"type": "thinking_delta", "thinking": draw(_TEXT)}]))  # fmt: skip
        return _sse("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta})
    if kind == "ping":
        return _sse("ping", {"type": "ping"})
    if kind == "stop_block":
        return _sse("content_block_stop", {"type": "content_block_stop", "index": 0})
    if kind == "message_delta":
        return _sse("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                                      "usage": {"output_tokens": draw(st.integers(0, 50))}})  # fmt: skip
    # A name that does not match its data, and junk: decoded as they come, like everything else.
    return draw(st.sampled_from([
        b'event: content_block_delta\ndata: {"type":"message_delta","usage":{"output_tokens":7}}\n\n',
        b"event: content_block_delta\ndata: not json\n\n",
        b": keep-alive\n\n",
    ]))  # fmt: skip


@settings(max_examples=300)
@given(st.lists(_anthropic_event(), max_size=25), st.booleans(), st.data())
def test_forwarding_scanner_matches_an_eager_decode(
    body: list[bytes], stop: bool, data: st.DataObject
) -> None:
    stream = b"".join(body) + (_sse("message_stop", {"type": "message_stop"}) if stop else b"")
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    scanner = MessagesStreamScanner()
    out = b""
    last = 0
    for cut in [*cuts, len(stream)]:
        out += scanner.feed(stream[last:cut])
        last = cut
    want = MessagesEvents()
    forwarded = b""
    for piece in stream.split(b"\n\n")[:-1]:
        event = piece + b"\n\n"
        if not want.done:
            decoded = decode_event(event)
            if decoded is not None:
                want.absorb(decoded)
            if not want.done:
                forwarded += event
    assert out == forwarded
    assert scanner.upstream_id == want.upstream_id and scanner.done == want.done
    assert scanner.usage == want.merger.usage
    assert scanner.content_bytes == want.content_bytes
    assert out + scanner.finish() == stream
