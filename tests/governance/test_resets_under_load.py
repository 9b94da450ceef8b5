"""Resets racing with calls in flight: nothing dropped, nothing counted twice, no limit crossed."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import httpx

from tests.governance.support import ADMIN, GovProxy

POLICY = """
[orgs.acme]
daily_budget = 1000
total_budget = 100000

[orgs.acme.agents.a1]
daily_budget = 0.5
total_budget = 100000

[orgs.acme.agents.a2]
daily_budget = 0.5
total_budget = 100000
"""


def test_resets_under_load_never_drop_or_double_count(tmp_path: Path) -> None:
    with GovProxy(tmp_path, POLICY) as proxy:
        h = proxy.bearer("acme")
        stop = time.time() + 4.0
        counts = {"ok": 0, "refused": 0, "two_phase": 0}
        lock = threading.Lock()

        def worker(seed: int) -> None:
            rng = random.Random(seed)
            with httpx.Client(base_url=proxy.url, headers=h, timeout=30) as client:
                while time.time() < stop:
                    agent = rng.choice(("a1", "a2"))
                    cost = f"0.0{rng.randint(1, 9)}"
                    if rng.random() < 0.3:
                        # Reserve, let a reset happen meanwhile, then commit: settles on its own window.
                        r = client.post("/api/v1/book", json={"agent_id": agent, "resource_type": "t", "action": "x",
                                                              "cost": cost, "phase": "reserve"})  # fmt: skip
                        if r.status_code == 200:
                            time.sleep(rng.random() * 0.05)
                            c = client.post(
                                f"/api/v1/bookings/{r.json()['booking_id']}/commit", json={"cost": cost}
                            )
                            assert c.status_code == 200, c.text
                            with lock:
                                counts["two_phase"] += 1
                        continue
                    r = client.post("/api/v1/book", json={"agent_id": agent, "resource_type": "t", "action": "x",
                                                          "cost": cost})  # fmt: skip
                    assert r.status_code in (200, 403), r.text
                    with lock:
                        counts["ok" if r.status_code == 200 else "refused"] += 1

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        resets = 0
        while time.time() < stop - 0.3:
            body = random.choice([{"org_id": "acme", "agent_id": "a1"}, {"org_id": "acme"}, {}])
            assert proxy.post("/api/v1/admin/reset-daily", ADMIN, body).status_code == 200
            resets += 1
            time.sleep(0.4)
        for t in threads:
            t.join(30)
        assert counts["ok"] > 20 and counts["refused"] > 0 and counts["two_phase"] > 5 and resets >= 5

    ledger = proxy.ledger
    ledger.check_invariants()  # nothing reserved; total lines == the audit trail, exactly
    lines = ledger.lines()
    audit_total = sum(a["actual"] for a in ledger.audit())
    for agent in ("a1", "a2"):
        daily = [spent for (o, k), (spent, _) in lines.items() if k.startswith(f"a:{agent}:daily:")]
        assert all(spent <= 500_000_000 for spent in daily), daily  # no window ever crossed its limit
        total = lines[("acme", f"a:{agent}:total:0")][0]
        assert sum(daily) == total  # every call counted in exactly one daily window
    assert sum(s for (o, k), (s, _) in lines.items() if k.startswith("o:daily:")) == audit_total
    assert len([k for (o, k) in lines if k.startswith("a:a1:daily:")]) > 2  # the resets did happen
