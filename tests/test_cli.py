"""`resgov check` and fail-closed `resgov serve`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BRIEF = """
[global]
currency = "USD"
fail_safe_action = "deny"

[agents.hermes]
daily_budget = 3.00
max_tokens_per_request = 4096
allowed_models = ["anthropic/claude-sonnet-4-6", "openrouter/deepseek/deepseek-v4-flash"]

[agents.research-bot]
daily_budget = 1.00
allowed_models = ["gpt-4o-mini"]
allowed_tools = ["web-scraper", "pexels_search"]
"""


def _resgov(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "resgov.cli", *args], capture_output=True, text=True, timeout=60
    )


def test_check_accepts_the_briefs_policy(tmp_path: Path) -> None:
    (tmp_path / "brief.rgf").write_text(BRIEF)
    r = _resgov("check", "--config", str(tmp_path / "brief.rgf"))
    assert r.returncode == 0, r.stderr
    assert "agent default/hermes: daily $3.00" in r.stdout
    assert "tools: web-scraper, pexels_search" in r.stdout


def test_bad_policy_names_key_paths_and_serve_fails_closed(tmp_path: Path) -> None:
    bad = tmp_path / "bad.rgf"
    bad.write_text('[agents.x]\ndaily_budget = -1\nbogus = 1\n[global]\ntimezone = "Mars/Base"\n')
    r = _resgov("check", "--config", str(bad))
    assert r.returncode == 1
    for path in ("agents.x.daily_budget", "agents.x.bogus: unknown key", "global.timezone"):
        assert path in r.stderr
    r = _resgov("serve", "--config", str(bad), "--port", "1")
    assert r.returncode == 2
    assert "refusing to start" in r.stderr and "agents.x.daily_budget" in r.stderr


def test_keys_create_writes_a_hashed_key(tmp_path: Path) -> None:
    import sqlite3

    store = f"sqlite:///{tmp_path / 'k.db'}"
    r = _resgov("keys", "create", "--org", "acme", "--name", "ci", "--store", store)
    assert r.returncode == 0, r.stderr
    key = r.stdout.strip()
    assert key.startswith("rgf_")
    rows = sqlite3.connect(tmp_path / "k.db").execute("SELECT key_hash, org, scopes FROM api_key").fetchall()
    assert len(rows) == 1 and rows[0][1] == "acme" and rows[0][2] == "proxy,read,write"
    assert key not in rows[0][0]
