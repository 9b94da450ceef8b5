#!/usr/bin/env python3
"""The proxied call without an HTTP server in front: ResGov's own CPU per call, part by part.

    python bench/path_bench.py                          # non-stream, concurrency 32, 5 rounds
    python bench/path_bench.py --mode stream --rounds 3 --variants full,no-ledger

``run.py`` measures ResGov as deployed, behind uvicorn and driven by wrk; on this shared VM
its calls/s move by ±10 % from one run to the next, more than most single changes are worth.
Here the ASGI application ResGov builds (``create_app``) is called directly by N coroutines in
one process pinned to the gateway core: no uvicorn, no wrk, only the simulator on the load
core. What is left is ResGov's own cost per call: auth, policy, pricing, the ledger, metrics,
the upstream client, and the asyncio work between them. Each variant takes away one part:

* ``full``: the application as ``resgov serve`` builds it (SQLite ledger in a temp dir,
  fsync'd reservations, metrics and alert checks, ``bench/bench.rgf``);
* ``no-metrics``: without the metrics and alerts around the ledger (``ObservedStore``) and
  without the per-call metrics;
* ``no-ledger``: ``no-metrics`` with ``reserve`` and ``settle`` answering at once, as if the
  ledger cost nothing;
* ``client``: ResGov's upstream client alone, sending the same request and reading the answer.

Variants run in fresh processes, alternating, ``--rounds`` times each; the figure is the
median CPU time per call (the process's, all its threads). Differences between variants are
what each part costs. Every call must answer 200, or the run fails.

``--instructions`` counts instead of timing: each variant runs once under valgrind's
callgrind, which counts the CPU instructions the process executes (all threads, user space;
the kernel's share of a syscall is not counted) during ``--calls`` calls after a warm-up.
The count does not depend on the machine's load, so two versions of the code compare to
about 1 % in one run each, where CPU time needs many alternating runs on this VM.

``--src DIR`` (here and in ``run.py``) runs another copy of ResGov's source instead of the
installed one, e.g. the mypyc-compiled copy ``compile_hot_path.py`` builds; the run stops if
``resgov.server.proxy`` does not load from there (as a compiled module, when the copy has one).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as bench

VARIANTS = ("full", "no-metrics", "no-ledger", "client")
BODIES = {
    "unary": b'{"model":"sim/gpt-bench","messages":[{"role":"user","content":"Say hello to the benchmark."}],'
    b'"max_tokens":64}',
    "stream": b'{"model":"sim/gpt-bench","messages":[{"role":"user","content":"Say hello to the benchmark."}],'
    b'"max_tokens":64,"stream":true,"stream_options":{"include_usage":true}}',
}
ADMIN = "path-bench-" + "0" * 32


async def _app_call(variant: str, sim_url: str, tmp: Path) -> tuple[Callable[[], Awaitable[int]], Any]:
    """One proxied call through the application, returning its HTTP status."""
    import httpx

    from resgov.cli import _load
    from resgov.config.settings import Settings
    from resgov.core.budget import LineState
    from resgov.ledger import store_from_url
    from resgov.ledger.store import ReserveOutcome, ReserveRequest, SettleOutcome, SettleRequest
    from resgov.server.app import create_app

    policy_path = tmp / "bench.rgf"
    policy_path.write_text(bench.POLICY.read_text().replace("http://127.0.0.1:9000", sim_url))
    settings = Settings.from_env(
        config_path=str(policy_path), store_url=f"sqlite:///{tmp / 'ledger.db'}", admin_token=ADMIN
    )
    app = create_app(settings, store_from_url(settings.store_url), _load(str(policy_path)))
    rt = app.runtime
    await rt.start()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bench") as admin:
        answer = await admin.post(
            "/api/v1/admin/generate-key",
            json={"org_id": "bench", "name": "bench"},
            headers={"X-Admin-Token": ADMIN},
        )
        key = answer.json()["api_key"]
    if variant in ("no-metrics", "no-ledger"):
        rt.metrics = None
        rt.store = rt.store.inner  # type: ignore[attr-defined]
    if variant == "no-ledger":

        class FreeLedger:
            """The store with reserve and settle answering at once (a wrapper: a compiled
            store's methods cannot be replaced on the instance)."""

            def __init__(self, inner: Any) -> None:
                self.inner = inner

            def __getattr__(self, attr: str) -> Any:
                return getattr(self.inner, attr)

            async def reserve(self, req: ReserveRequest) -> ReserveOutcome:
                return ReserveOutcome(
                    ok=True, states={line.key: LineState(0, req.amount) for line in req.lines}
                )

            async def settle(self, req: SettleRequest) -> SettleOutcome:
                return SettleOutcome(settled=True, charged=req.amount, reserved=req.amount)

        rt.store = FreeLedger(rt.store)
    body = BODIES[os.environ["PATH_BENCH_MODE"]]
    headers = [
        (b"host", b"bench"),
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"authorization", f"Bearer {key}".encode()),
        (b"x-resgov-agent-id", b"bench"),
    ]
    never = asyncio.Event()  # the client never disconnects

    async def call() -> int:
        first = True
        status = 0

        async def receive() -> dict[str, Any]:
            nonlocal first
            if first:
                first = False
                return {"type": "http.request", "body": body, "more_body": False}
            await never.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]

        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
            "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
            "query_string": b"", "root_path": "", "headers": headers,
            "server": ("127.0.0.1", 8080), "client": ("127.0.0.1", 50000),
        }  # fmt: skip
        await app(scope, receive, send)
        return status

    return call, rt


