#!/usr/bin/env python3
"""Upstream-client micro-benchmark: aiohttp's client vs resgov's UpstreamClient.

    python bench/client_bench.py                    # 3 s per point, unary + stream, concurrency 1 and 32
    python bench/client_bench.py --duration 5 --loop asyncio
    python bench/client_bench.py --clients upstream --modes stream --concurrency 32

Both clients make the very call the proxy makes (POST /v1/chat/completions with a JSON body,
an Authorization header, ``accept-encoding: identity``, a connect timeout and an outer
``asyncio.timeout`` for the first byte), against the simulated provider on loopback
(``python -m resgov.simulator.upstream --chunks 16 --latency-ms 0``). Non-stream reads the
JSON answer; stream reads 16 content chunks + the usage chunk + ``[DONE]`` with ``readany``,
as the proxy's stream loop does.

Pinning (with taskset and 2+ cores): this process (the client under test, on uvloop by
default, as ResGov runs) on core 0, the simulator on core 1. Each point is a closed loop of
N workers for ``--duration`` seconds after a ``--warmup``; figures: requests/s, CPU µs per
request (this process's CPU time, every thread, divided by the requests: 1e6 / it is what
one core could do), p50/p99 latency, the simulator's CPU share, and the CPU used meanwhile by
other processes on this shared machine (as bench/run.py reports it: above ~0.15 core the
point was disturbed; each point first waits up to ``--quiet-wait`` s for quiet). When the
client needs less CPU than the simulator, the simulator caps req/s (its core reaches 100 %)
and CPU µs/req is the figure to compare.

Results: printed, and written to bench/results/client.md and client.json. Everything listens
on 127.0.0.1; the simulator this script starts is stopped by its pid.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from resgov.providers.http_client import UpstreamClient

sys.path.insert(0, str(Path(__file__).resolve().parent))
# bench/run.py, a sibling script: the same noise measure as the main benchmark.
from run import NOISE_THRESHOLD, Foreign, proc_cpu_seconds

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
BODIES = {
    "unary": b'{"model":"sim/gpt-bench","messages":[{"role":"user","content":"Say hello to the benchmark."}],'
    b'"max_tokens":64}',
    "stream": b'{"model":"sim/gpt-bench","messages":[{"role":"user","content":"Say hello to the benchmark."}],'
    b'"max_tokens":64,"stream":true,"stream_options":{"include_usage":true}}',
}
#: What the proxy sends upstream (proxy.py ``_upstream``), minus the client's own headers.
HEADERS = {
    "content-type": "application/json",
    "accept-encoding": "identity",
    "authorization": "Bearer sk-bench-0123456789",
}
CONNECT_TIMEOUT = 10.0
FIRST_BYTE_TIMEOUT = 30.0


def log(message: str) -> None:
    print(f"[client-bench] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------------ simulator


@contextlib.contextmanager
def simulator(chunks: int, cpu: int | None) -> Iterator[tuple[str, int]]:
    """Start the simulator (pinned to ``cpu``), yield its base URL and pid, stop it by pid."""
    port = free_port()
    cmd = [sys.executable, "-m", "resgov.simulator.upstream", "--host", "127.0.0.1", "--port", str(port),
           "--chunks", str(chunks), "--latency-ms", "0"]  # fmt: skip
    if cpu is not None:
        cmd = ["taskset", "-c", str(cpu), *cmd]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                raise SystemExit(f"simulator exited: {err}")
            if time.monotonic() > deadline:
                raise SystemExit("simulator did not start within 20 s")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}", proc.pid
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


# -------------------------------------------------------------------------- clients

Call = Callable[[], Awaitable[int]]


class AiohttpClient:
    """aiohttp exactly as runtime.py configures it and proxy.py calls it."""

    name = "aiohttp"

    def __init__(self, url: str, body: bytes, stream: bool) -> None:
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30, ttl_dns_cache=300)
        self.session = aiohttp.ClientSession(
            connector=connector, auto_decompress=True, skip_auto_headers=("User-Agent",)
        )
        self.url, self.body, self.stream = url, body, stream
        self.timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=CONNECT_TIMEOUT, connect=CONNECT_TIMEOUT
        )

    async def call(self) -> int:
        async with asyncio.timeout(FIRST_BYTE_TIMEOUT):
            resp = await self.session.post(
                self.url, data=self.body, headers=HEADERS, timeout=self.timeout, allow_redirects=False
            )
        if not self.stream:
            body = await resp.read()
            return len(body) if resp.status == 200 else -1
        size = 0
        try:
            while chunk := await resp.content.readany():
                size += len(chunk)
        finally:
            resp.close()
        return size if resp.status == 200 else -1

    async def close(self) -> None:
        await self.session.close()


class OurClient:
    """resgov.providers.http_client.UpstreamClient, called the way the proxy would."""

    name = "UpstreamClient"

    def __init__(self, url: str, body: bytes, stream: bool) -> None:
        self.client = UpstreamClient()
        self.url, self.body, self.stream = url, body, stream

    async def call(self) -> int:
        async with asyncio.timeout(FIRST_BYTE_TIMEOUT):
            resp = await self.client.request(
                "POST", self.url, HEADERS, self.body, connect_timeout=CONNECT_TIMEOUT
            )
        if not self.stream:
            body = await resp.read()
            return len(body) if resp.status == 200 else -1
        size = 0
        try:
            while chunk := await resp.readany():
                size += len(chunk)
        finally:
            resp.close()
        return size if resp.status == 200 else -1

    async def close(self) -> None:
        await self.client.close()


CLIENTS: dict[str, type[AiohttpClient] | type[OurClient]] = {"aiohttp": AiohttpClient, "upstream": OurClient}


# ---------------------------------------------------------------------------- measure


@dataclass
class Point:
    client: str
    mode: str
    concurrency: int
    requests: int
    errors: int
    seconds: float
    rps: float
    cpu_us_per_req: float
    cpu_share: float
    p50_ms: float
    p99_ms: float
    sim_cpu_share: float = 0.0
    other_load: float = 0.0


async def closed_loop(call: Call, concurrency: int, seconds: float) -> tuple[int, int, list[float]]:
    """N workers, each sending its next call when the last one finished, for ``seconds``."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    latencies: list[float] = []
    errors = 0

    async def worker() -> None:
        nonlocal errors
        while loop.time() < end:
            t0 = time.perf_counter()
            try:
                ok = await call() >= 0
            except Exception:
                ok = False
            latencies.append(time.perf_counter() - t0)
            errors += not ok

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return len(latencies), errors, latencies


