#!/usr/bin/env python3
"""Store micro-benchmark: reserve + settle pairs per second, straight on the Store API.

    python bench/store_bench.py                      # SQLite and Redis, 64 coroutines, 5 s each
    python bench/store_bench.py --backends sqlite --duration 3 --concurrency 32
    python bench/store_bench.py --redis-url redis://127.0.0.1:6379/15   # an existing server

One operation is what the proxy does per call: a durable ``reserve`` on the agent's and the
org's daily lines (with its audit entry), then a ``settle`` with the actual cost. All workers
hit the same two lines by default (the hottest case; ``--agents N`` spreads them).

* SQLite: a temp file, the store's own settings (WAL, group commit, an fsync of the WAL for
  every batch holding a reservation).
* Redis: unless ``--redis-url`` is given, the benchmark starts its own ``redis-server`` on a
  free port, once with ``appendonly yes`` + ``appendfsync everysec`` and once with
  ``appendfsync always``, so the durability being measured is known. It is skipped with a
  message when ``resgov.ledger.redis`` does not import or ``redis-server`` is missing.

The benchmark process is pinned to core 0 and redis-server to core 1 (taskset), as in run.py.
Results: printed, and written to bench/results/store.md and store.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from resgov.core.budget import BudgetLine, lines_for
from resgov.ledger import store_from_url
from resgov.ledger.store import AuditEntry, ReserveRequest, SettleRequest, Store

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_SQLITE = 10_000
TARGET_REDIS = 20_000
ORG = "bench"
RESERVE_NANO = 421_000
CHARGE_NANO = 65_000


@dataclass
class StoreResult:
    backend: str
    durability: str
    concurrency: int
    seconds: float
    ops: int
    ops_per_s: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    errors: int
    open_reservations: int | None = None
    reserved_left: int | None = None
    avg_batch: float | None = None
    note: str = ""


def log(message: str) -> None:
    print(f"[store-bench] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def budget_lines(agents: int) -> list[list[BudgetLine]]:
    limit = 10**18  # never refuses: the benchmark measures the ledger, not refusals
    now = datetime.now(UTC)
    return [
        lines_for(ORG, f"agent{i}", {"daily": limit}, {"daily": limit}, now, ZoneInfo("UTC"))
        for i in range(agents)
    ]


async def drive(
    store: Store, concurrency: int, seconds: float, warmup: float, agents: int
) -> tuple[int, float, list[float], int]:
    """``concurrency`` workers doing reserve+settle; (ops, measured seconds, latencies, errors)."""
    lines = budget_lines(agents)
    ids = itertools.count()
    latencies: list[float] = []
    errors = 0
    measuring = False
    ops = 0

    async def worker(n: int) -> None:
        nonlocal errors, ops
        my_lines = lines[n % agents]
        agent = my_lines[0].agent or "agent0"
        while not stop.is_set():
            rid = f"sb_{next(ids)}"
            audit = AuditEntry(request_id=rid, org=ORG, agent=agent, route="/v1/chat/completions",
                               model="sim/gpt-bench", provider="sim", started_at=time.time())  # fmt: skip
            t0 = time.perf_counter()
            try:
                outcome = await store.reserve(
                    ReserveRequest(rid, ORG, agent, RESERVE_NANO, my_lines, 300.0, audit)
                )
                if not outcome.ok:
                    raise RuntimeError("reservation refused")
                await store.settle(SettleRequest(rid, "actual", CHARGE_NANO, "completed", http_status=200,
                                                 input_tokens=7, output_tokens=16))  # fmt: skip
            except Exception as exc:
                errors += 1
                if errors <= 3:
                    log(f"error: {type(exc).__name__}: {exc}")
                await asyncio.sleep(0.01)
                continue
            if measuring:
                ops += 1
                latencies.append(time.perf_counter() - t0)

    stop = asyncio.Event()
    tasks = [asyncio.create_task(worker(i)) for i in range(concurrency)]
    await asyncio.sleep(warmup)
    measuring = True
    started = time.perf_counter()
    await asyncio.sleep(seconds)
    measuring = False
    elapsed = time.perf_counter() - started
    stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
    return ops, elapsed, latencies, errors


def pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] * 1000


async def bench_store(url: str, backend: str, durability: str, args: argparse.Namespace) -> StoreResult:
    store = store_from_url(url)
    await store.open()
    try:
        ops, elapsed, lat, errors = await drive(
            store, args.concurrency, args.duration, args.warmup, args.agents
        )
        totals = await store.totals()
        batches = getattr(store, "batches", None)
        batched = getattr(store, "batched_ops", None)
    finally:
        await store.close()
    return StoreResult(
        backend=backend, durability=durability, concurrency=args.concurrency, seconds=args.duration, ops=ops,
        ops_per_s=ops / elapsed, p50_ms=pct(lat, 50), p99_ms=pct(lat, 99), max_ms=max(lat, default=0) * 1000,
        errors=errors, open_reservations=totals.open_reservations, reserved_left=totals.reserved_total,
        avg_batch=(batched / batches) if batches and batched else None,
    )  # fmt: skip


@contextlib.contextmanager
def redis_server(appendfsync: str, cpu: int | None) -> Iterator[str]:
    """Our own redis-server with a known persistence setting, on a free port, in a temp dir."""
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="resgov-redis-bench-")
    pin = ["taskset", "-c", str(cpu)] if cpu is not None else []
    cmd = [*pin, "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", workdir, "--save", "",
           "--appendonly", "yes", "--appendfsync", appendfsync, "--protected-mode", "yes", "--daemonize", "no",
           "--logfile", os.path.join(workdir, "redis.log")]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start (see {workdir}/redis.log)")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


async def redis_durability(url: str) -> str:
    import redis.asyncio as aioredis

    client = aioredis.from_url(url)
    try:
        aof = (await client.config_get("appendonly")).get("appendonly")
        fsync = (await client.config_get("appendfsync")).get("appendfsync")
    finally:
        await client.aclose()
    return f"appendonly {aof}, appendfsync {fsync}"


def run_async(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def table(results: list[StoreResult]) -> str:
    out = [
        "| backend | durability | coroutines | reserve+settle / s | p50 (ms) | p99 (ms) | max (ms) | errors "
        "| avg batch | left open | target |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for r in results:
        target = TARGET_SQLITE if r.backend == "sqlite" else TARGET_REDIS
        mark = "met" if r.ops_per_s >= target and r.errors == 0 else "MISSED"
        batch = f"{r.avg_batch:.1f}" if r.avg_batch else "-"
        out.append(
            f"| {r.backend} | {r.durability} | {r.concurrency} | {r.ops_per_s:,.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} "
            f"| {r.max_ms:.1f} | {r.errors} | {batch} | {r.open_reservations} | ≥ {target:,}: {mark} |"
        )
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per store (default 5)")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--concurrency", type=int, default=64, help="concurrent coroutines (default 64)")
    parser.add_argument("--agents", type=int, default=1, help="spread the workers over this many agents")
    parser.add_argument("--backends", default="sqlite,redis")
    parser.add_argument("--redis-url", default=None, help="use this Redis instead of starting our own")
    parser.add_argument(
        "--cpu", type=int, default=0, help="core for this process (redis-server: the other one)"
    )
    args = parser.parse_args(argv)
    pinned = (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None
    if pinned:
        os.sched_setaffinity(0, {args.cpu})
    other_cpu = (1 - args.cpu if args.cpu in (0, 1) else 0) if pinned else None
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    results: list[StoreResult] = []
    skipped: list[str] = []
    if "sqlite" in backends:
        tmp = tempfile.mkdtemp(prefix="resgov-store-bench-")
        try:
            log(f"sqlite: {args.concurrency} coroutines, {args.duration:g} s")
            results.append(run_async(bench_store(f"sqlite:///{tmp}/store.db", "sqlite",
                                                 "WAL, group commit, fsync per reserving batch", args)))  # fmt: skip
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if "redis" in backends:
        try:
            import resgov.ledger.redis  # noqa: F401 - only checking that the backend exists
        except ImportError as exc:
            skipped.append(f"redis: resgov.ledger.redis does not import ({exc}); skipped")
        else:
            if args.redis_url:
                durability = run_async(redis_durability(args.redis_url))
                log(f"redis at {args.redis_url} ({durability})")
                results.append(run_async(bench_store(args.redis_url, "redis", durability, args)))
            elif shutil.which("redis-server") is None:
                skipped.append("redis: redis-server is not installed (bench/install.sh); skipped")
            else:
                for fsync in ("everysec", "always"):
                    with redis_server(fsync, other_cpu) as url:
                        durability = run_async(redis_durability(url))
                        log(f"redis (own server, {durability}): {args.concurrency} coroutines")
                        results.append(run_async(bench_store(url, "redis", durability, args)))
    for line in skipped:
        log(line)
    from run import code_version  # here, not at the top: run.py imports this module

    pin_text = (
        f"this process on core {args.cpu}, redis-server on core {other_cpu}" if pinned else "not pinned"
    )
    md = "\n".join([
        "# Store micro-benchmark",
        "",
        f"reserve (durable, 2 budget lines + audit entry) then settle, per second; {args.concurrency} coroutines "
        f"on one event loop, {args.agents} agent(s), {args.duration:g} s after {args.warmup:g} s warm-up; {pin_text}; "
        f"code: commit {code_version()}.",
        "",
        table(results),
        *skipped,
    ])  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "store.md").write_text(md + "\n")
    (RESULTS / "store.json").write_text(json.dumps([asdict(r) for r in results], indent=2))
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