async def _client_call(sim_url: str) -> tuple[Callable[[], Awaitable[int]], Any]:
    """The same request through ResGov's upstream client alone."""
    from resgov.providers.http_client import UpstreamClient

    client = UpstreamClient(max_idle_per_host=256, keepalive_timeout=30.0)
    body = BODIES[os.environ["PATH_BENCH_MODE"]].replace(b"sim/gpt-bench", b"gpt-bench")
    url = f"{sim_url}/v1/chat/completions"

    async def call() -> int:
        resp = await client.request(
            "POST", url, {"content-type": "application/json"}, body, connect_timeout=5.0, head_timeout=5.0
        )
        resp.set_timeouts(total=5.0)
        try:
            await resp.read(1 << 24)
        finally:
            resp.release()
        return resp.status

    return call, client


async def _counted(call: Callable[[], Awaitable[int]], concurrency: int, count: int) -> tuple[float, float]:
    """Exactly ``count`` calls from ``concurrency`` coroutines, with callgrind counting only them."""
    left = count

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            if await call() != 200:
                raise SystemExit("path_bench: a call failed under callgrind")

    # Blocking on purpose: nothing of the load may run while counting is switched.
    bench.callgrind_switch(os.getpid(), True)
    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    bench.callgrind_switch(os.getpid(), False)
    return cpu, wall


async def _child(
    variant: str, sim_url: str, concurrency: int, seconds: float, count: int = 0
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="resgov-path-bench-") as tmp:
        if variant == "client":
            call, owner = await _client_call(sim_url)
        else:
            call, owner = await _app_call(variant, sim_url, Path(tmp))
        calls = failed = 0

        async def worker(until: float) -> None:
            nonlocal calls, failed
            while time.perf_counter() < until:
                if await call() != 200:
                    failed += 1
                calls += 1

        async def load(seconds: float) -> tuple[float, float]:
            until = time.perf_counter() + seconds
            cpu, wall = time.process_time(), time.perf_counter()
            await asyncio.gather(*(worker(until) for _ in range(concurrency)))
            return time.process_time() - cpu, time.perf_counter() - wall

        await load(1.0)  # warm-up: connections, caches, the ledger's first pages
        gc.collect()
        gc.freeze()  # as `resgov serve` does after start-up
        calls = failed = 0
        if count:
            cpu, wall = await _counted(call, concurrency, count)
            calls = count
        else:
            cpu, wall = await load(seconds)
        if variant == "client":
            await owner.close()
        else:
            await owner.stop()
    return {
        "variant": variant,
        "calls": calls,
        "failed": failed,
        "cpu_us": cpu / calls * 1e6,
        "rps": calls / wall,
    }


