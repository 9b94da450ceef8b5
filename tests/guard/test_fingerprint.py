"""Fingerprints: near-identical requests (ids, timestamps masked) match; different asks never do."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from resgov.guard.fingerprint import fingerprint, normalize_text


def _body(text: str, **extra: Any) -> dict[str, Any]:
    return {
        "messages": [{"role": "system", "content": "You are a bot."}, {"role": "user", "content": text}],
        **extra,
    }


def test_masks_each_kind_of_volatile_value() -> None:
    cases = {
        "id 123e4567-e89b-12d3-a456-426614174000 done": "id <uuid> done",
        "at 2024-05-01T12:34:56.789Z.": "at <ts>.",
        "at 2024-05-01 12:34:56+02:00 ok": "at <ts> ok",
        "on 2024-05-01, again": "on <ts>, again",
        "time 09:15:02 now": "time <ts> now",
        "epoch 1714567890 and 1714567890123 and 1714567890.25": "epoch <ts> and <ts> and <ts>",
        "trace 9f86d081884c7d65 / 0xdeadbeef01": "trace <id> / <id>",
        "call call_Ab12Cd34Ef56Gh78 and toolu_01XyZabcdefghijk": "call <id> and <id>",
        "order 12345678": "order <id>",
    }
    for text, expected in cases.items():
        assert normalize_text(text) == expected, text


def test_leaves_ordinary_text_alone() -> None:
    for text in (
        "Summarise page 12 of the report, version 3.2.1, in 200 words.",
        "deadbeef cafe facade",  # hex-looking words without digits
        "snake_case_identifier and kebab-case-word",
        "call me at 555-1234",
    ):
        assert normalize_text(text) == text


def test_identical_requests_match_and_the_model_matters() -> None:
    assert fingerprint("gpt-4o", _body("hi")) == fingerprint("gpt-4o", _body("hi"))
    assert fingerprint("gpt-4o", _body("hi")) != fingerprint("gpt-4o-mini", _body("hi"))
    assert fingerprint("gpt-4o", _body("hi")) != fingerprint("gpt-4o", _body("hello"))


def test_sampling_knobs_do_not_hide_a_loop_but_tools_and_system_count() -> None:
    base = fingerprint("m", _body("hi"))
    assert fingerprint("m", _body("hi", temperature=0.7, max_tokens=99, stream=True)) == base
    assert fingerprint("m", _body("hi", tools=[{"type": "function", "function": {"name": "x"}}])) != base
    assert fingerprint("m", {**_body("hi"), "system": "other"}) != base


def test_key_order_does_not_matter() -> None:
    a = {"messages": [{"role": "user", "content": "x"}], "input": "y"}
    b = {"input": "y", "messages": [{"content": "x", "role": "user"}]}
    assert fingerprint("m", a) == fingerprint("m", b)


def test_calls_differing_only_in_ids_and_timestamps_match_unless_exact() -> None:
    def turn(i: int) -> dict[str, Any]:
        now = datetime(2025, 1, 1, tzinfo=UTC) + timedelta(seconds=37 * i)
        return _body(
            f"Retry job {uuid.uuid4()} at {now.isoformat()} (epoch {int(now.timestamp())}); "
            f"last trace {uuid.uuid4().hex[:16]}. Still failing."
        )

    normalized = {fingerprint("m", turn(i)) for i in range(20)}
    exact = {fingerprint("m", turn(i), "exact") for i in range(20)}
    assert len(normalized) == 1
    assert len(exact) == 20


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60), st.uuids(), st.uuids(), st.integers(1_000_000_000, 2_000_000_000))
def test_property_uuid_and_epoch_never_change_the_fingerprint(
    prefix: str, a: uuid.UUID, b: uuid.UUID, epoch: int
) -> None:
    one = _body(f"{prefix} :: {a} @ {epoch}")
    two = _body(f"{prefix} :: {b} @ {epoch + 17}")
    assert fingerprint("m", one) == fingerprint("m", two)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(categories=["L", "Zs"]), min_size=1, max_size=40), st.text(max_size=40))
def test_property_different_words_never_collide(word: str, rest: str) -> None:
    # Letters-only words other than a-f hex runs are never masked: changing them changes the hash.
    assert fingerprint("m", _body(rest + word)) != fingerprint("m", _body(rest + word + "Z"))
