"""Redis URLs as ResGov reads them: ``?prefix=NAME`` is ResGov's key prefix, the rest is redis-py's.

The ledger, the guard and the alert store all open the same ``RESGOV_STORE`` URL, so they
read it here, once, the same way.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

#: The key prefix when the URL names none.
DEFAULT_PREFIX = "resgov"
#: Characters a prefix must not hold: braces would break the Cluster hash tags built from it,
#: the rest are SCAN/KEYS glob syntax.
_FORBIDDEN = "{}*?[]\\"


class InvalidRedisPrefix(ValueError):
    """The key prefix is empty or holds a character a Redis key pattern would misread."""


def split_redis_url(url: str, prefix: str | None = None) -> tuple[str, str]:
    """``(connection URL without ?prefix, key prefix)``; an explicit ``prefix`` wins over the URL's."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    from_url = [v for k, v in query if k == "prefix"]
    rest = [(k, v) for k, v in query if k != "prefix"]
    chosen = prefix if prefix is not None else (from_url[-1] if from_url else DEFAULT_PREFIX)
    if not chosen or any(c in chosen for c in _FORBIDDEN):
        raise InvalidRedisPrefix(
            f"invalid Redis key prefix {chosen!r}: it must be non-empty, without {_FORBIDDEN}"
        )
    return urlunsplit(parts._replace(query=urlencode(rest))), chosen
