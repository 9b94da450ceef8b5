"""The webhook admin API: create (secret once), list, update, rotate, delete, test send, auth."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from resgov.alerts import Alerts, RetryPolicy
from resgov.alerts.store import Destination, SQLiteAlertStore
from tests.alerts.conftest import Receiver
from tests.alerts.recipe import verify_resgov_signature
from tests.alerts.wiring import ADMIN, wired_app
from tests.helpers import policy_for

AGENTS = "[agents.hermes]\ndaily_budget = 1.00\n"
BASE = "/api/v1/admin/webhooks"


def _alerts(tmp_path: Path, **kw: Any) -> Alerts:
    return Alerts(
        SQLiteAlertStore(str(tmp_path / "resgov.alerts.db")),
        retry=RetryPolicy(max_attempts=2, base_seconds=0.05, jitter=0),
        poll_seconds=0.2,
        **kw,
    )


async def test_webhook_lifecycle(tmp_path: Path, sim: Any, receivers: Any) -> None:
    receiver: Receiver = await receivers([500])
    rgf = [
        Destination(
            id="rgf-ops", url="https://hooks.slack.com/services/T/B/TOKEN", type="slack", source="rgf"
        )
    ]
    alerts = _alerts(tmp_path, allow_private=True, rgf_destinations=lambda: rgf)
    async with wired_app(tmp_path, policy_for(sim.base_url, AGENTS), alerts=alerts) as w:
        c = w.client
        key = await w.key()
        body = {"url": receiver.url, "type": "generic", "events": ["budget.*"], "org_id": "default"}
        for headers in ({}, {"Authorization": f"Bearer {key}"}, {"X-Admin-Token": key}):
            assert (await c.post(BASE, json=body, headers=headers)).status_code == 401
        created = await c.post(BASE, json=body, headers=ADMIN)
        assert created.status_code == 201, created.text
        hook = created.json()
        secret = hook["secret"]
        assert secret.startswith("whsec_") and hook["events"] == ["budget.*"] and hook["signed"] is True
        wid = hook["id"]

        listed = await c.get(BASE, headers=ADMIN)
        assert listed.status_code == 200 and secret not in listed.text and "secret" not in listed.text
        items = {h["id"]: h for h in listed.json()}
        assert items["rgf-ops"]["source"] == "rgf" and "TOKEN" not in items["rgf-ops"]["url"]
        assert items[wid]["url"] == receiver.url
        assert [h["id"] for h in (await c.get(BASE, params={"org_id": "default"}, headers=ADMIN)).json()] == [
            wid
        ]
        one = await c.get(f"{BASE}/{wid}", headers=ADMIN)
        assert one.status_code == 200 and "secret" not in one.json()

        # The test send reports the receiver's answer, and is signed with the secret shown once.
        first = (await c.post(f"{BASE}/{wid}/test", headers=ADMIN)).json()
        assert first["delivered"] is False and first["status"] == 500
        second = (await c.post(f"{BASE}/{wid}/test", headers=ADMIN)).json()
        assert (
            second["delivered"] is True and second["status"] == 200 and second["event_id"].startswith("evt_")
        )
        sent = receiver.requests[-1]
        assert sent.json()["type"] == "webhook.test"
        assert verify_resgov_signature(secret, sent.headers["X-ResGov-Signature"], sent.body)

        patched = await c.patch(f"{BASE}/{wid}", json={"events": ["*"], "enabled": False}, headers=ADMIN)
        assert (
            patched.status_code == 200 and patched.json()["events"] == ["*"] and not patched.json()["enabled"]
        )
        assert "secret" not in patched.json()
        rotated = await c.patch(f"{BASE}/{wid}", json={"rotate_secret": True}, headers=ADMIN)
        new_secret = rotated.json()["secret"]
        assert new_secret != secret and rotated.json()["enabled"] is False
        replaced = await c.put(f"{BASE}/{wid}", json={"url": receiver.url, "type": "discord"}, headers=ADMIN)
        assert replaced.status_code == 200 and replaced.json()["type"] == "discord"
        assert replaced.json()["events"] == ["*"] and replaced.json()["org_id"] is None
        await c.post(f"{BASE}/{wid}/test", headers=ADMIN)
        last = receiver.requests[-1]
        assert "embeds" in last.json()
        assert verify_resgov_signature(new_secret, last.headers["X-ResGov-Signature"], last.body)
        assert not verify_resgov_signature(secret, last.headers["X-ResGov-Signature"], last.body)

        assert (await c.patch(f"{BASE}/rgf-ops", json={"enabled": False}, headers=ADMIN)).status_code == 409
        assert (await c.delete(f"{BASE}/rgf-ops", headers=ADMIN)).status_code == 409
        deleted = await c.delete(f"{BASE}/{wid}", headers=ADMIN)
        assert deleted.status_code == 200 and deleted.json()["deleted"] is True
        for r in (
            await c.get(f"{BASE}/{wid}", headers=ADMIN),
            await c.delete(f"{BASE}/{wid}", headers=ADMIN),
            await c.patch(f"{BASE}/{wid}", json={"enabled": True}, headers=ADMIN),
            await c.post(f"{BASE}/{wid}/test", headers=ADMIN),
        ):
            assert r.status_code == 404 and r.json()["error"]["reason"] == "webhook_not_found"
        status = (await c.get("/api/v1/admin/alerts/status", headers=ADMIN)).json()
        assert status["pending"] == 0 and status["backend"] == "sqlite"
        assert (await c.get("/api/v1/admin/alerts/dead-letters", headers=ADMIN)).json() == {"items": []}


async def test_invalid_webhooks_refused(tmp_path: Path, sim: Any) -> None:
    alerts = _alerts(tmp_path, allow_private=False)
    async with wired_app(tmp_path, policy_for(sim.base_url, AGENTS), alerts=alerts) as w:
        c = w.client
        for body, reason in (
            ({"url": "http://127.0.0.1:8080/hook"}, "webhook_url_refused"),
            ({"url": "http://169.254.169.254/latest"}, "webhook_url_refused"),
            ({"url": "http://[fd00::1]/x"}, "webhook_url_refused"),
            ({"url": "http://localhost:9/x"}, "webhook_url_refused"),
            ({"url": "ftp://example.com/x"}, "webhook_url_refused"),
            ({"url": "https://93.184.216.34/x", "events": ["budget.treshold"]}, "invalid_webhook"),
        ):
            r = await c.post(BASE, json=body, headers=ADMIN)
            assert r.status_code == 422 and r.json()["error"]["reason"] == reason, (body, r.text)
        for body in (
            {"url": "https://93.184.216.34/x", "type": "teams"},
            {"url": "https://93.184.216.34/x", "secret": "x"},
        ):
            assert (await c.post(BASE, json=body, headers=ADMIN)).status_code == 422
        ok = await c.post(BASE, json={"url": "https://93.184.216.34/x"}, headers=ADMIN)
        assert ok.status_code == 201  # a public address literal needs no DNS
        wid = ok.json()["id"]
        r = await c.patch(f"{BASE}/{wid}", json={"url": "http://10.0.0.1/x"}, headers=ADMIN)
        assert r.status_code == 422 and r.json()["error"]["reason"] == "webhook_url_refused"
