"""Test helpers: a real ResGov server on a loopback port, and direct views of the ledger."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from resgov.config.rgf import parse_policy
from resgov.config.settings import Settings
from resgov.ledger.sqlite import SQLiteStore
from resgov.server.app import ResGovApp, create_app

ADMIN_TOKEN = "test-admin-token-0123456789abcdef0123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerThread:
    """uvicorn serving an app on 127.0.0.1 in a daemon thread, with its own event loop."""

    def __init__(self, app: Any, port: int | None = None) -> None:
        self.port = port or free_port()
        self.config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.port,
            loop="asyncio",
            http="httptools",
            lifespan="on",
            log_level="warning",
            timeout_graceful_shutdown=10,
        )
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def _run(self) -> None:
        asyncio.run(self.server.serve())

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.time() + 15
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(20)


@dataclass
class Ledger:
    """Direct read-only view of a SQLite ledger file (black-box: what was committed)."""

    path: str

    def _rows(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        conn = sqlite3.connect(self.path, timeout=30)
        try:
            return conn.execute(sql, args).fetchall()
        finally:
            conn.close()

    def lines(self) -> dict[tuple[str, str], tuple[int, int]]:
        return {
            (o, k): (s, r) for o, k, s, r in self._rows("SELECT org, key, spent, reserved FROM budget_line")
        }

    def open_reservations(self) -> int:
        return int(self._rows("SELECT COUNT(*) FROM reservation")[0][0])

    def audit(self) -> list[dict[str, Any]]:
        conn = sqlite3.connect(self.path, timeout=30)
        conn.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in conn.execute("SELECT * FROM audit ORDER BY seq")]
        finally:
            conn.close()

    def spent(self, org: str, prefix: str) -> int:
        return sum(s for (o, k), (s, _) in self.lines().items() if o == org and k.startswith(prefix))

    def reserved_total(self) -> int:
        return sum(r for (s, r) in self.lines().values())

    def check_invariants(self) -> None:
        """After all calls drained: nothing reserved, every line's spend = its audit records, exactly."""
        assert self.open_reservations() == 0, "reservations left open"
        assert self.reserved_total() == 0, "reserved spend left on budget lines"
        audit = self.audit()
        assert all(a["status"] != "in_flight" for a in audit), "audit records left in flight"
        by_agent: dict[tuple[str, str], int] = {}
        by_org: dict[str, int] = {}
        for a in audit:
            by_agent[(a["org"], a["agent"])] = by_agent.get((a["org"], a["agent"]), 0) + a["actual"]
            by_org[a["org"]] = by_org.get(a["org"], 0) + a["actual"]
        for (org, key), (spent, _) in self.lines().items():
            _, period, _ = key.rsplit(":", 2)
            if period != "total" and key.startswith("a:"):
                continue  # windowed lines are checked through the total/org sums below
            if key.startswith("a:") and period == "total":
                agent = key[2:].rsplit(":", 2)[0]
                assert spent == by_agent.get((org, agent), 0), (key, spent, by_agent)
            if key.startswith("o:") and period == "total":
                assert spent == by_org.get(org, 0), (key, spent, by_org)


class Proxy:
    """A ResGov app over a SQLite file, served in-thread, with an admin token and helpers."""

    def __init__(self, tmp: Path, policy_text: str, **settings: Any) -> None:
        self.db = str(tmp / "resgov.db")
        self.policy_path = tmp / "policy.rgf"
        self.policy_path.write_text(policy_text)
        policy = parse_policy(policy_text, str(self.policy_path))
        self.settings = Settings(
            config_path=str(self.policy_path),
            store_url=f"sqlite:///{self.db}",
            admin_token=ADMIN_TOKEN,
            **settings,
        )
        self.app: ResGovApp = create_app(self.settings, SQLiteStore(self.db), policy)
        self.server = ServerThread(self.app)
        self.ledger = Ledger(self.db)

    @property
    def url(self) -> str:
        return self.server.url

    def __enter__(self) -> Proxy:
        self.server.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.__exit__(*exc)

    def key(self, org: str = "default", **extra: Any) -> str:
        r = httpx.post(
            f"{self.url}/api/v1/admin/generate-key",
            headers={"X-Admin-Token": ADMIN_TOKEN},
            json={"org_id": org, "name": "test", **extra},
        )
        r.raise_for_status()
        return str(r.json()["api_key"])


def policy_for(sim_url: str, agents: str, global_extra: str = "", models: str | None = None) -> str:
    """A policy routing the ``sim`` provider (and bare names) to a simulator, with fixed prices."""
    prices = (
        models
        if models is not None
        else (
            '[models."sim/gpt-sim"]\ninput_per_mtok = 1.00\noutput_per_mtok = 4.00\n'
            '[models."gpt-sim"]\ninput_per_mtok = 1.00\noutput_per_mtok = 4.00\n'
        )
    )
    return f"""
[global]
currency = "USD"
default_provider = "sim"
{global_extra}

[providers.sim]
base_url = "{sim_url}/v1"
api_key_env = "RESGOV_TEST_SIM_KEY"
format = "openai"
first_byte_timeout = 5
idle_timeout = 2

{prices}
{agents}
"""


@contextlib.contextmanager
def resgov_process(
    tmp: Path,
    policy_text: str,
    env: dict[str, str] | None = None,
    port: int | None = None,
    db: str | None = None,
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """``resgov serve`` as a real process (for signals and kill -9)."""
    port = port or free_port()
    policy = tmp / "proc.rgf"
    policy.write_text(policy_text)
    full_env = {
        **os.environ,
        "RESGOV_ADMIN_TOKEN": ADMIN_TOKEN,
        "RESGOV_STORE": f"sqlite:///{db or tmp / 'resgov.db'}",
        # Fail-open journals of test servers stay in the test's directory.
        "RESGOV_JOURNAL": str(tmp / f"journal-{port}.jsonl"),
        **(env or {}),
    }
    log = open(tmp / f"server-{port}.log", "ab")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "resgov.cli",
            "serve",
            "--config",
            str(policy),
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        env=full_env,
        stdout=log,
        stderr=log,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 20
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"resgov serve did not start: {(tmp / f'server-{port}.log').read_text()}")
            time.sleep(0.05)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


# --- shared by the issue-2 e2e suites (appended) ------------------------------------------------

#: policy_for's fixed prices, nano-units per million tokens.
SIM_INPUT_PER_MTOK = 1_000_000_000
SIM_OUTPUT_PER_MTOK = 4_000_000_000


def sim_cost(input_tokens: int, output_tokens: int) -> int:
    """What a call on ``gpt-sim`` costs, in nano-units, rounded up once (the README's rule)."""
    numerator = input_tokens * SIM_INPUT_PER_MTOK + output_tokens * SIM_OUTPUT_PER_MTOK
    return -(-numerator // 1_000_000)


def sim_bound(raw: bytes, messages: int, cap: int, n: int = 1, tools: bool = False) -> int:
    """The documented worst case of a text-only request: body bytes + overheads in, cap x n out."""
    input_tokens = len(raw) + 64 + 16 * messages + (1024 if tools else 0)
    return sim_cost(input_tokens, cap * n)


def sim_chat_bodies(sim: Any) -> list[Any]:
    """The JSON bodies the simulator received on its chat route, oldest first."""
    return [r.body for r in list(sim.stats.requests) if r.path.endswith("/chat/completions")]


def sim_chat_count(sim: Any) -> int:
    """How many chat requests reached the simulator."""
    return int(sim.stats.received.get("/chat/completions", 0))
