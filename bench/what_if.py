#!/usr/bin/env python3
"""What-if experiments: ResGov with one runtime patch applied, against ResGov as it is.

    python bench/what_if.py --patch uuid --patch uvicorn-lean --rounds 2 --duration 4

Each patch is applied in the server process before ``resgov serve`` starts (monkeypatching a
library or a setting, never editing ResGov's source), to estimate what a suggested change would
buy before anyone makes it. Baseline and patched servers alternate for ``--rounds`` rounds at
concurrency ``--concurrency`` (non-stream), with the same pinning as run.py; the figure that
matters is CPU µs per request (robust to other load), req/s is printed beside it.

Patches:

* ``uuid``: ``uuid.uuid4`` without ``os.urandom`` (a syscall that releases the GIL, i.e. a
  GIL hand-off to another thread on the same core, on every request);
* ``uvicorn-lean``: uvicorn without ``ProxyHeadersMiddleware``, the ``server`` and ``date``
  headers (``proxy_headers=False, server_header=False, date_header=False``);
* ``gc``: ``gc.freeze()`` after imports and a higher gen-0 threshold (fewer collections of
  the long-lived startup objects).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as bench

PATCHES: dict[str, str] = {
    "uuid": (
        "import random, uuid\n"
        "_rng = random.Random()\n"
        "uuid.uuid4 = lambda: uuid.UUID(int=_rng.getrandbits(128), version=4)\n"
    ),
    "uvicorn-lean": (
        "import functools, uvicorn\n"
        "uvicorn.run = functools.partial(uvicorn.run, proxy_headers=False, server_header=False, date_header=False)\n"
    ),
    "gc": "import gc\ngc.set_threshold(20_000, 50, 50)\n",
}
SERVE = (
    "import sys\n"
    "from resgov.cli import app\n"
    "{freeze}"
    "sys.argv = ['resgov', 'serve', '--config', {config!r}, '--host', '127.0.0.1', '--port', '{port}',"
    " '--log-level', 'warning']\n"
    "app()\n"
)


def start(ctx: bench.Context, sim_port: int, patches: list[str], tag: str) -> bench.Gateway:
    policy = ctx.tmp / "bench.rgf"
    policy.write_text(
        bench.POLICY.read_text().replace("http://127.0.0.1:9000/v1", f"http://127.0.0.1:{sim_port}/v1")
    )
    port = bench.free_port()
    admin = "whatif-" + os.urandom(20).hex()
    db = ctx.tmp / f"{tag}.db"
    env = {**os.environ, "RESGOV_STORE": f"sqlite:///{db}", "RESGOV_ADMIN_TOKEN": admin}
    code = "".join(PATCHES[p] for p in patches)
    freeze = "import gc\ngc.freeze()\n" if "gc" in patches else ""
    code += SERVE.format(config=str(policy), port=port, freeze=freeze)
    proc = ctx.start(tag, [sys.executable, "-c", code], ctx.pin.proxy_cpu, env)
    url = f"http://127.0.0.1:{port}"
    bench.wait_until(lambda: bench.http_ok(url + "/health"), proc, 30, tag)
    key = bench.http_json("POST", url + "/api/v1/admin/generate-key", {"org_id": "bench", "name": "bench"},
                          {"X-Admin-Token": admin})["api_key"]  # fmt: skip
    return bench.Gateway(tag, url, key, proc)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--patch", action="append", choices=sorted(PATCHES), required=True)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--mode", default="unary", choices=bench.MODES)
    parser.add_argument("--quiet-wait", type=float, default=10.0)
    args = parser.parse_args()
    ns = argparse.Namespace(proxy_cpu=0, load_cpu=1, duration=args.duration, warmup=1.0, quiet_wait=args.quiet_wait,
                            retries=1, keep=False)  # fmt: skip
    results: dict[str, list[bench.Measure]] = {"baseline": [], "+".join(args.patch): []}
    with bench.bench_context(ns) as ctx:
        sim_port = bench.free_port()
        bench.start_simulator(ctx, sim_port, 16)
        ctx.sim_url = f"http://127.0.0.1:{sim_port}"
        for rnd in range(args.rounds):
            for name, patches in (("baseline", []), ("+".join(args.patch), args.patch)):
                gw = start(ctx, sim_port, patches, f"{name}-{rnd}")
                bench.run_wrk(gw.url, args.mode, args.concurrency, 1.0, gw.key, ctx.pin, name)  # warm-up
                m = bench.measure(ctx, gw.url, args.mode, args.concurrency, gw.key, name, gw.proc)
                assert gw.proc is not None
                gw.proc.stop()
                results[name].append(m)
                bench.log(f"{name:>24} round {rnd}: {m.rps:7,.0f} req/s, CPU {m.cpu_main_us or 0:.0f} + "
                          f"{m.cpu_other_us or 0:.0f} µs/req, other load {m.foreign_cores or 0:.2f}")  # fmt: skip
    print("| variant | req/s (median) | CPU µs/req loop + threads (median) | runs |\n|---|--:|--:|--:|")
    for name, ms in results.items():
        rps = statistics.median(m.rps for m in ms)
        main_us = statistics.median(m.cpu_main_us or 0 for m in ms)
        other_us = statistics.median(m.cpu_other_us or 0 for m in ms)
        print(f"| {name} | {rps:,.0f} | {main_us:.0f} + {other_us:.0f} | {len(ms)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
