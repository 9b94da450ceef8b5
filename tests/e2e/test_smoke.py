from __future__ import annotations

from pathlib import Path

import openai

from tests.helpers import Proxy, policy_for

AGENTS = """
[agents.hermes]
daily_budget = 3.00
max_tokens_per_request = 4096
"""


def test_openai_sdk_non_stream_and_stream(tmp_path: Path, sim) -> None:
    with Proxy(tmp_path, policy_for(sim.base_url, AGENTS)) as proxy:
        client = openai.OpenAI(
            base_url=f"{proxy.url}/v1", api_key=proxy.key(), default_headers={"X-ResGov-Agent-ID": "hermes"}
        )
        r = client.chat.completions.create(
            model="gpt-sim", messages=[{"role": "user", "content": "hi"}], max_tokens=50
        )
        assert r.choices[0].message.content
        stream = client.chat.completions.create(
            model="sim/gpt-sim", messages=[{"role": "user", "content": "hi"}], stream=True, max_tokens=50
        )
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert text
    proxy.ledger.check_invariants()
