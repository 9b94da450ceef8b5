"""The input-token bound: never below the text a request carries, media parts at their ceiling."""

from __future__ import annotations

import base64
import json
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from resgov.core.bounds import (
    DOCUMENT_PART_TOKENS,
    IMAGE_PART_TOKENS,
    MEDIA_PART_TYPES,
    MESSAGE_OVERHEAD_TOKENS,
    REQUEST_OVERHEAD_TOKENS,
    TOOLS_OVERHEAD_TOKENS,
    input_bound,
    string_bytes,
)

_MEDIA_OR_DOC = MEDIA_PART_TYPES | {"file", "document", "input_file"}

text = st.text(max_size=60)
image_part = st.one_of(
    st.builds(lambda u: {"type": "image_url", "image_url": {"url": u, "detail": "high"}}, text),
    st.builds(
        lambda b: {
            "type": "image_url",
            "image_url": {"url": "data:image/png;base64," + base64.b64encode(b).decode()},
        },
        st.binary(max_size=300),
    ),
    st.builds(
        lambda b: {
            "type": "image",
            "source": {"type": "base64", "media_type": "image/png", "data": base64.b64encode(b).decode()},
        },
        st.binary(max_size=300),
    ),
    st.builds(lambda u: {"type": "input_image", "image_url": u}, text),
)
text_part = st.builds(lambda t: {"type": "text", "text": t}, text)
content = st.one_of(st.none(), text, st.lists(st.one_of(text_part, image_part), max_size=5))
tool_call = st.builds(
    lambda name, args: {"id": "call_1", "type": "function", "function": {"name": name, "arguments": args}},
    text,
    text,
)
message = st.builds(
    lambda role, c, calls, name: {k: v for k, v in
                                  (("role", role), ("content", c), ("tool_calls", calls), ("name", name))
                                  if v is not None},
    st.sampled_from(["system", "user", "assistant", "tool", "developer"]),
    content,
    st.one_of(st.none(), st.lists(tool_call, min_size=1, max_size=2)),
    st.one_of(st.none(), text),
)  # fmt: skip
tool_def = st.builds(
    lambda name, desc, props: {"type": "function", "function": {"name": name, "description": desc,
                               "parameters": {"type": "object", "properties": {p: {"type": "string"} for p in props}}}},
    text, text, st.lists(text, max_size=3),
)  # fmt: skip


def _text_bytes(value: Any) -> int:
    """UTF-8 bytes of every string (keys included) outside media parts."""
    if isinstance(value, str):
        return len(value.encode())
    if isinstance(value, dict):
        if value.get("type") in _MEDIA_OR_DOC:
            return 0
        return sum(len(k.encode()) + _text_bytes(v) for k, v in value.items())
    if isinstance(value, list):
        return sum(_text_bytes(v) for v in value)
    return 0


def _media_count(value: Any) -> int:
    if isinstance(value, dict):
        if value.get("type") in MEDIA_PART_TYPES:
            return 1
        return sum(_media_count(v) for v in value.values())
    if isinstance(value, list):
        return sum(_media_count(v) for v in value)
    return 0


def _encode(body: dict[str, Any], style: str) -> bytes:
    if style == "orjson":
        return orjson.dumps(body)
    if style == "ascii":
        return json.dumps(body).encode()
    if style == "indent":
        return json.dumps(body, indent=2, ensure_ascii=False).encode()
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


@given(
    st.lists(message, min_size=1, max_size=6),
    st.one_of(st.none(), st.lists(tool_def, min_size=1, max_size=3)),
    st.sampled_from(["orjson", "ascii", "indent", "compact"]),
)
@settings(max_examples=300, deadline=None)
def test_bound_covers_all_text_and_every_image_at_its_ceiling(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, style: str
) -> None:
    body: dict[str, Any] = {"model": "gpt-sim", "messages": messages, "max_tokens": 10}
    if tools:
        body["tools"] = tools
    raw = _encode(body, style)
    bound = input_bound(len(raw), messages, len(messages), bool(tools), None)
    images = _media_count(messages)
    text_bytes = _text_bytes(messages) + _text_bytes(tools)
    assert bound.media_parts == images
    assert bound.document_parts == 0
    assert bound.tokens >= text_bytes + images * IMAGE_PART_TOKENS
    assert bound.tokens >= REQUEST_OVERHEAD_TOKENS + MESSAGE_OVERHEAD_TOKENS * len(messages)
    if tools:
        assert bound.tokens >= text_bytes + images * IMAGE_PART_TOKENS + TOOLS_OVERHEAD_TOKENS


