"""``resgov demo``: the README's first command must run end to end and prove its own claims.

The demo starts a real simulator and a real ResGov on loopback ports, so these are
black-box runs: only its exit code and what it printed are checked here.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time

import pytest
from rich.console import Console

from resgov.demo import run_demo

VERDICT = re.compile(
    r"budget held: spent \$(?P<spent>[0-9.]+) ≤ limit \$(?P<limit>[0-9.]+); "
    r"upstream saw (?P<seen>\d+) calls = (?P<allowed>\d+) allowed"
)


def _console(terminal: bool) -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    # width fixed so the output does not depend on the terminal running the tests
    return Console(file=out, force_terminal=terminal, width=120, color_system=None), out


@pytest.mark.parametrize("terminal", [False, True], ids=["plain-log", "live-table"])
async def test_demo_stops_the_loop_and_checks_its_invariants(terminal: bool) -> None:
    console, out = _console(terminal)
    code = await run_demo(console, "0.02", 200)
    text = out.getvalue()
    assert code == 0, text
    assert '"type":"budget_exceeded"' in text
    assert '"reason":"daily_budget_exceeded"' in text
    assert "Daily budget exceeded. Limit: $0.02" in text
    match = VERDICT.search(text)
    assert match, text
    assert float(match["spent"]) <= float(match["limit"]) == 0.02
    assert match["seen"] == match["allowed"]
    assert int(match["allowed"]) >= 1
    assert "✘" not in text


async def test_budget_too_small_for_one_call_refuses_the_first() -> None:
    """Even the first call's worst case does not fit: nothing reaches the upstream, nothing is spent."""
    console, out = _console(False)
    code = await run_demo(console, "0.001", 50)
    text = out.getvalue()
    assert code == 0, text
    assert "budget held: spent $0.00 ≤ limit $0.001; upstream saw 0 calls = 0 allowed" in text


async def test_loop_that_never_hits_the_budget_is_not_a_success() -> None:
    """--max-calls ends the loop before the budget: the demo showed nothing, so it says so and fails."""
    console, out = _console(False)
    code = await run_demo(console, "100", 2)
    text = out.getvalue()
    assert code == 1, text
    assert "the loop was never stopped" in text
    assert "budget NOT verified" in text


@pytest.mark.parametrize("budget", ["abc", "0", "-1", "NaN"])
async def test_bad_budget_is_refused_before_starting_anything(budget: str) -> None:
    console, out = _console(False)
    assert await run_demo(console, budget, 10) == 2
    assert "--budget" in out.getvalue()


@pytest.mark.slow
def test_cli_demo_subprocess() -> None:
    """``resgov demo --budget 0.02`` as a user runs it, with stdout a pipe (as in CI)."""
    env = {**os.environ, "COLUMNS": "100"}
    env.pop("RESGOV_CONFIG", None)
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "resgov.cli", "demo", "--budget", "0.02"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert elapsed < 60
    assert "budget_exceeded" in proc.stdout
    match = VERDICT.search(proc.stdout)
    assert match, proc.stdout
    assert match["seen"] == match["allowed"]
    # stdout is not a terminal: no cursor movement or colour codes in the log
    assert "\x1b[" not in proc.stdout
