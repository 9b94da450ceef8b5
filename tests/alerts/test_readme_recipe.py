"""The README's webhook verification recipe accepts ResGov's signatures and nothing else."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

from resgov.alerts.signing import new_secret, signature_header

README = Path(__file__).resolve().parents[2] / "README.md"


def _recipe() -> Callable[..., bool]:
    text = README.read_text(encoding="utf-8")
    found = re.search(r"```python\n(import hashlib, hmac, time\n\ndef verify\(.*?)```", text, re.S)
    assert found, "README lost its verification recipe"
    namespace: dict[str, object] = {}
    exec(found.group(1), namespace)
    return namespace["verify"]  # type: ignore[return-value]


def test_readme_recipe_verifies_real_signatures_and_refuses_the_rest() -> None:
    verify = _recipe()
    secret = new_secret()
    body = b'{"id":"evt_1","type":"budget.threshold"}'
    header = signature_header(secret, body)
    assert verify(secret, header, body)
    assert not verify(secret, header, body + b" ")
    assert not verify(new_secret(), header, body)
    old = signature_header(secret, body, timestamp=int(time.time()) - 301)
    assert not verify(secret, old, body)
    assert not verify(secret, "garbage", body)
