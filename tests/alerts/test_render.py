"""Slack (Block Kit) and Discord (embed) layouts, and the generic body."""

from __future__ import annotations

import orjson

from resgov.alerts import budget_exceeded, budget_threshold, reservation_overage
from resgov.alerts.events import Crossing
from resgov.alerts.render import SEVERITY_COLOURS, discord_payload, render, slack_payload
from resgov.core.budget import BudgetLine
from resgov.core.money import NANO

LINE = BudgetLine("acme", "agent", "hermes", "daily", 3 * NANO, 1_700_000_000, 1_700_086_400)


def _threshold():  # type: ignore[no-untyped-def]
    return budget_threshold(Crossing(LINE, 0.8, 0, 2_400_000_000), "USD", now=1_700_000_500)


def test_slack_block_kit_shape() -> None:
    p = slack_payload(_threshold())
    assert isinstance(p["text"], str) and "80%" in p["text"]
    header, section, context = p["blocks"]
    assert header["type"] == "header" and header["text"]["type"] == "plain_text"
    assert len(header["text"]["text"]) <= 150
    assert section["type"] == "section" and section["text"]["type"] == "mrkdwn"
    labels = [f["text"].split("\n")[0] for f in section["fields"]]
    assert labels[:2] == ["*Org*", "*Agent*"]
    assert "*Threshold*" in labels and "*Limit*" in labels and "*Spent*" in labels
    assert len(section["fields"]) <= 10
    assert all(f["type"] == "mrkdwn" and len(f["text"]) <= 2000 for f in section["fields"])
    assert context["type"] == "context" and _threshold().id in context["elements"][0]["text"]
    values = {f["text"].split("\n")[0]: f["text"].split("\n")[1] for f in section["fields"]}
    assert values["*Threshold*"] == "80%" and values["*Limit*"] == "3 USD" and values["*Spent*"] == "2.4 USD"


def test_slack_escapes_user_text() -> None:
    e = reservation_overage("acme", "hermes", "rgr_1", "<!channel> & co", 100, 200, "USD")
    text = orjson.dumps(slack_payload(e)).decode()
    assert "<!channel>" not in text and "&lt;!channel&gt; &amp; co" in text


def test_discord_embed_shape() -> None:
    p = discord_payload(_threshold())
    assert p["allowed_mentions"] == {"parse": []} and p["username"] == "ResGov"
    (embed,) = p["embeds"]
    assert embed["color"] == SEVERITY_COLOURS["warning"]
    assert len(embed["title"]) <= 256 and len(embed["description"]) <= 4096
    assert 0 < len(embed["fields"]) <= 25
    assert all(f["inline"] is True and len(f["value"]) <= 1024 for f in embed["fields"])
    assert embed["fields"][0] == {"name": "Org", "value": "acme", "inline": True}
    assert _threshold().id in embed["footer"]["text"]
    assert embed["timestamp"] == "2023-11-14T22:21:40Z"
    critical = discord_payload(budget_exceeded(LINE, "hermes", 3 * NANO, 1, "USD"))
    assert critical["embeds"][0]["color"] == SEVERITY_COLOURS["critical"]


def test_generic_body_and_determinism() -> None:
    e = _threshold()
    body = orjson.loads(render("generic", e))
    assert body["id"] == e.id and body["type"] == "budget.threshold" and body["org_id"] == "acme"
    assert set(body) == {
        "id",
        "type",
        "severity",
        "title",
        "message",
        "created_at",
        "org_id",
        "agent_id",
        "data",
    }
    for kind in ("generic", "slack", "discord"):
        assert render(kind, e) == render(kind, e)  # byte-identical across retries
