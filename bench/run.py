#!/usr/bin/env python3
"""ResGov's benchmark: direct-to-upstream versus through ResGov, in one run, with one command.

    python bench/run.py                 # 5 s per point, non-stream and stream, concurrency 1/32/64
    python bench/run.py --quick         # 2 s per point (a smoke run)
    python bench/run.py --ladder        # + the layer ladder (bench/ladder_app.py) at concurrency 1 and 32
    python bench/run.py --profile       # + a py-spy profile of ResGov under concurrency-32 non-stream load
    python bench/run.py --with-litellm  # + LiteLLM's proxy (installed in its own venv) in the same table

Processes are pinned with taskset: ResGov (and every gateway under test) on core 0, the
simulated upstream and wrk on core 1. Every wrk run is bounded by --duration. The results go
to bench/results/latest.md and bench/results/latest.json (git-ignored). See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"
WRK_SCRIPT = BENCH / "wrk" / "chat.lua"
POLICY = BENCH / "bench.rgf"
LADDER_APP = BENCH / "ladder_app.py"
ROUTE = "/v1/chat/completions"
AGENT = "bench"
MODES = ("unary", "stream")
LADDER_ORDER = {name: i for i, name in enumerate(("uvicorn-static", "fastapi-static", "uvicorn-aiohttp",
                                                 "fastapi-aiohttp", "uvicorn-aiohttp-sqlite", "ResGov"))}  # fmt: skip
MODE_LABEL = {"unary": "non-stream", "stream": "stream (16 chunks + usage)"}

#: The issue's targets (ResGov on one core, reservations durable before the upstream call).
TARGET_ADDED_P50_UNARY_MS = 0.5
TARGET_ADDED_P99_UNARY_MS = 1.0
TARGET_ADDED_P50_STREAM_MS = 0.7
TARGET_RPS_UNARY = 8_000
TARGET_RPS_STREAM = 5_000
TARGET_RSS_MB = 80


# ----------------------------------------------------------------------------- processes


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def use_src(src: Path) -> Path:
    """Run ResGov from another copy of its source (e.g. ``compile_hot_path.py``'s) in every process
    started from now on; exits unless the proxied route loads from there, compiled if it was built so."""
    src = src.resolve()
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(src), os.environ.get("PYTHONPATH")]))
    probe = "import resgov.server.proxy as p; print(p.__file__)"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False
    )
    loaded = Path(out.stdout.strip())
    compiled = any((src / "resgov" / "server").glob("proxy.cpython-*.so"))
    if out.returncode != 0 or not loaded.is_relative_to(src) or (compiled and loaded.suffix != ".so"):
        raise SystemExit(
            f"bench: resgov.server.proxy loads from {loaded or out.stderr.strip()}, not from --src {src}"
        )
    log(f"ResGov from {src}" + (" (compiled)" if compiled else ""))
    return src


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@dataclass
class Pinning:
    """Which core runs what; ``None`` when the machine has a single core (no pinning)."""

    proxy_cpu: int | None
    load_cpu: int | None

    def prefix(self, cpu: int | None) -> list[str]:
        return ["taskset", "-c", str(cpu)] if cpu is not None else []

    def describe(self) -> str:
        if self.proxy_cpu is None:
            return "not pinned (fewer than 2 cores or taskset missing)"
        return (
            f"gateway under test on core {self.proxy_cpu}; simulated upstream and wrk on core {self.load_cpu} "
            "(taskset)"
        )


class Proc:
    """A child process we started (ended by its own pid only), with its output in a log file."""

    def __init__(
        self, name: str, cmd: Sequence[str], log_path: Path, env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.popen = subprocess.Popen(
            list(cmd), stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self, grace: float = 15.0) -> None:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self._log.close()


def wait_until(predicate: Any, proc: Proc, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError):
            if predicate():
                return
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited while starting:\n{proc.tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready after {timeout:.0f}s:\n{proc.tail()}")
        time.sleep(0.05)


def port_open(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True


def http_json(method: str, url: str, body: Any = None, headers: dict[str, str] | None = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return bool(resp.status == 200)
    except (OSError, ValueError):
        return False


class RssMonitor:
    """Polls /proc/PID/status while a run lasts: peak VmRSS of the run, VmHWM of the process."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def read(self, field_name: str) -> int:
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
        return 0

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak_kb = max(self.peak_kb, self.read("VmRSS"))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_kb = max(self.peak_kb, self.read("VmRSS"))


def _stat_fields(path: str) -> list[str]:
    """Fields of a /proc stat file after the command name (which may hold spaces)."""
    return Path(path).read_text().rsplit(")", 1)[1].split()


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of a process (0 once it is gone)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        fields = _stat_fields(f"/proc/{pid}/stat")
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return 0.0


def thread_cpu_seconds(pid: int) -> tuple[float, float]:
    """(event-loop thread, all other threads) CPU seconds of a process; the main thread's id is the pid.

    The process total includes threads that have already exited, so "other" = total - main.
    """
    main = 0.0
    with contextlib.suppress(OSError, ValueError, IndexError):
        fields = _stat_fields(f"/proc/{pid}/task/{pid}/stat")
        main = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return main, max(0.0, proc_cpu_seconds(pid) - main)


def _processes() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds) of every user-space process (kernel threads left out)."""
    out: dict[int, tuple[int, float]] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = _stat_fields(f"/proc/{entry}/stat")
            ppid = int(fields[1])
            if ppid == 2 or int(entry) == 2:  # kthreadd's children: work the kernel does for everyone
                continue
            out[int(entry)] = (ppid, (int(fields[11]) + int(fields[12])) / tick)
    return out


class Foreign:
    """CPU used by processes that are not part of the benchmark over an interval, in cores.

    Other work on the machine (a test suite, a build) competes for the pinned cores and makes
    the figures noisy, so every run reports it: the CPU time of every user-space process that
    is neither this script nor one of its descendants (the gateways, the simulator, wrk).
    """

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.start = _processes()

    def cores(self) -> float:
        t1, now = time.monotonic(), _processes()
        me = os.getpid()

        def ours(pid: int) -> bool:
            seen = 0
            while pid > 1 and seen < 64:
                if pid == me:
                    return True
                pid = now.get(pid, self.start.get(pid, (1, 0.0)))[0]
                seen += 1
            return False

        used = sum(cpu - self.start.get(pid, (0, 0.0))[1] for pid, (_pp, cpu) in now.items() if not ours(pid))
        return max(0.0, used) / max(t1 - self.t0, 1e-6)


#: Other load (cores) above which a run counts as disturbed.
NOISE_THRESHOLD = 0.15


def wait_for_quiet(ctx: Context, limit: float, threshold: float = NOISE_THRESHOLD) -> float:
    """Wait (at most ``limit`` seconds) until other processes use under ``threshold`` of a core."""
    deadline = time.monotonic() + limit
    while True:
        probe = Foreign()
        time.sleep(0.5)
        load = probe.cores()
        if load < threshold or time.monotonic() >= deadline:
            return load
        ctx.noisy_waits += 1


# ----------------------------------------------------------------------------------- wrk


@dataclass
class Measure:
    """One wrk run against one target."""

    target: str
    mode: str
    concurrency: int
    requests: int
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    non2xx: int
    socket_errors: int
    #: Peak VmRSS of the gateway during the run, and its CPU use (seconds per second of run).
    peak_rss_mb: float | None = None
    hwm_rss_mb: float | None = None
    cpu_util: float | None = None
    #: CPU per request of the event-loop thread and of the other threads (SQLite writer…), in µs.
    cpu_main_us: float | None = None
    cpu_other_us: float | None = None
    #: Cores' worth of CPU used meanwhile by processes outside the benchmark (noise).
    foreign_cores: float | None = None

    @property
    def errors(self) -> int:
        return self.non2xx + self.socket_errors


def run_wrk(
    url: str, mode: str, concurrency: int, duration: float, key: str, pin: Pinning, target: str
) -> Measure:
    cmd = [
        *pin.prefix(pin.load_cpu), "wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(duration))}s",
        "--timeout", "10s", "-s", str(WRK_SCRIPT), url + ROUTE, "--", mode, key, AGENT,
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60, check=False)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("WRK_JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk gave no result (rc {out.returncode}):\n{out.stdout}\n{out.stderr}")
    r = json.loads(line.removeprefix("WRK_JSON "))
    return Measure(
        target=target, mode=mode, concurrency=concurrency, requests=r["requests"], rps=r["rps"],
        p50_ms=r["p50_us"] / 1000, p90_ms=r["p90_us"] / 1000, p99_ms=r["p99_us"] / 1000,
        max_ms=r["max_us"] / 1000, mean_ms=r["mean_us"] / 1000, non2xx=r["non2xx"],
        socket_errors=r["connect_errors"] + r["read_errors"] + r["write_errors"] + r["timeouts"],
    )  # fmt: skip


def measure(
    ctx: Context, url: str, mode: str, concurrency: int, key: str, target: str, watch: Proc | None
) -> Measure:
    """wrk against ``url``, watching ``watch``'s memory and CPU, and other load on the machine."""
    if ctx.quiet_wait > 0:
        wait_for_quiet(ctx, ctx.quiet_wait)
    noise = Foreign()
    if watch is None:
        m = run_wrk(url, mode, concurrency, ctx.duration, key, ctx.pin, target)
    else:
        with RssMonitor(watch.pid) as mon:
            (main0, other0), t0 = thread_cpu_seconds(watch.pid), time.monotonic()
            m = run_wrk(url, mode, concurrency, ctx.duration, key, ctx.pin, target)
            (main1, other1), t1 = thread_cpu_seconds(watch.pid), time.monotonic()
        m.peak_rss_mb = mon.peak_kb / 1024
        m.hwm_rss_mb = mon.read("VmHWM") / 1024
        m.cpu_util = (main1 + other1 - main0 - other0) / (t1 - t0)
        if m.requests:
            # Per request, over the wrk run (wrk's count misses the few calls cut at its end).
            m.cpu_main_us = max(0.0, main1 - main0) / m.requests * 1e6
            m.cpu_other_us = max(0.0, other1 - other0) / m.requests * 1e6
    m.foreign_cores = noise.cores()
    return m


