"""Token bounds: upper limits, by construction, on what a request can be billed.

Input: a token is never shorter than one byte of the text it encodes, and every
text a request carries (messages, system prompt, tool definitions, schemas) is
inside its JSON body, which is never shorter than the decoded text. So the body's
byte length bounds the text tokens. Media parts are the exception (a URL of 40
bytes may be an image of thousands of tokens; a base64 image of 1 MB is not a
million tokens): each is replaced by a per-part ceiling. Fixed overheads cover the
tokens providers add around messages and tool definitions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: Tokens a provider adds per request (reply priming, hidden system text).
REQUEST_OVERHEAD_TOKENS = 64
#: Tokens a provider adds per message (role markers, separators).
MESSAGE_OVERHEAD_TOKENS = 16
#: Hidden tool-use system prompt (Anthropic documents up to 346 tokens; OpenAI's is smaller).
TOOLS_OVERHEAD_TOKENS = 1024
#: Ceiling for one image part. Documented maxima: OpenAI high detail ~1,445 (tiles) and
#: ~2,700 (patch models, 1,536 patches x 1.72); Anthropic ~1,600 (1.15 MP / 750) and
#: ~4,800 for high-resolution models. The ceiling sits well above all of them.
IMAGE_PART_TOKENS = 16_384
#: Part types whose payload is media, not text, across the OpenAI and Anthropic formats.
MEDIA_PART_TYPES = frozenset({"image_url", "image", "input_image"})
#: Documents (PDF pages become images and text): bounded by the model's context window
#: when known, else by this ceiling per part.
DOCUMENT_PART_TYPES = frozenset({"file", "document", "input_file"})
DOCUMENT_PART_TOKENS = 1_000_000
#: Input tokens one provider-side search (Anthropic's web search, the Responses API's web and
#: file search) can add to a call: its results are billed as input and are not in the body.
#: No provider documents a maximum; this ceiling sits well above the result sizes seen in
#: practice (OpenAI bills some models' searches as fixed 8,000-token blocks; file search returns
#: at most 50 chunks), and a breach still shows up as a flagged overage.
SEARCH_RESULT_TOKENS = 32_768


@dataclass(slots=True)
class InputBound:
    """An input-token bound and how it was made (for audit and debugging)."""

    tokens: int
    media_parts: int
    document_parts: int


def _media_parts(value: Any, found: list[tuple[str, Any]]) -> None:
    """Collect every media/document part anywhere in a messages structure."""
    if isinstance(value, dict):
        kind = value.get("type")
        if isinstance(kind, str) and (kind in MEDIA_PART_TYPES or kind in DOCUMENT_PART_TYPES):
            found.append((kind, value))
            return
        for item in value.values():
            if isinstance(item, list | dict):
                _media_parts(item, found)
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, list | dict):
                _media_parts(item, found)


def string_bytes(value: Any) -> int:
    """UTF-8 bytes of every string inside a JSON value (its text content, keys excluded)."""
    if isinstance(value, str):
        return len(value) if value.isascii() else len(value.encode())
    if isinstance(value, dict):
        items: Any = value.values()
    elif isinstance(value, list):
        items = value
    else:
        return 0
    # Runs on every chunk of every stream: strings counted here, only containers recurse.
    total = 0
    for item in items:
        if isinstance(item, str):
            total += len(item) if item.isascii() else len(item.encode())
        elif isinstance(item, dict | list):
            total += string_bytes(item)
    return total


def input_bound(
    body_size: int, messages: Any, message_count: int, has_tools: bool, context_window: int | None
) -> InputBound:
    """Upper bound on input tokens for a request whose JSON body is ``body_size`` bytes.

    ``messages`` is whatever part of the body may hold media parts (it is only walked
    when the raw body could contain one, which keeps text-only requests cheap).
    """
    media: list[tuple[str, Any]] = []
    if messages is not None:
        _media_parts(messages, media)
    tokens = body_size
    documents = 0
    for kind, part in media:
        # Only the part's string values are taken out: a JSON string never occupies fewer
        # bytes in the body than its UTF-8 length, whereas re-encoding numbers or
        # whitespace could take out more than the client actually sent.
        tokens -= string_bytes(part)
        if kind in DOCUMENT_PART_TYPES:
            documents += 1
            tokens += DOCUMENT_PART_TOKENS
        else:
            tokens += IMAGE_PART_TOKENS
    tokens = max(tokens, 0)
    tokens += REQUEST_OVERHEAD_TOKENS + MESSAGE_OVERHEAD_TOKENS * message_count
    if has_tools:
        tokens += TOOLS_OVERHEAD_TOKENS
    if documents and context_window:
        # A document's page count is unknown here; the provider rejects input above the
        # context window, so that caps it. Text-only bounds never lean on library metadata.
        tokens = min(tokens, context_window)
    return InputBound(tokens=tokens, media_parts=len(media) - documents, document_parts=documents)
