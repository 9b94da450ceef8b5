"""Webhook signatures, the way Stripe signs: ``X-ResGov-Signature: t=<unix>,v1=<hex>``.

``v1`` is the lowercase hex HMAC-SHA256 with key = the UTF-8 bytes of the secret
string exactly as it was returned (``whsec_…``, prefix included) and message =
``t + "." + the raw body bytes``. Receivers recompute it over the bytes they
received (before any JSON parsing), compare in constant time, and refuse a ``t``
more than 300 s away from their clock (a captured request cannot be replayed
later). A retry is signed anew with a new ``t``; its body and event id are the same.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

SIGNATURE_HEADER = "X-ResGov-Signature"
EVENT_ID_HEADER = "X-ResGov-Event-ID"
#: Receivers should refuse signatures older (or newer) than this many seconds.
REPLAY_WINDOW_SECONDS = 300
SECRET_PREFIX = "whsec_"


def new_secret() -> str:
    """A fresh signing secret: ``whsec_`` + 43 URL-safe characters (256 bits)."""
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def compute_v1(secret: str, timestamp: int, body: bytes) -> str:
    """Lowercase hex HMAC-SHA256(key=secret's UTF-8 bytes, msg=f"{t}." + body)."""
    return hmac.new(
        secret.encode("utf-8"), str(timestamp).encode("ascii") + b"." + body, hashlib.sha256
    ).hexdigest()


def signature_header(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """The ``X-ResGov-Signature`` value for ``body``, signed now (or at ``timestamp``)."""
    t = int(time.time()) if timestamp is None else timestamp
    return f"t={t},v1={compute_v1(secret, t, body)}"


def verify_signature(
    secret: str,
    header: str | None,
    body: bytes,
    *,
    tolerance: int = REPLAY_WINDOW_SECONDS,
    now: float | None = None,
) -> bool:
    """True when ``header`` signs ``body`` with ``secret`` and its ``t`` is within ``tolerance`` seconds.

    Several ``v1=`` entries are accepted (any one matching suffices), so a sender may sign with
    an old and a new secret during a rotation.
    """
    if not header:
        return False
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        if key == "t" and value.isdigit():
            timestamp = int(value)
        elif key == "v1" and value:
            candidates.append(value)
    if timestamp is None or not candidates:
        return False
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance:
        return False
    expected = compute_v1(secret, timestamp, body)
    return any(hmac.compare_digest(expected, c) for c in candidates)
