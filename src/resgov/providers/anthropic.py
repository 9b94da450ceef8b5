"""Anthropic Messages wire format: request checks and rewriting, usage, stream scanning.

``max_tokens`` is required by this API and caps every output token the call can bill
(extended thinking included), so the output bound of a Messages request is exact.
Usage arrives in two places when streaming: ``message_start`` carries the input side
(plain input, cache reads, cache writes) and ``message_delta`` the cumulative output
(newer API versions repeat the input side there too).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TypeGuard

import orjson

from resgov.core.bounds import SEARCH_RESULT_TOKENS, string_bytes
from resgov.core.errors import BadRequest, Forbidden, InvalidValue
from resgov.core.policy import ProviderPolicy
from resgov.core.pricing import Usage
from resgov.providers.base import Format, ParsedRequest, PassThrough
from resgov.providers.openai import json_request
from resgov.providers.sse import ForwardedStream, HeldEvents, SSESplitter, decode_event

#: Largest ``max_tokens`` ResGov forwards (no model comes close; beyond it the value is absurd).
MAX_OUTPUT_CAP = 10_000_000
#: Server tools whose output returns to the model as input of any size, with nothing in the
#: request to limit it (code execution also bills container time): no bound, so refused.
_UNBOUNDED_SERVER_TOOLS = ("code_execution", "mcp_toolset")

#: Usage fields read from the wire, merged by taking the largest value seen (they are
#: cumulative, so the largest is the latest, and a stale smaller one never wins).
_USAGE_FIELDS = (
    "input_tokens",
    "output_tokens",
    "cache_read_input_tokens",
    "cache_creation_input_tokens",
)


def messages_path(provider: ProviderPolicy) -> str:
    """The Messages path under a provider's base URL.

    Anthropic's documented base URL has no ``/v1`` (``https://api.anthropic.com``), but
    operators often paste one that does; either way the request lands on ``/v1/messages``.
    """
    return "/messages" if provider.base_url.rstrip("/").endswith("/v1") else "/v1/messages"


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _max_tokens(body: dict[str, Any]) -> int:
    value = body.get("max_tokens")
    if value is None:
        raise BadRequest(
            "'max_tokens' is required by the Anthropic Messages API (it caps the output, "
            "extended thinking included).",
            reason="missing_max_tokens",
            param="max_tokens",
        )
    if not _is_int(value):
        raise BadRequest("'max_tokens' must be an integer.", reason="invalid_type", param="max_tokens")
    if value < 1 or value > MAX_OUTPUT_CAP:
        raise InvalidValue(
            f"'max_tokens' must be between 1 and {MAX_OUTPUT_CAP}, got {value}.",
            reason="invalid_value",
            param="max_tokens",
        )
    return int(value)


def _check_thinking(thinking: Any) -> None:
    """Validate the types of ``thinking``; its budget lives inside ``max_tokens`` either way.

    A budget at or above ``max_tokens`` is left for Anthropic to judge: the interleaved
    thinking beta allows it, and the output bound (``max_tokens``) holds regardless.
    """
    if thinking is None:
        return
    if not isinstance(thinking, dict):
        raise BadRequest("'thinking' must be an object.", reason="invalid_type", param="thinking")
    if not isinstance(thinking.get("type"), str):
        raise BadRequest("'thinking.type' must be a string.", reason="invalid_type", param="thinking")
    budget = thinking.get("budget_tokens")
    if budget is None:
        return
    if not _is_int(budget):
        raise BadRequest(
            "'thinking.budget_tokens' must be an integer.", reason="invalid_type", param="thinking"
        )
    if budget < 1 or budget > MAX_OUTPUT_CAP:
        raise InvalidValue(
            f"'thinking.budget_tokens' must be between 1 and {MAX_OUTPUT_CAP}, got {budget}.",
            reason="invalid_value",
            param="thinking",
        )


@dataclass(slots=True)
class ToolFacts:
    """What the tools of a Messages request mean for policy and cost."""

    names: list[str] = field(default_factory=list)
    #: Most web searches the request can trigger; None when a search tool has no ``max_uses``.
    web_searches: int | None = 0
    #: Server tools other than custom (client-side) ones: web search, code execution...
    server_tools: list[str] = field(default_factory=list)
    #: Most input tokens fetched pages can add: ``max_uses × max_content_tokens`` summed over
    #: the web fetch tools; None when one of them lacks either limit (no bound).
    fetch_tokens: int | None = 0
    #: Server-side tools nothing in the request bounds: code execution, MCP servers.
    unbounded: list[str] = field(default_factory=list)


def _tool_limit(tool: dict[str, Any], key: str, i: int) -> int | None:
    """A server tool's positive integer limit (``max_uses``…): None when absent, 400 / 422 when bad."""
    value = tool.get(key)
    if value is None:
        return None
    if not _is_int(value):
        raise BadRequest(f"'tools[{i}].{key}' must be an integer.", reason="invalid_type", param="tools")
    if value < 1:
        raise InvalidValue(
            f"'tools[{i}].{key}' must be at least 1, got {value}.", reason="invalid_value", param="tools"
        )
    return int(value)


