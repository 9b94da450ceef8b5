"""``resgov demo``: watch ResGov stop runaway agent loops, with nothing configured.

Two acts. First a stuck agent re-sends the same request over and over (only the UUID and
the timestamp of its failed tool run change): the loop detector stops it after exactly
``loop_max_repeats`` calls, long before its daily budget. Then an agent whose calls are all
different, each more expensive than the last, runs until its budget stops it.

Everything runs in one event loop inside a temporary directory and talks only to
127.0.0.1:

* a simulated OpenAI-compatible provider (:class:`SimUpstream`), which counts every
  request that reaches it;
* ResGov itself (``create_app`` served by ``uvicorn.Server``) over a SQLite ledger
  in the temporary directory, with a demo ``.rgf`` and a random admin token;
* a "stuck" agent that retries one failing step, and a "runaway" agent, both written
  against the plain HTTP API (aiohttp, a runtime dependency; the openai SDK is only a
  dev extra); the runaway's conversation grows on every turn so each call costs more
  than the last, mixing streaming and JSON answers.

The demo then checks the promises it just showed (the stuck loop was refused with 429
``loop_detected`` after exactly the configured count, the runaway loop with the brief's
403 body, the upstream saw exactly the allowed calls, the ledger and the audit trail
agree to the nano-unit, nothing stays reserved) and returns 0 only if they all hold, so
it doubles as a smoke test in CI.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import socket
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import uvicorn
from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from resgov.config.rgf import PolicyError, parse_policy
from resgov.config.settings import Settings
from resgov.ledger.sqlite import SQLiteStore
from resgov.server.app import create_app
from resgov.simulator.upstream import ROUTE_CHAT, SimConfig, SimUpstream

__all__ = ["DEMO_AGENT", "DEMO_MODEL", "DEMO_ORG", "LOOP_AGENT", "LOOP_REPEATS", "demo_policy", "run_demo"]

DEMO_ORG = "demo"
DEMO_AGENT = "runaway-bot"
#: Routed to the ``sim`` provider; priced like GPT-4o so the numbers look like a real bill.
DEMO_MODEL = "sim/gpt-4o-demo"
#: Per-request output cap of the agent (also the cap ResGov applies when a call sends none).
MAX_TOKENS_PER_REQUEST = 512
#: The first act's agent: stuck retrying one step; the loop detector stops it.
LOOP_AGENT = "stuck-bot"
#: Near-identical calls the stuck agent may make within the loop window; the next one trips.
LOOP_REPEATS = 5
#: The stuck agent's daily budget (USD): fixed, and far more than its loop ever gets to spend.
LOOP_BUDGET = Decimal("1.00")
LOOP_MAX_TOKENS = 64
LOOP_COOLDOWN_SECONDS = 300
#: How many more times the runaway agent hammers ResGov after its first refusal (each
#: retry must be refused too, and none may reach the upstream).
RETRIES_AFTER_REFUSAL = 3
#: Rows the live table keeps on screen; older calls scroll out (the totals stay exact).
LIVE_ROWS = 14
#: The agent's mix of calls, repeated: streaming and JSON answers like real frameworks make,
#: with and without an output cap (without one, ResGov applies max_tokens_per_request).
#: Fixed rather than random so every run tells the same story.
STREAM_PATTERN = (True, False, True, True, False)
MAX_TOKENS_PATTERN: tuple[int | None, ...] = (None, 256, MAX_TOKENS_PER_REQUEST, 384)
NANO = 10**9

# The simulated provider: 120 output tokens per answer (one token per SSE chunk, as real
# providers stream), 3 ms a token after 120 ms to first byte: slow enough to watch,
# fast enough that the default $0.05 runs out in about seven seconds.
SIM_CONFIG = SimConfig(chunks=120, tokens_per_chunk=1, latency_ms=120.0, chunk_delay_ms=3.0)
#: What the agent spends "running its tool" between two calls.
TOOL_SECONDS = 0.15

SYSTEM_PROMPT = (
    "You are runaway-bot, an autonomous research agent. You have a search tool and a "
    "scratchpad. Work step by step, never stop before the task is complete, and keep "
    "every previous observation in mind when you plan the next step."
)
TASK = (
    "Build a complete literature review of every paper ever published about budget "
    "enforcement for LLM agents. Search, read, summarise, and repeat until nothing is left."
)
OBSERVATION = "search(page={n}): 10 results, 3 new. Not complete yet: continue."


class DemoError(Exception):
    """The demo could not set itself up (not a broken invariant: those are reported, not raised)."""


@dataclass
class CallRow:
    """One attempt of the runaway agent, as the table shows it."""

    n: int
    stream: bool
    messages: int
    status: int
    reserved: Decimal | None = None
    actual: Decimal | None = None
    spent: Decimal | None = None
    remaining: Decimal | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    error_type: str | None = None

    @property
    def allowed(self) -> bool:
        """The call went through ResGov to the upstream and back."""
        return self.status == 200


@dataclass
class Outcome:
    """Everything the runaway loop saw, for the summary and the invariant checks."""

    rows: list[CallRow] = field(default_factory=list)
    refusal_status: int | None = None
    refusal_body: str | None = None
    refusal_json: Any = None
    failure: str | None = None


# ---------------------------------------------------------------------------- money helpers


def _dec(value: Any) -> Decimal:
    """An API amount (a JSON number) as an exact Decimal.

    ResGov emits amounts as the shortest float that round-trips its nano-unit value,
    so ``repr`` gives back exactly that decimal (never the float's binary expansion).
    """
    if isinstance(value, Decimal):
        return value
    if isinstance(value, int | float | str) and not isinstance(value, bool):
        return Decimal(repr(value) if isinstance(value, float) else str(value))
    raise DemoError(f"expected an amount, got {value!r}")


def _nano(value: Decimal) -> int:
    return int((value * NANO).to_integral_value(rounding=ROUND_HALF_EVEN))


def _money(value: Decimal | None, places: int = 5) -> str:
    if value is None:
        return "—"
    return f"${value:.{places}f}"


def _exact(value: Decimal) -> str:
    """Full precision for the summary (at least two decimals, like ResGov's own messages)."""
    text = f"{value:.9f}".rstrip("0")
    whole, _, frac = text.partition(".")
    return f"${whole}.{frac.ljust(2, '0')}"


def _ascii_bar(fraction: float, width: int = 15) -> str:
    """A bar made of plain characters, for logs that are not a terminal."""
    filled = max(0, min(width, round(fraction * width)))
    return "[" + "#" * filled + "." * (width - filled) + "]"


# ---------------------------------------------------------------------------- the policy


def demo_policy(sim_url: str, budget: Decimal) -> str:
    """The demo's ``.rgf``: one org, one runaway agent, one simulated provider priced like GPT-4o."""
    return f"""# .rgf written by `resgov demo` (a temporary directory; removed when the demo ends)
[global]
currency = "USD"
fail_safe_action = "deny"
# Nothing may leave the machine: bare model names go to the simulator too.
default_provider = "sim"

[providers.sim]
base_url = "{sim_url}/v1"
format = "openai"
first_byte_timeout = 10
idle_timeout = 10

# GPT-4o's list price: $2.50 per million input tokens, $10.00 per million output tokens.
[models."{DEMO_MODEL}"]
input_per_mtok = 2.50
output_per_mtok = 10.00

[orgs.{DEMO_ORG}]

[agents.{DEMO_AGENT}]
org = "{DEMO_ORG}"
daily_budget = {format(budget, "f")}
max_tokens_per_request = {MAX_TOKENS_PER_REQUEST}
allowed_models = ["{DEMO_MODEL}"]

# Act one: the loop detector. {LOOP_REPEATS} near-identical calls (same model, same messages once
# UUIDs, hex ids and timestamps are masked) within 5 minutes are allowed; the next one pauses
# the agent for {LOOP_COOLDOWN_SECONDS} s (or until POST /api/v1/admin/agents/{LOOP_AGENT}/resume).
[agents.{LOOP_AGENT}]
org = "{DEMO_ORG}"
daily_budget = {format(LOOP_BUDGET, "f")}
max_tokens_per_request = {LOOP_MAX_TOKENS}
allowed_models = ["{DEMO_MODEL}"]
loop_max_repeats = {LOOP_REPEATS}
loop_window_seconds = 300
cooldown_seconds = {LOOP_COOLDOWN_SECONDS}
"""


def _parse_budget(budget: str) -> Decimal:
    try:
        value = Decimal(budget.strip())
    except InvalidOperation:
        raise DemoError(f"--budget must be an amount in USD such as 0.05, not {budget!r}") from None
    if not value.is_finite() or value <= 0 or value > 1000:
        raise DemoError(f"--budget must be more than 0 and at most 1000 (USD), not {budget!r}")
    return value


# ---------------------------------------------------------------------------- the services


def _loopback_socket() -> socket.socket:
    """A listening-ready socket on a free loopback port, handed to uvicorn (no pick-then-bind race)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


class _DemoServer(uvicorn.Server):
    """uvicorn without its signal capture: the CLI owns Ctrl-C.

    Ctrl-C then cancels the demo, whose clean-up stops this server through its lifespan
    (every reservation settled), instead of uvicorn stopping first under a client still
    sending calls and re-raising the signal afterwards.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@contextlib.asynccontextmanager
async def _simulator() -> AsyncIterator[SimUpstream]:
    sim = SimUpstream(dataclasses.replace(SIM_CONFIG))  # a copy: the simulator may mutate its config
    await sim.start("127.0.0.1", 0)
    try:
        yield sim
    finally:
        await sim.stop()


@contextlib.asynccontextmanager
async def _resgov(workdir: Path, policy_text: str, admin_token: str) -> AsyncIterator[str]:
    """ResGov on a free loopback port, until the block ends; yields its base URL."""
    policy_path = workdir / ".rgf"
    policy_path.write_text(policy_text, encoding="utf-8")
    db = workdir / "resgov.db"
    try:
        policy = parse_policy(policy_text, str(policy_path))
    except PolicyError as exc:  # a bug in demo_policy, not in the user's setup
        raise DemoError(str(exc)) from exc
    settings = Settings(config_path=str(policy_path), store_url=f"sqlite:///{db}", admin_token=admin_token,
                        host="127.0.0.1", drain_seconds=5.0)  # fmt: skip
    app = create_app(settings, SQLiteStore(str(db)), policy)
    # The breaker's warning would land in the middle of the table (Python's last-resort handler
    # prints to stderr): the demo shows each trip itself, and its audit record.
    quiet = logging.NullHandler()
    guard_log = logging.getLogger("resgov.guard")
    guard_log.addHandler(quiet)
    sock = _loopback_socket()
    port = int(sock.getsockname()[1])
    config = uvicorn.Config(app, lifespan="on", log_level="warning", access_log=False,
                            timeout_graceful_shutdown=5)  # fmt: skip
    server = _DemoServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]), name="resgov-demo-server")
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            if task.done():
                cause = task.exception() if not task.cancelled() else None
                raise DemoError(f"ResGov did not start: {cause!r}")
            if time.monotonic() > deadline:
                raise DemoError("ResGov did not start within 20 s")
            await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        # should_exit runs the lifespan's shutdown: in-flight calls settle, the ledger closes.
        server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, timeout=15)
        sock.close()
        guard_log.removeHandler(quiet)