# ------------------------------------------------------------------------------ gateways


@dataclass
class Gateway:
    """Something under test between wrk and the simulator."""

    name: str
    url: str
    key: str
    proc: Proc | None


@dataclass
class Context:
    tmp: Path
    pin: Pinning
    sim_url: str
    duration: float
    warmup: float
    quiet_wait: float = 0.0
    retries: int = 0
    noisy_waits: int = 0
    procs: list[Proc] = field(default_factory=list)
    #: Other things to stop at the end (a redis-server for ``--store redis``).
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    def start(
        self, name: str, cmd: Sequence[str], cpu: int | None, env: dict[str, str] | None = None
    ) -> Proc:
        proc = Proc(name, [*self.pin.prefix(cpu), *cmd], self.tmp / f"{name}.log", env)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()


def start_simulator(ctx: Context, port: int, chunks: int) -> Proc:
    cmd = [sys.executable, "-m", "resgov.simulator.upstream", "--host", "127.0.0.1", "--port", str(port),
           "--chunks", str(chunks), "--latency-ms", "0"]  # fmt: skip
    proc = ctx.start("simulator", cmd, ctx.pin.load_cpu)
    wait_until(lambda: port_open(port), proc, 20, "simulator")
    return proc


def start_resgov(
    ctx: Context,
    sim_port: int,
    store_url: str | None = None,
    *,
    name: str = "resgov",
    wrap: Sequence[str] = (),
    ready_timeout: float = 30.0,
) -> Gateway:
    """``resgov serve`` as deployed (``wrap``: a command it runs under, e.g. valgrind), with an API key."""
    policy = ctx.tmp / "bench.rgf"
    policy.write_text(
        POLICY.read_text().replace("http://127.0.0.1:9000/v1", f"http://127.0.0.1:{sim_port}/v1")
    )
    port = free_port()
    admin = "bench-" + secrets.token_hex(24)
    db = ctx.tmp / f"{name}-bench.db"
    env = {**os.environ, "RESGOV_STORE": store_url or f"sqlite:///{db}", "RESGOV_ADMIN_TOKEN": admin}
    cmd = [*wrap, sys.executable, "-m", "resgov.cli", "serve", "--config", str(policy), "--host", "127.0.0.1",
           "--port", str(port), "--log-level", "warning"]  # fmt: skip
    proc = ctx.start(name, cmd, ctx.pin.proxy_cpu, env)
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: http_ok(url + "/health"), proc, ready_timeout, name)
    key = http_json("POST", url + "/api/v1/admin/generate-key", {"org_id": "bench", "name": "bench"},
                    {"X-Admin-Token": admin})["api_key"]  # fmt: skip
    return Gateway("ResGov", url, key, proc)


