"""What each destination type receives: generic JSON, a Slack Block Kit message, a Discord embed.

Rendering is deterministic (sorted keys, no timestamps of its own), so a retry sends
byte-identical bodies; only the signature's ``t`` changes.

Slack limits respected: header text <= 150 chars, <= 10 section fields of <= 2000 chars.
Discord limits: title <= 256, description <= 4096, <= 25 fields (name <= 256, value <= 1024);
``allowed_mentions`` is empty so an agent or model name can never ping ``@everyone``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import orjson

from resgov.alerts.events import AlertEvent, iso

DestinationType = Literal["generic", "slack", "discord"]
DESTINATION_TYPES: tuple[DestinationType, ...] = ("generic", "slack", "discord")

#: Discord embed colours by severity (blue, amber, red).
SEVERITY_COLOURS = {"info": 0x3B82F6, "warning": 0xF59E0B, "critical": 0xDC2626}
SEVERITY_EMOJI = {"info": ":information_source:", "warning": ":warning:", "critical": ":rotating_light:"}
_DISCORD_EMOJI = {"info": "ℹ️", "warning": "⚠️", "critical": "🚨"}

#: Which ``data`` fields each type shows first, with their labels (the rest follow, up to the limits).
_FIELD_LABELS: dict[str, str] = {
    "period": "Window",
    "level": "Budget of",
    "threshold": "Threshold",
    "limit": "Limit",
    "spent": "Spent",
    "used": "Used",
    "required": "Required",
    "reserved": "Reserved",
    "remaining": "Remaining",
    "resets_at": "Resets at",
    "charged": "Charged",
    "overage": "Overage",
    "model": "Model",
    "request_id": "Request",
    "count": "Count",
    "mode": "Mode",
    "reason": "Reason",
    "until": "Until",
    "backend": "Backend",
    "error": "Error",
    "predicted_exhaustion_at": "Runs out at",
    "rate_per_hour": "Rate per hour",
}
_MONEY = {
    "limit",
    "spent",
    "used",
    "required",
    "reserved",
    "remaining",
    "charged",
    "overage",
    "rate_per_hour",
}


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _value(key: str, value: Any, data: Mapping[str, Any]) -> str:
    if key in _MONEY and isinstance(value, int | float):
        return f"{value:,.6f}".rstrip("0").rstrip(".") + f" {data.get('currency', '')}".rstrip()
    if key == "threshold" and isinstance(value, int | float):
        return f"{value * 100:g}%"
    return str(value)


def fields(event: AlertEvent) -> list[tuple[str, str]]:
    """``(label, value)`` pairs for chat layouts: org and agent first, then the event's data."""
    out: list[tuple[str, str]] = []
    if event.org:
        out.append(("Org", event.org))
    if event.agent:
        out.append(("Agent", event.agent))
    data = event.data
    for key, label in _FIELD_LABELS.items():
        value = data.get(key)
        if value is None or value == "" or value == []:
            continue
        out.append((label, _value(key, value, data)))
    return out


def _slack_escape(text: str) -> str:
    """Slack mrkdwn control characters (``&``, ``<``, ``>``) must be escaped in user-supplied text."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def slack_payload(event: AlertEvent) -> dict[str, Any]:
    """A Block Kit message: header, section (message + fields), context (severity, time, event id)."""
    emoji = SEVERITY_EMOJI.get(event.severity, "")
    section: dict[str, Any] = {
        "type": "section",
        "text": {"type": "mrkdwn", "text": _truncate(_slack_escape(event.message), 3000)},
    }
    pairs = fields(event)[:10]
    if pairs:
        section["fields"] = [
            {"type": "mrkdwn", "text": _truncate(f"*{label}*\n{_slack_escape(value)}", 2000)}
            for label, value in pairs
        ]
    return {
        # Shown in notifications and by clients that cannot render blocks.
        "text": _truncate(f"{emoji} {event.title}".strip(), 3000),
        "blocks": [
            {
                "type": "header",
                "text": {
                    "type": "plain_text",
                    "text": _truncate(f"{emoji} {event.title}".strip(), 150),
                    "emoji": True,
                },
            },
            section,
            {
                "type": "context",
                "elements": [
                    {
                        "type": "mrkdwn",
                        "text": _truncate(
                            f"*{event.severity.upper()}* · `{event.type}` · {iso(event.created_at)} · "
                            f"ResGov event `{event.id}`",
                            3000,
                        ),
                    }
                ],
            },
        ],
    }


def discord_payload(event: AlertEvent) -> dict[str, Any]:
    """A Discord message with one embed coloured by severity, inline fields and the event id in the footer."""
    emoji = _DISCORD_EMOJI.get(event.severity, "")
    return {
        "username": "ResGov",
        "allowed_mentions": {"parse": []},
        "embeds": [
            {
                "title": _truncate(f"{emoji} {event.title}".strip(), 256),
                "description": _truncate(event.message, 4096),
                "color": SEVERITY_COLOURS.get(event.severity, SEVERITY_COLOURS["info"]),
                "fields": [
                    {"name": _truncate(label, 256), "value": _truncate(value, 1024), "inline": True}
                    for label, value in fields(event)[:25]
                ],
                "footer": {"text": _truncate(f"{event.severity.upper()} · {event.type} · {event.id}", 2048)},
                "timestamp": iso(event.created_at),
            }
        ],
    }


def render(kind: str, event: AlertEvent) -> bytes:
    """The exact body bytes sent to a destination of type ``kind`` (the bytes that are signed)."""
    if kind == "slack":
        payload = slack_payload(event)
    elif kind == "discord":
        payload = discord_payload(event)
    else:
        payload = event.body()
    return orjson.dumps(payload, option=orjson.OPT_SORT_KEYS)
