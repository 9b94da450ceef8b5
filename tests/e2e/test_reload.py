"""Policy reload: on change and on SIGHUP, validated before the swap, last good policy kept."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx

from tests.helpers import ADMIN_TOKEN, Proxy, policy_for, resgov_process


def _chat(url: str, key: str, agent: str) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}", "X-ResGov-Agent-ID": agent},
        json={"model": "gpt-sim", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8},
    )


def _wait(predicate, seconds: float = 6.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.time() + seconds
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_edit_is_picked_up_and_bad_edit_keeps_last_good_policy(tmp_path: Path, sim) -> None:  # type: ignore[no-untyped-def]
    base = policy_for(sim.base_url, "[agents.a1]\ndaily_budget = 1.00\n")
    with Proxy(tmp_path, base) as proxy:
        key = proxy.key()
        assert _chat(proxy.url, key, "a1").status_code == 200
        assert _chat(proxy.url, key, "a2").json()["error"]["reason"] == "agent_not_found"

        proxy.policy_path.write_text(base + "\n[agents.a2]\ndaily_budget = 1.00\n")
        assert _wait(lambda: _chat(proxy.url, key, "a2").status_code == 200)

        # A bad edit: the last good policy (with a2) stays in force, /health says why.
        proxy.policy_path.write_text(base + "\n[agents.a2]\ndaily_budget = -5\n")
        assert _wait(lambda: httpx.get(f"{proxy.url}/health").json()["status"] == "degraded")
        health = httpx.get(f"{proxy.url}/health").json()
        assert "agents.a2.daily_budget" in health["policy"]["error"]
        assert _chat(proxy.url, key, "a2").status_code == 200

        proxy.policy_path.write_text(base)
        assert _wait(lambda: httpx.get(f"{proxy.url}/health").json()["status"] == "ok")
        assert _chat(proxy.url, key, "a2").json()["error"]["reason"] == "agent_not_found"
    proxy.ledger.check_invariants()


def test_sighup_reloads(tmp_path: Path, sim) -> None:  # type: ignore[no-untyped-def]
    base = policy_for(sim.base_url, "[agents.a1]\ndaily_budget = 1.00\n")
    with resgov_process(tmp_path, base) as (proc, url):
        key = httpx.post(
            f"{url}/api/v1/admin/generate-key",
            headers={"X-Admin-Token": ADMIN_TOKEN},
            json={"org_id": "default"},
        ).json()["api_key"]
        policy = tmp_path / "proc.rgf"
        stat = policy.stat()
        policy.write_text(base + "\n[agents.a3]\ndaily_budget = 1.00\n")
        # Keep the mtime unchanged so only the signal can trigger the reload.
        os.utime(policy, (stat.st_atime, stat.st_mtime))
        time.sleep(1.5)
        assert _chat(url, key, "a3").json()["error"]["reason"] == "agent_not_found"
        proc.send_signal(signal.SIGHUP)
        assert _wait(lambda: _chat(url, key, "a3").status_code == 200)