def start_ladder(ctx: Context, variant: str) -> Gateway:
    port = free_port()
    cmd = [
        sys.executable,
        str(LADDER_APP),
        "--variant",
        variant,
        "--port",
        str(port),
        "--upstream",
        ctx.sim_url,
    ]
    proc = ctx.start(f"ladder-{variant}", cmd, ctx.pin.proxy_cpu)
    wait_until(lambda: port_open(port), proc, 30, variant)
    return Gateway(variant, f"http://127.0.0.1:{port}", "none", proc)


LITELLM_VENV = RESULTS / ".venv-litellm"
#: LiteLLM's proxy refuses to start without a master key; no database, so only this key exists.
LITELLM_KEY = "sk-bench-0123456789abcdef0123456789abcdef"


def install_litellm() -> Path:
    """LiteLLM's proxy in its own venv (bench/results/ is git-ignored); reused when present."""
    exe = LITELLM_VENV / "bin" / "litellm"
    if exe.exists():
        return exe
    log(f"installing litellm[proxy] into {LITELLM_VENV} (once)")
    subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True)
    pip = [str(LITELLM_VENV / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True, timeout=600)
    subprocess.run([*pip, "litellm[proxy]"], check=True, timeout=1800)
    return exe


def start_litellm(ctx: Context) -> Gateway:
    exe = install_litellm()
    config = ctx.tmp / "litellm.yaml"
    config.write_text(
        "model_list:\n"
        "  - model_name: sim/gpt-bench\n"
        "    litellm_params:\n"
        "      model: openai/gpt-bench\n"
        f"      api_base: {ctx.sim_url}/v1\n"
        "      api_key: sk-bench\n"
        "litellm_settings:\n"
        "  drop_params: true\n"
        "  telemetry: false\n"
        "general_settings:\n"
        f"  master_key: {LITELLM_KEY}\n"
    )
    port = free_port()
    env = {**os.environ, "LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False", "LITELLM_LOCAL_MODEL_COST_MAP": "True",
           "DISABLE_SCHEMA_UPDATE": "True"}  # fmt: skip
    env.pop("VIRTUAL_ENV", None)
    cmd = [
        str(exe),
        "--config",
        str(config),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--num_workers",
        "1",
    ]
    proc = ctx.start("litellm", cmd, ctx.pin.proxy_cpu, env)
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: http_ok(url + "/health/liveliness"), proc, 180, "litellm")
    return Gateway("LiteLLM", url, LITELLM_KEY, proc)


