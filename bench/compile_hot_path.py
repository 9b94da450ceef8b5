#!/usr/bin/env python3
"""What-if: ResGov's hot path compiled to C with mypyc, to price compilation before anyone ships it.

    python bench/compile_hot_path.py                    # builds bench/results/compiled/src
    python bench/path_bench.py --instructions --src bench/results/compiled/src
    python bench/path_bench.py --rounds 5 --src bench/results/compiled/src

Copies ``src/`` to ``bench/results/compiled/src`` and compiles the modules every proxied call
runs through (the request path, its core arithmetic, the providers, the SQLite ledger, the
metrics wrapper) with mypyc, which ships with mypy (a dev dependency). The compiled extension
modules sit beside their sources in the copy and win the import there; ResGov's own ``src/``
is never touched, and nothing installed changes. ``path_bench.py --src`` then runs the copy
and checks that the compiled modules are the ones loaded.

mypyc refuses one construct of the real code: a mixin (``MessagesEventsView``) listed before
the base class. The copy declares it a mypyc trait listed after the base, which mypyc accepts
and which resolves to the same attributes (the two classes define none in common). That edit
is made on the copy only, and the build fails loudly if the line it expects has moved.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
OUT = BENCH / "results" / "compiled"

#: The modules a proxied call runs through. A compiled class cannot be subclassed by an
#: interpreted one, so every provider module goes together.
HOT = [
    "resgov/server/proxy.py",
    "resgov/server/asgi.py",
    "resgov/server/auth.py",
    "resgov/server/runtime.py",
    "resgov/server/governance_service.py",
    "resgov/server/metrics.py",
    "resgov/core/budget.py",
    "resgov/core/money.py",
    "resgov/core/pricing.py",
    "resgov/core/bounds.py",
    "resgov/core/policy.py",
    "resgov/core/overlay.py",
    "resgov/core/windows.py",
    "resgov/core/errors.py",
    "resgov/alerts/events.py",
    "resgov/ledger/store.py",
    "resgov/ledger/sqlite.py",
    "resgov/ledger/sqlite_writer.py",
    "resgov/ledger/sqlite_lines.py",
    *sorted(p.relative_to(ROOT / "src").as_posix() for p in (ROOT / "src/resgov/providers").glob("*.py")),
]

#: (file, the line as written, the line mypyc accepts): the mixin as a trait, after the base.
EDITS = [
    (
        "resgov/providers/anthropic.py",
        "class MessagesEventsView:",
        "from mypy_extensions import trait\n\n\n@trait\nclass MessagesEventsView:",
    ),
    (
        "resgov/providers/anthropic.py",
        "class MessagesStreamScanner(MessagesEventsView, ForwardedStream):",
        "class MessagesStreamScanner(ForwardedStream, MessagesEventsView):",
    ),
    (
        "resgov/providers/translate.py",
        "class AnthropicToChatStream(MessagesEventsView, TranslatedStream):",
        "class AnthropicToChatStream(TranslatedStream, MessagesEventsView):",
    ),
]

MYPY_CONFIG = "[mypy]\npython_version = 3.11\nignore_missing_imports = True\n"


def build(out: Path) -> Path:
    """A fresh copy of ``src`` under ``out`` with the hot modules compiled; returns its ``src``."""
    mypyc = Path(sys.executable).with_name("mypyc")
    if not mypyc.exists():
        raise SystemExit(
            "compile_hot_path: no mypyc beside this Python; run it with .venv/bin/python (./dev lint makes .venv)"
        )
    if out.exists():
        shutil.rmtree(out)
    src = out / "src"
    shutil.copytree(ROOT / "src", src, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    for rel, old, new in EDITS:
        path = src / rel
        text = path.read_text()
        if text.count(old + "\n") != 1:
            raise SystemExit(f"compile_hot_path: {rel} no longer has the line {old!r}; update EDITS")
        path.write_text(text.replace(old + "\n", new + "\n"))
    (out / "mypy.ini").write_text(MYPY_CONFIG)
    cmd = [str(mypyc), "--config-file", str(out / "mypy.ini"), *HOT]
    done = subprocess.run(cmd, cwd=src, capture_output=True, text=True)
    built = [rel for rel in HOT if list((src / rel).parent.glob(Path(rel).stem + ".cpython-*.so"))]
    if done.returncode != 0 or len(built) != len(HOT):
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
        raise SystemExit(f"compile_hot_path: mypyc failed ({len(built)} of {len(HOT)} modules built)")
    shutil.rmtree(src / "build", ignore_errors=True)
    return src


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    src = build(args.out)
    print(f"{len(HOT)} modules compiled into {src}")
    print(f"next: python bench/path_bench.py --instructions --src {src}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