async def _create_key(http: aiohttp.ClientSession, url: str, admin_token: str) -> str:
    async with http.post(f"{url}/api/v1/admin/generate-key", headers={"X-Admin-Token": admin_token},
                         json={"org_id": DEMO_ORG, "name": "resgov-demo"}) as resp:  # fmt: skip
        body = await resp.read()
        if resp.status != 200:
            raise DemoError(f"generate-key answered {resp.status}: {body.decode(errors='replace')}")
        key = orjson.loads(body).get("api_key")
    if not isinstance(key, str):
        raise DemoError("generate-key returned no api_key")
    return key


async def _get_json(http: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> Any:
    async with http.get(url, headers=headers) as resp:
        body = await resp.read()
        if resp.status != 200:
            raise DemoError(f"GET {url} answered {resp.status}: {body.decode(errors='replace')}")
        return orjson.loads(body)


async def _agent_budget(
    http: aiohttp.ClientSession, url: str, auth: dict[str, str], agent: str = DEMO_AGENT
) -> dict[str, Any]:
    """An agent's own daily window (``GET /api/v1/agents/{id}``); the runaway agent's by default."""
    data = await _get_json(http, f"{url}/api/v1/agents/{agent}", auth)
    for window in data.get("budgets", []):
        if window.get("level") == "agent" and window.get("period") == "daily":
            return dict(window)
    raise DemoError(f"no daily agent budget in {data!r}")


async def _audit(
    http: aiohttp.ClientSession, url: str, auth: dict[str, str], agent: str = DEMO_AGENT
) -> list[dict[str, Any]]:
    """Every audit record of one demo agent (the runaway by default), following the pagination cursor."""
    items: list[dict[str, Any]] = []
    after = 0
    while True:
        page = await _get_json(http, f"{url}/api/v1/audit?agent_id={agent}&after={after}&limit=1000", auth)
        batch = page.get("items", [])
        items.extend(batch)
        nxt = page.get("next_after")
        if not batch or nxt is None or len(batch) < 1000:
            return items
        after = int(nxt)


# ---------------------------------------------------------------------------- act one: a stuck agent

STUCK_SYSTEM = "You are stuck-bot. When a tool call fails, call the tool again until it succeeds."
STUCK_TASK = "Upload the quarterly report to the archive with the upload tool."
#: A failing tool run: only its id and its time change from one retry to the next.
STUCK_OBSERVATION = "upload(report.pdf) run {run} failed at {at}: HTTP 503 Service Unavailable. Try again."


@dataclass
class LoopOutcome:
    """What the stuck agent saw: each call's status, each refusal's error object."""

    statuses: list[int] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    refusal_body: str | None = None
    retry_after: str | None = None
    failure: str | None = None

    @property
    def allowed(self) -> int:
        """Calls that went through ResGov to the upstream."""
        return self.statuses.count(200)


def stuck_request() -> dict[str, Any]:
    """The stuck agent's request: the same every time, but for a fresh UUID and timestamp."""
    at = datetime.now(UTC).isoformat(timespec="milliseconds")
    return {
        "model": DEMO_MODEL,
        "max_tokens": LOOP_MAX_TOKENS,
        "messages": [
            {"role": "system", "content": STUCK_SYSTEM},
            {"role": "user", "content": STUCK_TASK},
            {"role": "user", "content": STUCK_OBSERVATION.format(run=uuid.uuid4(), at=at)},
        ],
    }


async def _run_stuck_loop(
    console: Console, http: aiohttp.ClientSession, url: str, api_key: str
) -> LoopOutcome:
    """Retry the failing step until ResGov stops it, then a few more times (a stuck agent does)."""
    out = LoopOutcome()
    headers = {"Authorization": f"Bearer {api_key}", "X-ResGov-Agent-ID": LOOP_AGENT,
               "Content-Type": "application/json"}  # fmt: skip
    for n in range(1, LOOP_REPEATS + 2 + RETRIES_AFTER_REFUSAL):
        body = stuck_request()
        async with http.post(f"{url}/v1/chat/completions", data=orjson.dumps(body), headers=headers) as resp:
            raw = await resp.read()
            out.statuses.append(resp.status)
            retry_after = resp.headers.get("Retry-After")
        if resp.status == 200:
            cost = (orjson.loads(raw).get("resgov_cost") or {}).get("actual")
            console.print(f"{n:>3} json   retry #{n}: same request, new run id and time   200  "
                          f"cost {_money(_dec(cost) if cost is not None else None)}",
                          highlight=False, markup=False)  # fmt: skip
        else:
            error: dict[str, Any] = {}
            with contextlib.suppress(orjson.JSONDecodeError, AttributeError, TypeError, KeyError):
                error = dict(orjson.loads(raw)["error"])
            out.errors.append(error)
            if out.refusal_body is None:
                out.refusal_body = raw.decode("utf-8", errors="replace")
                out.retry_after = retry_after
            console.print(f"{n:>3} json   retry #{n}: same request, new run id and time   REFUSED {resp.status} "
                          f"{error.get('reason', 'error')} (never reached the upstream)",
                          highlight=False, markup=False)  # fmt: skip
            if resp.status != 429:
                out.failure = f"call {n} answered {resp.status}: {raw.decode(errors='replace')}"
                return out
        await asyncio.sleep(TOOL_SECONDS / 3)
    return out


def _check_loop(
    out: LoopOutcome, upstream_calls: int, budget: dict[str, Any], audit: list[dict[str, Any]]
) -> list[tuple[bool, str]]:
    """Each promise of act one, with a line that says what was compared."""
    expected = [200] * LOOP_REPEATS + [429] * (1 + RETRIES_AFTER_REFUSAL)
    first = out.errors[0] if out.errors else {}
    spent, reserved = _dec(budget["spent"]), _dec(budget["reserved"])
    trips = [
        a for a in audit if a.get("reason") == "loop_detected" and (a.get("detail") or {}).get("tripped")
    ]
    evidence = (trips[0].get("detail") or {}) if trips else {}
    audit_actual = sum((_dec(item.get("actual", 0)) for item in audit), Decimal(0))
    return [
        (out.failure is None, "every stuck call was either served or refused with 429"
         + (f" ({out.failure})" if out.failure else "")),
        (out.statuses == expected,
         f"exactly {LOOP_REPEATS} near-identical calls were allowed, then every call refused "
         f"({', '.join(map(str, out.statuses))})"),
        (first.get("type") == "circuit_breaker_open" and first.get("reason") == "loop_detected"
         and first.get("agent_id") == LOOP_AGENT and out.retry_after == str(LOOP_COOLDOWN_SECONDS),
         f"the refusal is 429 circuit_breaker_open / loop_detected with Retry-After: {out.retry_after}"),
        (len(out.errors) > 1 and all(e.get("reason") == "loop_detected" for e in out.errors[1:]),
         "the retries after the trip were refused too: the agent is paused"),
        (upstream_calls == out.allowed, f"upstream received {upstream_calls} call(s) = {out.allowed} allowed"),
        (spent * 100 < LOOP_BUDGET,
         f"stopped having spent {_exact(spent)}, under 1% of its {_exact(LOOP_BUDGET)} daily budget"),
        (reserved == 0 and _nano(audit_actual) == _nano(spent),
         f"reserved {_exact(reserved)}; Σ audit actual {_exact(audit_actual)} = spent {_exact(spent)}"),
        (len(trips) == 1 and evidence.get("count") == LOOP_REPEATS + 1 and evidence.get("limit") == LOOP_REPEATS,
         f"audit: one trip recorded with its evidence (count {evidence.get('count')}, "
         f"limit {evidence.get('limit')}, window {evidence.get('window_seconds', 0):g} s)"),
    ]  # fmt: skip


# ---------------------------------------------------------------------------- act two: the runaway agent


class RunawayAgent:
    """An agent stuck in a loop: every answer and every tool observation is appended to its history."""

    def __init__(self, http: aiohttp.ClientSession, url: str, api_key: str) -> None:
        self.http = http
        self.url = url
        self.headers = {"Authorization": f"Bearer {api_key}", "X-ResGov-Agent-ID": DEMO_AGENT}
        self.messages: list[dict[str, str]] = [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": TASK},
        ]

    def next_request(self) -> tuple[bool, dict[str, Any]]:
        """(stream?, body) for the next turn; mixes streaming and JSON like real frameworks."""
        turn = len(self.messages) // 2 - 1
        stream = STREAM_PATTERN[turn % len(STREAM_PATTERN)]
        max_tokens = MAX_TOKENS_PATTERN[turn % len(MAX_TOKENS_PATTERN)]
        body: dict[str, Any] = {"model": DEMO_MODEL, "messages": list(self.messages), "temperature": 0.2}
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return stream, body

    def remember(self, n: int, answer: str) -> None:
        """The loop that makes it a runaway: the history only ever grows."""
        self.messages.append({"role": "assistant", "content": answer})
        self.messages.append({"role": "user", "content": OBSERVATION.format(n=n)})

    async def call(self, n: int) -> tuple[CallRow, str | None, bytes]:
        """One chat completion through ResGov; returns the row, the answer text, and the raw error body."""
        stream, body = self.next_request()
        row = CallRow(n=n, stream=stream, messages=len(body["messages"]), status=0)
        url = f"{self.url}/v1/chat/completions"
        async with self.http.post(url, data=orjson.dumps(body), headers={
                **self.headers, "Content-Type": "application/json"}) as resp:  # fmt: skip
            row.status = resp.status
            reserved = resp.headers.get("X-ResGov-Reserved")
            if reserved is not None:
                row.reserved = Decimal(reserved)
            if resp.status != 200:
                raw = await resp.read()
                with contextlib.suppress(orjson.JSONDecodeError, AttributeError, TypeError):
                    row.error_type = orjson.loads(raw)["error"]["type"]
                return row, None, raw
            if not stream:
                data = orjson.loads(await resp.read())
                cost = data.get("resgov_cost") or {}
                row.actual = _dec(cost["actual"]) if "actual" in cost else None
                row.input_tokens = cost.get("input_tokens")
                row.output_tokens = cost.get("output_tokens")
                return row, str(data["choices"][0]["message"]["content"] or ""), b""
            parts: list[str] = []
            async for line in resp.content:
                # SSE: one "data: {...}" per event; aiohttp reassembles lines across TCP chunks.
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    break
                event = orjson.loads(payload)
                if "error" in event:
                    row.error_type = str(event["error"].get("type"))
                for choice in event.get("choices") or ():
                    parts.append((choice.get("delta") or {}).get("content") or "")
                usage = event.get("usage")
                if usage:
                    row.input_tokens = usage.get("prompt_tokens")
                    row.output_tokens = usage.get("completion_tokens")
            return row, "".join(parts), b""


# ---------------------------------------------------------------------------- display


class Display:
    """A live table and a budget bar on a terminal; one plain line per call everywhere else (CI logs)."""

    def __init__(self, console: Console, limit: Decimal) -> None:
        self.console = console
        self.limit = limit
        self.rows: list[CallRow] = []
        self.live: Live | None = None
        self.interactive = console.is_terminal and not console.is_dumb_terminal

    def __enter__(self) -> Display:
        if self.interactive:
            self.live = Live(self._render(), console=self.console, refresh_per_second=12, transient=False)
            self.live.__enter__()
        else:
            self.console.print(
                f"{'#':>3} {'kind':<6} {'msgs':>4} {'reserved':>9} {'actual':>9} {'spent':>9} "
                f"{'remaining':>9}  budget",
                highlight=False,
            )
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.update(self._render())
            self.live.__exit__(None, None, None)

    def add(self, row: CallRow) -> None:
        """Show one more call (the live view redraws; a log gets one line)."""
        self.rows.append(row)
        if self.live is not None:
            self.live.update(self._render())
            return
        self.console.print(self._line(row), highlight=False, markup=False, soft_wrap=True)

    def _fraction(self, spent: Decimal | None) -> float:
        return float(spent / self.limit) if spent is not None and self.limit else 0.0

    def _line(self, row: CallRow) -> str:
        kind = "stream" if row.stream else "json"
        if not row.allowed:
            return (
                f"{row.n:>3} {kind:<6} {row.messages:>4} REFUSED {row.status} {row.error_type or 'error'}"
                + (" (never reached the upstream)" if row.error_type == "budget_exceeded" else "")
            )
        frac = self._fraction(row.spent)
        return (
            f"{row.n:>3} {kind:<6} {row.messages:>4} {_money(row.reserved):>9} {_money(row.actual):>9} "
            f"{_money(row.spent):>9} {_money(row.remaining):>9}  {_ascii_bar(frac)} {frac:4.0%}"
        )

    def _render(self) -> RenderableType:
        # Below ~110 columns the full table would truncate every amount to "$0.00…": drop the
        # token column and the vertical rules instead, so it fits in 80 columns.
        compact = self.console.width < 110
        table = Table(
            title=f"runaway-bot → ResGov → simulated GPT-4o   (daily budget {_exact(self.limit)})",
            title_justify="left",
            box=box.SIMPLE_HEAD if compact else box.HEAVY_HEAD,
            collapse_padding=compact,
            pad_edge=not compact,
            show_edge=not compact,
        )
        table.add_column("#", justify="right", no_wrap=True)
        table.add_column("kind", no_wrap=True)
        table.add_column("msgs", justify="right", no_wrap=True)
        if not compact:
            table.add_column("tokens in/out", justify="right", no_wrap=True)
        for name in ("reserved", "actual", "spent", "remaining"):
            table.add_column(name, justify="right", no_wrap=True)
        table.add_column("budget", no_wrap=True)
        bar_width = 8 if compact else 14
        hidden = max(0, len(self.rows) - LIVE_ROWS)
        for row in self.rows[hidden:]:
            kind = "stream" if row.stream else "json"
            cells: list[RenderableType] = [str(row.n), kind, str(row.messages)]
            if not row.allowed:
                label = f"HTTP {row.status} {row.error_type or ''}".rstrip()
                if row.status == 403 and row.error_type == "budget_exceeded":
                    label = "403 refused" if compact else "403 budget_exceeded"
                # The refusal spans the empty amount columns (a Text cell cannot, so it goes last).
                cells += [""] * (4 if compact else 5)
                cells.append(Text(label, style="bold red"))
                table.add_row(*cells)
                continue
            if not compact:
                cells.append(f"{row.input_tokens or 0}/{row.output_tokens or 0}")
            frac = self._fraction(row.spent)
            bar = Table.grid(padding=(0, 1))
            bar.add_row(ProgressBar(total=1.0, completed=min(frac, 1.0), width=bar_width), f"{frac:4.0%}")
            cells += [_money(row.reserved), _money(row.actual), _money(row.spent), _money(row.remaining), bar]
            table.add_row(*cells)
        if hidden:
            table.caption = f"(last {LIVE_ROWS} of {len(self.rows)} calls)"
        last = next((r for r in reversed(self.rows) if r.spent is not None), None)
        spent = last.spent if last and last.spent is not None else Decimal(0)
        frac = self._fraction(spent)
        overall = Table.grid(padding=(0, 1))
        overall.add_row(
            Text("daily budget", style="bold"),
            ProgressBar(total=1.0, completed=min(frac, 1.0), width=30 if compact else 40),
            f"{_money(spent)} of {_exact(self.limit)} ({frac:.0%})",
        )
        return Group(table, overall)


# ---------------------------------------------------------------------------- the show


async def _run_loop(agent: RunawayAgent, display: Display, http: aiohttp.ClientSession, url: str,
                    auth: dict[str, str], max_calls: int) -> Outcome:  # fmt: skip
    outcome = Outcome()
    spent_before = Decimal(0)
    refused_at: int | None = None
    for n in range(1, max_calls + 1):
        try:
            row, answer, raw = await agent.call(n)
        except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError, KeyError) as exc:
            outcome.failure = f"call {n} failed: {type(exc).__name__}: {exc}"
            return outcome
        outcome.rows.append(row)
        if row.allowed and row.error_type is not None:
            display.add(row)
            outcome.failure = f"call {n}: the stream ended with an error event ({row.error_type})"
            return outcome
        if row.allowed:
            budget = await _agent_budget(http, url, auth)
            row.spent, row.remaining = _dec(budget["spent"]), _dec(budget["remaining"])
            # A stream's cost is not in its body; the agent's ledger (read-your-writes) has it.
            if row.actual is None:
                row.actual = row.spent - spent_before
            spent_before = row.spent
            display.add(row)
            agent.remember(n, answer or "")
            await asyncio.sleep(TOOL_SECONDS)
            continue
        display.add(row)
        if row.status != 403 or row.error_type != "budget_exceeded":
            outcome.failure = f"call {n} failed with HTTP {row.status}: {raw.decode(errors='replace')}"
            outcome.refusal_body = outcome.refusal_body or raw.decode(errors="replace")
            outcome.refusal_status = outcome.refusal_status or row.status
            return outcome
        if refused_at is None:
            refused_at = n
            outcome.refusal_status = row.status
            outcome.refusal_body = raw.decode("utf-8", errors="replace")
            with contextlib.suppress(orjson.JSONDecodeError):
                outcome.refusal_json = orjson.loads(raw)
        if n - refused_at >= RETRIES_AFTER_REFUSAL:
            return outcome
        # A runaway agent retries; a short pause keeps the show readable.
        await asyncio.sleep(0.1)
    return outcome