def tool_facts(body: dict[str, Any]) -> ToolFacts:
    """Names of every tool offered or forced, and the bounds of web search and web fetch."""
    facts = ToolFacts()
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise BadRequest("'tools' must be an array.", reason="invalid_type", param="tools")
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict):
                raise BadRequest(f"'tools[{i}]' must be an object.", reason="invalid_type", param="tools")
            kind = tool.get("type")
            if kind is not None and not isinstance(kind, str):
                raise BadRequest(f"'tools[{i}].type' must be a string.", reason="invalid_type", param="tools")
            name = tool.get("name")
            if name is None:
                # MCP toolsets are named by their server; anything else by its type.
                name = tool.get("mcp_server_name") or kind
            if not isinstance(name, str) or not name:
                raise BadRequest(f"'tools[{i}].name' must be a string.", reason="invalid_type", param="tools")
            facts.names.append(name)
            if kind is not None and kind != "custom":
                facts.server_tools.append(kind)
            if isinstance(kind, str) and kind.startswith(_UNBOUNDED_SERVER_TOOLS):
                facts.unbounded.append(kind)
            if isinstance(kind, str) and kind.startswith("web_search"):
                uses = _tool_limit(tool, "max_uses", i)
                if uses is None:
                    facts.web_searches = None
                elif facts.web_searches is not None:
                    facts.web_searches += uses
            elif isinstance(kind, str) and kind.startswith("web_fetch"):
                uses = _tool_limit(tool, "max_uses", i)
                size = _tool_limit(tool, "max_content_tokens", i)
                if uses is None or size is None:
                    facts.fetch_tokens = None
                elif facts.fetch_tokens is not None:
                    facts.fetch_tokens += uses * size
    choice = body.get("tool_choice")
    if choice is not None:
        if not isinstance(choice, dict) or not isinstance(choice.get("type"), str):
            raise BadRequest(
                "'tool_choice' must be an object with a string 'type'.",
                reason="invalid_type",
                param="tool_choice",
            )
        if choice["type"] == "tool":
            name = choice.get("name")
            if not isinstance(name, str) or not name:
                raise BadRequest(
                    "'tool_choice.name' must be a string.", reason="invalid_type", param="tool_choice"
                )
            if name not in facts.names:
                facts.names.append(name)
    servers = body.get("mcp_servers")
    if servers is not None:
        # Tools of a remote MCP server run on Anthropic's side: count them against
        # allowed_tools by their allow-list when given, else by the server's name.
        if not isinstance(servers, list) or not all(isinstance(s, dict) for s in servers):
            raise BadRequest(
                "'mcp_servers' must be an array of objects.", reason="invalid_type", param="mcp_servers"
            )
        if servers:
            facts.unbounded.append("mcp_servers")
        for server in servers:
            config = server.get("tool_configuration")
            allowed = config.get("allowed_tools") if isinstance(config, dict) else None
            if isinstance(allowed, list) and all(isinstance(a, str) for a in allowed):
                facts.names.extend(a for a in allowed if a not in facts.names)
            elif isinstance(server.get("name"), str) and server["name"] not in facts.names:
                facts.names.append(server["name"])
    return facts


