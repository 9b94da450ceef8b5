"""The ledger: one Store protocol, one module per backend, selected by ``RESGOV_STORE``."""

from __future__ import annotations

from resgov.ledger.store import Store, StoreError


def store_from_url(url: str) -> Store:
    """``sqlite:///path.db`` (default) or ``redis://host:port/db`` / ``rediss://…``."""
    if url.startswith(("redis://", "rediss://", "unix://")):
        from resgov.ledger.redis import RedisStore

        return RedisStore(url)
    if url.startswith("sqlite://") or "://" not in url:
        from resgov.ledger.sqlite import SQLiteStore

        return SQLiteStore(url)
    raise StoreError(f"unsupported RESGOV_STORE {url!r}: use sqlite:///path.db or redis://host:port/db")


__all__ = ["Store", "StoreError", "store_from_url"]
