"""Tests for the simulated LLM upstream (resgov.simulator.upstream).

The official SDKs are used wherever possible: if they parse the simulator's answers,
so will the proxy's code paths that were written against the real providers.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import pytest

import resgov
from resgov.simulator.upstream import SimConfig, SimUpstream, SimUpstreamThread

PROMPT = "hello world, how are you today?"


@pytest.fixture
def sim() -> Iterator[SimUpstreamThread]:
    with SimUpstreamThread(SimConfig(chunks=4)) as server:
        yield server


def oai(sim: SimUpstreamThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=sim.base_url + "/v1", api_key="x", max_retries=0)


def claude(sim: SimUpstreamThread) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=sim.base_url, api_key="x", max_retries=0)


def expected_input_tokens(text: str) -> int:
    return math.ceil(len(text.encode()) / 4)


def post_json(url: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """Tiny stdlib client so error paths are checked without SDK interpretation."""
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"content-type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def exception_chain(exc: BaseException | None) -> str:
    """Messages of an exception and everything it was raised from."""
    parts = []
    while exc is not None:
        parts.append(f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__ or exc.__context__
    return " <- ".join(parts)


def parse_sse(raw: bytes) -> list[tuple[str | None, str]]:
    """(event, data) pairs from a complete SSE body."""
    out: list[tuple[str | None, str]] = []
    for block in raw.decode().split("\n\n"):
        if not block.strip():
            continue
        event = None
        data = []
        for line in block.split("\n"):
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data.append(line[6:])
        out.append((event, "\n".join(data)))
    return out


# ----------------------------------------------------------------------- OpenAI chat


def test_openai_chat_non_stream(sim: SimUpstreamThread) -> None:
    resp = oai(sim).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": PROMPT}]
    )
    assert resp.object == "chat.completion"
    assert resp.id.startswith("chatcmpl-")
    assert resp.model == "gpt-4o-mini"
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == "tok " * 4
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage is not None
    assert resp.usage.prompt_tokens == expected_input_tokens(PROMPT)
    assert resp.usage.completion_tokens == 4
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 4


def test_openai_chat_stream_n2_include_usage(sim: SimUpstreamThread) -> None:
    stream = oai(sim).chat.completions.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": PROMPT}],
        n=2,
        stream=True,
        stream_options={"include_usage": True},
    )
    texts = {0: "", 1: ""}
    finishes: dict[int, str | None] = {}
    usage_chunks = []
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if not chunk.choices:
            usage_chunks.append(chunk.usage)
            continue
        assert chunk.usage is None  # only the last chunk carries usage
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert texts == {0: "tok " * 4, 1: "tok " * 4}
    assert finishes == {0: "stop", 1: "stop"}
    assert len(usage_chunks) == 1 and usage_chunks[0] is not None
    assert usage_chunks[0].completion_tokens == 8  # summed over both choices
    assert usage_chunks[0].prompt_tokens == expected_input_tokens(PROMPT)
    assert sim.stats.completed["/chat/completions"] == 1


def test_openai_chat_stream_without_include_usage_has_no_usage(sim: SimUpstreamThread) -> None:
    chunks = list(
        oai(sim).chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], stream=True)
    )
    assert all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_any_path_prefix_is_accepted(sim: SimUpstreamThread) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    for prefix in ("", "/v1", "/api/v1", "/openai/deployments/x"):
        status, data = post_json(sim.base_url + prefix + "/chat/completions", body)
        assert status == 200 and data["object"] == "chat.completion"
    assert sim.stats.received["/chat/completions"] == 4
    status, data = post_json(sim.base_url + "/v1/nope", body)
    assert status == 404 and "message" in data["error"]


def test_tool_call_openai(sim: SimUpstreamThread) -> None:
    sim.config.tool_call = True
    tools: Any = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    client = oai(sim)
    resp = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "q"}], tools=tools)
    call = resp.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert resp.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "lookup"  # type: ignore[union-attr]
    assert json.loads(call.function.arguments) == {"input": "tok " * 4}  # type: ignore[union-attr]
    args = ""
    for chunk in client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "q"}], tools=tools, stream=True
    ):
        for choice in chunk.choices:
            for tc in choice.delta.tool_calls or []:
                args += (tc.function.arguments or "") if tc.function else ""
    assert json.loads(args) == {"input": "tok " * 4}


# ------------------------------------------------------------------------ Anthropic


def test_anthropic_non_stream(sim: SimUpstreamThread) -> None:
    msg = claude(sim).messages.create(
        model="claude-sim",
        max_tokens=100,
        system="be brief",
        messages=[{"role": "user", "content": PROMPT}],
    )
    assert msg.type == "message" and msg.role == "assistant"
    assert msg.id.startswith("msg_")
    assert msg.content[0].type == "text" and msg.content[0].text == "tok " * 4
    assert msg.stop_reason == "end_turn" and msg.stop_sequence is None
    assert msg.usage.input_tokens == expected_input_tokens("be brief" + PROMPT)
    assert msg.usage.output_tokens == 4
    assert msg.usage.cache_read_input_tokens == 0


def test_anthropic_stream(sim: SimUpstreamThread) -> None:
    with claude(sim).messages.stream(
        model="claude-haiku", max_tokens=3, messages=[{"role": "user", "content": PROMPT}]
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "tok " * 3
    assert final.stop_reason == "max_tokens"
    assert final.usage.input_tokens == expected_input_tokens(PROMPT)
    assert final.usage.output_tokens == 3

    events = list(
        claude(sim).messages.create(
            model="claude-haiku", max_tokens=50, messages=[{"role": "user", "content": "x"}], stream=True
        )
    )
    kinds = [e.type for e in events]
    assert kinds == [  # the SDK swallows "ping"; the raw SSE test checks it is sent
        "message_start",
        "content_block_start",
        *["content_block_delta"] * 4,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]


def test_anthropic_requires_max_tokens(sim: SimUpstreamThread) -> None:
    status, data = post_json(sim.base_url + "/v1/messages", {"model": "c", "messages": []})
    assert status == 400
    assert data["type"] == "error"
    assert data["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in data["error"]["message"]


def test_tool_call_anthropic(sim: SimUpstreamThread) -> None:
    sim.config.tool_call = True
    tools: Any = [{"name": "search", "input_schema": {"type": "object"}}]
    client = claude(sim)
    msg = client.messages.create(
        model="c", max_tokens=64, messages=[{"role": "user", "content": "q"}], tools=tools
    )
    assert msg.stop_reason == "tool_use"
    block = msg.content[0]
    assert block.type == "tool_use" and block.name == "search" and block.input == {"input": "tok " * 4}
    with client.messages.stream(
        model="c", max_tokens=64, messages=[{"role": "user", "content": "q"}], tools=tools
    ) as stream:
        final = stream.get_final_message()
    assert final.content[0].type == "tool_use" and final.content[0].input == {"input": "tok " * 4}


# ------------------------------------------------------------- embeddings, responses


def test_embeddings(sim: SimUpstreamThread) -> None:
    client = oai(sim)
    resp = client.embeddings.create(model="text-embedding-3-small", input=["hello", "world!!"])  # base64
    assert [d.index for d in resp.data] == [0, 1]
    assert all(len(d.embedding) == 8 for d in resp.data)
    assert resp.usage.prompt_tokens == resp.usage.total_tokens == 2 + 2
    floats = client.embeddings.create(model="e", input="abc", encoding_format="float", dimensions=3)
    assert len(floats.data[0].embedding) == 3
    assert floats.data[0].object == "embedding"


def test_responses_api(sim: SimUpstreamThread) -> None:
    client = oai(sim)
    resp = client.responses.create(model="gpt-4.1", input=PROMPT, instructions="short")
    assert resp.status == "completed"
    assert resp.output_text == "tok " * 4
    assert resp.usage is not None
    assert resp.usage.input_tokens == expected_input_tokens(PROMPT + "short")
    assert resp.usage.output_tokens == 4
    assert resp.usage.total_tokens == resp.usage.input_tokens + 4

    events = list(client.responses.create(model="gpt-4.1", input=PROMPT, stream=True))
    assert events[0].type == "response.created"
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert "".join(deltas) == "tok " * 4
    assert events[-1].type == "response.completed"
    assert events[-1].response.usage is not None
    assert events[-1].response.usage.output_tokens == 4
    assert [e.sequence_number for e in events] == list(range(len(events)))


# ------------------------------------------------------------------ token accounting


def test_usage_never_exceeds_caps(sim: SimUpstreamThread) -> None:
    sim.config.chunks = 16
    client = oai(sim)
    msgs: Any = [{"role": "user", "content": PROMPT}]
    resp = client.chat.completions.create(model="m", messages=msgs, max_tokens=5)
    assert resp.usage is not None and resp.usage.completion_tokens == 5
    assert resp.choices[0].finish_reason == "length"
    resp = client.chat.completions.create(model="m", messages=msgs, max_completion_tokens=3, n=3)
    assert resp.usage is not None and resp.usage.completion_tokens == 9

    sim.config.tokens_per_chunk = 3
    resp = client.chat.completions.create(model="m", messages=msgs, max_tokens=10)
    assert resp.usage is not None and resp.usage.completion_tokens == 10
    assert resp.choices[0].message.content == "tok " * 3 * 4  # ceil(10/3) chunks, billed at the cap
    stream = client.chat.completions.create(
        model="m", messages=msgs, max_tokens=7, stream=True, stream_options={"include_usage": True}
    )
    usage = [c.usage for c in stream if c.usage is not None]
    assert usage[0].completion_tokens == 7

    sim.config.tokens_per_chunk = 1
    msg = claude(sim).messages.create(model="c", max_tokens=2, messages=msgs)
    assert msg.usage.output_tokens == 2 and msg.stop_reason == "max_tokens"
    r = client.responses.create(model="m", input=PROMPT, max_output_tokens=6)
    assert r.usage is not None and r.usage.output_tokens == 6 and r.status == "incomplete"

    # Input tokens are bounded by the request body size.
    big = "é" * 1000  # 2000 UTF-8 bytes
    msg = claude(sim).messages.create(model="c", max_tokens=1, messages=[{"role": "user", "content": big}])
    assert msg.usage.input_tokens == 500
    assert msg.usage.input_tokens <= len(json.dumps(sim.stats.requests[-1].body).encode())


def test_usage_multiplier_and_omit_usage(sim: SimUpstreamThread) -> None:
    sim.config.usage_multiplier = 2.5
    resp = oai(sim).chat.completions.create(model="m", messages=[{"role": "user", "content": "abcd"}])
    assert resp.usage is not None
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (math.ceil(2.5), 10)
    sim.config.usage_multiplier = 1.0
    sim.config.omit_usage = True
    resp = oai(sim).chat.completions.create(model="m", messages=[{"role": "user", "content": "abcd"}])
    assert resp.usage is None
    chunks = list(
        oai(sim).chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "abcd"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.usage is None for c in chunks) and all(c.choices for c in chunks)


# ---------------------------------------------------------------- faults & overrides


def test_error_status_openai_and_anthropic(sim: SimUpstreamThread) -> None:
    sim.config.error_status = 429
    with pytest.raises(openai.RateLimitError) as oexc:
        oai(sim).chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert oexc.value.status_code == 429
    assert oexc.value.code == "rate_limit_exceeded"
    assert oexc.value.response.headers["retry-after"] == "1"
    with pytest.raises(anthropic.RateLimitError) as aexc:
        claude(sim).messages.create(model="c", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert aexc.value.body == {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": "Simulated rate_limit_error (429)."},
    }
    sim.config.error_status = 500
    with pytest.raises(openai.InternalServerError):
        list(
            oai(sim).chat.completions.create(
                model="m", messages=[{"role": "user", "content": "x"}], stream=True
            )
        )
    status, data = post_json(sim.base_url + "/v1/messages", {"max_tokens": 1, "messages": []})
    assert status == 500 and data["error"]["type"] == "api_error"
    assert sim.stats.completed["/chat/completions"] == 2


def test_per_request_header_overrides(sim: SimUpstreamThread) -> None:
    client = oai(sim)
    msgs: Any = [{"role": "user", "content": "x"}]
    resp = client.chat.completions.create(model="m", messages=msgs, extra_headers={"X-Sim-Chunks": "2"})
    assert resp.choices[0].message.content == "tok tok "
    with pytest.raises(openai.APIStatusError) as exc:
        client.chat.completions.create(model="m", messages=msgs, extra_headers={"X-Sim-Error-Status": "503"})
    assert exc.value.status_code == 503
    # Overrides are per request: the shared config is untouched.
    assert sim.config.chunks == 4 and sim.config.error_status is None
    assert client.chat.completions.create(model="m", messages=msgs).choices[0].message.content == "tok " * 4

    t0 = time.perf_counter()
    client.chat.completions.create(model="m", messages=msgs, extra_headers={"X-Sim-Latency-Ms": "60"})
    assert time.perf_counter() - t0 >= 0.06
    status, data = post_json(
        sim.base_url + "/v1/chat/completions", {"messages": msgs}, {"X-Sim-Chunks": "lots"}
    )
    assert status == 400 and "chunks" in data["error"]["message"]
    headers = sim.stats.requests[-1].headers
    assert headers["x-sim-chunks"] == "lots"


def test_cut_after_chunks_is_a_client_visible_error(sim: SimUpstreamThread) -> None:
    sim.config.cut_after_chunks = 2
    stream = oai(sim).chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "x"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    got = ""
    # SDK versions differ in how they wrap it; the root cause is always the truncated body.
    with pytest.raises(Exception) as exc:
        for chunk in stream:
            for choice in chunk.choices:
                got += choice.delta.content or ""
    assert "incomplete chunked read" in exception_chain(exc.value)
    assert got == "tok tok "
    assert sim.stats.aborted["/chat/completions"] == 1
    assert "/chat/completions" not in sim.stats.completed

    with (
        pytest.raises(Exception) as exc,
        claude(sim).messages.stream(
            model="c", max_tokens=9, messages=[{"role": "user", "content": "x"}]
        ) as s,
    ):
        s.get_final_message()
    assert "incomplete chunked read" in exception_chain(exc.value)


def test_stall_and_chunk_delay() -> None:
    async def scenario() -> None:
        sim = SimUpstream(SimConfig(chunks=3, chunk_delay_ms=20))
        await sim.start()
        body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True}
        url = sim.base_url + "/v1/chat/completions"
        async with aiohttp.ClientSession() as session:
            t0 = time.perf_counter()
            async with session.post(url, json=body) as resp:
                raw = await resp.read()
            assert time.perf_counter() - t0 >= 0.06  # 3 content chunks x 20 ms
            assert raw.endswith(b"data: [DONE]\n\n")

            sim.config.chunk_delay_ms = 0
            sim.config.stall_after_chunks = 1
            timeout = aiohttp.ClientTimeout(sock_read=0.1)
            async with session.post(url, json=body, timeout=timeout) as resp:
                first = await resp.content.readuntil(b"\n\n")  # role chunk
                second = await resp.content.readuntil(b"\n\n")  # one content chunk
                assert b'"content":"tok "' in second and b'"role"' in first
                with pytest.raises(asyncio.TimeoutError):
                    await resp.content.readuntil(b"\n\n")
        # stop() must not hang on the stalled connection.
        await asyncio.wait_for(sim.stop(), 2)
        assert sim.stats.aborted["/chat/completions"] == 1

    asyncio.run(scenario())


def test_split_sse_many_small_chunks_reassemble(sim: SimUpstreamThread) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True}

    async def fetch(url: str, split: bool, payload: dict[str, Any]) -> tuple[bytes, int]:
        headers = {"X-Sim-Split-Sse": "true"} if split else {}
        pieces = []
        async with (
            aiohttp.ClientSession() as session,
            session.post(url, json=payload, headers=headers) as resp,
        ):
            async for data, _end in resp.content.iter_chunks():
                pieces.append(data)
        return b"".join(pieces), len(pieces)

    async def scenario() -> None:
        base = sim.base_url + "/v1"
        chat_payload = {**body, "stream_options": {"include_usage": True}}
        whole, n_whole = await fetch(base + "/chat/completions", False, chat_payload)
        split, n_split = await fetch(base + "/chat/completions", True, chat_payload)
        events_whole = parse_sse(whole)
        events_split = parse_sse(split)
        assert n_split > 10 * len(events_split) > n_whole
        assert len(events_split) == len(events_whole) == 1 + 4 + 1 + 1 + 1
        assert events_split[-1] == (None, "[DONE]")
        usage = json.loads(events_split[-2][1])["usage"]
        assert usage["completion_tokens"] == 4

        anth = {
            "model": "c",
            "max_tokens": 10,
            "messages": [{"role": "user", "content": "x"}],
            "stream": True,
        }
        split, n_split = await fetch(sim.base_url + "/v1/messages", True, anth)
        events = parse_sse(split)
        assert [e for e, _ in events][:3] == ["message_start", "content_block_start", "ping"]
        assert [e for e, _ in events][-2:] == ["message_delta", "message_stop"]
        assert json.loads(events[-2][1])["usage"] == {"output_tokens": 4}
        assert n_split > 10 * len(events)

    asyncio.run(scenario())


def test_split_sse_through_sdk(sim: SimUpstreamThread) -> None:
    sim.config.split_sse = True
    stream = oai(sim).chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "x"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "tok " * 4
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4


# ----------------------------------------------------------------- HTTP plumbing


def test_chunked_request_body_and_pipelining(sim: SimUpstreamThread) -> None:
    async def body() -> AsyncIterator[bytes]:
        raw = json.dumps({"model": "m", "messages": [{"role": "user", "content": "chunked"}]}).encode()
        for i in range(0, len(raw), 7):
            yield raw[i : i + 7]

    async def chunked() -> None:
        async with aiohttp.ClientSession() as session:
            resp = await session.post(sim.base_url + "/v1/chat/completions", data=body())
            assert resp.status == 200
            assert (await resp.json())["usage"]["prompt_tokens"] == 2

    asyncio.run(chunked())

    payload = json.dumps({"model": "m", "messages": [{"role": "user", "content": "p"}]}).encode()
    req = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n%%s\r\n" % len(payload)
    ) + payload
    # Three pipelined requests, the middle one delayed: answers must stay in order.
    wire = req % b"" + req % b"x-sim-latency-ms: 30\r\nx-sim-chunks: 1\r\n" + req % b"connection: close\r\n"
    with socket.create_connection(("127.0.0.1", sim.port), timeout=5) as sock:
        sock.sendall(wire)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.count(b"HTTP/1.1 200 OK") == 3
    contents = [json.loads(part.split(b"\r\n\r\n", 1)[1]) for part in data.split(b"HTTP/1.1 ")[1:]]
    assert [c["choices"][0]["message"]["content"] for c in contents] == ["tok " * 4, "tok ", "tok " * 4]
    assert b"connection: close" in data.split(b"HTTP/1.1 ")[-1]


def test_stats_counters_and_control_endpoints(sim: SimUpstreamThread) -> None:
    client = oai(sim)
    client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    list(client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], stream=True))
    claude(sim).messages.create(model="c", max_tokens=3, messages=[{"role": "user", "content": "y"}])
    assert sim.stats.received == {"/chat/completions": 2, "/messages": 1}
    assert sim.stats.completed == {"/chat/completions": 2, "/messages": 1}
    rec = sim.stats.requests[-1]
    assert rec.path == "/v1/messages" and rec.method == "POST"
    assert rec.body["max_tokens"] == 3
    assert "anthropic-version" in rec.headers  # names are lower-cased

    with urllib.request.urlopen(sim.base_url + "/_sim/stats", timeout=5) as resp:
        stats = json.loads(resp.read())
    assert stats["received"] == {"/chat/completions": 2, "/messages": 1}
    assert stats["completed_total"] == 3
    reset = urllib.request.Request(sim.base_url + "/_sim/reset", data=b"", method="POST")
    with urllib.request.urlopen(reset, timeout=5) as resp:
        assert json.loads(resp.read()) == {"ok": True}
    assert sim.stats.received == {} and sim.stats.completed == {} and len(sim.stats.requests) == 0

    status, cfg = post_json(sim.base_url + "/_sim/config", {"chunks": 2, "error_status": None})
    assert status == 200 and cfg["chunks"] == 2 and sim.config.chunks == 2
    status, _ = post_json(sim.base_url + "/_sim/config", {"chunks": "x"})
    assert status == 400 and sim.config.chunks == 2


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        SimConfig(tokens_per_chunk=0)
    cfg = SimConfig().with_overrides({"error_status": "429", "split_sse": "yes", "cut_after_chunks": "none"})
    assert (cfg.error_status, cfg.split_sse, cfg.cut_after_chunks) == (429, True, None)
    with pytest.raises(ValueError):
        SimConfig().with_overrides({"nope": "1"})


def test_run_as_separate_process() -> None:
    src = str(Path(resgov.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "resgov.simulator.upstream", "--port", "0", "--chunks", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        base = line.strip().rsplit(" ", 1)[-1]
        assert base.startswith("http://127.0.0.1:"), line + (proc.stderr.read() if proc.stderr else "")
        status, data = post_json(
            base + "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}
        )
        assert status == 200 and data["usage"]["completion_tokens"] == 2
        with urllib.request.urlopen(base + "/_sim/stats", timeout=5) as resp:
            assert json.loads(resp.read())["completed"] == {"/chat/completions": 1}
    finally:
        proc.terminate()
        assert proc.wait(timeout=5) == 0
