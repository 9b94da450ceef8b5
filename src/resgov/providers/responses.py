"""OpenAI Responses API (``/v1/responses``): ``max_output_tokens``, typed stream events."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from resgov.core.bounds import SEARCH_RESULT_TOKENS, string_bytes
from resgov.core.errors import BadRequest, Forbidden
from resgov.core.policy import ProviderPolicy
from resgov.core.pricing import Usage
from resgov.providers.base import Format, ParsedRequest, PassThrough
from resgov.providers.openai import (
    MAX_OUTPUT_CAP,
    int_field,
    json_request,
    tool_names,
    unbounded_features,
    usage_from_openai,
)
from resgov.providers.sse import ForwardedStream, SSESplitter, data_object, event_data

#: Events that end a response; they carry its usage and are held back until settlement.
_TERMINAL = (b"response.completed", b"response.incomplete", b"response.failed")
#: Built-in tools billed per call; ``max_tool_calls`` bounds how often they run.
_FEE_TOOLS = frozenset({"web_search", "web_search_preview", "file_search"})
#: Built-in tools nothing in the request bounds: MCP and the code interpreter return output of
#: any size as input (the code interpreter also bills containers), and image generation bills
#: each of any number of images at image-model rates ResGov has no price for.
_UNBOUNDED_TOOLS = frozenset({"mcp", "code_interpreter", "image_generation"})


def parse_responses(raw: bytes) -> ParsedRequest:
    """Validate a Responses request and collect what bounds its cost."""
    body, model = json_request(raw)
    value = body.get("input")
    if value is not None and not isinstance(value, str | list):
        raise BadRequest("'input' must be a string or an array.", reason="invalid_type", param="input")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise BadRequest("'stream' must be a boolean.", reason="invalid_type", param="stream")
    if body.get("previous_response_id") is not None or body.get("conversation") is not None:
        # The provider adds a stored conversation ResGov never sees: no bound from this body.
        raise Forbidden(
            "previous_response_id / conversation add stored input ResGov cannot see, so the call's "
            "cost cannot be bounded; send the full input instead.",
            type="unbounded_cost",
            reason="unbounded_cost",
        )
    cap = int_field(body, "max_output_tokens", minimum=1, maximum=MAX_OUTPUT_CAP)
    tools = body.get("tools")
    names = tool_names(tools, body.get("tool_choice"))
    searches: int | None = 0
    if isinstance(tools, list) and any(isinstance(t, dict) and t.get("type") in _FEE_TOOLS for t in tools):
        searches = int_field(body, "max_tool_calls", minimum=0, maximum=10_000)
    unbounded = unbounded_features(body, model)
    if isinstance(tools, list):
        unbounded += [t["type"] for t in tools if isinstance(t, dict) and t.get("type") in _UNBOUNDED_TOOLS]
    count = len(value) if isinstance(value, list) else 1
    # Search results are billed as input but are not in the body: allow for each call.
    search_input = (searches or 0) * SEARCH_RESULT_TOKENS
    return ParsedRequest(
        body=body,
        model=model,
        stream=bool(stream),
        output_cap=cap,
        tools=names,
        message_count=count + (1 if body.get("instructions") else 0),
        web_searches=searches,
        unbounded_tools=unbounded,
        media_root=value,
        raw_size=len(raw) + search_input,
    )


@dataclass(slots=True)
class ResponsesStreamScanner(ForwardedStream):
    """Forwards Responses events unchanged; usage from the terminal event, held back until settled."""

    content_bytes: int = 0
    upstream_id: str | None = None
    done: bool = False
    usage_raw: dict[str, Any] | None = None
    held: bytes = b""
    splitter: SSESplitter = field(init=False)

    def __post_init__(self) -> None:
        self.splitter = SSESplitter()

    @property
    def usage(self) -> Usage | None:
        """The terminal event's usage."""
        return usage_from_openai(self.usage_raw) if self.usage_raw is not None else None

    def _event(self, event: bytes) -> bool:
        if self.done:
            self.held += event
            return False
        data = event_data(event)
        if not data:
            return True
        payload = data_object(data)
        if payload is None:
            return True
        kind = payload.get("type")
        delta = payload.get("delta")
        if isinstance(delta, str):
            self.content_bytes += len(delta.encode())
        response = payload.get("response")
        if isinstance(response, dict):
            if self.upstream_id is None and isinstance(response.get("id"), str):
                self.upstream_id = response["id"]
            if isinstance(kind, str) and kind.encode() in _TERMINAL:
                usage = response.get("usage")
                if isinstance(usage, dict):
                    self.usage_raw = usage
                self.done = True
                self.held += event
                return False
        return True

    def error_event(self, kind: str, message: str) -> bytes:
        """A Responses ``error`` event."""
        return (
            b"event: error\ndata: "
            + orjson.dumps({"type": "error", "code": kind, "message": message})
            + b"\n\n"
        )


class Responses(PassThrough):
    """``/v1/responses`` to OpenAI."""

    client_format: Format = "openai"
    upstream_format: Format = "openai"

    def parse(self, raw: bytes) -> ParsedRequest:
        """See :func:`parse_responses`."""
        return parse_responses(raw)

    def build_upstream(
        self, req: ParsedRequest, cap: int, upstream_model: str, provider: ProviderPolicy
    ) -> tuple[str, bytes]:
        """The client's body with the model renamed and ``max_output_tokens`` = the reserved cap."""
        req.body["model"] = upstream_model
        req.body["max_output_tokens"] = cap
        return "/responses", orjson.dumps(req.body)

    def usage(self, response: Any) -> Usage | None:
        """``usage`` of a response object."""
        return usage_from_openai(response.get("usage")) if isinstance(response, dict) else None

    def content_bytes(self, response: Any) -> int:
        """Every string in ``output`` (text, tool arguments, reasoning summaries)."""
        return string_bytes(response.get("output")) if isinstance(response, dict) else 0

    def scanner(self, req: ParsedRequest) -> ResponsesStreamScanner:
        """A fresh scanner."""
        return ResponsesStreamScanner()