def _check(
    outcome: Outcome,
    limit: Decimal,
    upstream_calls: int,
    budget: dict[str, Any],
    audit: list[dict[str, Any]],
) -> list[tuple[bool, str]]:
    """Each invariant the demo promises, with a line that says what was compared."""
    allowed = sum(1 for r in outcome.rows if r.allowed)
    refused = sum(1 for r in outcome.rows if r.status == 403)
    spent, reserved = _dec(budget["spent"]), _dec(budget["reserved"])
    remaining, api_limit = _dec(budget["remaining"]), _dec(budget["limit"])
    by_status = Counter(str(item.get("status")) for item in audit)
    audit_actual = sum((_dec(item.get("actual", 0)) for item in audit), Decimal(0))
    err = outcome.refusal_json.get("error") if isinstance(outcome.refusal_json, dict) else None
    brief_shape = (
        isinstance(err, dict)
        and err.get("type") == "budget_exceeded"
        and err.get("reason") == "daily_budget_exceeded"
        and err.get("agent_id") == DEMO_AGENT
        and str(err.get("message", "")).startswith("Daily budget exceeded. Limit: ")
    )
    checks = [
        (
            outcome.failure is None,
            "every call was either served or refused with budget_exceeded"
            + (f" ({outcome.failure})" if outcome.failure else ""),
        ),
        (
            refused > 0,
            f"the loop was stopped by ResGov ({refused} call(s) refused)"
            if refused
            else "the loop was never stopped (raise --max-calls or lower --budget)",
        ),
        (
            not refused or brief_shape,
            "the refusal is the brief's 403 body (type budget_exceeded, reason daily_budget_exceeded)",
        ),
        (upstream_calls == allowed, f"upstream received {upstream_calls} call(s) = {allowed} allowed"),
        (api_limit == limit, f"agent limit {_exact(api_limit)} = configured {_exact(limit)}"),
        (spent <= limit, f"spent {_exact(spent)} ≤ limit {_exact(limit)}"),
        (reserved == 0, f"reserved {_exact(reserved)} = $0 (every reservation settled)"),
        (_nano(remaining) == _nano(limit - spent), f"remaining {_exact(remaining)} = limit - spent"),
        (
            _nano(audit_actual) == _nano(spent),
            f"Σ audit actual {_exact(audit_actual)} = spent {_exact(spent)}",
        ),
        (
            by_status.get("completed", 0) == allowed,
            f"audit: {by_status.get('completed', 0)} completed = {allowed} allowed",
        ),
        (
            by_status.get("denied", 0) == refused,
            f"audit: {by_status.get('denied', 0)} denied = {refused} refused",
        ),
        (
            by_status.get("in_flight", 0) == 0 and len(audit) == len(outcome.rows),
            f"audit: {len(audit)} record(s) for {len(outcome.rows)} call(s), none in flight",
        ),
    ]
    return checks


