"""What a wire format plugs into the proxy: one Adapter per client-facing route and upstream format.

The proxy (server/proxy.py) knows nothing about any provider's JSON. For each call it
asks the route's adapter to parse the client's request (validation, the facts the
bound needs), to build the upstream request, to read the provider's usage, and to
scan a stream. When the provider speaks another format than the route, a translating
adapter (providers/translate.py) does the same while converting both ways.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from resgov.core.policy import ProviderPolicy
from resgov.core.pricing import Usage

Format = Literal["openai", "anthropic"]


@dataclass(slots=True)
class ParsedRequest:
    """A validated client request and the facts its worst-case cost depends on."""

    body: dict[str, Any]
    model: str
    stream: bool = False
    #: Choices generated (OpenAI ``n``); output is bounded per choice.
    n: int = 1
    #: The client's output cap per choice, if it sent one.
    output_cap: int | None = None
    #: Names of every tool offered or forced (checked against ``allowed_tools``).
    tools: list[str] = field(default_factory=list)
    message_count: int = 0
    #: Output the provider may bill beyond the capped generation (rejected predictions).
    extra_output_tokens: int = 0
    #: Most provider-side web searches the request can trigger; None = no bound (refused if priced).
    web_searches: int | None = 0
    #: Provider-side tools whose billed input or fees no field of the request bounds (MCP
    #: servers, code execution: their results come back as input tokens of any size): refused.
    unbounded_tools: list[str] = field(default_factory=list)
    #: The part of the body that may hold media parts (walked for the input bound).
    media_root: Any = None
    raw_size: int = 0
    #: OpenAI streams: the client asked for the usage chunk itself.
    client_wants_usage: bool = False
    #: False for routes that generate no output tokens (embeddings).
    has_output: bool = True


class StreamScanner(Protocol):
    """Watches an upstream stream, returns what to forward, and learns usage as it goes."""

    @property
    def usage(self) -> Usage | None:
        """The usage the stream reported, if it has so far."""

    @property
    def content_bytes(self) -> int:
        """Bytes of generated content seen so far (bounds the output tokens produced)."""

    @property
    def upstream_id(self) -> str | None:
        """The provider's id for the response."""

    @property
    def done(self) -> bool:
        """The stream ended properly (``[DONE]``, ``message_stop``, ``response.completed``)."""

    def feed(self, data: bytes) -> bytes:
        """Upstream bytes in, bytes to forward to the client out."""

    def finish(self) -> bytes:
        """Bytes held back until the call is settled (the end of the stream)."""

    def error_event(self, kind: str, message: str) -> bytes:
        """An event telling the client the stream failed, in the client's format."""


class Adapter(Protocol):
    """One route (client format) talking to one upstream format."""

    client_format: Format
    upstream_format: Format

    def parse(self, raw: bytes) -> ParsedRequest:
        """Validate the client's body (400 for wrong types, 422 for invalid values)."""

    def build_upstream(
        self, req: ParsedRequest, cap: int, upstream_model: str, provider: ProviderPolicy
    ) -> tuple[str, bytes]:
        """The upstream path (appended to the provider's base URL) and body, with ``cap`` as output cap."""

    def usage(self, response: Any) -> Usage | None:
        """The usage of a non-streaming upstream answer (None if absent or malformed)."""

    def content_bytes(self, response: Any) -> int:
        """Bytes of generated content in a non-streaming upstream answer (bounds its output tokens)."""

    def client_body(self, raw: bytes, response: Any, req: ParsedRequest) -> bytes:
        """The body the client receives for a non-streaming answer (translated if needed)."""

    def client_error(self, status: int, raw: bytes) -> bytes:
        """An upstream error body, in the client's format."""

    def scanner(self, req: ParsedRequest) -> StreamScanner:
        """A fresh stream scanner for one call."""


class PassThrough:
    """For adapters whose client and upstream speak the same format: answers go back as they came."""

    def client_body(self, raw: bytes, response: Any, req: ParsedRequest) -> bytes:
        """Unchanged: same format on both sides."""
        return raw

    def client_error(self, status: int, raw: bytes) -> bytes:
        """Unchanged: same format on both sides."""
        return raw
