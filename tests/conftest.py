"""Shared fixtures: a simulated provider and a ResGov server, both real HTTP servers on loopback."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from resgov.simulator.upstream import SimConfig, SimUpstreamThread


@pytest.fixture
def sim() -> Iterator[SimUpstreamThread]:
    """A simulated OpenAI/Anthropic upstream on a free loopback port."""
    with SimUpstreamThread(SimConfig()) as upstream:
        yield upstream