def _summary(console: Console, outcome: Outcome, upstream_calls: int, budget: dict[str, Any],
             audit: list[dict[str, Any]], elapsed: float) -> None:  # fmt: skip
    allowed = sum(1 for r in outcome.rows if r.allowed)
    refused = sum(1 for r in outcome.rows if r.status == 403)
    console.print()
    calls = Table(title="Calls", title_justify="left", show_header=False)
    calls.add_column(style="bold")
    calls.add_column(justify="right")
    calls.add_row("allowed by ResGov", str(allowed))
    calls.add_row("refused (403)", str(refused))
    calls.add_row("received by the upstream", str(upstream_calls))
    calls.add_row("wall time", f"{elapsed:.1f} s")

    ledger = Table(title=f"Ledger: GET /api/v1/agents/{DEMO_AGENT}", title_justify="left")
    for col in ("level", "period", "limit", "spent", "reserved", "remaining"):
        ledger.add_column(col, justify="right" if col not in ("level", "period") else "left")
    ledger.add_row(str(budget["level"]), str(budget["period"]), _exact(_dec(budget["limit"])),
                   _exact(_dec(budget["spent"])), _exact(_dec(budget["reserved"])),
                   _exact(_dec(budget["remaining"])))  # fmt: skip

    by_status = Counter(str(item.get("status")) for item in audit)
    reserved_by: dict[str, Decimal] = {}
    actual_by: dict[str, Decimal] = {}
    for item in audit:
        status = str(item.get("status"))
        reserved_by[status] = reserved_by.get(status, Decimal(0)) + _dec(item.get("reserved", 0))
        actual_by[status] = actual_by.get(status, Decimal(0)) + _dec(item.get("actual", 0))
    trail = Table(title="Audit trail: GET /api/v1/audit", title_justify="left")
    trail.add_column("status")
    trail.add_column("records", justify="right")
    trail.add_column("Σ reserved", justify="right")
    trail.add_column("Σ actual", justify="right")
    for status, count in sorted(by_status.items()):
        trail.add_row(status, str(count), _exact(reserved_by[status]), _exact(actual_by[status]))
    trail.add_row(Text("total", style="bold"), str(len(audit)), _exact(sum(reserved_by.values(), Decimal(0))),
                  _exact(sum(actual_by.values(), Decimal(0))), end_section=True)  # fmt: skip
    for renderable in (calls, ledger, trail):
        console.print(renderable)
        console.print()


