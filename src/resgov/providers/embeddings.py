"""OpenAI embeddings: input tokens only, no stream, no output."""

from __future__ import annotations

from typing import Any

import orjson

from resgov.core.errors import BadRequest
from resgov.core.policy import ProviderPolicy
from resgov.core.pricing import Usage
from resgov.providers.base import Format, ParsedRequest, PassThrough, StreamScanner
from resgov.providers.openai import ChatStreamScanner, json_request, usage_from_openai


def parse_embeddings(raw: bytes) -> ParsedRequest:
    """Validate an embeddings request. Token-id inputs are bounded too: each id is at least one byte."""
    body, model = json_request(raw)
    value = body.get("input")
    if not isinstance(value, str | list) or (isinstance(value, list) and not value):
        raise BadRequest(
            "'input' is required: a string or a non-empty array of strings or token arrays.",
            reason="invalid_type",
            param="input",
        )
    if body.get("stream"):
        raise BadRequest("Embeddings do not stream.", reason="invalid_type", param="stream")
    count = len(value) if isinstance(value, list) else 1
    return ParsedRequest(body=body, model=model, message_count=count, raw_size=len(raw), has_output=False)


class Embeddings(PassThrough):
    """``/v1/embeddings`` to an OpenAI-compatible upstream."""

    client_format: Format = "openai"
    upstream_format: Format = "openai"

    def parse(self, raw: bytes) -> ParsedRequest:
        """See :func:`parse_embeddings`."""
        return parse_embeddings(raw)

    def build_upstream(
        self, req: ParsedRequest, cap: int, upstream_model: str, provider: ProviderPolicy
    ) -> tuple[str, bytes]:
        """The client's body with the model as the provider knows it."""
        req.body["model"] = upstream_model
        return "/embeddings", orjson.dumps(req.body)

    def usage(self, response: Any) -> Usage | None:
        """``usage.prompt_tokens`` (there is no output)."""
        return usage_from_openai(response.get("usage")) if isinstance(response, dict) else None

    def content_bytes(self, response: Any) -> int:
        """Embeddings generate no tokens."""
        return 0

    def scanner(self, req: ParsedRequest) -> StreamScanner:
        """Never used (parse refuses ``stream``); present to satisfy the protocol."""
        return ChatStreamScanner(strip_usage=False)
