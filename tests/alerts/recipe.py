"""The receiver-side verification recipe from the README, used verbatim by the tests.

Written independently of resgov.alerts.signing on purpose: the tests check ResGov's
signatures with a receiver's own code, not with ResGov's.
"""

from __future__ import annotations

import hashlib
import hmac
import time

TOLERANCE_SECONDS = 300


def verify_resgov_signature(
    secret: str, header: str, raw_body: bytes, now: float | None = None, tolerance: int = TOLERANCE_SECONDS
) -> bool:
    """True if ``header`` (``X-ResGov-Signature``) signs ``raw_body`` with ``secret`` within the replay window."""
    try:
        fields = dict(part.strip().split("=", 1) for part in header.split(","))
        timestamp = int(fields["t"])
        received = [v for k, v in (p.strip().split("=", 1) for p in header.split(",")) if k == "v1"]
    except (KeyError, ValueError):
        return False
    # Replay window: refuse anything signed more than 5 minutes ago (or in the future).
    if abs((time.time() if now is None else now) - timestamp) > tolerance:
        return False
    expected = hmac.new(
        secret.encode("utf-8"), f"{timestamp}.".encode() + raw_body, hashlib.sha256
    ).hexdigest()
    return any(hmac.compare_digest(expected, v) for v in received)
