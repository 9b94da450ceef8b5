"""``[[webhooks]]`` in the .rgf file → destinations."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from resgov.alerts import RgfDestinations, WebhookSection, destinations_from_config
from resgov.alerts.config import AlertThresholds


def test_sections_validate() -> None:
    ok = WebhookSection.model_validate(
        {"name": "ops", "url": "https://hooks.example.com/x", "type": "slack", "events": ["budget.*"]}
    )
    assert ok.type == "slack"
    for bad in (
        {"name": "a"},  # neither url nor url_env
        {"name": "a", "url": "https://x.example", "url_env": "X"},
        {"name": "a", "url": "ftp://x.example"},
        {"name": "a", "url": "https://x.example", "events": ["budget.treshold"]},
        {"name": "a", "url": "https://x.example", "type": "teams"},
        {"name": "a", "url": "https://x.example", "extra": 1},
    ):
        with pytest.raises(ValidationError):
            WebhookSection.model_validate(bad)
    assert AlertThresholds.model_validate({"alert_thresholds": [1, 0.25]}).alert_thresholds == [0.25, 1.0]
    with pytest.raises(ValidationError):
        AlertThresholds.model_validate({"alert_thresholds": [0]})


def test_destinations_from_config() -> None:
    sections = [
        WebhookSection(name="slack", url_env="SLACK_URL", type="slack", events=["*"]),
        WebhookSection(
            name="generic", url="https://alerts.example.com/in", secret_env="WH_SECRET", org_id="acme"
        ),
        WebhookSection(name="nosecret", url="https://alerts.example.com/in", secret_env="MISSING"),
        WebhookSection(name="local", url="http://127.0.0.1:9/x"),
        WebhookSection(name="slack", url="https://dup.example.com/"),
    ]
    env = {"SLACK_URL": "https://hooks.slack.com/services/T/B/TOKEN", "WH_SECRET": "whsec_abc"}
    dests, problems = destinations_from_config(sections, allow_private=False, env=env)
    assert [d.id for d in dests] == ["rgf-slack", "rgf-generic"]
    assert dests[0].events is None and dests[0].source == "rgf" and dests[0].url.endswith("TOKEN")
    assert dests[1].secret == "whsec_abc" and dests[1].org_id == "acme"
    assert len(problems) == 3
    assert any("MISSING" in p for p in problems) and any("loopback" in p for p in problems)
    assert any("duplicate" in p for p in problems)
    assert all("whsec_abc" not in p and "TOKEN" not in p for p in problems)
    assert "TOKEN" not in repr(dests[0])
    allowed, _ = destinations_from_config(sections[3:4], allow_private=True, env={})
    assert [d.id for d in allowed] == ["rgf-local"]


def test_rgf_destinations_follow_the_policy(caplog: pytest.LogCaptureFixture) -> None:
    first = (WebhookSection(name="a", url="https://a.example/x"), WebhookSection(name="b", url_env="UNSET_X"))
    second = (WebhookSection(name="c", url="https://c.example/x", type="discord"),)
    current: list[tuple[WebhookSection, ...]] = [first]
    rgf = RgfDestinations(lambda: current[0], allow_private=False, env={})
    assert [d.id for d in rgf()] == ["rgf-a"]
    assert rgf() is rgf()  # built once per policy object
    assert caplog.text.count("UNSET_X") == 1  # the skipped entry is reported once, not per alert
    current[0] = second  # a policy reload
    assert [(d.id, d.type) for d in rgf()] == [("rgf-c", "discord")]