def _instructions(args: argparse.Namespace, variants: list[str], ctx: Any, sim_url: str) -> int:
    """One callgrind run per variant: CPU instructions per call, and the raw output for callgrind_annotate."""
    rows = []
    bench.RESULTS.mkdir(parents=True, exist_ok=True)
    for variant in variants:
        out_file = bench.RESULTS / f"callgrind-path-{args.mode}-{variant}.out"
        cmd = [*ctx.pin.prefix(ctx.pin.proxy_cpu), *bench.callgrind_command(out_file), sys.executable, __file__,
               "--child", variant, "--sim-url", sim_url, "--mode", args.mode, "--concurrency", str(args.concurrency),
               "--count", str(args.calls)]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        total = bench.callgrind_count(out.stderr)
        if out.returncode != 0 or total is None:
            sys.stderr.write(out.stdout + out.stderr)
            raise SystemExit(f"path_bench: variant {variant} failed under callgrind (exit {out.returncode})")
        per_call = total / args.calls
        rows.append((variant, per_call))
        bench.log(f"{variant:>10}: {per_call:,.0f} instructions per call ({out_file.name})")
    print(
        f"\n{args.mode}, concurrency {args.concurrency}, {args.calls} calls per variant under callgrind; "
        f"code: commit {bench.code_version(args.src)}\n"
    )
    print("| variant | instructions per call | vs full |\n|---|--:|--:|")
    full = dict(rows).get("full")
    for variant, per_call in rows:
        ratio = f"{per_call / full:.2f}" if full else "-"
        print(f"| {variant} | {per_call:,.0f} | {ratio} |")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mode", choices=sorted(BODIES), default="unary")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument(
        "--seconds", type=float, default=2.0, help="measured seconds per run (after 1 s of warm-up)"
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--proxy-cpu", type=int, default=0)
    parser.add_argument("--load-cpu", type=int, default=1)
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="count CPU instructions per call under valgrind's callgrind (one run per variant)",
    )
    parser.add_argument(
        "--calls", type=int, default=1000, help="calls counted per variant with --instructions"
    )
    parser.add_argument("--src", type=Path, help="run this copy of ResGov's src/ (see compile_hot_path.py)")
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--sim-url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ["PATH_BENCH_MODE"] = args.mode
    if args.src is not None:
        args.src = bench.use_src(args.src)
    if args.child:
        import uvloop

        uvloop.install()
        result = asyncio.run(_child(args.child, args.sim_url, args.concurrency, args.seconds, args.count))
        print("PATH_BENCH " + json.dumps(result))
        return 0
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants: {', '.join(sorted(unknown))} (choose from {', '.join(VARIANTS)})")
    ns = argparse.Namespace(proxy_cpu=args.proxy_cpu, load_cpu=args.load_cpu, duration=args.seconds, warmup=1.0,
                            quiet_wait=0.0, retries=1, keep=False)  # fmt: skip
    results: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    if args.instructions and not shutil.which("valgrind"):
        raise SystemExit("path_bench: --instructions needs valgrind (bench/install.sh installs it)")
    with bench.bench_context(ns) as ctx:
        sim_port = bench.free_port()
        bench.start_simulator(ctx, sim_port, 16)
        sim_url = f"http://127.0.0.1:{sim_port}"
        if args.instructions:
            return _instructions(args, variants, ctx, sim_url)
        for rnd in range(args.rounds):
            for variant in variants:
                cmd = [*ctx.pin.prefix(ctx.pin.proxy_cpu), sys.executable, __file__, "--child", variant,
                       "--sim-url", sim_url, "--mode", args.mode, "--concurrency", str(args.concurrency),
                       "--seconds", str(args.seconds)]  # fmt: skip
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=120 + args.seconds)
                line = next((x for x in out.stdout.splitlines() if x.startswith("PATH_BENCH ")), None)
                if out.returncode != 0 or line is None:
                    sys.stderr.write(out.stdout + out.stderr)
                    raise SystemExit(f"path_bench: variant {variant} failed (exit {out.returncode})")
                result = json.loads(line.removeprefix("PATH_BENCH "))
                if result["failed"]:
                    raise SystemExit(
                        f"path_bench: {result['failed']} of {result['calls']} {variant} calls failed"
                    )
                results[variant].append(result)
                bench.log(
                    f"round {rnd} {variant:>10}: {result['rps']:8,.0f} calls/s, CPU {result['cpu_us']:6.1f} µs/call"
                )
    pinning = (
        f"this process on core {ctx.pin.proxy_cpu}, the simulator on core {ctx.pin.load_cpu}"
        if ctx.pin.proxy_cpu is not None
        else "not pinned"
    )
    print(
        f"\n{args.mode}, concurrency {args.concurrency}, {args.rounds} rounds of {args.seconds:g} s; {pinning}; "
        f"code: commit {bench.code_version(args.src)}\n"
    )
    print("| variant | CPU µs per call (median) | all runs | calls/s (median) |\n|---|--:|---|--:|")
    for variant, runs in results.items():
        cpu = sorted(r["cpu_us"] for r in runs)
        rps = statistics.median(r["rps"] for r in runs)
        print(
            f"| {variant} | {statistics.median(cpu):.1f} | {', '.join(f'{c:.0f}' for c in cpu)} | {rps:,.0f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
