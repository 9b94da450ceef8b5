"""Request fingerprints for the loop detector: pure functions, no I/O.

Two requests are "near-identical" when they ask the same model the same thing once the
values that change on every turn of a stuck loop are masked: UUIDs, ISO timestamps and
clock times, epoch numbers, hex ids of 8 characters or more (and long numbers), and
prefixed opaque ids such as tool-call ids (``call_…``, ``toolu_…``). Only what the model
reads is hashed (the conversation, system prompt, tools); sampling knobs such as
``temperature`` or ``max_tokens`` are not, since a loop that varies them is still a loop.

``loop_match = "exact"`` hashes the same fields without masking anything.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any, Literal

import orjson

#: The body fields that carry what the model reads, across the wire formats ResGov serves
#: (chat ``messages``, Anthropic ``system``, Responses ``input`` / ``instructions``,
#: embeddings ``input``, legacy ``prompt``) and the tools offered with them.
CONTENT_FIELDS = ("messages", "system", "input", "instructions", "prompt", "tools")

# One alternation, scanned once per string; the group that matched names the mask. Order
# matters: a UUID or a timestamp would otherwise be eaten piecewise by the id rules.
_MASKS = re.compile(
    r"""
    (?P<uuid>
        (?<![0-9A-Za-z])[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}(?![0-9A-Za-z])
    )
    |(?P<ts>
        (?<![0-9])\d{4}-\d{2}-\d{2}                           # ISO date
        (?:[T\ ]\d{2}:\d{2}(?::\d{2}(?:[.,]\d+)?)?            # time
           (?:\s?(?:Z|UTC|GMT|[+-]\d{2}:?\d{2}))?)?           # zone
        (?![0-9])
    )
    |(?P<clock>
        (?<![0-9:])\d{1,2}:\d{2}:\d{2}(?:[.,]\d+)?(?![0-9:])
    )
    |(?P<epoch>
        (?<![0-9A-Za-z.])\d{9,19}(?:\.\d+)?(?![0-9A-Za-z])    # epoch s / ms / µs / ns
    )
    |(?P<hex>
        (?<![0-9A-Za-z])(?:0[xX])?(?=[0-9a-fA-F]*[0-9])[0-9a-fA-F]{8,}(?![0-9A-Za-z])
    )
    |(?P<opaque>
        (?<![0-9A-Za-z_-])[A-Za-z]{2,16}[_-](?=[A-Za-z0-9]*[0-9])[A-Za-z0-9]{12,}(?![0-9A-Za-z])
    )
    """,
    re.VERBOSE,
)
_REPLACEMENT = {
    "uuid": "<uuid>",
    "ts": "<ts>",
    "clock": "<ts>",
    "epoch": "<ts>",
    "hex": "<id>",
    "opaque": "<id>",
}


def _mask(match: re.Match[str]) -> str:
    return _REPLACEMENT[match.lastgroup or "hex"]


def normalize_text(text: str) -> str:
    """``text`` with every volatile value replaced by a placeholder (``<uuid>``, ``<ts>``, ``<id>``)."""
    return _MASKS.sub(_mask, text)


def _normalized(value: Any) -> Any:
    """The same JSON value with every string normalised (keys are schema, left as they are)."""
    if isinstance(value, str):
        return normalize_text(value)
    if isinstance(value, list):
        return [_normalized(v) for v in value]
    if isinstance(value, dict):
        return {k: _normalized(v) for k, v in value.items()}
    return value


def fingerprint(
    model: str, body: Mapping[str, Any], match: Literal["normalized", "exact"] = "normalized"
) -> str:
    """A 128-bit hex digest of the model and what the model reads; equal for near-identical requests."""
    content = {name: body[name] for name in CONTENT_FIELDS if name in body}
    if match == "normalized":
        content = _normalized(content)
    # Sorted keys: the same JSON object in another key order is the same request.
    payload = orjson.dumps([model, content], option=orjson.OPT_SORT_KEYS)
    return hashlib.blake2b(payload, digest_size=16).hexdigest()