async def measure(kind: str, url: str, mode: str, concurrency: int, warmup: float, seconds: float) -> Point:
    client = CLIENTS[kind](url + "/v1/chat/completions", BODIES[mode], mode == "stream")
    try:
        await closed_loop(client.call, concurrency, warmup)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        n, errors, lat = await closed_loop(client.call, concurrency, seconds)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    finally:
        await client.close()
    lat.sort()
    return Point(
        client=client.name,
        mode=mode,
        concurrency=concurrency,
        requests=n,
        errors=errors,
        seconds=round(wall, 3),
        rps=n / wall,
        cpu_us_per_req=cpu / n * 1e6 if n else 0.0,
        cpu_share=cpu / wall,
        p50_ms=statistics.median(lat) * 1e3 if lat else 0.0,
        p99_ms=lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3 if lat else 0.0,
    )


def run_point(loop_kind: str, *args: Any) -> Point:
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if loop_kind == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(measure(*args))


# ---------------------------------------------------------------------------- report


def wait_for_quiet(limit: float) -> None:
    """Wait (at most ``limit`` seconds) until other processes use under NOISE_THRESHOLD of a core."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        probe = Foreign()
        time.sleep(0.5)
        if probe.cores() < NOISE_THRESHOLD:
            return
    log(f"the machine did not quieten within {limit:g} s; measuring anyway (see 'other load')")


def table(points: list[Point]) -> str:
    rows = [
        "| mode | conc. | client | req/s | CPU µs/req | client CPU | simulator CPU | p50 (ms) | p99 (ms) "
        "| errors | other load (cores) |",
        "|---|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for p in points:
        mode = "non-stream" if p.mode == "unary" else "stream (16 chunks + usage)"
        rows.append(
            f"| {mode} | {p.concurrency} | {p.client} | {p.rps:,.0f} | {p.cpu_us_per_req:,.1f} | "
            f"{p.cpu_share:.0%} | {p.sim_cpu_share:.0%} | {p.p50_ms:.3f} | {p.p99_ms:.3f} | {p.errors} | "
            f"{p.other_load:.2f} |"
        )
    return "\n".join(rows)


def comparison(points: list[Point]) -> str:
    lines = [
        "| mode | conc. | CPU µs/req aiohttp → UpstreamClient | saved | req/s ratio |",
        "|---|--:|--:|--:|--:|",
    ]
    by = {(p.client, p.mode, p.concurrency): p for p in points}
    for (client, mode, conc), ours in by.items():
        theirs = by.get(("aiohttp", mode, conc))
        if client != "UpstreamClient" or theirs is None or not ours.cpu_us_per_req:
            continue
        lines.append(
            f"| {mode} | {conc} | {theirs.cpu_us_per_req:,.1f} → {ours.cpu_us_per_req:,.1f} | "
            f"{theirs.cpu_us_per_req - ours.cpu_us_per_req:,.1f} µs "
            f"({1 - ours.cpu_us_per_req / theirs.cpu_us_per_req:.0%}) | {ours.rps / theirs.rps:.2f}× |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds measured per point")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before each point")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--modes", nargs="+", choices=sorted(BODIES), default=["unary", "stream"])
    parser.add_argument("--clients", nargs="+", choices=sorted(CLIENTS), default=["aiohttp", "upstream"])
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument("--client-cpu", type=int, default=0)
    parser.add_argument("--sim-cpu", type=int, default=1)
    parser.add_argument("--quiet-wait", type=float, default=20.0,
                        help="seconds to wait at most, before each point, for other load to drop")  # fmt: skip
    parser.add_argument("--no-write", action="store_true", help="print only, do not write bench/results/")
    args = parser.parse_args(argv)
    if not 0 < args.duration <= 60 or not 0 <= args.warmup <= 30:
        parser.error("--duration must be in (0, 60] and --warmup in [0, 30]")

    pinned = (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None
    if pinned:
        os.sched_setaffinity(0, {args.client_cpu})
    pinning = (
        f"client on core {args.client_cpu}, simulator on core {args.sim_cpu} (taskset)"
        if pinned
        else "not pinned (fewer than 2 cores or no taskset)"
    )
    points: list[Point] = []
    with simulator(args.chunks, args.sim_cpu if pinned else None) as (url, sim_pid):
        for mode in args.modes:
            for conc in args.concurrency:
                for kind in args.clients:
                    wait_for_quiet(args.quiet_wait)
                    foreign, sim0, t0 = Foreign(), proc_cpu_seconds(sim_pid), time.monotonic()
                    point = run_point(args.loop, kind, url, mode, conc, args.warmup, args.duration)
                    # Over warm-up + measurement: the simulator's share and the machine's noise.
                    point.sim_cpu_share = (proc_cpu_seconds(sim_pid) - sim0) / (time.monotonic() - t0)
                    point.other_load = foreign.cores()
                    log(
                        f"{point.client:>14} {mode:>6} c={conc:<3} {point.rps:>9,.0f} req/s "
                        f"{point.cpu_us_per_req:>7.1f} µs/req  p50 {point.p50_ms:.3f} ms  errors {point.errors}  "
                        f"other load {point.other_load:.2f}"
                    )
                    points.append(point)

    header = (
        f"# Upstream client benchmark\n\nRun {datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC; "
        f"{args.duration:g} s per point after {args.warmup:g} s warm-up; closed loop; event loop: {args.loop}.\n"
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"aiohttp {aiohttp.__version__}. Pinning: {pinning}.\n"
        f"Upstream: resgov.simulator.upstream, 0 ms latency, {args.chunks} content chunks.\n"
        "'CPU µs/req' = this process's CPU time (all threads) / requests; 'client CPU' = CPU seconds per "
        "second (100 % = the client's whole core; below it, the simulator's core is the limit); 'other load' = "
        "CPU used meanwhile by processes outside the benchmark: above ~0.15 the point was disturbed.\n"
    )
    report = f"{header}\n{table(points)}\n\n{comparison(points)}\n"
    print(report)
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "client.md").write_text(report)
        meta = {"loop": args.loop, "duration": args.duration, "pinning": pinning, "chunks": args.chunks}
        (RESULTS / "client.json").write_text(
            json.dumps({"meta": meta, "points": [asdict(p) for p in points]}, indent=2)
        )
        log(f"written {RESULTS / 'client.md'} and client.json")
    return 0 if all(p.errors == 0 for p in points) else 1


if __name__ == "__main__":
    raise SystemExit(main())
