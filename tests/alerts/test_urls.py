"""Webhook URL validation: private, loopback, link-local, metadata, unique-local, unspecified refused."""

from __future__ import annotations

import pytest

from resgov.alerts.resolver import GuardedResolver
from resgov.alerts.urls import (
    RefusedAddress,
    UnsafeURL,
    allow_private_from_env,
    check_literal,
    check_url,
    parse_url,
    redact_url,
    refused_reason,
)

REFUSED = [
    "127.0.0.1", "127.8.9.10", "10.0.0.1", "172.16.0.1", "172.31.255.255", "192.168.1.1",
    "169.254.169.254", "169.254.0.1", "0.0.0.0", "100.64.0.1", "224.0.0.1", "255.255.255.255",
    "::1", "::", "fc00::1", "fd00:ec2::254", "fe80::1", "::ffff:127.0.0.1", "::ffff:169.254.169.254",
    "64:ff9b::a00:1", "2002:7f00:1::1", "ff02::1",
]  # fmt: skip
ALLOWED = ["93.184.216.34", "1.1.1.1", "8.8.8.8", "2606:4700:4700::1111"]


@pytest.mark.parametrize("address", REFUSED)
def test_refused_addresses(address: str) -> None:
    assert refused_reason(address) is not None
    with pytest.raises(UnsafeURL):
        check_literal(
            f"http://[{address}]/x" if ":" in address else f"http://{address}/x", allow_private=False
        )


@pytest.mark.parametrize("address", ALLOWED)
def test_public_addresses(address: str) -> None:
    assert refused_reason(address) is None
    check_literal(f"https://[{address}]/x" if ":" in address else f"https://{address}/x", allow_private=False)


@pytest.mark.parametrize(
    "url",
    ["ftp://example.com/", "http://user:pw@example.com/", "http:///path", "", "http://exa mple.com/", "x" * 3000,
     "http://example.com:99999/", "javascript:alert(1)"],
)  # fmt: skip
def test_malformed_urls(url: str) -> None:
    with pytest.raises(UnsafeURL):
        parse_url(url)


def test_allow_private_flag() -> None:
    check_literal("http://127.0.0.1:9/x", allow_private=True)
    assert allow_private_from_env({"RESGOV_ALLOW_PRIVATE_WEBHOOKS": "1"})
    assert allow_private_from_env({"RESGOV_ALLOW_PRIVATE_WEBHOOKS": "true"})
    assert not allow_private_from_env({"RESGOV_ALLOW_PRIVATE_WEBHOOKS": "0"})
    assert not allow_private_from_env({})


def _resolver(answers: dict[str, list[str]]):  # type: ignore[no-untyped-def]
    async def resolve(host: str, port: int) -> list[tuple[int, str]]:
        if host not in answers:
            raise OSError("name not known")
        return [(10 if ":" in a else 2, a) for a in answers[host]]

    return resolve


async def test_check_url_resolves_names() -> None:
    resolve = _resolver(
        {
            "public.test": ["93.184.216.34"],
            "internal.test": ["10.1.2.3"],
            "mixed.test": ["93.184.216.34", "169.254.169.254"],
        }
    )
    await check_url("https://public.test/hook", False, resolve)
    for host in ("internal.test", "mixed.test", "unknown.test"):
        with pytest.raises(UnsafeURL):
            await check_url(f"https://{host}/hook", False, resolve)
    await check_url("https://internal.test/hook", True, resolve)  # allowed by the operator


async def test_guarded_resolver_refuses_at_send_time() -> None:
    guard = GuardedResolver(
        False, _resolver({"a.test": ["93.184.216.34"], "b.test": ["93.184.216.34", "127.0.0.1"]})
    )
    results = await guard.resolve("a.test", 443)
    assert [r["host"] for r in results] == ["93.184.216.34"] and results[0]["hostname"] == "a.test"
    with pytest.raises(RefusedAddress):
        await guard.resolve("b.test", 443)
    open_guard = GuardedResolver(True, _resolver({"b.test": ["127.0.0.1"]}))
    assert [r["host"] for r in await open_guard.resolve("b.test", 80)] == ["127.0.0.1"]


def test_redact_url_hides_tokens() -> None:
    url = "https://hooks.slack.com/services/T000/B000/XXXXSECRET"
    assert redact_url(url) == "https://hooks.slack.com/…"
    assert "SECRET" not in redact_url("https://discord.com/api/webhooks/1/SECRET?wait=true")