def parse_messages(raw: bytes) -> ParsedRequest:
    """Validate an Anthropic Messages request: 400 for wrong types, 422 for invalid values."""
    body, model = json_request(raw)
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise BadRequest(
            "'messages' is required and must be an array.", reason="invalid_type", param="messages"
        )
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRequest(f"'messages[{i}]' must be an object.", reason="invalid_type", param="messages")
        if not isinstance(message.get("role"), str):
            raise BadRequest(
                f"'messages[{i}].role' must be a string.", reason="invalid_type", param="messages"
            )
        if message["role"] not in ("user", "assistant"):
            raise InvalidValue(
                f"'messages[{i}].role' must be 'user' or 'assistant', got '{message['role']}'.",
                reason="invalid_value",
                param="messages",
            )
        content = message.get("content")
        if not isinstance(content, str | list):
            raise BadRequest(
                f"'messages[{i}].content' must be a string or an array.",
                reason="invalid_type",
                param="messages",
            )
        if isinstance(content, list) and not all(isinstance(b, dict) for b in content):
            raise BadRequest(
                f"'messages[{i}].content' blocks must be objects.", reason="invalid_type", param="messages"
            )
    system = body.get("system")
    if system is not None and not (
        isinstance(system, str) or (isinstance(system, list) and all(isinstance(b, dict) for b in system))
    ):
        raise BadRequest(
            "'system' must be a string or an array of content blocks.", reason="invalid_type", param="system"
        )
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise BadRequest("'stream' must be a boolean.", reason="invalid_type", param="stream")
    cap = _max_tokens(body)
    _check_thinking(body.get("thinking"))
    facts = tool_facts(body)
    if facts.fetch_tokens is None:
        # Fetched pages are billed as input the body does not hold; without both limits
        # nothing bounds how much of it a call can bring in.
        raise Forbidden(
            "The web fetch tool needs both max_uses and max_content_tokens: fetched pages are billed "
            "as input, and without both limits ResGov cannot bound the call's cost.",
            type="unbounded_cost",
            reason="unbounded_cost",
            param="tools",
        )
    # Search results and fetched pages are billed as input but are not in the body: allow for them.
    search_input = (facts.web_searches or 0) * SEARCH_RESULT_TOKENS + facts.fetch_tokens
    return ParsedRequest(
        body=body,
        model=model,
        stream=bool(stream),
        n=1,
        output_cap=cap,
        tools=facts.names,
        message_count=len(messages) + (1 if system else 0),
        web_searches=facts.web_searches,
        unbounded_tools=facts.unbounded,
        media_root=[messages, system],
        raw_size=len(raw) + search_input,
    )


# --- usage ---------------------------------------------------------------------------------------


def _count(value: Any) -> int:
    """A token count: absent or null is 0, anything but a non-negative integer is malformed."""
    if value is None:
        return 0
    if not _is_int(value) or value < 0:
        raise ValueError("token count must be a non-negative integer")
    return int(value)


def usage_from_anthropic(usage: Any) -> Usage | None:
    """Anthropic's ``usage`` object, split by price; ``None`` if it is missing or malformed.

    ``input_tokens`` is already the plain input (cache reads and writes are reported
    beside it, not inside it). Cache writes are split into 5-minute and 1-hour entries
    when ``cache_creation`` says how; a total above the split is charged at the 5-minute
    rate, and the 1-hour share is taken as reported.
    """
    if not isinstance(usage, dict):
        return None
    try:
        plain = _count(usage.get("input_tokens"))
        output = _count(usage.get("output_tokens"))
        read = _count(usage.get("cache_read_input_tokens"))
        write = _count(usage.get("cache_creation_input_tokens"))
        write_5m, write_1h = write, 0
        split = usage.get("cache_creation")
        if isinstance(split, dict):
            write_1h = _count(split.get("ephemeral_1h_input_tokens"))
            write_5m = max(_count(split.get("ephemeral_5m_input_tokens")), write - write_1h)
        elif split is not None:
            return None
        searches = 0
        tools = usage.get("server_tool_use")
        if isinstance(tools, dict):
            searches = _count(tools.get("web_search_requests"))
        elif tools is not None:
            return None
    except ValueError:
        return None
    return Usage(
        input_tokens=plain,
        output_tokens=output,
        cache_read_tokens=read,
        cache_write_tokens=write_5m,
        cache_write_1h_tokens=write_1h,
        web_searches=searches,
    )


def response_content_bytes(body: Any) -> int:
    """Bytes of generated content in a Messages response (a bound on its output tokens)."""
    if not isinstance(body, dict) or not isinstance(body.get("content"), list):
        return 0
    return sum(block_bytes(b) for b in body["content"])