# ------------------------------------------------------------------------------- results


@dataclass
class Row:
    """A gateway against the direct run of the same mode and concurrency."""

    mode: str
    concurrency: int
    gateway: str
    direct: Measure
    via: Measure

    @property
    def ratio(self) -> float:
        return self.via.rps / self.direct.rps if self.direct.rps else 0.0

    @property
    def added_p50_ms(self) -> float:
        return self.via.p50_ms - self.direct.p50_ms

    @property
    def added_p99_ms(self) -> float:
        return self.via.p99_ms - self.direct.p99_ms

    def as_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode, "concurrency": self.concurrency, "gateway": self.gateway,
            "rps_direct": self.direct.rps, "rps_gateway": self.via.rps, "throughput_ratio": self.ratio,
            "added_p50_ms": self.added_p50_ms, "added_p99_ms": self.added_p99_ms,
            "direct": asdict(self.direct), "gateway_run": asdict(self.via),
        }  # fmt: skip


def _lat(m: Measure) -> str:
    return f"{m.p50_ms:.2f} / {m.p99_ms:.2f} / {m.max_ms:.1f}"


def _mb(value: float | None) -> str:
    return f"{value:.0f}" if value is not None else "-"


def _per_req(m: Measure) -> str:
    if m.cpu_main_us is None or m.cpu_other_us is None:
        return "-"
    return f"{m.cpu_main_us:.0f} + {m.cpu_other_us:.0f}"


def _noise(r: Row) -> str:
    def one(m: Measure) -> str:
        return f"{m.foreign_cores:.2f}" if m.foreign_cores is not None else "-"

    return f"{one(r.direct)} / {one(r.via)}"


def table(rows: Sequence[Row]) -> str:
    head = (
        "| mode | conc. | gateway | req/s direct | req/s gateway | ratio | direct p50 / p99 / max (ms) "
        "| gateway p50 / p99 / max (ms) | added p50 (ms) | added p99 (ms) | errors direct / gateway "
        "| gateway CPU | CPU µs/req (loop + threads) | peak RSS (MB) | other load direct / gateway (cores) |\n"
        "|---|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n"
    )
    out = [head]
    for r in rows:
        cpu = f"{r.via.cpu_util * 100:.0f} %" if r.via.cpu_util is not None else "-"
        out.append(
            f"| {MODE_LABEL.get(r.mode, r.mode)} | {r.concurrency} | {r.gateway} | {r.direct.rps:,.0f} "
            f"| {r.via.rps:,.0f} | {r.ratio:.2f} | {_lat(r.direct)} | {_lat(r.via)} | {r.added_p50_ms:+.2f} "
            f"| {r.added_p99_ms:+.2f} | {r.direct.errors} / {r.via.errors} | {cpu} | {_per_req(r.via)} "
            f"| {_mb(r.via.peak_rss_mb)} "
            f"| {_noise(r)} |\n"
        )
    return "".join(out)


def find(rows: Sequence[Row], mode: str, conc: int, gateway: str = "ResGov") -> Row | None:
    return next((r for r in rows if r.mode == mode and r.concurrency == conc and r.gateway == gateway), None)


def verdicts(rows: Sequence[Row]) -> list[str]:
    """The issue's targets against what this run measured."""
    out: list[str] = []

    def line(name: str, value: str, ok: bool | None) -> None:
        mark = "n/a" if ok is None else ("met" if ok else "MISSED")
        out.append(f"| {name} | {value} | {mark} |")

    u1, s1 = find(rows, "unary", 1), find(rows, "stream", 1)
    u32, s32 = find(rows, "unary", 32), find(rows, "stream", 32)
    if u1:
        line(f"added p50, non-stream, c=1 ≤ {TARGET_ADDED_P50_UNARY_MS} ms", f"{u1.added_p50_ms:.2f} ms",
             u1.added_p50_ms <= TARGET_ADDED_P50_UNARY_MS)  # fmt: skip
        line(f"added p99, non-stream, c=1 ≤ {TARGET_ADDED_P99_UNARY_MS} ms", f"{u1.added_p99_ms:.2f} ms",
             u1.added_p99_ms <= TARGET_ADDED_P99_UNARY_MS)  # fmt: skip
    if s1:
        line(f"added p50 (time to last byte), stream, c=1 ≤ {TARGET_ADDED_P50_STREAM_MS} ms",
             f"{s1.added_p50_ms:.2f} ms", s1.added_p50_ms <= TARGET_ADDED_P50_STREAM_MS)  # fmt: skip
    if u32:
        line(f"req/s non-stream, c=32 ≥ {TARGET_RPS_UNARY:,}, no errors",
             f"{u32.via.rps:,.0f} req/s, {u32.via.errors} errors (ceiling {u32.direct.rps:,.0f})",
             u32.via.rps >= TARGET_RPS_UNARY and u32.via.errors == 0)  # fmt: skip
    if s32:
        line(f"req/s stream, c=32 ≥ {TARGET_RPS_STREAM:,}, no errors",
             f"{s32.via.rps:,.0f} req/s, {s32.via.errors} errors (ceiling {s32.direct.rps:,.0f})",
             s32.via.rps >= TARGET_RPS_STREAM and s32.via.errors == 0)  # fmt: skip
    peaks = [r.via.peak_rss_mb for r in rows if r.gateway == "ResGov" and r.via.peak_rss_mb is not None]
    if peaks:
        line(f"peak RSS ≤ {TARGET_RSS_MB} MB", f"{max(peaks):.0f} MB", max(peaks) <= TARGET_RSS_MB)
    if not out:
        return []
    return ["| target | measured | |", "|---|---|---|", *out]


