"""The provider's request id: OpenAI's header first, Anthropic's otherwise, any case."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from resgov.providers.http_client import Headers
from resgov.server.proxy import _upstream_id


def _resp(*pairs: tuple[bytes, bytes]) -> Any:
    return SimpleNamespace(headers=Headers(list(pairs)))


@pytest.mark.parametrize(
    ("pairs", "expected"),
    [
        ([(b"X-Request-Id", b"req_1")], "req_1"),  # OpenAI, any case
        ([(b"request-id", b"req_2")], "req_2"),  # Anthropic
        ([(b"request-id", b"req_a"), (b"x-request-id", b"req_o")], "req_o"),  # OpenAI's wins, any order
        ([(b"x-request-id", b""), (b"Request-Id", b"req_3")], "req_3"),  # an empty one is no id
        ([(b"x-request-id", b"first"), (b"x-request-id", b"second")], "first"),
        ([(b"content-type", b"application/json")], None),
        ([], None),
    ],
)
def test_upstream_id(pairs: list[tuple[bytes, bytes]], expected: str | None) -> None:
    assert _upstream_id(_resp(*pairs)) == expected
