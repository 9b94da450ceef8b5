"""An incremental Server-Sent Events splitter that never alters what it forwards.

Upstream bytes arrive in arbitrary TCP-sized pieces: an event may be split inside a
``data:`` line or inside its JSON. The splitter forwards only whole events, keeps
the incomplete tail for the next piece, and lets its owner inspect (and, rarely,
drop) each event. Events are forwarded byte for byte as the upstream wrote them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import orjson

#: Inspect one complete event (raw bytes including its terminating blank line);
#: return False to drop it from the forwarded stream.
EventHook = Callable[[bytes], bool]
#: Look at a whole run of complete events at once and return how many of its leading bytes
#: (whole events) to forward unchanged without calling the event hook on each (the owner has
#: seen all it needs of them); the rest is split into events as usual.
RunHook = Callable[[bytes], int]


# Searching bytes with ``in`` first tries the operand as an integer (a byte value) and formats
# the TypeError it gets: ~1,800 CPU instructions each time, about ten times per stream (counted
# with callgrind, bench/README.md). ``find`` goes straight to the search.
def event_data(event: bytes) -> bytes:
    """The ``data`` payload of one event (multi-line data joined with newlines)."""
    if event.startswith(b"data: "):
        # The usual event, one data line (every chunk of a stream): no split, no join.
        line = event[6:].rstrip(b"\r\n")
        if line.find(b"\n") < 0 and line.find(b"\r") < 0:
            return line
    parts = []
    for line in event.splitlines():
        if line.startswith(b"data:"):
            value = line[5:]
            parts.append(value[1:] if value.startswith(b" ") else value)
    return b"\n".join(parts)


def data_object(data: bytes) -> dict[str, Any] | None:
    """The JSON object an event's data holds, or None (empty, not JSON, not an object)."""
    if not data:
        return None
    try:
        parsed = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, dict) else None


def decode_event(event: bytes) -> dict[str, Any] | None:
    """The JSON object of one SSE event, or None (comments, pings without data, junk)."""
    return data_object(event_data(event))


def event_name(event: bytes) -> bytes | None:
    """The ``event:`` field of one event, if any."""
    for line in event.splitlines():
        if line.startswith(b"event:"):
            return line[6:].strip()
    return None


class SSESplitter:
    """Feed upstream bytes, get back whole events to forward.

    The hooks are passed with each call, not kept: a scanner holding a splitter that held the
    scanner's own bound methods would be a reference cycle, freed only by the cyclic garbage
    collector, with everything the scanner holds (measured: +3 MB peak RSS at 64 streams).
    """

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes, hook: EventHook, run_hook: RunHook | None = None) -> bytes:
        """Accept a piece of the upstream stream; return the bytes to forward now."""
        buffer = self._buffer + data if self._buffer else data
        end = _last_boundary(buffer)
        if end < 0:
            self._buffer = buffer
            return b""
        complete, self._buffer = buffer[:end], buffer[end:]
        taken = run_hook(complete) if run_hook is not None else 0
        if taken == len(complete):
            return complete
        out = bytearray(complete[:taken])
        for event in events(complete[taken:] if taken else complete):
            if hook(event):
                out += event
        return bytes(out)

    def flush(self, hook: EventHook) -> bytes:
        """Whatever is left at the end of the stream (an unterminated last event), inspected too."""
        tail, self._buffer = self._buffer, b""
        if not tail.strip():
            return tail
        return tail if hook(tail) else b""


def _last_boundary(buffer: bytes) -> int:
    """Index just past the last event terminator (blank line), or -1."""
    i = buffer.rfind(b"\n\n")
    best = i + 2 if i >= 0 else -1
    # A terminator that is absent is searched for over the whole buffer (a slow backward search
    # for a multi-byte needle); CR line endings are rare, and a one-byte find is a memchr.
    if buffer.find(b"\r") >= 0:
        for sep in (b"\r\n\r\n", b"\r\r"):
            i = buffer.rfind(sep)
            if i >= 0:
                best = max(best, i + len(sep))
    return best