def block_bytes(block: Any) -> int:
    """Generated bytes of one content block (text, thinking, redacted thinking, tool input)."""
    if not isinstance(block, dict):
        return 0
    kind = block.get("type")
    if kind in ("tool_use", "server_tool_use"):
        return len(orjson.dumps(block.get("input"))) if block.get("input") else 0
    return sum(string_bytes(block.get(k)) for k in ("text", "thinking", "data"))


def delta_bytes(delta: Any) -> int:
    """Generated bytes of one ``content_block_delta``."""
    if not isinstance(delta, dict):
        return 0
    return sum(string_bytes(delta.get(k)) for k in ("text", "partial_json", "thinking"))


@dataclass(slots=True)
class UsageMerger:
    """Merges the usage objects of a stream: the largest value of each count wins."""

    counts: dict[str, int] = field(default_factory=dict)
    #: The 5m/1h split of cache writes, if ``message_start`` gave one.
    split: dict[str, int] = field(default_factory=dict)
    searches: int = 0
    #: A ``message_delta`` with a valid output count arrived (the usage is final).
    final: bool = False

    def absorb(self, usage: Any, *, final: bool) -> None:
        """Take in one usage object; malformed counts are ignored (never lowered)."""
        if not isinstance(usage, dict):
            return
        for name in _USAGE_FIELDS:
            value = usage.get(name)
            if _is_int(value) and value >= 0:
                self.counts[name] = max(self.counts.get(name, 0), int(value))
                if final and name == "output_tokens":
                    self.final = True
        split = usage.get("cache_creation")
        if isinstance(split, dict):
            for name in ("ephemeral_5m_input_tokens", "ephemeral_1h_input_tokens"):
                value = split.get(name)
                if _is_int(value) and value >= 0:
                    self.split[name] = max(self.split.get(name, 0), int(value))
        tools = usage.get("server_tool_use")
        if isinstance(tools, dict):
            value = tools.get("web_search_requests")
            if _is_int(value) and value >= 0:
                self.searches = max(self.searches, int(value))

    @property
    def usage(self) -> Usage | None:
        """The merged usage once the final output count is known, else None.

        ``message_start`` alone reports a placeholder output count: settling on it would
        charge a stream cut mid-way for almost no output, so it is never used alone.
        """
        if not self.final:
            return None
        merged: dict[str, Any] = dict(self.counts)
        if self.split:
            merged["cache_creation"] = dict(self.split)
        merged["server_tool_use"] = {"web_search_requests": self.searches}
        return usage_from_anthropic(merged)


@dataclass(slots=True)
class MessagesEvents:
    """What a stream of Anthropic events has told so far (shared by every scanner reading one)."""

    merger: UsageMerger = field(default_factory=UsageMerger)
    content_bytes: int = 0
    upstream_id: str | None = None
    model: str | None = None
    stop_reason: str | None = None
    done: bool = False

    def absorb(self, event: dict[str, Any]) -> None:
        """Take in one decoded event."""
        kind = event.get("type")
        if kind == "message_start":
            message = event.get("message")
            if isinstance(message, dict):
                if isinstance(message.get("id"), str):
                    self.upstream_id = message["id"]
                if isinstance(message.get("model"), str):
                    self.model = message["model"]
                self.merger.absorb(message.get("usage"), final=False)
        elif kind == "content_block_delta":
            self.content_bytes += delta_bytes(event.get("delta"))
        elif kind == "content_block_start":
            self.content_bytes += block_bytes(event.get("content_block"))
        elif kind == "message_delta":
            delta = event.get("delta")
            if isinstance(delta, dict) and isinstance(delta.get("stop_reason"), str):
                self.stop_reason = delta["stop_reason"]
            self.merger.absorb(event.get("usage"), final=True)
        elif kind == "message_stop":
            self.done = True


def anthropic_error_event(kind: str, message: str) -> bytes:
    """An ``error`` event as Anthropic sends one mid-stream (the SDKs raise it)."""
    payload = {"type": "error", "error": {"type": kind, "message": message}}
    return b"event: error\ndata: " + orjson.dumps(payload) + b"\n\n"