def ledger_check(db: Path) -> dict[str, int]:
    """What the run left in ResGov's ledger: every call audited, no reservation left open."""
    if not db.exists():
        return {}
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        open_res = conn.execute("SELECT COUNT(*) FROM reservation").fetchone()[0]
        statuses = dict(conn.execute("SELECT status, COUNT(*) FROM audit GROUP BY status").fetchall())
        audited = sum(statuses.values())
    finally:
        conn.close()
    return {
        "audit_rows": audited,
        "open_reservations": open_res,
        **{f"status_{k}": v for k, v in statuses.items()},
    }


def ledger_check_redis(url: str) -> dict[str, int]:
    """The same check on a Redis ledger, through the store's own totals."""
    import asyncio

    from resgov.ledger import store_from_url

    async def totals() -> dict[str, int]:
        store = store_from_url(url)
        await store.open()
        try:
            t = await store.totals()
        finally:
            await store.close()
        return {"audit_rows": t.audit_count, "open_reservations": t.open_reservations}

    return asyncio.run(totals())


def machine(src: Path | None = None) -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError, ValueError):
        mem = int(Path("/proc/meminfo").read_text().split()[1]) // 1024
    wrk = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False).stdout.split("\n")[0]
    return {
        "cpu": cpu, "cores": os.cpu_count(), "memory_mb": mem, "kernel": platform.release(),
        "python": platform.python_version(), "wrk": wrk.strip(), "code": code_version(src),
    }  # fmt: skip


def code_version(src: Path | None = None) -> str:
    """The commit measured, whether ``src/`` differed from it, and the ``--src`` copy run instead
    of the installed package, if any (a table must name its code)."""

    def git(*args: str) -> str:
        out = subprocess.run(
            ["git", "-C", str(BENCH.parent), *args], capture_output=True, text=True, check=False
        )
        return out.stdout.strip() if out.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD")
    if not commit:
        return "unknown (not a git checkout)"
    dirty = " with uncommitted changes in src/" if git("status", "--porcelain", "--", "src") else ""
    copy = f", ResGov run from {src} (--src), not the installed package" if src else ""
    return commit + dirty + copy


# ------------------------------------------------------------------------------- profile


def profile_resgov(ctx: Context, gw: Gateway, concurrency: int, seconds: float) -> dict[str, Any]:
    """py-spy records of ResGov while wrk drives non-stream load (separate, unmeasured runs).

    Two views: every thread that is not idle ("active", plus a flame graph), and only the thread
    holding the GIL ("gil": where Python CPU goes, without the time spent waiting for the GIL).
    """
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        log("py-spy not installed (bench/install.sh installs it); skipping the profile")
        return {}
    assert gw.proc is not None
    span = max(seconds, 3.0)
    result: dict[str, Any] = {}
    for view, extra in (("active", []), ("gil", ["--gil"])):
        raw = RESULTS / f"profile-resgov-c{concurrency}-unary-{view}.txt"
        wrk = subprocess.Popen(
            [*ctx.pin.prefix(ctx.pin.load_cpu), "wrk", "-t1", f"-c{concurrency}", f"-d{round(span + 2)}s",
             "--timeout", "10s", "-s", str(WRK_SCRIPT), gw.url + ROUTE, "--", "unary", gw.key, AGENT],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        try:
            time.sleep(1.0)
            base = [*ctx.pin.prefix(ctx.pin.load_cpu), spy, "record", "--pid", str(gw.proc.pid), "--rate", "250",
                    "--duration", str(round(span)), "--nonblocking", "--threads", *extra]  # fmt: skip
            subprocess.run([*base, "--format", "raw", "-o", str(raw)], capture_output=True, timeout=span + 60,
                           check=False)  # fmt: skip
        finally:
            out, _ = wrk.communicate(timeout=span + 60)
        line = next((ln for ln in out.splitlines() if ln.startswith("WRK_JSON ")), None)
        entry: dict[str, Any] = {"raw": str(raw)}
        if line:
            entry["wrk_rps_while_profiled"] = json.loads(line.removeprefix("WRK_JSON "))["rps"]
        if raw.exists():
            from profile_summary import summarise  # bench/ is on sys.path when run as a script

            entry["summary_md"] = summarise(raw.read_text())
            if view == "active":
                svg = raw.with_suffix(".svg")
                subprocess.run([*base, "--format", "flamegraph", "-o", str(svg)], capture_output=True,
                               timeout=span + 60, check=False)  # fmt: skip
                entry["flamegraph"] = str(svg)
        result[view] = entry
    return result


def callgrind_command(out_file: Path) -> list[str]:
    """The prefix that runs a command under callgrind with counting off until switched on."""
    return ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out_file}"]


