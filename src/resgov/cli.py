"""``resgov serve | check | demo | keys | store``."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from resgov import __version__
from resgov.config.rgf import PolicyError, describe, load_policy, parse_policy
from resgov.config.settings import Settings
from resgov.core.policy import Policy

app = typer.Typer(
    help="ResGov: the budget firewall between AI agents and the money they spend.", no_args_is_help=True
)
keys_app = typer.Typer(help="Manage API keys directly in the store (works beside a running server).")
app.add_typer(keys_app, name="keys")
store_app = typer.Typer(
    help="Move a ledger between backends and check its invariants (migrate with every instance stopped).",
    no_args_is_help=True,
)
app.add_typer(store_app, name="store")
console = Console()
err_console = Console(stderr=True)

ConfigOpt = Annotated[
    str | None, typer.Option("--config", "-c", help="Policy file (.rgf); default $RESGOV_CONFIG or ./.rgf")
]
StoreOpt = Annotated[
    str | None, typer.Option("--store", help="Ledger URL; default $RESGOV_STORE or sqlite:///resgov.db")
]


def _config_path(config: str | None) -> str | None:
    path = config or os.environ.get("RESGOV_CONFIG")
    if path:
        return path
    return ".rgf" if Path(".rgf").exists() else None


def _load(path: str | None) -> Policy:
    if path is None:
        err_console.print(
            "[yellow]No policy file (--config, $RESGOV_CONFIG or ./.rgf): no agent can spend.[/]"
        )
        return parse_policy("", "<empty>")
    return load_policy(path)


@app.command()
def serve(
    config: ConfigOpt = None,
    store: StoreOpt = None,
    host: Annotated[str, typer.Option(help="Interface to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on")] = 8080,
    drain_seconds: Annotated[float, typer.Option(help="SIGTERM: how long in-flight calls may finish")] = 30.0,
    log_level: Annotated[str, typer.Option(help="debug|info|warning|error")] = "info",
) -> None:
    """Run the proxy and the governance API."""
    import uvicorn

    from resgov.ledger import store_from_url
    from resgov.server.app import create_app

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    path = _config_path(config)
    try:
        policy = _load(path)
    except PolicyError as exc:
        err_console.print(f"[red]resgov: refusing to start: {exc}[/]")
        raise typer.Exit(2) from None
    settings = Settings.from_env(
        config_path=path, store_url=store, host=host, port=port, drain_seconds=drain_seconds
    )
    application = create_app(settings, store_from_url(settings.store_url), policy)
    # Everything loaded so far lives as long as the process: keep it out of the collector's
    # scans (measured in bench/: ~10 % more calls per second at load).
    gc.collect()
    gc.freeze()
    uvicorn.run(
        application,
        host=host,
        port=port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        log_level=log_level,
        access_log=False,
        # ResGov never reads the client address, so X-Forwarded-* parsing would be pure cost
        # on every call; and the server's name is nobody's business.
        proxy_headers=False,
        server_header=False,
        timeout_graceful_shutdown=int(drain_seconds) or 1,
    )


@app.command()
def check(config: ConfigOpt = None) -> None:
    """Validate a policy file and print what it enforces (exit 1 if invalid)."""
    path = _config_path(config)
    if path is None:
        err_console.print("[red]No policy file given (--config) and no ./.rgf[/]")
        raise typer.Exit(1)
    try:
        policy = load_policy(path)
    except PolicyError as exc:
        err_console.print(f"[red]{exc}[/]")
        raise typer.Exit(1) from None
    console.print(f"[green]{path}: valid[/]", soft_wrap=True)
    for line in describe(policy):
        console.print(f"  {line}", highlight=False, soft_wrap=True)


@app.command()
def demo(
    budget: Annotated[str, typer.Option(help="The runaway agent's daily budget, in USD")] = "0.05",
    max_calls: Annotated[
        int, typer.Option(help="Stop the loop after this many calls if the budget never does")
    ] = 500,
) -> None:
    """Watch ResGov stop a runaway agent loop at its budget (no keys, no services needed)."""
    from resgov.demo import run_demo

    raise typer.Exit(asyncio.run(run_demo(console, budget, max_calls)))


@app.command()
def version() -> None:
    """Print the version."""
    console.print(__version__)


@keys_app.command("create")
def keys_create(
    org: Annotated[str, typer.Option(help="Organisation the key acts for")],
    name: Annotated[str, typer.Option(help="A label for the key")] = "cli",
    agent: Annotated[str | None, typer.Option(help="Bind the key to one agent")] = None,
    scopes: Annotated[
        str | None, typer.Option(help="Comma-separated: proxy,read,write (default all)")
    ] = None,
    store: StoreOpt = None,
) -> None:
    """Create an API key; it is printed once and stored only as a hash."""
    from resgov.config.rgf import NAME_RE
    from resgov.server.auth import SCOPES, new_key

    if not NAME_RE.match(org) or (agent and not NAME_RE.match(agent)):
        err_console.print("[red]invalid org or agent name[/]")
        raise typer.Exit(2)
    scope_list = tuple(s.strip() for s in scopes.split(",") if s.strip()) if scopes else SCOPES
    if any(s not in SCOPES for s in scope_list):
        err_console.print(f"[red]unknown scope; known: {', '.join(SCOPES)}[/]")
        raise typer.Exit(2)
    secret, record = new_key(org, name, scopes=scope_list, agent_id=agent)
    asyncio.run(_put_key(store, record))
    console.print(secret, highlight=False, soft_wrap=True)
    err_console.print(
        f"key {record.key_id} for org {org} ({', '.join(record.scopes)}); shown once, stored hashed."
    )


async def _put_key(store_url: str | None, record: object) -> None:
    from resgov.ledger import store_from_url
    from resgov.ledger.store import ApiKeyRecord

    assert isinstance(record, ApiKeyRecord)
    settings = Settings.from_env(store_url=store_url)
    store = store_from_url(settings.store_url)
    await store.open()
    try:
        await store.put_api_key(record)
    finally:
        await store.close()


@keys_app.command("list")
def keys_list(
    org: Annotated[str | None, typer.Option(help="Only this org")] = None, store: StoreOpt = None
) -> None:
    """List keys (ids and prefixes only; keys themselves are never stored)."""

    async def run() -> None:
        from resgov.ledger import store_from_url

        s = store_from_url(Settings.from_env(store_url=store).store_url)
        await s.open()
        try:
            for r in await s.list_api_keys(org):
                state = (
                    "revoked"
                    if r.revoked_at
                    else ("expired" if r.expires_at and r.expires_at < time.time() else "active")
                )
                console.print(
                    f"{r.key_id}  {r.org}  {r.name}  {r.prefix}…  {','.join(r.scopes)}  {r.agent_id or '-'}  {state}"
                )
        finally:
            await s.close()

    asyncio.run(run())


@keys_app.command("revoke")
def keys_revoke(key_id: str, store: StoreOpt = None) -> None:
    """Revoke a key by id (a running server notices within its key cache time, 5 s)."""

    async def run() -> bool:
        from resgov.ledger import store_from_url

        s = store_from_url(Settings.from_env(store_url=store).store_url)
        await s.open()
        try:
            return await s.revoke_api_key(None, key_id)
        finally:
            await s.close()

    if not asyncio.run(run()):
        err_console.print(f"[red]no active key {key_id}[/]")
        raise typer.Exit(1)
    console.print(f"revoked {key_id}")


@store_app.command("migrate")
def store_migrate(
    from_url: Annotated[
        str, typer.Option("--from", help="Source ledger: sqlite:///path.db or redis://host:port/db")
    ],
    to_url: Annotated[str, typer.Option("--to", help="Destination ledger URL (same forms)")],
    force: Annotated[
        bool, typer.Option("--force", help="Replace a destination that already holds data")
    ] = False,
) -> None:
    """Copy lines, open reservations (lease left kept), audit, API keys and governance; verify counts and sums.

    Exit 0 when every count and sum matches, 1 on any mismatch, 2 when the migration cannot start.
    """
    from resgov.ledger.migrate import MigrationError, format_sums, migrate
    from resgov.ledger.store import StoreError

    try:
        report = asyncio.run(migrate(from_url, to_url, force=force))
    except (MigrationError, StoreError) as exc:
        err_console.print(f"[red]resgov store migrate: {exc}[/]", soft_wrap=True)
        raise typer.Exit(2) from None
    for row in format_sums(report):
        console.print(row, highlight=False, soft_wrap=True)
    for warning in report.warnings:
        err_console.print(f"[yellow]warning: {warning}[/]", soft_wrap=True)
    if not report.ok:
        for problem in report.problems:
            err_console.print(f"[red]MISMATCH: {problem}[/]", soft_wrap=True)
        err_console.print("[red]migration did NOT verify[/]")
        raise typer.Exit(1)
    console.print("[green]migration verified: every count and sum matches[/]")


@store_app.command("check")
def store_check(store: StoreOpt = None) -> None:
    """Print ledger totals and check its invariants (exit 1 if one is broken, 2 if unreachable)."""
    from resgov.ledger.migrate import MigrationError, check
    from resgov.ledger.store import StoreError

    url = Settings.from_env(store_url=store).store_url
    try:
        report = asyncio.run(check(url))
    except (MigrationError, StoreError) as exc:
        err_console.print(f"[red]resgov store check: {exc}[/]", soft_wrap=True)
        raise typer.Exit(2) from None
    for line in report.figures:
        console.print(line, highlight=False, soft_wrap=True)
    for warning in report.warnings:
        console.print(f"[yellow]warning: {warning}[/]", soft_wrap=True)
    for error in report.errors:
        console.print(f"[red]BROKEN: {error}[/]", soft_wrap=True)
    if not report.ok:
        raise typer.Exit(1)
    console.print("[green]invariants hold[/]")


def main() -> None:  # pragma: no cover - console entry point alias
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
