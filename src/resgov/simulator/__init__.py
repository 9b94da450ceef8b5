"""Simulated LLM providers (OpenAI / Anthropic wire formats) for demos, tests and benchmarks.

Names are resolved lazily so ``python -m resgov.simulator.upstream`` does not import
the module twice (runpy warns when the package already imported it).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from resgov.simulator.upstream import (
        RecordedRequest,
        SimConfig,
        SimStats,
        SimUpstream,
        SimUpstreamThread,
    )

__all__ = ["RecordedRequest", "SimConfig", "SimStats", "SimUpstream", "SimUpstreamThread"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("resgov.simulator.upstream"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
