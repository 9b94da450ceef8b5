"""Summarise a py-spy ``--format raw --threads`` profile as Markdown tables.

    python bench/profile_summary.py bench/results/profile-resgov-c32-unary.txt

Each raw line is ``thread (TID): NAME;frame;frame;... COUNT`` with frames written
``function (file:line)``. The summary gives, per thread, the share of samples; for the
event-loop thread, self time by layer (the package of the innermost frame), the hottest
lines, and inclusive time per function; for the other threads, their hottest lines.

py-spy samples a thread as active when it is not idle in a syscall: on one core two
threads can both look active (one holds the core, the other waits for it or for the
GIL), so shares are of samples, not of CPU.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from dataclasses import dataclass, field

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")

#: Innermost-frame file prefix -> layer, first match wins.
LAYERS: tuple[tuple[str, str], ...] = (
    ("resgov/server/proxy", "resgov proxy (request logic)"),
    ("resgov/server/auth", "resgov auth"),
    ("resgov/server", "resgov server (asgi helpers, runtime)"),
    ("resgov/core", "resgov core (policy, pricing, budget windows)"),
    ("resgov/providers", "resgov providers (parse, usage)"),
    ("resgov/ledger", "resgov ledger (store client side)"),
    ("uvicorn/", "uvicorn (HTTP server protocol)"),
    ("starlette/", "starlette/fastapi"),
    ("fastapi/", "starlette/fastapi"),
    ("aiohttp/", "aiohttp (upstream client)"),
    ("multidict/", "aiohttp (upstream client)"),
    ("yarl/", "aiohttp (upstream client)"),
    ("asyncio/runners", "event loop (uvloop C code, syscalls)"),
    ("asyncio/", "asyncio (tasks, futures, timeouts)"),
    ("uuid", "stdlib uuid"),
    ("dataclasses", "dataclass __init__"),
    ("<string>", "dataclass __init__"),
    ("datetime", "stdlib datetime/zoneinfo"),
    ("zoneinfo", "stdlib datetime/zoneinfo"),
    ("decimal", "stdlib decimal"),
    ("json/", "stdlib json"),
    ("logging/", "stdlib logging"),
)

#: Frames under which everything runs (process start-up, the loop's own entry): no information.
BOOTSTRAP: tuple[str, ...] = (
    "<frozen runpy>", "typer/", "resgov/cli.py", "uvicorn/main.py", "uvicorn/server.py", "uvicorn/_compat.py",
    "asyncio/runners.py", "asyncio/base_events.py", "threading.py",
)  # fmt: skip


@dataclass
class Frame:
    func: str
    file: str
    line: int | None

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}" if self.line is not None else self.file

    @property
    def name(self) -> str:
        return f"{self.func} ({self.file})"


def parse_frame(text: str) -> Frame:
    m = _FRAME.match(text)
    if m is None:
        return Frame(text, "?", None)
    line = m.group("line")
    return Frame(m.group("func"), m.group("file"), int(line) if line else None)


def layer_of(frame: Frame) -> str:
    for prefix, layer in LAYERS:
        if prefix in frame.file:
            return layer
    return "other: " + frame.file.split("/")[0]


@dataclass
class ThreadProfile:
    name: str
    samples: int = 0
    self_lines: Counter[str] = field(default_factory=Counter)
    self_layers: Counter[str] = field(default_factory=Counter)
    inclusive: Counter[str] = field(default_factory=Counter)


def parse(raw: str) -> dict[str, ThreadProfile]:
    threads: dict[str, ThreadProfile] = {}
    for line in raw.splitlines():
        stack, _, count_text = line.rstrip().rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        parts = stack.split(";")
        head = parts[0]
        if head.startswith("thread ("):
            tname = head.split(":", 1)[1].strip() or head
            frames = [parse_frame(p) for p in parts[1:]]
        else:
            tname = "all"
            frames = [parse_frame(p) for p in parts]
        if not frames:
            continue
        prof = threads.setdefault(tname, ThreadProfile(tname))
        prof.samples += count
        leaf = frames[-1]
        prof.self_lines[f"`{leaf.func}` {leaf.where}"] += count
        prof.self_layers[layer_of(leaf)] += count
        for name in {f.name for f in frames}:
            prof.inclusive[name] += count
    return threads


def _pct(n: int, total: int) -> str:
    return f"{n / total * 100:5.1f} %" if total else "-"


def summarise(raw: str, top: int = 15) -> str:
    threads = parse(raw)
    if not threads:
        return "(empty profile)\n"
    total = sum(t.samples for t in threads.values())
    out = ["| thread | samples | share |", "|---|--:|--:|"]
    for t in sorted(threads.values(), key=lambda t: -t.samples):
        out.append(f"| {t.name} | {t.samples} | {_pct(t.samples, total)} |")
    main = threads.get("MainThread") or max(threads.values(), key=lambda t: t.samples)
    n = main.samples
    out += ["", f"Event-loop thread ({main.name}), self time by layer (innermost frame):", "",
            "| layer | share |", "|---|--:|"]  # fmt: skip
    out += [f"| {layer} | {_pct(c, n)} |" for layer, c in main.self_layers.most_common()]
    out += ["", "Event-loop thread, hottest lines (self):", "", "| line | share |", "|---|--:|"]
    out += [f"| {k} | {_pct(c, n)} |" for k, c in main.self_lines.most_common(top)]
    inclusive = [(k, c) for k, c in main.inclusive.most_common() if not any(b in k for b in BOOTSTRAP)]
    out += ["", "Event-loop thread, inclusive time per function:", "", "| function | share |", "|---|--:|"]
    out += [f"| {k} | {_pct(c, n)} |" for k, c in inclusive[: top + 10]]
    for t in sorted(threads.values(), key=lambda t: -t.samples):
        if t is main or t.samples < 0.02 * total:
            continue
        out += ["", f"Thread {t.name}, hottest lines (self):", "", "| line | share |", "|---|--:|"]
        out += [f"| {k} | {_pct(c, t.samples)} |" for k, c in t.self_lines.most_common(8)]
    return "\n".join(out) + "\n"


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    with open(sys.argv[1], encoding="utf-8") as fh:
        print(summarise(fh.read()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