async def _show(console: Console, limit: Decimal, max_calls: int) -> int:
    started = time.monotonic()
    admin_token = secrets.token_urlsafe(32)  # 43 characters: above the 32 the admin API requires
    with tempfile.TemporaryDirectory(prefix="resgov-demo-") as tmp:
        async with _simulator() as sim:
            policy_text = demo_policy(sim.base_url, limit)
            async with _resgov(Path(tmp), policy_text, admin_token) as url:
                timeout = aiohttp.ClientTimeout(total=60)
                async with aiohttp.ClientSession(timeout=timeout) as http:
                    api_key = await _create_key(http, url, admin_token)
                    console.print(
                        f"[bold]ResGov demo[/]: ResGov on {url}, simulated provider on {sim.base_url}, "
                        f"ledger in {tmp}/resgov.db"
                    )
                    auth = {"Authorization": f"Bearer {api_key}"}
                    console.print(
                        f"[bold]Act 1: the loop detector.[/] Agent [bold]{LOOP_AGENT}[/] keeps retrying a failing "
                        f"tool with the same request; only the run id and the time change. It may send "
                        f"{LOOP_REPEATS} near-identical requests within 5 minutes (loop_max_repeats = {LOOP_REPEATS}); "
                        f"its daily budget is {_exact(LOOP_BUDGET)}.\n"
                    )
                    seen = sim.stats.received.get(ROUTE_CHAT, 0)
                    loop_outcome = await _run_stuck_loop(console, http, url, api_key)
                    loop_upstream = sim.stats.received.get(ROUTE_CHAT, 0) - seen
                    loop_budget = await _agent_budget(http, url, auth, LOOP_AGENT)
                    loop_audit = await _audit(http, url, auth, LOOP_AGENT)
                    console.print()
                    console.print(
                        f"[bold]Act 2: the budget.[/] Agent [bold]{DEMO_AGENT}[/] (org {DEMO_ORG}) has a daily budget of {_exact(limit)} "
                        f"for {DEMO_MODEL} ($2.50 / $10.00 per MTok, max {MAX_TOKENS_PER_REQUEST} tokens a call). "
                        "Its loop never ends; every turn re-sends the whole, growing conversation, so no "
                        "two calls are alike and only the budget can stop it.\n"
                    )
                    agent = RunawayAgent(http, url, api_key)
                    seen = sim.stats.received.get(ROUTE_CHAT, 0)
                    with Display(console, limit) as display:
                        outcome = await _run_loop(agent, display, http, url, auth, max_calls)
                    upstream_calls = sim.stats.received.get(ROUTE_CHAT, 0) - seen
                    budget = await _agent_budget(http, url, auth)
                    audit = await _audit(http, url, auth)
        elapsed = time.monotonic() - started
    # Everything is shut down and the temporary directory is gone: now tell the story.
    loop_ok = _tell_loop(console, loop_outcome, loop_upstream, loop_budget, loop_audit)
    if outcome.refusal_body is not None:
        console.print()
        console.print(f"[bold]ResGov's answer to call #{next(r.n for r in outcome.rows if not r.allowed)}[/] "
                      f"(HTTP {outcome.refusal_status}, body exactly as received):")  # fmt: skip
        console.print(Text(outcome.refusal_body), soft_wrap=True, highlight=False, markup=False)
        console.print(
            "ResGov refuses as soon as the next call's worst case (Required: every prompt byte counted "
            "as a token, plus the output cap, at the model's prices) no longer fits beside what is spent, "
            "so spend stops short of the limit and never passes it. The call never reached the upstream.",
            highlight=False,
        )
    _summary(console, outcome, upstream_calls, budget, audit, elapsed)
    checks = _check(outcome, limit, upstream_calls, budget, audit)
    for ok, text in checks:
        console.print(Text.assemble(("  ✔ " if ok else "  ✘ ", "green" if ok else "bold red"), text))
    console.print()
    allowed = sum(1 for r in outcome.rows if r.allowed)
    spent = _dec(budget["spent"])
    if all(ok for ok, _ in checks):
        console.print(f"[bold green]budget held: spent {_exact(spent)} ≤ limit {_exact(limit)}; "
                      f"upstream saw {upstream_calls} calls = {allowed} allowed[/]")  # fmt: skip
        return 0 if loop_ok else 1
    console.print(f"[bold red]budget NOT verified: spent {_exact(spent)} (limit {_exact(limit)}); "
                  f"upstream saw {upstream_calls} calls, {allowed} allowed; see ✘ above[/]")  # fmt: skip
    return 1


