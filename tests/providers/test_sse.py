"""The SSE helpers: an event's data payload, whatever its line endings and however many lines."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from resgov.providers.sse import SSESplitter, event_data


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


@settings(max_examples=200)
@given(st.lists(st.binary(min_size=1, max_size=12).filter(lambda b: b"\n" not in b and b"\r" not in b),
                max_size=8), st.integers(0, 8), st.data())  # fmt: skip
def test_run_hook_takes_a_prefix_and_the_rest_goes_event_by_event(
    payloads: list[bytes], keep: int, data: st.DataObject
) -> None:
    stream = b"".join(b"data: " + p + b"\n\n" for p in payloads)
    log: list[tuple[bytes, bool]] = []  # (bytes seen by a hook, forwarded), in call order

    def event_hook(event: bytes) -> bool:
        forwarded = not event.startswith(b"data: x")  # drops some, to show the rest is filtered
        log.append((event, forwarded))
        return forwarded

    def run_hook(run: bytes) -> int:
        cut = 0  # the first ``keep`` events of the run, taken whole
        for _ in range(keep):
            nxt = run.find(b"\n\n", cut)
            if nxt < 0:
                break
            cut = nxt + 2
        if cut:
            log.append((run[:cut], True))
        return cut

    splitter = SSESplitter()
    cut = data.draw(st.integers(0, len(stream)))
    out = (splitter.feed(stream[:cut], event_hook, run_hook) + splitter.feed(stream[cut:], event_hook, run_hook)
           + splitter.flush(event_hook))  # fmt: skip
    # Every event went through exactly one hook, in stream order; only what the event hook
    # refused is missing from the output.
    assert b"".join(seen for seen, _ in log) == stream
    assert out == b"".join(seen for seen, forwarded in log if forwarded)


def test_scanners_are_freed_by_reference_counting() -> None:
    """No scanner is part of a reference cycle: what a stream holds goes when its call ends,
    not when the cyclic collector next runs (which kept megabytes alive under load)."""
    import gc

    from resgov.providers.anthropic import MessagesStreamScanner
    from resgov.providers.openai import ChatStreamScanner
    from resgov.providers.responses import ResponsesStreamScanner
    from resgov.providers.translate import AnthropicToChatStream, ChatToAnthropicStream

    chat = b'data: {"id":"c","choices":[{"delta":{"content":"hi"}}],"usage":null}\n\ndata: [DONE]\n\n'
    messages = (b'event: message_start\ndata: {"type":"message_start","message":{"id":"m","usage":{}}}\n\n'
                b'event: content_block_delta\ndata: {"type":"content_block_delta","delta":{"text":"hi"}}\n\n'
                b'event: message_stop\ndata: {"type":"message_stop"}\n\n')  # fmt: skip
    makers = [
        (lambda: ChatStreamScanner(strip_usage=False), chat),
        (MessagesStreamScanner, messages),
        (ResponsesStreamScanner, b'event: response.output_text.delta\ndata: {"delta":"hi"}\n\n'),
        (lambda: AnthropicToChatStream(wants_usage=True, model="m"), messages),
        (lambda: ChatToAnthropicStream(model="m"), chat),
    ]
    gc.collect()
    gc.disable()
    try:
        for make, stream in makers:
            scanner = make()
            scanner.feed(stream)
            _ = scanner.content_bytes
            scanner.finish()
            del scanner
        assert gc.collect() == 0
    finally:
        gc.enable()


def last_boundary_by_the_spec(buffer: bytes) -> int:
    """Just past the last blank line of any of the three line endings, or -1."""
    ends = [buffer.rfind(sep) + len(sep) for sep in (b"\n\n", b"\r\n\r\n", b"\r\r") if buffer.rfind(sep) >= 0]
    return max(ends, default=-1)


PIECES = st.lists(st.sampled_from([b"data: x", b"\n", b"\r", b"\n\n", b"\r\n\r\n", b"\r\r", b"{}", b"[DONE]"]),
                  max_size=16).map(b"".join)  # fmt: skip


@settings(max_examples=500)
@given(PIECES | st.binary(max_size=40))
def test_the_last_boundary_and_the_events_of_a_run_whatever_the_line_endings(buffer: bytes) -> None:
    from resgov.providers.sse import _last_boundary, events, iter_events

    assert _last_boundary(buffer) == last_boundary_by_the_spec(buffer)
    complete = buffer[: max(_last_boundary(buffer), 0)]
    # The lazy split yields exactly the events of the eager one, whole, in order.
    assert list(iter_events(complete)) == events(complete)
    assert b"".join(events(complete)) == complete
