"""Every ``.rgf`` key the loader accepts is documented in the README (issue 2)."""

from __future__ import annotations

import json
import re
from decimal import Decimal
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import pytest
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from resgov.alerts.config import WebhookSection
from resgov.config.rgf import (
    AgentSection,
    GlobalSection,
    ModelSection,
    OrgSection,
    PolicyError,
    ProviderSection,
    documented_keys,
    parse_policy,
)

README = Path(__file__).resolve().parents[1] / "README.md"
_FENCE = re.compile(r"```.*?```", re.S)
_INLINE = re.compile(r"`([^`\n]+)`")


def _code_spans(text: str) -> list[str]:
    """Inline code spans and fenced blocks: where a key name counts as documented."""
    fenced = _FENCE.findall(text)
    return fenced + _INLINE.findall(_FENCE.sub("", text))


def test_every_policy_key_is_documented_in_the_readme() -> None:
    assert README.exists(), f"{README} does not exist (issue 2: the README documents every .rgf key)"
    spans = _code_spans(README.read_text(encoding="utf-8"))
    missing = []
    for full in sorted(documented_keys()):
        bare = full.rsplit(".", 1)[1]
        word = re.compile(rf"(?<![A-Za-z0-9_]){re.escape(bare)}(?![A-Za-z0-9_])")
        if not any(word.search(span) for span in spans):
            missing.append(full)
    assert not missing, f"keys the loader accepts but README.md does not document (in backticks): {missing}"


def test_every_section_is_documented_in_the_readme() -> None:
    assert README.exists()
    text = README.read_text(encoding="utf-8")
    for section in ("[global]", "[providers.", "[models.", "[orgs.", "[agents."):
        assert section in text, section


_MODELS: dict[str, type[BaseModel]] = {
    "global": GlobalSection, "providers.NAME": ProviderSection, 'models."NAME"': ModelSection,
    "orgs.NAME": OrgSection, "agents.NAME": AgentSection, "webhooks[]": WebhookSection,
}  # fmt: skip


def _sample(prefix: str, name: str) -> str:
    """A valid TOML value for a key added after this test was written: its default, else a
    small value of its type (so a new key is still checked against the loader)."""
    info = _MODELS[prefix].model_fields[name]
    default = info.get_default()
    if default is not None and default is not PydanticUndefined:
        return _toml(default)
    annotation: Any = info.annotation
    while get_origin(annotation) in (Union, UnionType, Annotated):
        annotation = next(a for a in get_args(annotation) if a is not type(None))
    if get_origin(annotation) is Literal:
        return _toml(get_args(annotation)[0])
    if get_origin(annotation) in (list, tuple):
        return "[]"
    return {int: "1", float: "1.0", Decimal: "1", str: '"x"', bool: "true"}[annotation]


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return str(value)


def test_documented_keys_are_exactly_what_the_loader_accepts() -> None:
    """The list the README is checked against is the loader's: each key parses, a typo does not."""
    values = {
        "currency": '"USD"', "fail_safe_action": '"deny"', "timezone": '"UTC"', "reservation_ttl_seconds": "30",
        "default_provider": '"sim"', "on_insufficient_budget": '"shrink"', "shrink_min_tokens": "16",
        "on_expired_reservation": '"release"', "default_max_tokens": "100", "max_request_bytes": "4096",
        "base_url": '"http://127.0.0.1:9/v1"', "api_key_env": '"X_KEY"', "format": '"openai"',
        "connect_timeout": "1", "first_byte_timeout": "1", "idle_timeout": "1", "input_per_mtok": "1",
        "output_per_mtok": "2", "cache_read_per_mtok": "0.1", "cache_write_per_mtok": "1.25", "per_request": "0.001",
        "max_output_tokens": "100", "context_window": "1000", "org": '"acme"', "max_tokens_per_request": "10",
        "allowed_models": '["*"]', "allowed_tools": "[]", "name": '"ops"', "url": '"https://hooks.example.com/x"',
        "url_env": '"OPS_WEBHOOK"', "type": '"slack"', "events": '["budget.*"]', "org_id": '"acme"',
        "secret_env": '"OPS_SECRET"', "enabled": "false",
    }  # fmt: skip
    sections = {
        "global": "[global]", "providers.NAME": "[providers.sim]", 'models."NAME"': '[models."m"]',
        "orgs.NAME": "[orgs.acme]", "agents.NAME": "[agents.bot]", "webhooks[]": "[[webhooks]]",
    }  # fmt: skip
    keys = documented_keys()
    for full in sorted(keys):
        prefix, bare = full.rsplit(".", 1)
        if bare == "agents" or bare.endswith("_budget"):
            continue  # a sub-table, and the budgets (checked below)
        # A minimal valid file, plus the one key under test.
        body = {"global": {"default_provider": '"sim"'}, "providers.NAME": {"base_url": values["base_url"]}}
        if prefix == 'models."NAME"':
            body[prefix] = {"input_per_mtok": "1", "output_per_mtok": "2"}
        if prefix == "webhooks[]":
            # An entry needs a name and exactly one of url and url_env (the key under test may be either).
            body[prefix] = {"name": values["name"]}
            if bare not in ("url", "url_env"):
                body[prefix]["url"] = values["url"]
        body.setdefault(prefix, {})[bare] = values.get(bare) or _sample(prefix, bare)
        text = "".join(
            f"{sections[p]}\n" + "".join(f"{k} = {v}\n" for k, v in kv.items()) for p, kv in body.items()
        )
        parse_policy(text, full, library_prices=False)
    for period in ("hourly", "daily", "weekly", "monthly", "total"):
        assert f"agents.NAME.{period}_budget" in keys and f"orgs.NAME.{period}_budget" in keys
        parse_policy(f"[orgs.acme]\n{period}_budget = 1\n[agents.bot]\norg = \"acme\"\n{period}_budget = 0.5\n",
                     library_prices=False)  # fmt: skip
    assert "orgs.NAME.agents" in keys
    parse_policy("[orgs.acme.agents.bot]\ndaily_budget = 1\n", library_prices=False)
    assert {f"webhooks[].{k}" for k in ("name", "url", "url_env", "type", "events", "secret_env")} <= keys
    for typo in (
        '[global]\ntimezones = "UTC"\n',
        '[[webhooks]]\nname = "ops"\nurl = "https://hooks.example.com/x"\nsecrets_env = "X"\n',
        "[agents.bot]\ndaily_budgets = 1\n",
        "[orgs.acme]\nmax_tokens = 1\n",
    ):
        with pytest.raises(PolicyError, match="unknown key"):
            parse_policy(typo, library_prices=False)
