"""OpenAI chat completions wire format: request checks and rewriting, usage, stream scanning."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import orjson

from resgov.core.bounds import string_bytes
from resgov.core.errors import BadRequest, InvalidValue
from resgov.core.policy import ProviderPolicy
from resgov.core.pricing import Usage
from resgov.providers.base import Format, ParsedRequest, PassThrough
from resgov.providers.sse import (
    ForwardedStream,
    HeldEvents,
    SSESplitter,
    data_object,
    decode_event,
    event_data,
    iter_events,
)

#: Largest output cap ResGov forwards (no model comes close; beyond it the value is absurd).
MAX_OUTPUT_CAP = 10_000_000
MAX_CHOICES = 128
#: OpenAI reasoning models reject ``max_tokens`` and take ``max_completion_tokens``.
_REASONING_MODEL = re.compile(r"^(o\d|gpt-5)")


def int_field(body: dict[str, Any], name: str, *, minimum: int, maximum: int) -> int | None:
    """An optional integer field: 400 for a wrong type, 422 outside ``[minimum, maximum]``."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"'{name}' must be an integer or null.", reason="invalid_type", param=name)
    if value < minimum or value > maximum:
        raise InvalidValue(
            f"'{name}' must be between {minimum} and {maximum}, got {value}.",
            reason="invalid_value",
            param=name,
        )
    return value


def tool_names(tools: Any, tool_choice: Any) -> list[str]:
    """Names of every tool a request offers or forces: function names, else the tool's type."""
    names: list[str] = []
    if tools is not None:
        if not isinstance(tools, list):
            raise BadRequest("'tools' must be an array.", reason="invalid_type", param="tools")
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict):
                raise BadRequest(f"'tools[{i}]' must be an object.", reason="invalid_type", param="tools")
            kind = tool.get("type", "function")
            inner = tool.get(kind) if isinstance(kind, str) else None
            name = inner.get("name") if isinstance(inner, dict) else tool.get("name")
            if not isinstance(name, str) or not name:
                name = kind if isinstance(kind, str) else None
            if not isinstance(name, str):
                raise BadRequest(f"'tools[{i}]' has no name.", reason="invalid_type", param="tools")
            names.append(name)
    if isinstance(tool_choice, dict):
        kind = tool_choice.get("type", "function")
        inner = tool_choice.get(kind) if isinstance(kind, str) else None
        name = inner.get("name") if isinstance(inner, dict) else tool_choice.get("name")
        if isinstance(name, str) and name not in names:
            names.append(name)
    return names


def unbounded_features(body: dict[str, Any], model: str) -> list[str]:
    """Provider-side features of the OpenAI-format routes that nothing in the request bounds at
    a price ResGov knows: chat completions' ``web_search_options``, OpenRouter's web
    search (the ``:online`` model suffix, the ``web`` plugin, the ``openrouter:web_search`` server
    tool) and every other ``openrouter:`` server tool (image generation…). Refused as
    ``unbounded_cost``; providers without these features ignore or reject the fields."""
    found = [":online"] if model.endswith(":online") else []
    if body.get("web_search_options") is not None:
        # Chat completions' web search has no per-request limit on searches, and its fees are
        # unknown wherever the model's price does not list them (OpenRouter maps it to its own).
        found.append("web_search_options")
    plugins = body.get("plugins")
    if isinstance(plugins, list):
        found += [f"plugins {p['id']}" for p in plugins if isinstance(p, dict) and p.get("id") == "web"]
    tools = body.get("tools")
    if isinstance(tools, list):
        found += [
            t["type"]
            for t in tools
            if isinstance(t, dict) and isinstance(t.get("type"), str) and t["type"].startswith("openrouter:")
        ]
    return found