class MessagesEventsView:
    """A scanner's usage, content bytes, upstream id and end, as its Anthropic events told them."""

    events: MessagesEvents

    @property
    def usage(self) -> Usage | None:
        """Input side from ``message_start``, output from the last ``message_delta``."""
        return self.events.merger.usage

    @property
    def content_bytes(self) -> int:
        """Bytes of text, tool input and thinking streamed so far."""
        return self.events.content_bytes

    @property
    def upstream_id(self) -> str | None:
        """``message_start.message.id``."""
        return self.events.upstream_id

    @property
    def done(self) -> bool:
        """``message_stop`` arrived."""
        return self.events.done


#: A delta as Anthropic writes it: the event's name, then its data with that type first.
_DELTA_EVENT = b'event: content_block_delta\ndata: {"type":"content_block_delta"'


class MessagesStreamScanner(MessagesEventsView, ForwardedStream):
    """Forwards an Anthropic stream byte for byte while reading its usage.

    ``message_stop`` (and anything after it) is held back until :meth:`finish`, so the
    proxy settles the call before the client sees the stream end. Text deltas are not decoded
    as they pass: they only count towards :attr:`content_bytes`, which is only read when a
    stream ends without usage, so they are decoded then (see bench/README.md).
    """

    __slots__ = ("_deferred", "events", "held", "splitter")

    def __init__(self) -> None:
        self.events = MessagesEvents()
        self.held = b""
        self.splitter = SSESplitter()
        self._deferred = HeldEvents()

    @property
    def content_bytes(self) -> int:
        """Bytes of text, tool input and thinking streamed so far."""
        if self._deferred:
            for event in self._deferred.take():
                decoded = decode_event(event)
                if decoded is not None:
                    self.events.absorb(decoded)
        return self.events.content_bytes

    def _event(self, event: bytes) -> bool:
        if not self.events.done and event.startswith(_DELTA_EVENT):
            # A delta moves nothing but content_bytes: decoded when that is read.
            if self._deferred.add(event):
                _ = self.content_bytes
            return True
        if not self.events.done:
            decoded = decode_event(event)
            if decoded is not None:
                self.events.absorb(decoded)
            if not self.events.done:
                return True
        self.held += event
        return False

    def error_event(self, kind: str, message: str) -> bytes:
        """An Anthropic ``error`` event."""
        return anthropic_error_event(kind, message)


def upstream_messages_body(body: dict[str, Any], cap: int, upstream_model: str) -> bytes:
    """A Messages body with the provider's model name and ResGov's output cap.

    When ResGov lowered the cap (``on_insufficient_budget = "shrink"``) below a thinking
    budget the client had kept under its own ``max_tokens``, the budget is lowered too so
    the request stays valid (Anthropic requires ``budget_tokens < max_tokens``).
    """
    out = dict(body)
    out["model"] = upstream_model
    original = out.get("max_tokens")
    out["max_tokens"] = cap
    thinking = out.get("thinking")
    if isinstance(thinking, dict):
        budget = thinking.get("budget_tokens")
        if _is_int(budget) and _is_int(original) and budget < original and budget >= cap:
            out["thinking"] = {**thinking, "budget_tokens": max(cap - 1, 1)}
    return orjson.dumps(out)


class Messages(PassThrough):
    """``/v1/messages`` to an Anthropic-format upstream: forwarded, barely rewritten."""

    client_format: Format = "anthropic"
    upstream_format: Format = "anthropic"

    def parse(self, raw: bytes) -> ParsedRequest:
        """See :func:`parse_messages`."""
        return parse_messages(raw)

    def build_upstream(
        self, req: ParsedRequest, cap: int, upstream_model: str, provider: ProviderPolicy
    ) -> tuple[str, bytes]:
        """The client's body with the model renamed and ``max_tokens`` set to the reserved cap."""
        return messages_path(provider), upstream_messages_body(req.body, cap, upstream_model)

    def usage(self, response: Any) -> Usage | None:
        """``usage`` of a message."""
        return usage_from_anthropic(response.get("usage")) if isinstance(response, dict) else None

    def content_bytes(self, response: Any) -> int:
        """Generated text, thinking and tool input of the message."""
        return response_content_bytes(response)

    def scanner(self, req: ParsedRequest) -> MessagesStreamScanner:
        """A fresh scanner for one stream."""
        return MessagesStreamScanner()
