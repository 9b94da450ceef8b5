"""Signatures: ResGov's header verifies with a receiver's own code; tampering and replays fail."""

from __future__ import annotations

import hashlib
import hmac

from resgov.alerts.signing import compute_v1, new_secret, signature_header, verify_signature
from tests.alerts.recipe import verify_resgov_signature


def test_header_format_and_independent_verification() -> None:
    secret = new_secret()
    assert secret.startswith("whsec_") and len(secret) > 40
    body = b'{"id":"evt_1","type":"budget.threshold"}'
    header = signature_header(secret, body, timestamp=1_700_000_000)
    t_part, v1_part = header.split(",")
    assert t_part == "t=1700000000"
    expected = hmac.new(secret.encode(), b"1700000000." + body, hashlib.sha256).hexdigest()
    assert v1_part == f"v1={expected}"
    assert v1_part[3:] == v1_part[3:].lower() and len(v1_part[3:]) == 64
    assert verify_resgov_signature(secret, header, body, now=1_700_000_100)
    assert verify_signature(secret, header, body, now=1_700_000_100)


def test_replay_window_and_tampering() -> None:
    secret = new_secret()
    body = b'{"a":1}'
    header = signature_header(secret, body, timestamp=1_000)
    # Exactly at the edge of the 300 s window is accepted; one second past it is refused.
    assert verify_resgov_signature(secret, header, body, now=1_300)
    assert not verify_resgov_signature(secret, header, body, now=1_301)
    assert not verify_resgov_signature(secret, header, body, now=699)  # signed "in the future"
    assert not verify_signature(secret, header, body, now=1_301)
    assert not verify_resgov_signature(secret, header, body + b" ", now=1_000)
    assert not verify_resgov_signature(secret + "x", header, body, now=1_000)
    assert not verify_signature(secret, "t=abc,v1=00", body, now=1_000)
    assert not verify_signature(secret, None, body)
    assert not verify_resgov_signature(secret, "garbage", body)


def test_rotation_accepts_any_v1() -> None:
    old, new = new_secret(), new_secret()
    body = b"{}"
    header = f"t=50,v1={compute_v1(old, 50, body)},v1={compute_v1(new, 50, body)}"
    assert verify_signature(new, header, body, now=60)
    assert verify_signature(old, header, body, now=60)
    assert verify_resgov_signature(new, header, body, now=60)
