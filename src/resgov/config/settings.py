"""Process settings from the environment (``RESGOV_*``), separate from the policy file."""

from __future__ import annotations

import os
from dataclasses import dataclass

MIN_ADMIN_TOKEN = 32


@dataclass(frozen=True)
class Settings:
    """Where the policy and the ledger live, and the secrets that open the admin API."""

    config_path: str | None = None
    store_url: str = "sqlite:///resgov.db"
    admin_token: str | None = None
    metrics_token: str | None = None
    host: str = "127.0.0.1"
    port: int = 8080
    drain_seconds: float = 30.0
    #: How often the sweeper looks for expired leases.
    sweep_interval: float = 1.0
    #: Seconds an API-key lookup is cached (a CLI revocation beside a running server takes this long).
    key_cache_seconds: float = 5.0
    #: The fail-open journal (``fail_safe_action = "allow"``): ``RESGOV_JOURNAL``; one file per
    #: process. None: ``resgov-journal-<port>.jsonl`` beside a SQLite ledger, else in the working directory.
    journal_path: str | None = None
    #: How often budgets are checked for predicted exhaustion (forecast.exhaustion alerts).
    forecast_interval: float = 60.0

    @property
    def admin_enabled(self) -> bool:
        """The admin API is open only with a token of at least 32 characters."""
        return self.admin_token is not None and len(self.admin_token) >= MIN_ADMIN_TOKEN

    @property
    def journal(self) -> str:
        """Where this process journals calls it lets through while the store is unreachable."""
        if self.journal_path:
            return self.journal_path
        name = f"resgov-journal-{self.port}.jsonl"
        if self.store_url.startswith("sqlite://"):
            # Beside the ledger file: the same disk, and no stray files in the working directory.
            db = self.store_url[len("sqlite://") :].removeprefix("/") or "resgov.db"
            return os.path.join(os.path.dirname(os.path.abspath(db)), name)
        return name

    @classmethod
    def from_env(cls, **overrides: object) -> Settings:
        """Settings from ``RESGOV_CONFIG``, ``RESGOV_STORE``, ``RESGOV_ADMIN_TOKEN``…; ``overrides`` win."""
        env = os.environ
        values: dict[str, object] = {
            "config_path": env.get("RESGOV_CONFIG") or None,
            "store_url": env.get("RESGOV_STORE") or "sqlite:///resgov.db",
            "admin_token": env.get("RESGOV_ADMIN_TOKEN") or None,
            "metrics_token": env.get("RESGOV_METRICS_TOKEN") or None,
            "journal_path": env.get("RESGOV_JOURNAL") or None,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]