def iter_events(chunk: bytes) -> Iterator[bytes]:
    """The events of a run one by one, as :func:`events` splits them, without splitting all of
    it first (for a caller that usually stops at the first)."""
    if chunk.find(b"\r") >= 0:
        yield from events(chunk)
        return
    start, n = 0, len(chunk)
    while start < n:
        end = chunk.find(b"\n\n", start)
        if end < 0:
            yield chunk[start:]
            return
        yield chunk[start : end + 2]
        start = end + 2


def events(chunk: bytes) -> list[bytes]:
    """Split a run of complete events, keeping each one's terminator attached."""
    if chunk.find(b"\r") >= 0:
        out: list[bytes] = []
        start = 0
        i = 0
        n = len(chunk)
        while i < n:
            for sep in (b"\r\n\r\n", b"\n\n", b"\r\r"):
                if chunk.startswith(sep, i):
                    out.append(chunk[start : i + len(sep)])
                    i += len(sep)
                    start = i
                    break
            else:
                i += 1
        if start < n:
            out.append(chunk[start:])
        return out
    pieces = chunk.split(b"\n\n")
    # split() leaves an empty string after the final terminator.
    return [p + b"\n\n" for p in pieces[:-1]] + ([pieces[-1]] if pieces[-1] else [])


class HeldEvents:
    """Events a scanner forwarded without decoding, kept until it needs what they say.

    Bounded: once more than :attr:`LIMIT` bytes are held, :meth:`add` says so and the owner
    reads them at once, so a long stream never piles up its whole body here.
    """

    __slots__ = ("_runs", "_size")
    LIMIT = 64 * 1024

    def __init__(self) -> None:
        self._runs: list[bytes] = []
        self._size = 0

    def __bool__(self) -> bool:
        return bool(self._runs)

    def add(self, raw: bytes) -> bool:
        """Hold ``raw`` (whole events); True when the owner should now :meth:`take` them."""
        self._runs.append(raw)
        self._size += len(raw)
        return self._size > self.LIMIT

    def take(self) -> list[bytes]:
        """Every held event, in stream order; nothing is held afterwards."""
        runs, self._runs, self._size = self._runs, [], 0
        return [event for run in runs for event in events(run)]


class ForwardedStream:
    """Base of the scanners that forward upstream events unchanged.

    A subclass sets ``splitter``, inspects each event in ``_event`` (False: not forwarded), may
    take whole runs of events in ``_run``, and appends the events it holds back (the stream's
    end, until the call is settled) to ``held``.
    """

    splitter: SSESplitter
    held: bytes

    def _event(self, event: bytes) -> bool:
        raise NotImplementedError

    def _run(self, run: bytes) -> int:
        """How many leading bytes of ``run`` to forward without looking at its events (none)."""
        return 0

    def feed(self, data: bytes) -> bytes:
        """Upstream bytes in, whole events to forward out (unchanged)."""
        return self.splitter.feed(data, self._event, self._run)

    def finish(self) -> bytes:
        """Any unterminated tail, then the held-back end of the stream."""
        tail = self.splitter.flush(self._event)
        held, self.held = self.held, b""
        return tail + held


class TranslatedStream:
    """Base of the scanners that translate each upstream event into ``out``.

    A subclass sets ``splitter``, writes each event's translation to ``out`` in ``_event``, and
    appends the translated end of the stream, held back until the call is settled, to ``held``.
    """

    splitter: SSESplitter
    out: bytearray
    held: bytes

    def _event(self, event: bytes) -> bool:
        raise NotImplementedError

    def _drain(self) -> bytes:
        out = bytes(self.out)
        self.out.clear()
        return out

    def feed(self, data: bytes) -> bytes:
        """Upstream bytes in, translated events out."""
        self.splitter.feed(data, self._event)
        return self._drain()

    def finish(self) -> bytes:
        """Translated events of an unterminated last event, then the held-back end."""
        self.splitter.flush(self._event)
        held, self.held = self.held, b""
        return self._drain() + held
