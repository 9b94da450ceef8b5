"""Alert settings in the ``.rgf`` file: thresholds and ``[[webhooks]]``.

Suggested keys (the loader in ``config/rgf.py`` includes these models)::

    [global]
    alert_thresholds = [0.5, 0.8, 1.0]     # fractions of each budget's limit; default 50/80/100 %

    [[webhooks]]
    name = "ops-slack"                     # unique; the destination id is "rgf-<name>"
    url_env = "RESGOV_SLACK_WEBHOOK_URL"   # or url = "https://…" (Slack/Discord URLs are secrets: prefer url_env)
    type = "slack"                         # generic | slack | discord
    events = ["budget.threshold", "budget.exceeded"]   # or ["*"] / absent = all; globs like "budget.*"
    org_id = "acme"                        # optional: only this org's events
    secret_env = "RESGOV_WEBHOOK_SECRET"   # generic: signing secret read from the environment

Secrets and URLs named by ``*_env`` are read from the environment when destinations
are built (at start and on each policy reload), never stored in the file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from resgov.alerts.events import DEFAULT_THRESHOLDS
from resgov.alerts.store import Destination, normalize_events
from resgov.alerts.urls import UnsafeURL, check_literal

log = logging.getLogger("resgov.alerts")

_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_ENV = r"^[A-Za-z_][A-Za-z0-9_]*$"


def validate_thresholds(values: Sequence[float]) -> tuple[float, ...]:
    """Sorted, unique fractions in (0, 10] (above 1 alerts on overage beyond the limit)."""
    out = sorted({float(v) for v in values})
    for v in out:
        if not 0 < v <= 10:
            raise ValueError(f"alert threshold {v} must be > 0 and <= 10 (fractions: 0.8 = 80 %)")
    return tuple(out)


class AlertThresholds(BaseModel):
    """Pydantic helper for ``[global] alert_thresholds`` (use :func:`validate_thresholds` directly too)."""

    model_config = ConfigDict(extra="forbid")
    alert_thresholds: list[float] = Field(default_factory=lambda: list(DEFAULT_THRESHOLDS), max_length=20)

    @field_validator("alert_thresholds")
    @classmethod
    def _check(cls, value: list[float]) -> list[float]:
        return list(validate_thresholds(value))


class WebhookSection(BaseModel):
    """One ``[[webhooks]]`` entry of the ``.rgf`` file."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=_NAME)
    url: str | None = Field(None, max_length=2048)
    url_env: str | None = Field(None, pattern=_ENV)
    type: Literal["generic", "slack", "discord"] = "generic"
    events: list[str] | None = None
    org_id: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")
    secret_env: str | None = Field(None, pattern=_ENV)
    enabled: bool = True

    @model_validator(mode="after")
    def _check(self) -> WebhookSection:
        if (self.url is None) == (self.url_env is None):
            raise ValueError("give exactly one of url or url_env")
        if self.url is not None:
            try:
                # Syntax and IP literals only: names are resolved and checked at each send.
                check_literal(self.url, allow_private=True)
            except UnsafeURL as exc:
                raise ValueError(str(exc)) from exc
        try:
            normalize_events(self.events)
        except ValueError as exc:
            raise ValueError(f"events: {exc}") from exc
        return self


class WebhookConfigError(ValueError):
    """A ``[[webhooks]]`` entry that cannot be used (missing environment variable, refused URL)."""


def destinations_from_config(
    sections: Sequence[WebhookSection],
    *,
    allow_private: bool,
    env: Mapping[str, str] | None = None,
) -> tuple[list[Destination], list[str]]:
    """``[[webhooks]]`` → destinations, plus one problem message per entry that was skipped.

    A skipped entry (its ``url_env``/``secret_env`` unset, or an IP-literal address refused
    without ``RESGOV_ALLOW_PRIVATE_WEBHOOKS``) does not stop the others: a missing secret must
    not silence every alert. Names are unique; a duplicate is skipped too.
    """
    environ = env if env is not None else os.environ
    out: list[Destination] = []
    problems: list[str] = []
    seen: set[str] = set()
    for section in sections:
        where = f"webhooks.{section.name}"
        if section.name in seen:
            problems.append(f"{where}: duplicate name, skipped")
            continue
        seen.add(section.name)
        url = section.url
        if section.url_env is not None:
            url = environ.get(section.url_env) or None
            if url is None:
                problems.append(f"{where}: environment variable {section.url_env} is not set, skipped")
                continue
        assert url is not None
        secret: str | None = None
        if section.secret_env is not None:
            secret = environ.get(section.secret_env) or None
            if secret is None:
                problems.append(f"{where}: environment variable {section.secret_env} is not set, skipped")
                continue
        try:
            check_literal(url, allow_private)
        except UnsafeURL as exc:
            problems.append(f"{where}: {exc}, skipped")
            continue
        out.append(
            Destination(
                id=f"rgf-{section.name}",
                url=url,
                type=section.type,
                events=normalize_events(section.events),
                org_id=section.org_id,
                secret=secret,
                enabled=section.enabled,
                source="rgf",
                description=f"[[webhooks]] {section.name} in the policy file",
            )
        )
    return out, problems


class RgfDestinations:
    """``Alerts(rgf_destinations=...)`` for the policy in force: rebuilt when the policy object changes.

    ``sections`` returns the current policy's ``[[webhooks]]`` (e.g. ``lambda: holder.policy.webhooks``);
    the destinations are built once per policy object (a reload builds a new one), and the
    problems of skipped entries are logged once per policy, without URLs or secrets.
    """

    def __init__(
        self,
        sections: Callable[[], Sequence[WebhookSection]],
        *,
        allow_private: bool,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self._sections = sections
        self.allow_private = allow_private
        self._env = env
        self._key: int | None = None
        self._cached: list[Destination] = []

    def __call__(self) -> list[Destination]:
        """The destinations of the policy in force."""
        sections = self._sections()
        key = id(sections)
        if key != self._key:
            self._cached, problems = destinations_from_config(
                sections, allow_private=self.allow_private, env=self._env
            )
            for problem in problems:
                log.warning("alerts: %s", problem)
            self._key = key
        return self._cached