def callgrind_switch(pid: int, on: bool) -> None:
    """Switch counting on or off in a process running under callgrind (blocks until done)."""
    state = "on" if on else "off"
    subprocess.run(
        ["callgrind_control", f"--instr={state}", str(pid)], capture_output=True, check=True, timeout=60
    )


def callgrind_count(log_text: str) -> int | None:
    """The instructions callgrind counted, from its summary on stderr (None if it printed none)."""
    found = re.search(r"Collected : (\d+)", log_text)
    return int(found.group(1)) if found else None


def instructions_resgov(
    ctx: Context, sim_port: int, store_url: str | None, mode: str, concurrency: int, seconds: float
) -> dict[str, Any]:
    """CPU instructions per request of ``resgov serve`` (uvicorn included) under valgrind's callgrind.

    A separate run: ResGov starts under callgrind with counting off, wrk warms it up, then
    counting is on for ``seconds`` of wrk load and the count is divided by the requests wrk
    completed (the few in flight when wrk stops are counted but not completed: about c/requests
    too high). Unlike req/s and CPU time, the count does not move with the machine's load.
    """
    if shutil.which("valgrind") is None:
        log("valgrind not installed (bench/install.sh installs it); skipping the instruction count")
        return {}
    out_file = RESULTS / f"callgrind-serve-{mode}-c{concurrency}.out"
    gw = start_resgov(
        ctx, sim_port, store_url, name="resgov-callgrind", wrap=callgrind_command(out_file), ready_timeout=600
    )
    assert gw.proc is not None
    run_wrk(gw.url, mode, concurrency, 3, gw.key, ctx.pin, gw.name)  # under callgrind: ~50x slower
    callgrind_switch(gw.proc.pid, True)
    m = run_wrk(gw.url, mode, concurrency, seconds, gw.key, ctx.pin, gw.name)
    callgrind_switch(gw.proc.pid, False)
    gw.proc.stop(grace=300)
    total = callgrind_count(gw.proc.log_path.read_text(errors="replace"))
    if total is None or m.requests == 0:
        log(f"callgrind gave no count:\n{gw.proc.tail()}")
        return {}
    per_request = total / m.requests
    log(
        f"ResGov under callgrind, {mode} c={concurrency}: {m.requests} requests, {per_request:,.0f} instructions each"
    )
    return {"mode": mode, "concurrency": concurrency, "requests": m.requests, "errors": m.errors,
            "instructions_per_request": per_request, "callgrind_out": str(out_file)}  # fmt: skip


# ---------------------------------------------------------------------------------- main


@contextlib.contextmanager
def bench_context(args: argparse.Namespace) -> Iterator[Context]:
    cores = os.cpu_count() or 1
    pinned = cores >= 2 and shutil.which("taskset") is not None
    pin = Pinning(args.proxy_cpu if pinned else None, args.load_cpu if pinned else None)
    tmp = Path(tempfile.mkdtemp(prefix="resgov-bench-"))
    ctx = Context(tmp=tmp, pin=pin, sim_url="", duration=args.duration, warmup=args.warmup,
                  quiet_wait=args.quiet_wait, retries=args.retries)  # fmt: skip
    try:
        yield ctx
    finally:
        ctx.stop_all()
        ctx.stack.close()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            log(f"kept logs and the ledger in {tmp}")


