"""API keys and the admin token: hashing, lookup with a short cache, constant-time checks."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Mapping

from resgov.core.errors import BadRequest, Forbidden, StoreUnavailable, Unauthorized
from resgov.ledger.store import ApiKeyRecord, Store, StoreError

SCOPES = ("proxy", "read", "write")
KEY_PREFIX = "rgf_"


def hash_key(key: str) -> str:
    """SHA-256 of the key: the only form in which a key is stored."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key(
    org: str,
    name: str,
    *,
    scopes: tuple[str, ...] | None = None,
    agent_id: str | None = None,
    expires_at: float | None = None,
) -> tuple[str, ApiKeyRecord]:
    """A fresh key (shown once) and the record to store."""
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    record = ApiKeyRecord(
        key_id="key_" + secrets.token_hex(8),
        key_hash=hash_key(secret),
        org=org,
        name=name,
        scopes=tuple(scopes) if scopes else SCOPES,
        agent_id=agent_id,
        created_at=time.time(),
        expires_at=expires_at,
        prefix=secret[: len(KEY_PREFIX) + 6],
    )
    return secret, record


def key_from_headers(headers: Mapping[bytes, bytes]) -> str | None:
    """The key as the OpenAI SDK (``Authorization: Bearer``) or the Anthropic SDK (``x-api-key``) sends it."""
    value = headers.get(b"authorization")
    if value:
        scheme, _, token = value.decode("latin-1").partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    value = headers.get(b"x-api-key")
    if value:
        return value.decode("latin-1").strip() or None
    return None


def admin_token_matches(expected: str | None, given: str | None) -> bool:
    """Constant-time comparison; a missing or short configured token never matches."""
    if not expected or not given:
        return False
    return hmac.compare_digest(expected.encode(), given.encode())


class KeyCache:
    """Looks keys up in the store, caching hits briefly: auth is on every proxied call."""

    def __init__(self, store: Store, ttl: float) -> None:
        self.store = store
        self.ttl = ttl
        self._cache: dict[str, tuple[float, ApiKeyRecord | None]] = {}

    def forget(self, key_id: str | None = None) -> None:
        """Drop cached entries (after a revocation through this process)."""
        if key_id is None:
            self._cache.clear()
        else:
            self._cache = {h: v for h, v in self._cache.items() if not (v[1] and v[1].key_id == key_id)}

    async def authenticate(self, key: str | None, scope: str) -> ApiKeyRecord:
        """The key's record if it is valid, unexpired, unrevoked and has ``scope``; else a refusal."""
        if not key:
            raise Unauthorized(
                "Missing API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'.",
                reason="missing_api_key",
            )
        digest = hash_key(key)
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is not None and cached[0] > now:
            record = cached[1]
        else:
            try:
                record = await self.store.get_api_key(digest)
            except StoreError as exc:
                if cached is None:
                    raise StoreUnavailable(
                        "The key store is unavailable; the call was not sent upstream.",
                        reason="store_unavailable",
                    ) from exc
                # A key seen recently keeps working through a store outage; what the call
                # may spend is still decided by fail_safe_action.
                record = cached[1]
            else:
                if len(self._cache) > 10_000:
                    self._cache.clear()
                self._cache[digest] = (now + self.ttl, record)
        if record is None:
            raise Unauthorized("Invalid API key.", reason="invalid_api_key")
        if record.revoked_at is not None:
            raise Unauthorized("This API key has been revoked.", reason="revoked_api_key")
        if record.expires_at is not None and record.expires_at <= time.time():
            raise Unauthorized("This API key has expired.", reason="expired_api_key")
        if scope not in record.scopes:
            raise Forbidden(
                f"This API key lacks the '{scope}' scope.",
                type="insufficient_scope",
                reason="insufficient_scope",
            )
        return record


def agent_for(record: ApiKeyRecord, header_value: str | None) -> str:
    """The agent a call acts as: the header, or the key's bound agent (which the header must match)."""
    if record.agent_id is not None:
        if header_value is not None and header_value != record.agent_id:
            raise Forbidden(
                f"This API key is bound to agent '{record.agent_id}'; X-ResGov-Agent-ID says '{header_value}'.",
                type="agent_mismatch",
                reason="agent_mismatch",
                agent_id=header_value,
            )
        return record.agent_id
    if not header_value:
        raise BadRequest(
            "Missing X-ResGov-Agent-ID header (this API key is not bound to an agent).",
            reason="missing_agent_id",
        )
    return header_value