def json_request(raw: bytes) -> tuple[dict[str, Any], str]:
    """The request body as a JSON object and its ``model``: 400 for anything else (every route)."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"Request body is not valid JSON: {exc}", reason="invalid_json") from exc
    if not isinstance(body, dict):
        raise BadRequest("Request body must be a JSON object.", reason="invalid_json")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest(
            "'model' is required and must be a non-empty string.", reason="invalid_type", param="model"
        )
    return body, model


def parse_chat(raw: bytes) -> ParsedRequest:
    """Validate what ResGov relies on; everything else is forwarded untouched."""
    body, model = json_request(raw)
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise BadRequest(
            "'messages' is required and must be an array.", reason="invalid_type", param="messages"
        )
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRequest(f"'messages[{i}]' must be an object.", reason="invalid_type", param="messages")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise BadRequest("'stream' must be a boolean.", reason="invalid_type", param="stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise BadRequest("'stream_options' must be an object.", reason="invalid_type", param="stream_options")
    wants_usage = bool(options.get("include_usage")) if options else False
    n = int_field(body, "n", minimum=1, maximum=MAX_CHOICES) or 1
    caps = [
        c
        for c in (
            int_field(body, "max_tokens", minimum=1, maximum=MAX_OUTPUT_CAP),
            int_field(body, "max_completion_tokens", minimum=1, maximum=MAX_OUTPUT_CAP),
        )
        if c is not None
    ]
    names = tool_names(body.get("tools"), body.get("tool_choice"))
    extra = 0
    prediction = body.get("prediction")
    if prediction is not None:
        # Rejected prediction tokens are billed as output; bytes bound their tokens.
        extra = len(orjson.dumps(prediction))
    return ParsedRequest(
        body=body,
        model=model,
        stream=bool(stream),
        client_wants_usage=wants_usage,
        n=n,
        # Both caps sent: the provider honours one of them; the larger bounds either.
        output_cap=max(caps) if caps else None,
        tools=names,
        message_count=len(messages),
        extra_output_tokens=extra,
        unbounded_tools=unbounded_features(body, model),
        media_root=messages,
        raw_size=len(raw),
    )


def upstream_body(req: ParsedRequest, cap: int, upstream_model: str, provider_is_openai: bool) -> bytes:
    """The body sent upstream: the model name as the provider knows it, the output cap ResGov
    reserved for, and usage reporting switched on for streams."""
    body = req.body
    body["model"] = upstream_model
    if "max_completion_tokens" in body and body["max_completion_tokens"] is not None:
        body["max_completion_tokens"] = cap
        if body.get("max_tokens") is not None:
            body["max_tokens"] = cap
    elif body.get("max_tokens") is not None:
        body["max_tokens"] = cap
    elif provider_is_openai and _REASONING_MODEL.match(upstream_model):
        body["max_completion_tokens"] = cap
    else:
        body["max_tokens"] = cap
    if req.stream:
        options = dict(body.get("stream_options") or {})
        options["include_usage"] = True
        body["stream_options"] = options
    return orjson.dumps(body)


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError("token count must be a non-negative integer")
    return value


def usage_from_openai(usage: Any) -> Usage | None:
    """OpenAI's ``usage`` object, split by price; ``None`` if it is missing or malformed."""
    if not isinstance(usage, dict):
        return None
    try:
        prompt = _int(usage.get("prompt_tokens", usage.get("input_tokens", 0)) or 0)
        completion = _int(usage.get("completion_tokens", usage.get("output_tokens", 0)) or 0)
        details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details") or {}
        out_details = usage.get("completion_tokens_details") or usage.get("output_tokens_details") or {}
        cached = _int(details.get("cached_tokens") or 0) if isinstance(details, dict) else 0
        audio_in = _int(details.get("audio_tokens") or 0) if isinstance(details, dict) else 0
        audio_out = _int(out_details.get("audio_tokens") or 0) if isinstance(out_details, dict) else 0
    except ValueError:
        return None
    cached = min(cached, prompt)
    audio_in = min(audio_in, prompt - cached)
    audio_out = min(audio_out, completion)
    return Usage(
        input_tokens=prompt - cached - audio_in,
        output_tokens=completion - audio_out,
        cache_read_tokens=cached,
        input_audio_tokens=audio_in,
        output_audio_tokens=audio_out,
    )


def response_content_bytes(body: Any) -> int:
    """Bytes of generated content in a non-streaming response (a bound on its output tokens)."""
    if not isinstance(body, dict):
        return 0
    choices = body.get("choices")
    return (
        string_bytes([c.get("message") for c in choices if isinstance(c, dict)])
        if isinstance(choices, list)
        else 0
    )


def _no_usage(raw: bytes) -> bool:
    """True when no event in ``raw`` can carry a usage object: every ``"usage"`` key in it is
    ``"usage":null`` (what OpenAI sends on each content chunk when usage was asked for). A JSON
    string cannot hold an unescaped quote, so text cannot fake the key. Anything else (a usage
    object, another spelling) returns False, and its events are parsed."""
    return raw.count(b'"usage"') == raw.count(b'"usage":null')