def matrix(ctx: Context, gw: Gateway, direct_key: str, modes: Sequence[str], concs: Sequence[int],
           direct_cache: dict[tuple[str, int], Measure]) -> list[Row]:  # fmt: skip
    rows: list[Row] = []
    for mode in modes:
        if ctx.warmup > 0:
            run_wrk(gw.url, mode, 32, ctx.warmup, gw.key, ctx.pin, gw.name)
        for conc in concs:
            if (mode, conc) not in direct_cache:
                direct_cache[(mode, conc)] = measure(ctx, ctx.sim_url, mode, conc, direct_key, "direct", None)
            direct = direct_cache[(mode, conc)]
            via = measure(ctx, gw.url, mode, conc, gw.key, gw.name, gw.proc)
            row = Row(mode, conc, gw.name, direct, via)
            log(f"{gw.name:>22} {mode:6} c={conc:<3} direct {direct.rps:9,.0f}/s p50 {direct.p50_ms:6.2f} ms | "
                f"via {via.rps:9,.0f}/s p50 {via.p50_ms:6.2f} p99 {via.p99_ms:6.2f} ms | ratio {row.ratio:.2f} "
                f"errors {via.errors} rss {_mb(via.peak_rss_mb)} MB other load {via.foreign_cores or 0:.2f}")  # fmt: skip
            rows.append(row)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run (default 5)")
    parser.add_argument("--warmup", type=float, default=None, help="seconds of warm-up per gateway and mode")
    parser.add_argument("--quick", action="store_true", help="2 s runs, 1 s warm-up")
    parser.add_argument("--concurrency", default="1,32,64", help="comma-separated (default 1,32,64)")
    parser.add_argument("--modes", default="unary,stream", help="unary,stream")
    parser.add_argument("--chunks", type=int, default=16, help="content chunks per simulated answer")
    parser.add_argument("--proxy-cpu", type=int, default=0, help="core for the gateway under test")
    parser.add_argument("--load-cpu", type=int, default=1, help="core for the simulator and wrk")
    parser.add_argument(
        "--ladder", action="store_true", help="also run the layer ladder (bench/ladder_app.py)"
    )
    parser.add_argument(
        "--profile", action="store_true", help="also py-spy ResGov under c=32 non-stream load"
    )
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="also count CPU instructions per non-stream request of ResGov under callgrind (c=32)",
    )
    parser.add_argument("--with-litellm", action="store_true", help="also LiteLLM's proxy (own venv)")
    parser.add_argument("--store", choices=("sqlite", "redis"), default="sqlite",
                        help="ResGov's ledger: the SQLite default, or a redis-server the benchmark starts "
                             "(appendfsync everysec) on the load core")  # fmt: skip
    parser.add_argument(
        "--src", type=Path, help="run ResGov from this copy of src/ (see compile_hot_path.py)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, ledger)")
    parser.add_argument(
        "--retries",
        type=int,
        default=2,
        help="repeat a run disturbed by other load up to this many times, keep the least disturbed",
    )
    parser.add_argument("--quiet-wait", type=float, default=20.0,
                        help="before each point, wait up to this many seconds for other load to stop (0: never)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.quick:
        args.duration = min(args.duration, 2.0)
    if args.warmup is None:
        args.warmup = 1.0 if args.quick else 2.0
    concs = [int(c) for c in args.concurrency.split(",") if c.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if any(m not in MODES for m in modes):
        parser.error(f"--modes: choose from {', '.join(MODES)}")
    if shutil.which("wrk") is None:
        log("wrk is not installed: run bench/install.sh as root")
        return 2
    if args.src is not None:
        args.src = use_src(args.src)
    RESULTS.mkdir(parents=True, exist_ok=True)
    started = time.time()
    rows: list[Row] = []
    ladder_rows: list[Row] = []
    extra: dict[str, Any] = {}
    with bench_context(args) as ctx:
        log(f"pinning: {ctx.pin.describe()}; {args.duration:g} s per point; work dir {ctx.tmp}")
        sim_port = 9000 if port_is_free(9000) else free_port()
        start_simulator(ctx, sim_port, args.chunks)
        ctx.sim_url = f"http://127.0.0.1:{sim_port}"
        direct_cache: dict[tuple[str, int], Measure] = {}
        for mode in modes:  # the harness ceiling first, warmed up
            run_wrk(ctx.sim_url, mode, 32, ctx.warmup, "none", ctx.pin, "direct")
        store_url = None
        if args.store == "redis":
            from store_bench import redis_server

            store_url = ctx.stack.enter_context(redis_server("everysec", ctx.pin.load_cpu))
            log(f"ResGov's ledger: {store_url} (appendonly yes, appendfsync everysec, on the load core)")
        resgov = start_resgov(ctx, sim_port, store_url)
        rows += matrix(ctx, resgov, resgov.key, modes, concs, direct_cache)
        extra["resgov_vmhwm_mb"] = (RssMonitor(resgov.proc.pid).read("VmHWM") / 1024) if resgov.proc else None
        if args.profile:
            log("profiling ResGov under c=32 non-stream load (py-spy)")
            extra["profile"] = profile_resgov(ctx, resgov, 32, max(args.duration, 5.0))
        assert resgov.proc is not None
        resgov.proc.stop()
        extra["ledger"] = (
            ledger_check_redis(store_url) if store_url else ledger_check(ctx.tmp / "resgov-bench.db")
        )
        extra["store"] = args.store
        if args.instructions:
            # Non-stream only: how a stream's chunks group into reads and writes depends on timing,
            # and under callgrind (ResGov ~50x slower) two runs of the same code differed by 20 %.
            # path_bench.py --instructions --mode stream counts streams in-process, stably.
            log("counting ResGov's instructions per non-stream request under callgrind (about 2 min)")
            count = instructions_resgov(ctx, sim_port, store_url, "unary", 32, 30.0)
            extra["instructions"] = [count] if count else []
        if args.ladder:
            ladder_concs = [c for c in concs if c in (1, 32)] or concs[:1]
            from ladder_app import VARIANTS

            for variant in VARIANTS:
                gw = start_ladder(ctx, variant)
                ladder_rows += matrix(ctx, gw, gw.key, ["unary"], ladder_concs, direct_cache)
                assert gw.proc is not None
                gw.proc.stop()
            ladder_rows += [r for r in rows if r.mode == "unary" and r.concurrency in ladder_concs]
        if args.with_litellm:
            try:
                lite = start_litellm(ctx)
            except (RuntimeError, subprocess.SubprocessError, OSError) as exc:
                log(f"LiteLLM could not be run: {exc}")
                extra["litellm_error"] = str(exc)[-2000:]
            else:
                rows += matrix(ctx, lite, lite.key, modes, concs, direct_cache)
                assert lite.proc is not None
                lite.proc.stop()
    report(args, rows, ladder_rows, extra, started, ctx.pin)
    return 0


def report(args: argparse.Namespace, rows: list[Row], ladder_rows: list[Row], extra: dict[str, Any],
           started: float, pin: Pinning) -> None:  # fmt: skip
    info = machine(args.src)
    when = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started))
    md = [
        "# ResGov benchmark",
        "",
        f"Run {when}; {args.duration:g} s per point after a {args.warmup:g} s warm-up; wrk -t1 -cN, "
        "closed loop (each connection sends its next request when the last answer is complete).",
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['memory_mb']:,} MB, Linux {info['kernel']}, "
        f"Python {info['python']}, {info['wrk']}.",
        f"Pinning: {pin.describe()}.",
        f"Code: commit {info['code']}.",
        "Upstream: resgov.simulator.upstream, 0 ms latency, 16 content chunks (+ usage chunk when streaming). "
        "Policy: bench/bench.rgf (budgets enforced on every call: agent and org daily lines, priced, reserved "
        + (
            "in Redis (its own redis-server on the load core, appendonly yes, appendfsync everysec)"
            if extra.get("store") == "redis"
            else "durably in SQLite (WAL fsync'd per group commit)"
        )
        + " before the upstream call, settled after).",
        "",
        "'added' = gateway latency minus direct latency at the same percentile; 'ratio' = gateway req/s / direct "
        "req/s; 'gateway CPU' = CPU seconds per second used by the gateway process (100 % = its whole core); "
        "'CPU µs/req' = the gateway's CPU time per request on its event-loop thread + on its other threads "
        "(SQLite writer, readers); "
        "errors = non-2xx + socket errors; 'other load' = CPU used meanwhile by processes outside the "
        "benchmark, in cores, during the direct / gateway run: above ~0.1 that run was disturbed.",
        "",
        table(rows),
    ]
    checks = verdicts(rows)
    if checks:
        md += ["## Targets (issue 6)", "", *checks, ""]
    ledger = extra.get("ledger")
    if ledger:
        statuses = ", ".join(
            f"{k.removeprefix('status_')} {v:,}" for k, v in ledger.items() if k.startswith("status_")
        )
        md += [
            f"Ledger after the run: {ledger.get('audit_rows', 0):,} audit rows, "
            f"{ledger.get('open_reservations', 0)} open reservations"
            + (f"; {statuses}." if statuses else "."),
            "",
        ]
    if extra.get("resgov_vmhwm_mb") is not None:
        md += [f"ResGov VmHWM (peak RSS over its whole life): {extra['resgov_vmhwm_mb']:.0f} MB.", ""]
    if extra.get("instructions"):
        md += [
            "## CPU instructions per request (callgrind)",
            "",
            "ResGov under valgrind's callgrind, counting user-space instructions of all its threads during "
            "30 s of wrk load (a separate run; about c/requests high: requests in flight at the end are "
            "counted but not completed). The count does not move with the machine's load.",
            "",
            "| mode | concurrency | requests | instructions per request |",
            "|---|--:|--:|--:|",
            *(
                f"| {c['mode']} | {c['concurrency']} | {c['requests']:,} | {c['instructions_per_request']:,.0f} |"
                for c in extra["instructions"]
            ),
            "",
        ]
    if ladder_rows:
        md += [
            "## Layer ladder (non-stream)",
            "",
            "Each rung adds one layer on the same uvicorn settings (bench/ladder_app.py); the difference between "
            "rungs is that layer's cost.",
            "",
            table(sorted(ladder_rows, key=lambda r: (r.concurrency, LADDER_ORDER.get(r.gateway, 99)))),
        ]
    profile = extra.get("profile") or {}
    for view, title in (("active", "threads not idle"), ("gil", "only the thread holding the GIL, `--gil`")):
        entry = profile.get(view) or {}
        if not entry.get("summary_md"):
            continue
        graph = f", flame graph `{Path(entry['flamegraph']).name}`" if entry.get("flamegraph") else ""
        md += [
            f"## Profile: ResGov, non-stream, concurrency 32 (py-spy, {title})",
            "",
            f"req/s while profiled: {entry.get('wrk_rps_while_profiled', 0):,.0f}; raw stacks "
            f"`{Path(entry['raw']).name}`{graph}.",
            "",
            entry["summary_md"],
        ]
    if extra.get("litellm_error"):
        md += ["LiteLLM could not be run:", "", "```", extra["litellm_error"], "```", ""]
    text = "\n".join(md)
    (RESULTS / "latest.md").write_text(text)
    payload = {
        "started": started, "duration_s": args.duration, "warmup_s": args.warmup, "machine": info,
        "pinning": pin.describe(), "rows": [r.as_dict() for r in rows],
        "ladder": [r.as_dict() for r in ladder_rows],
        "extra": {k: v for k, v in extra.items() if k != "profile"},
        "profile": {view: {k: v for k, v in e.items() if k != "summary_md"} for view, e in profile.items()},
    }  # fmt: skip
    (RESULTS / "latest.json").write_text(json.dumps(payload, indent=2))
    print(text)
    log(f"wrote {RESULTS / 'latest.md'} and {RESULTS / 'latest.json'}")


if __name__ == "__main__":
    sys.path.insert(0, str(BENCH))
    raise SystemExit(main())