def test_huge_base64_image_costs_its_ceiling_not_its_bytes() -> None:
    blob = base64.b64encode(b"\x00" * 750_000).decode()
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "describe"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{blob}"}},
    ]}]  # fmt: skip
    raw = orjson.dumps({"model": "m", "messages": messages})
    bound = input_bound(len(raw), messages, 1, False, None)
    assert len(raw) > 1_000_000
    assert IMAGE_PART_TOKENS + len("describe") <= bound.tokens < IMAGE_PART_TOKENS + 1024
    assert bound.media_parts == 1


def test_short_image_url_is_charged_the_ceiling() -> None:
    messages = [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x.test/a.png"}}]}
    ]
    raw = orjson.dumps({"model": "m", "messages": messages})
    bound = input_bound(len(raw), messages, 1, False, None)
    assert bound.tokens >= IMAGE_PART_TOKENS + REQUEST_OVERHEAD_TOKENS + MESSAGE_OVERHEAD_TOKENS


def test_documents_are_capped_by_the_context_window_only_when_known() -> None:
    messages = [{"role": "user", "content": [{"type": "file", "file": {"file_id": "file-abc"}}]}]
    raw = orjson.dumps({"model": "m", "messages": messages})
    unknown = input_bound(len(raw), messages, 1, False, None)
    assert unknown.tokens >= DOCUMENT_PART_TOKENS
    assert unknown.document_parts == 1 and unknown.media_parts == 0
    capped = input_bound(len(raw), messages, 1, False, 200_000)
    assert capped.tokens == 200_000


def test_text_only_bound_is_the_body_size_plus_overheads() -> None:
    messages = [{"role": "user", "content": "héllo wörld"}, {"role": "assistant", "content": None}]
    raw = orjson.dumps({"model": "m", "messages": messages})
    bound = input_bound(len(raw), messages, 2, False, None)
    assert bound.tokens == len(raw) + REQUEST_OVERHEAD_TOKENS + 2 * MESSAGE_OVERHEAD_TOKENS


def test_media_part_never_subtracts_more_than_the_client_sent() -> None:
    """The bytes removed for a media part must be bytes the client's body really spent on it.

    ``input_bound`` subtracts ``len(orjson.dumps(part))``, assuming orjson's encoding is
    the shortest; it is not for numbers: ``1e15`` (4 bytes on the wire) re-encodes as
    ``1000000000000000.0`` (18). Padding an image part with such numbers removes more
    than the part's own bytes, so the text of *other* messages drops out of the bound.
    """
    text_len = 200_000
    pad = ",".join(["1e15"] * 20_000)
    image = '{"type":"image_url","image_url":{"url":"https://x.test/a.png"},"pad":[' + pad + "]}"
    raw = (
        '{"model":"m","messages":[{"role":"user","content":"' + "a" * text_len + '"},'
        '{"role":"user","content":[' + image + "]}]}"
    ).encode()
    messages = orjson.loads(raw)["messages"]
    bound = input_bound(len(raw), messages, len(messages), False, None)
    assert bound.tokens >= text_len + IMAGE_PART_TOKENS


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
    max_leaves=25,
)


@given(_JSON)
def test_string_bytes_counts_the_utf8_of_every_string_value(value: object) -> None:
    def utf8_of_strings(v: object) -> int:
        if isinstance(v, str):
            return len(v.encode())
        if isinstance(v, dict):
            return sum(utf8_of_strings(x) for x in v.values())
        if isinstance(v, list):
            return sum(utf8_of_strings(x) for x in v)
        return 0

    assert string_bytes(value) == utf8_of_strings(value)
