"""The README's policy and client snippets, run as written against a real ResGov and a local provider.

Only the address and the key are substituted; the policy is the README's own example with
its providers pointed at the simulator.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import httpx
import openai
import pytest

from resgov.simulator.upstream import SimUpstreamThread
from tests.helpers import Proxy

README = Path(__file__).resolve().parents[2] / "README.md"


def _readme() -> str:
    return README.read_text(encoding="utf-8")


def _policy(sim_url: str) -> str:
    example = re.search(r"```toml\n(.*?)```", _readme(), re.S)
    assert example, "README has no .rgf example"
    return (
        example.group(1)
        + f"""
[providers.openai]
base_url = "{sim_url}/v1"
api_key_env = "RESGOV_README_OPENAI_KEY"

[providers.anthropic]
base_url = "{sim_url}"
api_key_env = "RESGOV_README_ANTHROPIC_KEY"
format = "anthropic"
"""
    )


def _snippet(name: str) -> str:
    found = re.search(rf"<!-- snippet: {re.escape(name)} -->\s*```python\n(.*?)```", _readme(), re.S)
    assert found, f"README snippet {name!r} is missing"
    return found.group(1)


def _run(name: str, proxy: Proxy, key: str) -> dict[str, object]:
    code = _snippet(name).replace("http://127.0.0.1:8080", proxy.url).replace("rgf_…", key)
    namespace: dict[str, object] = {}
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(code, f"README:{name}", "exec"), namespace)
    return namespace


@pytest.fixture
def readme_proxy(tmp_path: Path, sim: SimUpstreamThread, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("RESGOV_README_OPENAI_KEY", "sk-provider-openai")
    monkeypatch.setenv("RESGOV_README_ANTHROPIC_KEY", "sk-provider-anthropic")
    with Proxy(tmp_path, _policy(sim.base_url)) as proxy:
        yield proxy, proxy.key("default")
    proxy.ledger.check_invariants()


def test_openai_sdk_snippet(readme_proxy, sim: SimUpstreamThread) -> None:  # type: ignore[no-untyped-def]
    proxy, key = readme_proxy
    ns = _run("openai-sdk", proxy, key)
    cost = ns["r"].resgov_cost  # type: ignore[attr-defined]
    assert cost["actual"] > 0 and cost["reserved"] >= cost["actual"]
    sent = [r for r in sim.stats.requests if r.path.endswith("/chat/completions")]
    assert len(sent) == 2 and all(r.headers["authorization"] == "Bearer sk-provider-openai" for r in sent)
    assert all(r.body["model"] == "gpt-4o-mini" for r in sent)


def test_anthropic_sdk_snippet(readme_proxy, sim: SimUpstreamThread) -> None:  # type: ignore[no-untyped-def]
    proxy, key = readme_proxy
    ns = _run("anthropic-sdk", proxy, key)
    assert ns["msg"].content[0].text and ns["text"]  # type: ignore[attr-defined]
    sent = [r for r in sim.stats.requests if r.path.endswith("/messages")]
    assert len(sent) == 2
    for r in sent:
        assert r.headers["x-api-key"] == "sk-provider-anthropic" and "authorization" not in r.headers
        assert r.headers["anthropic-version"] and r.body["model"] == "claude-sonnet-4-6"
        assert key not in str(r.headers)


def test_langchain_snippet_reaches_anthropic_through_translation(
    readme_proxy, sim: SimUpstreamThread
) -> None:  # type: ignore[no-untyped-def]
    proxy, key = readme_proxy
    ns = _run("langchain", proxy, key)
    assert ns["reply"].content  # type: ignore[attr-defined]
    sent = [r for r in sim.stats.requests if r.path.endswith("/messages")]
    assert len(sent) == 1 and sent[0].body["model"] == "claude-sonnet-4"


def test_crewai_snippet_request(readme_proxy, sim: SimUpstreamThread) -> None:  # type: ignore[no-untyped-def]
    """What CrewAI's LLM(model="openai/anthropic/claude-sonnet-4", extra_headers=…) sends, streamed."""
    proxy, key = readme_proxy
    assert 'model="openai/anthropic/claude-sonnet-4"' in _readme()
    client = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key=key, max_retries=0)
    chunks = client.chat.completions.create(
        model="anthropic/claude-sonnet-4",
        stream=True,
        extra_headers={"X-ResGov-Agent-ID": "hermes"},
        messages=[{"role": "user", "content": "Process streams..."}],
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert [r.body["model"] for r in sim.stats.requests if r.path.endswith("/messages")] == [
        "claude-sonnet-4"
    ]
    agent = httpx.get(f"{proxy.url}/api/v1/agents/hermes", headers={"Authorization": f"Bearer {key}"}).json()
    assert agent["budgets"][0]["spent"] > 0
