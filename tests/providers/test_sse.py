"""The SSE helpers: an event's data payload, whatever its line endings and however many lines."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from resgov.providers.sse import event_data


def data_by_the_spec(event: bytes) -> bytes:
    """Every ``data:`` line's value (one leading space dropped), joined with newlines."""
    parts = []
    for line in event.splitlines():
        if line.startswith(b"data:"):
            value = line[5:]
            parts.append(value[1:] if value.startswith(b" ") else value)
    return b"\n".join(parts)


ENDINGS = [
    b"\n\n",
    b"\r\n\r\n",
    b"\r\r",
    b"\n",
    b"",
    b"\ndata: more\n\n",
    b"\r\ndata:more\r\n\r\n",
    b"\nid: 1\n\n",
]


@settings(max_examples=500)
@given(st.binary(max_size=60) | st.builds(lambda body, end: b"data: " + body + end, st.binary(max_size=40),
                                          st.sampled_from(ENDINGS)))  # fmt: skip
def test_event_data_matches_the_spec_on_any_event(event: bytes) -> None:
    assert event_data(event) == data_by_the_spec(event)


def test_event_data_of_the_usual_events() -> None:
    assert event_data(b'data: {"a":1}\n\n') == b'{"a":1}'
    assert event_data(b"data: [DONE]\r\n\r\n") == b"[DONE]"
    assert event_data(b"data: a\ndata: b\n\n") == b"a\nb"
    assert event_data(b"event: ping\ndata: {}\n\n") == b"{}"
    assert event_data(b": comment\n\n") == b""
