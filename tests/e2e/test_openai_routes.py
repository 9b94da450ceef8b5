"""Embeddings, Responses and the models list through the official OpenAI SDK, budgeted like chat."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest

from resgov.simulator.upstream import SimUpstreamThread
from tests.helpers import Proxy, policy_for

AGENTS = """
[agents.emb]
daily_budget = 0.01
[agents.resp]
daily_budget = 1.00
max_tokens_per_request = 64
[agents.picky]
daily_budget = 1.00
allowed_models = ["sim/*"]
[agents.openai-only]
daily_budget = 1.00
allowed_models = ["gpt-4o*"]
"""


def _client(proxy: Proxy, agent: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{proxy.url}/v1",
        api_key=proxy.key(),
        max_retries=0,
        default_headers={"X-ResGov-Agent-ID": agent},
    )


def test_embeddings_charge_input_only_and_stop_at_the_budget(tmp_path: Path, sim: SimUpstreamThread) -> None:
    with Proxy(tmp_path, policy_for(sim.base_url, AGENTS)) as proxy:
        client = _client(proxy, "emb")
        text = "x" * 2000
        r = client.embeddings.create(model="gpt-sim", input=[text, "short"])
        assert len(r.data) == 2 and r.usage.prompt_tokens > 0
        allowed = 1
        with pytest.raises(openai.PermissionDeniedError) as denied:
            for _ in range(50):
                client.embeddings.create(model="gpt-sim", input=[text, "short"])
                allowed += 1
        assert denied.value.body["reason"] == "daily_budget_exceeded"  # type: ignore[index]
        assert sim.stats.received.get("/embeddings") == allowed
        audit = [a for a in proxy.ledger.audit() if a["status"] == "completed"]
        assert len(audit) == allowed
        # Input tokens only: $1/MTok on the reported prompt tokens, rounded up once.
        assert all(a["output_tokens"] == 0 for a in audit)
    proxy.ledger.check_invariants()
    assert proxy.ledger.spent("default", "a:emb:daily") <= 10_000_000


def test_responses_stream_and_not(tmp_path: Path, sim: SimUpstreamThread) -> None:
    with Proxy(tmp_path, policy_for(sim.base_url, AGENTS)) as proxy:
        client = _client(proxy, "resp")
        r = client.responses.create(model="gpt-sim", input="hello there")
        assert r.output_text
        assert r.usage is not None and r.usage.output_tokens <= 64
        received = sim.stats.requests[-1].body
        assert received["max_output_tokens"] == 64  # the agent's cap, set by ResGov
        events = list(
            client.responses.create(model="gpt-sim", input="hello", stream=True, max_output_tokens=8)
        )
        kinds = [e.type for e in events]
        assert kinds[-1] in ("response.completed", "response.incomplete")
        assert any(k == "response.output_text.delta" for k in kinds)
        with pytest.raises(openai.PermissionDeniedError) as refused:
            client.responses.create(model="gpt-sim", input="x", max_output_tokens=65)
        assert refused.value.body["reason"] == "max_tokens_exceeded"  # type: ignore[index]
        with pytest.raises(openai.PermissionDeniedError) as unbounded:
            client.responses.create(model="gpt-sim", input="x", previous_response_id="resp_1")
        assert unbounded.value.body["reason"] == "unbounded_cost"  # type: ignore[index]
        # Tools whose results return as input of any size (and, for the code interpreter, container
        # fees): refused, never sent.
        sent = len(sim.stats.requests)
        for tool in ({"type": "mcp", "server_label": "gh", "server_url": "https://mcp.example"},
                     {"type": "code_interpreter", "container": {"type": "auto"}}):  # fmt: skip
            with pytest.raises(openai.PermissionDeniedError) as unbounded:
                client.responses.create(
                    model="gpt-sim",
                    input="x",
                    tools=[tool],  # type: ignore[list-item]
                    max_tool_calls=1,
                )
            assert unbounded.value.body["reason"] == "unbounded_cost"  # type: ignore[index]
            assert tool["type"] in unbounded.value.body["message"]  # type: ignore[index]
        assert len(sim.stats.requests) == sent
    audit = proxy.ledger.audit()
    completed = [a for a in audit if a["route"] == "/v1/responses" and a["status"] == "completed"]
    assert len(completed) == 2 and all(a["actual"] > 0 for a in completed)
    proxy.ledger.check_invariants()


def test_openrouter_features_whose_cost_nothing_bounds_are_refused_never_sent(
    tmp_path: Path, sim: SimUpstreamThread
) -> None:
    # OpenRouter runs web search (the :online suffix, the web plugin, its server tools) on its
    # side, as chat completions' web_search_options does, with fees and injected results no field
    # of the request limits: no reservation could hold a budget, so the call is refused before
    # anything is reserved.
    with Proxy(tmp_path, policy_for(sim.base_url, AGENTS)) as proxy:
        client = _client(proxy, "resp")
        sent = len(sim.stats.requests)
        message = [{"role": "user", "content": "news?"}]
        for model, extra in (
            ("gpt-sim:online", {}),
            ("gpt-sim", {"plugins": [{"id": "web", "max_results": 3}]}),
            ("gpt-sim", {"tools": [{"type": "openrouter:web_search"}]}),
            ("gpt-sim", {"web_search_options": {}}),
        ):
            with pytest.raises(openai.PermissionDeniedError) as refused:
                client.chat.completions.create(model=model, messages=message, extra_body=extra)  # type: ignore[arg-type]
            assert refused.value.body["reason"] == "unbounded_cost"  # type: ignore[index]
        assert len(sim.stats.requests) == sent
        # Plain calls go through as before.
        assert client.chat.completions.create(model="gpt-sim", messages=message).choices  # type: ignore[arg-type]
    denied = [a for a in proxy.ledger.audit() if a["status"] == "denied"]
    assert [a["reason"] for a in denied] == ["unbounded_cost"] * 4
    proxy.ledger.check_invariants()


def test_models_list_follows_allowed_models(tmp_path: Path, sim: SimUpstreamThread) -> None:
    with Proxy(tmp_path, policy_for(sim.base_url, AGENTS)) as proxy:
        picky = [m.id for m in _client(proxy, "picky").models.list()]
        assert picky == ["sim/gpt-sim"]
        wide = [m.id for m in _client(proxy, "openai-only").models.list()]
        assert "gpt-4o" not in wide  # bare names belong to default_provider (sim), not OpenAI
        assert wide == [] or all(m.startswith("gpt-4o") for m in wide)
        everything = {m.id for m in _client(proxy, "resp").models.list()}
        assert {"sim/gpt-sim", "gpt-sim", "openai/gpt-4o-mini", "anthropic/claude-sonnet-4-5"} <= everything
        r = httpx.get(
            f"{proxy.url}/v1/models", headers={"Authorization": "Bearer nope", "X-ResGov-Agent-ID": "resp"}
        )
        assert r.status_code == 401
        r = httpx.get(
            f"{proxy.url}/v1/models",
            headers={"Authorization": f"Bearer {proxy.key()}", "X-ResGov-Agent-ID": "ghost"},
        )
        assert r.status_code == 403 and r.json()["error"]["reason"] == "agent_not_found"