def _tell_loop(console: Console, out: LoopOutcome, upstream_calls: int, budget: dict[str, Any],
               audit: list[dict[str, Any]]) -> bool:  # fmt: skip
    """Act one's refusal, checks and verdict; True when every check held."""
    console.print()
    if out.refusal_body is not None:
        console.print(f"[bold]Act 1: ResGov's answer to retry #{LOOP_REPEATS + 1}[/] (HTTP 429, "
                      f"Retry-After: {out.retry_after}, body exactly as received):")  # fmt: skip
        console.print(Text(out.refusal_body), soft_wrap=True, highlight=False, markup=False)
        console.print(
            "The loop detector masks what changes on every turn of a stuck loop (UUIDs, hex ids, "
            "timestamps) and counts identical requests: the agent was paused after "
            f"{LOOP_REPEATS} tries, for cents, instead of burning its whole budget.",
            highlight=False,
        )
    checks = _check_loop(out, upstream_calls, budget, audit)
    for ok, text in checks:
        console.print(Text.assemble(("  ✔ " if ok else "  ✘ ", "green" if ok else "bold red"), text))
    spent = _dec(budget["spent"])
    if all(ok for ok, _ in checks):
        console.print(f"[bold green]loop stopped: {out.allowed} near-identical calls allowed, then paused "
                      f"(loop_detected); spent {_exact(spent)} of {_exact(LOOP_BUDGET)}[/]")  # fmt: skip
        return True
    console.print(f"[bold red]loop detector NOT verified: {out.allowed} calls allowed, spent {_exact(spent)}; "
                  "see ✘ above[/]")  # fmt: skip
    return False


async def run_demo(console: Console, budget: str, max_calls: int) -> int:
    """Run the whole demo; 0 when every invariant held, 1 when one broke, 2 on bad arguments or setup."""
    try:
        limit = _parse_budget(budget)
        if max_calls < 1:
            raise DemoError("--max-calls must be at least 1")
        return await _show(console, limit, max_calls)
    except DemoError as exc:
        console.print(f"[bold red]resgov demo: {exc}[/]", highlight=False)
        return 2
    except (aiohttp.ClientError, TimeoutError) as exc:
        # ResGov stopped answering mid-demo: that is a failed run, not a bad invocation.
        console.print(f"[bold red]resgov demo: lost contact with ResGov: {type(exc).__name__}: {exc}[/]",
                      highlight=False)  # fmt: skip
        return 1
