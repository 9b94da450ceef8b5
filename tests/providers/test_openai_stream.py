"""The OpenAI chat stream scanner: what it forwards, and the usage, id and content size it reads.

The scanner leaves content chunks unparsed and counts them only when asked; these tests hold
it to an eager reference that parses every event, on generated streams cut at random places.
"""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from resgov.core.bounds import string_bytes
from resgov.providers.openai import ChatStreamScanner, _no_usage
from resgov.providers.sse import event_data

#: Strings that may look like the usage key once written in JSON.
TEXT = st.lists(st.sampled_from(["a", "é", '"', "\\", " ", "\n", "usage", '"usage":', "null", "€"]),
                max_size=6).map("".join)  # fmt: skip


def reference(stream: bytes, strip_usage: bool) -> tuple[bytes, dict[str, Any] | None, str | None, int]:
    """Forwarded bytes (before finish), last usage, first id and content bytes, parsing every event."""
    forwarded = b""
    usage_raw = None
    upstream_id = None
    content = 0
    done = False
    for piece in stream.split(b"\n\n")[:-1]:
        event = piece + b"\n\n"
        data = event_data(event)
        if data == b"[DONE]" or done:
            done = True
            continue
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            forwarded += event
            continue
        if not isinstance(chunk, dict):
            forwarded += event
            continue
        if upstream_id is None and isinstance(chunk.get("id"), str):
            upstream_id = chunk["id"]
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            usage_raw = usage
        choices = chunk.get("choices")
        if isinstance(choices, list):
            content += sum(string_bytes(c.get("delta")) for c in choices if isinstance(c, dict))
            if not choices and usage is not None and strip_usage:
                continue
        forwarded += event
    return forwarded, usage_raw, upstream_id, content


@st.composite
def chunks(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["content", "content", "tool", "usage", "odd", "spaced"]))
    chunk_id = draw(st.sampled_from(["chatcmpl-1", "chatcmpl-2"]))
    usage_field: dict[str, Any] = draw(st.sampled_from([{}, {"usage": None}]))
    if kind == "content":
        body = {"id": chunk_id, "choices": [{"index": 0, "delta": {"content": draw(TEXT)}}], **usage_field}
    elif kind == "tool":
        delta = {"tool_calls": [{"index": 0, "function": {"name": draw(TEXT), "arguments": draw(TEXT)}}]}
        body = {"id": chunk_id, "choices": [{"index": 0, "delta": delta}], **usage_field}
    elif kind == "usage":
        n = draw(st.integers(0, 99))
        body = {"id": chunk_id, "choices": [], "usage": {"prompt_tokens": n, "completion_tokens": n + 1}}
    elif kind == "spaced":
        # Whitespace the fast check must see through, and a usage object it must not skip.
        text = draw(TEXT)
        usage = draw(st.sampled_from(["null", '{"prompt_tokens": 3, "completion_tokens": 4}']))
        content = orjson.dumps(text).decode()
        raw = f'{{ "id" : "{chunk_id}", "choices": [{{"delta": {{"content": {content}}}}}], "usage" :  {usage} }}'
        return b"data: " + raw.encode() + b"\n\n"
    else:
        return draw(st.sampled_from([b"data: not json\n\n", b"data: [1,2]\n\n", b": keep-alive\n\n",
                                     b'data: {"usage": null, "x": {"usage": {"prompt_tokens": 1}}}\n\n']))  # fmt: skip
    return b"data: " + orjson.dumps(body) + b"\n\n"


@settings(max_examples=400)
@given(st.lists(chunks(), max_size=30), st.booleans(), st.booleans(), st.data())
def test_scanner_matches_an_eager_parse_of_every_event(
    events: list[bytes], done: bool, strip_usage: bool, data: st.DataObject
) -> None:
    stream = b"".join(events) + (b"data: [DONE]\n\n" if done else b"")
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    scanner = ChatStreamScanner(strip_usage=strip_usage)
    forwarded = b""
    last = 0
    for cut in [*cuts, len(stream)]:
        forwarded += scanner.feed(stream[last:cut])
        last = cut
    want_forwarded, want_usage, want_id, want_content = reference(stream, strip_usage)
    assert forwarded == want_forwarded
    assert scanner.usage_raw == want_usage
    assert scanner.upstream_id == want_id
    assert scanner.content_bytes == want_content
    assert scanner.done == done
    assert scanner.finish() == (b"data: [DONE]\n\n" if done else b"")


def test_no_usage_check() -> None:
    assert _no_usage(b'{"choices":[]}')
    assert _no_usage(b'data: {"choices":[],"usage":null}\n\ndata: {"usage":null}\n\n')
    assert not _no_usage(b'{"usage":{"prompt_tokens":1}}')
    assert not _no_usage(b'{"usage":null,"x":{"usage":{}}}')
    assert not _no_usage(b'{"usage" : null}')  # another spelling: parsed, to be sure
    # Quotes inside a JSON string are escaped: text cannot spell the key.
    assert _no_usage(orjson.dumps({"content": '"usage": {"prompt_tokens": 1}'}))


def test_content_is_counted_when_asked_and_memory_stays_bounded() -> None:
    scanner = ChatStreamScanner(strip_usage=False)
    event = b'data: {"id":"c","choices":[{"delta":{"content":"ab"}}],"usage":null}\n\n'
    for _ in range(1000):
        scanner.feed(event)
    assert scanner._uncounted._size <= 64 * 1024
    assert scanner.content_bytes == 2000
    scanner.feed(event * 1000)  # one run, forwarded whole
    assert scanner.content_bytes == 4000