@dataclass(slots=True)
class ChatStreamScanner(ForwardedStream):
    """Watches an OpenAI chat stream: usage, content bytes, the upstream id.

    When the client did not ask for usage, the usage-only chunk ResGov requested is
    dropped, so the client sees the stream it asked for. ``[DONE]`` is held back
    (``hold_done``) so the call can be settled before the last byte leaves.

    Content events are not parsed as they pass: their sizes only matter when the stream ends
    without usage (the estimate), so they are kept and counted on demand by
    :attr:`content_bytes` (and searched for the id by :attr:`upstream_id`). A run of events
    with no usage and no ``[DONE]`` is forwarded whole, without splitting it into events
    (see bench/README.md).
    """

    strip_usage: bool
    usage_raw: dict[str, Any] | None = None
    done: bool = False
    held: bytes = b""
    splitter: SSESplitter = field(init=False)
    _id: str | None = None
    _counted: int = 0
    #: Content events not yet counted.
    _uncounted: HeldEvents = field(default_factory=HeldEvents)
    #: Runs forwarded unparsed while no id was known, searched for it on demand.
    _id_search: list[bytes] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.splitter = SSESplitter()

    @property
    def upstream_id(self) -> str | None:
        """The id of the first chunk that has one."""
        if self._id is None and self._id_search:
            runs, self._id_search = self._id_search, []
            for run in runs:
                for event in iter_events(run):
                    chunk = decode_event(event)
                    if chunk is not None and isinstance(chunk.get("id"), str):
                        self._id = chunk["id"]
                        return self._id
        return self._id

    @property
    def content_bytes(self) -> int:
        """UTF-8 bytes of every string in the choices' deltas so far (text, tool arguments…)."""
        if self._uncounted:
            for event in self._uncounted.take():
                data = event_data(event)
                if data:
                    self._count(data)
        return self._counted

    def _count(self, data: bytes) -> dict[str, Any] | None:
        chunk = data_object(data)
        if chunk is None:
            return None
        choices = chunk.get("choices")
        if isinstance(choices, list):
            for choice in choices:
                if isinstance(choice, dict):
                    self._counted += string_bytes(choice.get("delta"))
        return chunk

    def _hold(self, raw: bytes) -> None:
        """Forwarded unparsed: counted (and searched for the id) only when asked."""
        if self._id is None:
            self._id_search.append(raw)
        if self._uncounted.add(raw):
            _ = self.content_bytes  # count them now

    def _run(self, run: bytes) -> int:
        """The leading events of ``run`` up to the first that may end the stream or carry usage."""
        if self.done or run.find(b"\r") >= 0:
            return 0  # event by event (CR line endings: boundaries are not just blank lines)
        cut = run.find(b"[DONE]")
        if cut < 0:
            cut = len(run)
        head = run if cut == len(run) else run[:cut]
        # Every chunk of a stream with usage on says "usage":null: count both (two scans in C)
        # rather than stepping through each occurrence (a find with bounds per chunk).
        if not _no_usage(head):
            i = head.find(b'"usage"')
            while head.startswith(b'"usage":null', i):
                i = head.find(b'"usage"', i + 7)
            cut = i
        if cut < len(run):
            start = run.rfind(b"\n\n", 0, cut)  # the start of the event holding it
            cut = start + 2 if start >= 0 else 0
        if cut:
            self._hold(run[:cut] if cut < len(run) else run)
        return cut

    def _event(self, event: bytes) -> bool:
        data = event_data(event)
        if not data:
            return True
        if data == b"[DONE]":
            self.done = True
            self.held += event
            return False
        if self.done:
            self.held += event
            return False
        if _no_usage(data):
            self._hold(event)
            return True
        chunk = self._count(data)
        if chunk is None:
            return True
        # The property first searches what came before, unparsed.
        if self.upstream_id is None and isinstance(chunk.get("id"), str):
            self._id = chunk["id"]
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self.usage_raw = usage
        # Dropped: the usage-only chunk ResGov asked for on behalf of a client that did not.
        choices = chunk.get("choices")
        return not (isinstance(choices, list) and not choices and usage is not None and self.strip_usage)

    @property
    def usage(self) -> Usage | None:
        """The last usage the stream reported, split by price."""
        return usage_from_openai(self.usage_raw) if self.usage_raw is not None else None

    def error_event(self, kind: str, message: str) -> bytes:
        """An SSE event the OpenAI SDKs raise as an APIError."""
        return b"data: " + orjson.dumps({"error": {"type": kind, "message": message}}) + b"\n\n"


def is_openai(provider: ProviderPolicy) -> bool:
    """OpenAI itself (reasoning models there take ``max_completion_tokens``)."""
    return provider.name == "openai" or "api.openai.com" in provider.base_url


class ChatCompletions(PassThrough):
    """``/v1/chat/completions`` to an OpenAI-compatible upstream: forwarded, barely rewritten."""

    client_format: Format = "openai"
    upstream_format: Format = "openai"

    def parse(self, raw: bytes) -> ParsedRequest:
        """See :func:`parse_chat`."""
        return parse_chat(raw)

    def build_upstream(
        self, req: ParsedRequest, cap: int, upstream_model: str, provider: ProviderPolicy
    ) -> tuple[str, bytes]:
        """The client's body with the model renamed, the output cap set and stream usage on."""
        return "/chat/completions", upstream_body(req, cap, upstream_model, is_openai(provider))

    def usage(self, response: Any) -> Usage | None:
        """``usage`` of a chat completion."""
        return usage_from_openai(response.get("usage")) if isinstance(response, dict) else None

    def content_bytes(self, response: Any) -> int:
        """Generated text, tool arguments and refusals of every choice."""
        return response_content_bytes(response)

    def scanner(self, req: ParsedRequest) -> ChatStreamScanner:
        """Strips the usage chunk ResGov asked for when the client did not."""
        return ChatStreamScanner(strip_usage=not req.client_wants_usage)
