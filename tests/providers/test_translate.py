"""Translation between OpenAI chat completions and Anthropic messages: requests, answers,
errors, streams, and the input bound of the translated request."""

from __future__ import annotations

import itertools
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resgov.core.bounds import input_bound, string_bytes
from resgov.core.errors import BadRequest, InvalidValue
from resgov.core.policy import ProviderPolicy
from resgov.core.pricing import Usage
from resgov.providers.anthropic import parse_messages
from resgov.providers.openai import parse_chat
from resgov.providers.sse import event_data, event_name
from resgov.providers.translate import (
    AnthropicToChatStream,
    ChatToAnthropicStream,
    ChatToMessages,
    MessagesToChat,
    anthropic_error_to_openai,
    chat_response_to_messages,
    chat_to_messages_request,
    messages_response_to_chat,
    messages_to_chat_request,
    openai_error_to_anthropic,
)
from tests.providers.test_anthropic import EXPECTED_BYTES, EXPECTED_USAGE, sample_stream

ANTHROPIC = ProviderPolicy(name="anthropic", base_url="https://api.anthropic.com", format="anthropic")
OPENAI = ProviderPolicy(name="openai", base_url="https://api.openai.com/v1", format="openai")
LOCAL = ProviderPolicy(name="vllm", base_url="http://127.0.0.1:8000/v1", format="openai")

PNG = "iVBORw0KGgo" + "A" * 200
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}

CHAT_CONVERSATION: list[dict[str, Any]] = [
    {"role": "system", "content": "You are terse."},
    {"role": "developer", "content": [{"type": "text", "text": "Use tools."}]},
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "Weather in Paris and Rome? See map."},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}", "detail": "high"}},
            {"type": "image_url", "image_url": {"url": "https://example.com/map.png"}},
        ],
    },
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
            },
            {
                "id": "call_2",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'},
            },
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "18C sunny"},
    {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "22C"}]},
    {"role": "user", "content": "Thanks. Which is warmer?"},
]


def chat_raw(**fields: Any) -> bytes:
    body: dict[str, Any] = {"model": "anthropic/claude-sonnet-4-6", "messages": CHAT_CONVERSATION}
    body.update(fields)
    return orjson.dumps(body)


# --- chat → messages: requests ---------------------------------------------------------------------


def test_chat_request_translated() -> None:
    raw = chat_raw(
        tools=[WEATHER_TOOL],
        tool_choice="required",
        parallel_tool_calls=False,
        stop="END",
        temperature=1.5,
        top_p=0.9,
        user="u-1",
        max_tokens=300,
        seed=7,
    )
    out = chat_to_messages_request(parse_chat(raw).body)
    assert out["system"] == [
        {"type": "text", "text": "You are terse."},
        {"type": "text", "text": "Use tools."},
    ]
    user, assistant, results = out["messages"]
    assert user["role"] == "user"
    assert user["content"] == [
        {"type": "text", "text": "Weather in Paris and Rome? See map."},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/map.png"}},
    ]
    assert assistant == {
        "role": "assistant",
        "content": [
            {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "call_2", "name": "get_weather", "input": {"city": "Rome"}},
        ],
    }
    # Consecutive tool results, and the user text after them, form one user turn.
    assert results == {
        "role": "user",
        "content": [
            {"type": "tool_result", "tool_use_id": "call_1", "content": "18C sunny"},
            {"type": "tool_result", "tool_use_id": "call_2", "content": "22C"},
            {"type": "text", "text": "Thanks. Which is warmer?"},
        ],
    }
    assert out["tools"] == [
        {
            "name": "get_weather",
            "description": "Weather for a city",
            "input_schema": WEATHER_TOOL["function"]["parameters"],  # type: ignore[index]
        }
    ]
    assert out["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}
    assert out["stop_sequences"] == ["END"]
    assert out["temperature"] == 1
    assert out["top_p"] == 0.9
    assert out["metadata"] == {"user_id": "u-1"}
    assert "seed" not in out and "stream" not in out


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ("auto", {"type": "auto"}),
        ("none", {"type": "none"}),
        (None, {"type": "auto"}),
        ({"type": "function", "function": {"name": "get_weather"}}, {"type": "tool", "name": "get_weather"}),
    ],
)
def test_tool_choice(choice: Any, expected: dict[str, Any]) -> None:
    fields: dict[str, Any] = {"tools": [WEATHER_TOOL]}
    if choice is not None:
        fields["tool_choice"] = choice
    assert chat_to_messages_request(parse_chat(chat_raw(**fields)).body)["tool_choice"] == expected


def test_json_mode_becomes_an_instruction() -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}
    out = chat_to_messages_request(parse_chat(chat_raw(response_format=fmt)).body)
    assert orjson.dumps(schema).decode() in out["system"][-1]["text"]
    out = chat_to_messages_request(parse_chat(chat_raw(response_format={"type": "json_object"})).body)
    assert "JSON" in out["system"][-1]["text"]


def test_files_become_documents() -> None:
    pdf = {"type": "file", "file": {"filename": "a.pdf", "file_data": "data:application/pdf;base64,JVBERi0x"}}
    txt = {"type": "file", "file": {"file_data": "data:text/plain;base64,aGVsbG8="}}
    messages = [{"role": "user", "content": [pdf, txt]}]
    out = chat_to_messages_request(parse_chat(chat_raw(messages=messages)).body)
    assert out["messages"][0]["content"] == [
        {
            "type": "document",
            "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0x"},
            "title": "a.pdf",
        },
        {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "hello"}},
    ]


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"n": 2}, InvalidValue),
        ({"web_search_options": {}}, InvalidValue),
        ({"modalities": ["text", "audio"]}, InvalidValue),
        ({"messages": [{"role": "function", "name": "f", "content": "x"}]}, InvalidValue),
        ({"messages": [{"role": 3, "content": "x"}]}, BadRequest),
        (
            {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
            InvalidValue,
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "data:image/png,xx"}}],
                    }
                ]
            },
            InvalidValue,
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "file", "file": {"file_id": "file-1"}}]}]},
            InvalidValue,
        ),
        ({"messages": [{"role": "user", "content": 5}]}, BadRequest),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{oops"}}],
                    }
                ]
            },
            InvalidValue,
        ),
        ({"messages": [{"role": "tool", "content": "x"}]}, BadRequest),
        ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, InvalidValue),
        ({"tools": [WEATHER_TOOL], "tool_choice": 5}, BadRequest),
        ({"stop": 5}, BadRequest),
        ({"temperature": "hot"}, BadRequest),
        ({"response_format": {"type": "grammar"}}, InvalidValue),
        ({"max_tokens": 0}, InvalidValue),
        ({"max_tokens": "5"}, BadRequest),
    ],
)
def test_chat_refusals(fields: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        ChatToMessages().parse(chat_raw(**fields))


def test_chat_to_messages_adapter_parse_and_build() -> None:
    adapter = ChatToMessages()
    raw = chat_raw(
        tools=[WEATHER_TOOL], max_completion_tokens=500, stream=True, stream_options={"include_usage": True}
    )
    same = parse_chat(raw)
    req = adapter.parse(raw)
    # The same checks and facts as the chat route.
    assert (req.model, req.output_cap, req.tools, req.stream, req.client_wants_usage) == (
        same.model,
        500,
        ["get_weather"],
        True,
        True,
    )
    path, body = adapter.build_upstream(req, 480, "claude-sonnet-4-6", ANTHROPIC)
    sent = orjson.loads(body)
    assert path == "/v1/messages"
    assert sent["model"] == "claude-sonnet-4-6"
    assert sent["max_tokens"] == 480
    assert sent["stream"] is True
    assert "stream_options" not in sent and "max_completion_tokens" not in sent


def test_bound_covers_the_translated_request() -> None:
    """The bound is computed on what Anthropic receives: body length, its media, its turns."""
    adapter = ChatToMessages()
    requests = [
        chat_raw(),
        chat_raw(tools=[WEATHER_TOOL]),
        # A schema written compactly in the client body grows a little when re-encoded
        # into an instruction, and an empty parameters object gets a default schema.
        chat_raw(
            tools=[{"type": "function", "function": {"name": "f"}}],
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "object"}},
            },
        ),
        orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}]}),
    ]
    for raw in requests:
        req = adapter.parse(raw)
        _, body = adapter.build_upstream(req, 10_000_000, "m", ANTHROPIC)
        assert req.raw_size >= len(body)
        assert req.raw_size >= len(raw)
        sent = orjson.loads(body)
        assert req.message_count >= len(sent["messages"]) + (1 if sent.get("system") else 0)
        bound = input_bound(req.raw_size, req.media_root, req.message_count, bool(req.tools), None)
        direct = input_bound(
            len(body),
            [sent["messages"], sent.get("system")],
            len(sent["messages"]) + 1,
            bool(req.tools),
            None,
        )
        assert bound.tokens >= direct.tokens
    # Both images of the conversation are swapped for their ceiling in the translated request.
    req = adapter.parse(chat_raw())
    assert input_bound(req.raw_size, req.media_root, req.message_count, False, None).media_parts == 2


def test_prediction_is_not_sent_so_not_billed() -> None:
    adapter = ChatToMessages()
    req = adapter.parse(chat_raw(prediction={"type": "content", "content": "x" * 100}))
    assert req.extra_output_tokens == 0
    assert b"prediction" not in adapter.build_upstream(req, 10, "m", ANTHROPIC)[1]


def test_parsed_request_keeps_the_client_body() -> None:
    """build_upstream translates, so it works whichever parse produced the request."""
    raw = chat_raw(tools=[WEATHER_TOOL], max_tokens=70)
    adapter = ChatToMessages()
    assert adapter.parse(raw).body == parse_chat(raw).body
    via_own = adapter.build_upstream(adapter.parse(raw), 70, "m", ANTHROPIC)
    via_route_parser = adapter.build_upstream(parse_chat(raw), 70, "m", ANTHROPIC)
    assert via_own == via_route_parser
    raw = messages_raw(tools=ANTHROPIC_TOOLS)
    back = MessagesToChat()
    assert back.build_upstream(back.parse(raw), 70, "m", LOCAL) == back.build_upstream(
        parse_messages(raw), 70, "m", LOCAL
    )


@pytest.mark.parametrize("tools", [False, True])
def test_client_body_bound_also_covers_the_translation(tools: bool) -> None:
    """Bounded from the client's body alone (the same-format parse), the translation still fits.

    What a provider bills as text is the strings of what it receives (JSON structure is not
    text), plus per-message and per-request overheads and each media part's ceiling.
    """
    tiny_chat = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    tiny_messages = orjson.dumps(
        {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    )
    json_schema = {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "object"}}}
    cases: list[tuple[Any, Any, bytes, ProviderPolicy]] = [
        (ChatToMessages(), parse_chat, chat_raw(tools=[WEATHER_TOOL]) if tools else chat_raw(), ANTHROPIC),
        (ChatToMessages(), parse_chat, chat_raw(response_format=json_schema), ANTHROPIC),
        (ChatToMessages(), parse_chat, chat_raw(response_format={"type": "json_object"}), ANTHROPIC),
        (ChatToMessages(), parse_chat, tiny_chat, ANTHROPIC),
        (
            MessagesToChat(),
            parse_messages,
            messages_raw(tools=ANTHROPIC_TOOLS) if tools else messages_raw(),
            OPENAI,
        ),
        (MessagesToChat(), parse_messages, tiny_messages, OPENAI),
    ]
    for adapter, same_format_parse, raw, provider in cases:
        client = same_format_parse(raw)
        _, body = adapter.build_upstream(client, 1000, "m", provider)
        sent = orjson.loads(body)
        count = len(sent["messages"]) + (1 if sent.get("system") else 0)
        root = [sent["messages"], sent.get("system")]
        client_bound = input_bound(client.raw_size, client.media_root, client.message_count, tools, None)
        sent_text = input_bound(string_bytes(sent), root, count, tools, None)
        assert client_bound.tokens >= sent_text.tokens
        assert client_bound.media_parts == sent_text.media_parts


# --- messages → chat: requests ---------------------------------------------------------------------

ANTHROPIC_CONVERSATION: list[dict[str, Any]] = [
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "What is in this picture, and the weather in Paris?"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": PNG}},
            {"type": "image", "source": {"type": "url", "url": "https://example.com/x.png"}},
        ],
    },
    {
        "role": "assistant",
        "content": [
            {"type": "thinking", "thinking": "Use the tool.", "signature": "sig"},
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {"city": "Nice"}},
        ],
    },
    {
        "role": "user",
        "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C"},
            {
                "type": "tool_result",
                "tool_use_id": "toolu_2",
                "content": [
                    {"type": "text", "text": "20C"},
                    {"type": "image", "source": {"type": "url", "url": "https://example.com/radar.png"}},
                ],
            },
            {"type": "text", "text": "And?"},
        ],
    },
]
ANTHROPIC_TOOLS = [
    {
        "name": "get_weather",
        "description": "Weather for a city",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
    }
]


def messages_raw(**fields: Any) -> bytes:
    body: dict[str, Any] = {
        "model": "vllm/qwen",
        "max_tokens": 400,
        "system": [{"type": "text", "text": "Be terse."}, {"type": "text", "text": "Be kind."}],
        "messages": ANTHROPIC_CONVERSATION,
    }
    body.update(fields)
    return orjson.dumps(body)


def test_messages_request_translated() -> None:
    raw = messages_raw(
        tools=ANTHROPIC_TOOLS,
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
        stop_sequences=["END"],
        temperature=0.2,
        top_k=5,
        metadata={"user_id": "u-2"},
        stream=True,
    )
    out = messages_to_chat_request(parse_messages(raw).body)
    msgs = out["messages"]
    assert msgs[0] == {"role": "system", "content": "Be terse.\nBe kind."}
    assert msgs[1] == {
        "role": "user",
        "content": [
            {"type": "text", "text": "What is in this picture, and the weather in Paris?"},
            {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{PNG}"}},
            {"type": "image_url", "image_url": {"url": "https://example.com/x.png"}},
        ],
    }
    assert msgs[2] == {
        "role": "assistant",
        "content": "Checking.",
        "tool_calls": [
            {
                "id": "toolu_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
            },
            {
                "id": "toolu_2",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city":"Nice"}'},
            },
        ],
    }
    # Tool results become tool messages right after the call; the image they held and the
    # text after them form the next user message.
    assert msgs[3] == {"role": "tool", "tool_call_id": "toolu_1", "content": "18C"}
    assert msgs[4] == {"role": "tool", "tool_call_id": "toolu_2", "content": "20C"}
    assert msgs[5] == {
        "role": "user",
        "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/radar.png"}},
            {"type": "text", "text": "And?"},
        ],
    }
    assert out["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather for a city",
                "parameters": ANTHROPIC_TOOLS[0]["input_schema"],
            },
        }
    ]
    assert out["tool_choice"] == "required"
    assert out["parallel_tool_calls"] is False
    assert out["stop"] == ["END"]
    assert out["temperature"] == 0.2
    assert "top_k" not in out
    assert out["user"] == "u-2"
    assert out["stream_options"] == {"include_usage": True}


def test_messages_documents_and_string_content() -> None:
    doc = {
        "type": "document",
        "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBER"},
        "title": "r.pdf",
    }
    text_doc = {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "notes"}}
    messages = [{"role": "user", "content": [doc, text_doc]}, {"role": "assistant", "content": "ok"}]
    out = messages_to_chat_request(parse_messages(messages_raw(messages=messages, system="S")).body)
    assert out["messages"] == [
        {"role": "system", "content": "S"},
        {
            "role": "user",
            "content": [
                {
                    "type": "file",
                    "file": {"filename": "r.pdf", "file_data": "data:application/pdf;base64,JVBER"},
                },
                {"type": "text", "text": "notes"},
            ],
        },
        {"role": "assistant", "content": "ok"},
    ]


@pytest.mark.parametrize(
    "fields",
    [
        {"tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 2}]},
        {"tools": [{"type": "bash_20250124", "name": "bash"}]},
        {"mcp_servers": [{"type": "url", "url": "https://m", "name": "m"}]},
        {"messages": [{"role": "user", "content": [{"type": "search_result", "source": "s"}]}]},
        {
            "messages": [
                {
                    "role": "assistant",
                    "content": [{"type": "server_tool_use", "id": "s", "name": "web_search", "input": {}}],
                }
            ]
        },
        {
            "messages": [
                {"role": "user", "content": [{"type": "image", "source": {"type": "file", "file_id": "f"}}]}
            ]
        },
        {"system": [{"type": "image", "source": {}}]},
    ],
)
def test_messages_untranslatable(fields: dict[str, Any]) -> None:
    with pytest.raises(InvalidValue):
        MessagesToChat().parse(messages_raw(**fields))


def test_messages_refusals_are_the_messages_route_ones() -> None:
    with pytest.raises(BadRequest, match="max_tokens"):
        MessagesToChat().parse(messages_raw(max_tokens=None))


def test_messages_to_chat_adapter_build() -> None:
    adapter = MessagesToChat()
    req = adapter.parse(messages_raw(stream=True))
    assert req.output_cap == 400 and req.stream
    path, body = adapter.build_upstream(req, 350, "qwen", LOCAL)
    sent = orjson.loads(body)
    assert path == "/chat/completions"
    assert sent["model"] == "qwen"
    assert sent["max_tokens"] == 350
    assert sent["stream_options"] == {"include_usage": True}
    # OpenAI's reasoning models take max_completion_tokens.
    req = adapter.parse(messages_raw())
    sent = orjson.loads(adapter.build_upstream(req, 350, "o4-mini", OPENAI)[1])
    assert sent["max_completion_tokens"] == 350 and "max_tokens" not in sent


def test_messages_bound_counts_split_tool_results() -> None:
    """One Anthropic turn with two tool results becomes three chat messages: all bounded."""
    adapter = MessagesToChat()
    raw = messages_raw(tools=ANTHROPIC_TOOLS)
    req = adapter.parse(raw)
    _, body = adapter.build_upstream(req, 10_000_000, "m", OPENAI)
    sent = orjson.loads(body)
    assert len(sent["messages"]) == 6
    assert req.message_count == 6
    assert req.raw_size >= len(body)
    assert input_bound(req.raw_size, req.media_root, req.message_count, True, None).media_parts == 3


# --- round trips ------------------------------------------------------------------------------------


def test_chat_round_trip_keeps_tools_results_images_and_system() -> None:
    body = parse_chat(chat_raw(tools=[WEATHER_TOOL])).body
    there = chat_to_messages_request(body)
    back = messages_to_chat_request(parse_messages(orjson.dumps({**there, "max_tokens": 10})).body)
    assert back["tools"] == [WEATHER_TOOL]
    msgs = back["messages"]
    assert msgs[0] == {"role": "system", "content": "You are terse.\nUse tools."}
    assert msgs[1]["content"][1]["image_url"]["url"] == f"data:image/png;base64,{PNG}"
    assert msgs[1]["content"][2]["image_url"]["url"] == "https://example.com/map.png"
    assert msgs[2]["tool_calls"] == CHAT_CONVERSATION[3]["tool_calls"]
    assert msgs[3] == {"role": "tool", "tool_call_id": "call_1", "content": "18C sunny"}
    assert msgs[4] == {"role": "tool", "tool_call_id": "call_2", "content": "22C"}
    assert msgs[5] == {"role": "user", "content": "Thanks. Which is warmer?"}


def test_messages_round_trip_keeps_tools_and_results() -> None:
    body = parse_messages(
        messages_raw(tools=ANTHROPIC_TOOLS, tool_choice={"type": "tool", "name": "get_weather"})
    ).body
    there = messages_to_chat_request(body)
    back = chat_to_messages_request(parse_chat(orjson.dumps(there)).body)
    assert back["tools"] == ANTHROPIC_TOOLS
    assert back["tool_choice"] == {"type": "tool", "name": "get_weather"}
    assistant = back["messages"][1]
    assert [b for b in assistant["content"] if b["type"] == "tool_use"] == ANTHROPIC_CONVERSATION[1][
        "content"
    ][2:]
    results = back["messages"][2]["content"]
    assert results[0] == {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C"}
    assert results[1] == {"type": "tool_result", "tool_use_id": "toolu_2", "content": "20C"}


# --- answers -----------------------------------------------------------------------------------------

ANTHROPIC_ANSWER: dict[str, Any] = {
    "id": "msg_01",
    "type": "message",
    "role": "assistant",
    "model": "claude-sonnet-4-6",
    "content": [
        {"type": "thinking", "thinking": "ok", "signature": "s"},
        {"type": "text", "text": "Calling."},
        {"type": "tool_use", "id": "toolu_9", "name": "get_weather", "input": {"city": "Oslo"}},
    ],
    "stop_reason": "tool_use",
    "stop_sequence": None,
    "usage": {
        "input_tokens": 10,
        "output_tokens": 20,
        "cache_read_input_tokens": 100,
        "cache_creation_input_tokens": 5,
    },
}


def test_anthropic_answer_as_chat_completion() -> None:
    out = messages_response_to_chat(ANTHROPIC_ANSWER)
    assert out["id"] == "msg_01"
    assert out["object"] == "chat.completion"
    assert out["model"] == "claude-sonnet-4-6"
    choice = out["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Calling."
    assert choice["message"]["reasoning_content"] == "ok"
    assert choice["message"]["tool_calls"] == [
        {
            "id": "toolu_9",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'},
        }
    ]
    assert out["usage"] == {
        "prompt_tokens": 115,
        "completion_tokens": 20,
        "total_tokens": 135,
        "prompt_tokens_details": {"cached_tokens": 100},
    }
    adapter = ChatToMessages()
    req = adapter.parse(chat_raw())
    assert (
        orjson.loads(adapter.client_body(b"", ANTHROPIC_ANSWER, req))["choices"][0]["finish_reason"]
        == "tool_calls"
    )
    assert adapter.usage(ANTHROPIC_ANSWER) == Usage(10, 20, cache_read_tokens=100, cache_write_tokens=5)
    assert adapter.content_bytes(ANTHROPIC_ANSWER) > 0


@pytest.mark.parametrize(
    ("stop", "finish"),
    [
        ("end_turn", "stop"),
        ("max_tokens", "length"),
        ("stop_sequence", "stop"),
        ("refusal", "content_filter"),
        ("tool_use", "tool_calls"),
    ],
)
def test_stop_reasons(stop: str, finish: str) -> None:
    assert (
        messages_response_to_chat({**ANTHROPIC_ANSWER, "stop_reason": stop})["choices"][0]["finish_reason"]
        == finish
    )


CHAT_ANSWER: dict[str, Any] = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "model": "qwen",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "Sure.",
                "tool_calls": [
                    {
                        "id": "call_7",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Lima"}'},
                    },
                    {
                        "id": "call_8",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": "not json"},
                    },
                ],
            },
            "finish_reason": "tool_calls",
        }
    ],
    "usage": {"prompt_tokens": 50, "completion_tokens": 7, "prompt_tokens_details": {"cached_tokens": 30}},
}


def test_chat_answer_as_anthropic_message() -> None:
    out = chat_response_to_messages(CHAT_ANSWER)
    assert out == {
        "id": "chatcmpl-1",
        "type": "message",
        "role": "assistant",
        "model": "qwen",
        "content": [
            {"type": "text", "text": "Sure."},
            {"type": "tool_use", "id": "call_7", "name": "get_weather", "input": {"city": "Lima"}},
            {
                "type": "tool_use",
                "id": "call_8",
                "name": "get_weather",
                "input": {"_raw_arguments": "not json"},
            },
        ],
        "stop_reason": "tool_use",
        "stop_sequence": None,
        "usage": {
            "input_tokens": 20,
            "output_tokens": 7,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 30,
        },
    }
    length = {**CHAT_ANSWER, "choices": [{"message": {"content": "x"}, "finish_reason": "length"}]}
    assert chat_response_to_messages(length)["stop_reason"] == "max_tokens"
    adapter = MessagesToChat()
    assert adapter.usage(CHAT_ANSWER) == Usage(input_tokens=20, output_tokens=7, cache_read_tokens=30)
    req = adapter.parse(messages_raw())
    assert orjson.loads(adapter.client_body(b"", CHAT_ANSWER, req))["type"] == "message"


# --- errors ------------------------------------------------------------------------------------------


def test_errors_both_ways() -> None:
    anthropic = b'{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}'
    out = orjson.loads(anthropic_error_to_openai(429, anthropic))
    assert out["error"]["message"] == "slow down"
    assert out["error"]["type"] == "rate_limit_error"
    assert orjson.loads(anthropic_error_to_openai(502, b"<html>bad gateway</html>"))["error"] == {
        "message": "<html>bad gateway</html>",
        "type": "server_error",
        "param": None,
        "code": None,
    }
    openai = (
        b'{"error":{"message":"Incorrect API key","type":"invalid_request_error","code":"invalid_api_key"}}'
    )
    assert orjson.loads(openai_error_to_anthropic(401, openai)) == {
        "type": "error",
        "error": {"type": "authentication_error", "message": "Incorrect API key"},
    }
    assert orjson.loads(openai_error_to_anthropic(503, b""))["error"]["type"] == "api_error"
    assert orjson.loads(MessagesToChat().client_error(429, openai))["error"]["type"] == "rate_limit_error"
    assert "error" in orjson.loads(ChatToMessages().client_error(400, anthropic))


# --- streams: Anthropic events → chat chunks ------------------------------------------------------------


def sse_payloads(data: bytes) -> list[Any]:
    """The data payloads of an SSE byte stream, decoded (``[DONE]`` kept as a string)."""
    out: list[Any] = []
    for event in data.split(b"\n\n"):
        payload = event_data(event)
        if payload:
            out.append("[DONE]" if payload == b"[DONE]" else orjson.loads(payload))
    return out


def translate_anthropic(pieces: list[bytes], wants_usage: bool) -> tuple[AnthropicToChatStream, bytes, bytes]:
    scanner = AnthropicToChatStream(wants_usage=wants_usage, model="anthropic/claude")
    # Two translations compared byte for byte must not straddle a second of the "created" clock.
    scanner.created = 1_700_000_000
    out = b"".join(scanner.feed(p) for p in pieces)
    return scanner, out, scanner.finish()


def test_anthropic_stream_as_chat_chunks() -> None:
    scanner, out, tail = translate_anthropic([sample_stream()], wants_usage=False)
    assert tail == b"data: [DONE]\n\n"
    assert b"[DONE]" not in out
    chunks = sse_payloads(out)
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == "msg_abc" for c in chunks)
    assert all("usage" not in c for c in chunks)
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert "".join(d.get("content", "") for d in deltas) == "Hé, world"
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "let me see"
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert calls[0] == {
        "index": 0,
        "id": "toolu_1",
        "type": "function",
        "function": {"name": "f", "arguments": ""},
    }
    assert "".join(c["function"]["arguments"] for c in calls) == '{"q": "x"}'
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]]
    assert finishes == ["tool_calls"]
    assert scanner.usage == EXPECTED_USAGE
    assert scanner.content_bytes == EXPECTED_BYTES
    assert scanner.upstream_id == "msg_abc"
    assert scanner.done


def test_anthropic_stream_usage_chunk_only_when_asked() -> None:
    _, out, _ = translate_anthropic([sample_stream()], wants_usage=True)
    chunks = sse_payloads(out)
    assert all("usage" in c for c in chunks)
    assert chunks[-1]["choices"] == []
    # prompt = plain 25 + cache read 100 + writes 50; cached = the reads.
    assert chunks[-1]["usage"] == {
        "prompt_tokens": 175,
        "completion_tokens": 42,
        "total_tokens": 217,
        "prompt_tokens_details": {"cached_tokens": 100},
    }
    assert all(c["usage"] is None for c in chunks[:-1])


@settings(max_examples=150, deadline=None)
@given(
    cuts=st.lists(st.integers(min_value=0, max_value=len(sample_stream(True))), max_size=30),
    crlf=st.booleans(),
)
def test_anthropic_stream_translation_ignores_packet_boundaries(cuts: list[int], crlf: bool) -> None:
    data = sample_stream(crlf)
    points = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    pieces = [data[a:b] for a, b in itertools.pairwise(points)]
    _, whole, whole_tail = translate_anthropic([data], wants_usage=True)
    scanner, out, tail = translate_anthropic(pieces, wants_usage=True)
    assert out + tail == whole + whole_tail
    assert scanner.usage == EXPECTED_USAGE


def test_anthropic_stream_error_and_cut() -> None:
    error = (
        b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}\n\n'
    )
    data = sample_stream()
    cut = data.index(b"event: message_delta")
    scanner, out, tail = translate_anthropic([data[:cut], error], wants_usage=False)
    assert sse_payloads(out)[-1] == {"error": {"type": "overloaded_error", "message": "Overloaded"}}
    assert tail == b""
    assert scanner.usage is None and not scanner.done
    assert scanner.content_bytes == EXPECTED_BYTES
    assert sse_payloads(scanner.error_event("upstream_cut", "cut")) == [
        {"error": {"type": "upstream_cut", "message": "cut"}}
    ]


# --- streams: chat chunks → Anthropic events ------------------------------------------------------------


def chat_stream(tool: bool, usage: bool = True) -> bytes:
    base = {"id": "chatcmpl-9", "object": "chat.completion.chunk", "created": 1, "model": "qwen"}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        return (
            b"data: "
            + orjson.dumps({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
            + b"\n\n"
        )

    parts = [
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "Let me "}),
        chunk({"content": "check."}),
    ]
    if tool:
        parts += [
            chunk(
                {
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": ""},
                        }
                    ]
                }
            ),
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}),
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Oslo"}'}}]}),
            chunk(
                {
                    "tool_calls": [
                        {
                            "index": 1,
                            "id": "call_2",
                            "type": "function",
                            "function": {"name": "get_time", "arguments": "{}"},
                        }
                    ]
                }
            ),
        ]
    parts.append(chunk({}, "tool_calls" if tool else "stop"))
    if usage:
        payload = {
            **base,
            "choices": [],
            "usage": {
                "prompt_tokens": 40,
                "completion_tokens": 9,
                "prompt_tokens_details": {"cached_tokens": 8},
            },
        }
        parts.append(b"data: " + orjson.dumps(payload) + b"\n\n")
    parts.append(b"data: [DONE]\n\n")
    return b"".join(parts)


def anthropic_events(data: bytes) -> list[tuple[str, Any]]:
    out = []
    for event in data.split(b"\n\n"):
        if event.strip():
            name = event_name(event)
            assert name is not None
            out.append((name.decode(), orjson.loads(event_data(event))))
    return out


def test_chat_stream_as_anthropic_events() -> None:
    scanner = ChatToAnthropicStream(model="vllm/qwen")
    data = chat_stream(tool=True)
    out = scanner.feed(data)
    tail = scanner.finish()
    assert anthropic_events(tail) == [("message_stop", {"type": "message_stop"})]
    events = anthropic_events(out)
    names = [n for n, _ in events]
    assert names == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
    ]
    assert all(n == p["type"] for n, p in events)
    start = events[0][1]["message"]
    assert (start["id"], start["model"], start["role"], start["content"]) == (
        "chatcmpl-9",
        "qwen",
        "assistant",
        [],
    )
    assert events[1][1] == {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "text", "text": ""},
    }
    assert events[5][1]["content_block"] == {
        "type": "tool_use",
        "id": "call_1",
        "name": "get_weather",
        "input": {},
    }
    args = "".join(p["delta"]["partial_json"] for _, p in events[6:8])
    assert orjson.loads(args) == {"city": "Oslo"}
    assert events[9][1]["index"] == 2 and events[9][1]["content_block"]["name"] == "get_time"
    assert events[-1][1] == {
        "type": "message_delta",
        "delta": {"stop_reason": "tool_use", "stop_sequence": None},
        "usage": {
            "input_tokens": 32,
            "output_tokens": 9,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 8,
        },
    }
    assert scanner.usage == Usage(input_tokens=32, output_tokens=9, cache_read_tokens=8)
    assert scanner.done
    assert scanner.upstream_id == "chatcmpl-9"
    assert scanner.content_bytes > 0


@settings(max_examples=150, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=30), tool=st.booleans())
def test_chat_stream_translation_ignores_packet_boundaries(cuts: list[int], tool: bool) -> None:
    data = chat_stream(tool)
    points = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    whole = ChatToAnthropicStream(model="m")
    expected = whole.feed(data) + whole.finish()
    split = ChatToAnthropicStream(model="m")
    got = b"".join(split.feed(data[a:b]) for a, b in itertools.pairwise(points)) + split.finish()
    assert got == expected
    assert split.usage == whole.usage


def test_chat_stream_without_usage_or_done() -> None:
    scanner = ChatToAnthropicStream(model="m")
    data = chat_stream(tool=False, usage=False)
    cut = data.index(b"data: [DONE]")
    out = scanner.feed(data[:cut])
    assert not scanner.done and scanner.usage is None
    assert scanner.finish() == b""
    assert "message_stop" not in [n for n, _ in anthropic_events(out)]
    assert anthropic_events(scanner.error_event("upstream_cut", "cut")) == [
        ("error", {"type": "error", "error": {"type": "upstream_cut", "message": "cut"}})
    ]
    error = b'data: {"error":{"message":"boom","type":"server_error"}}\n\n'
    assert anthropic_events(ChatToAnthropicStream(model="m").feed(error)) == [
        ("error", {"type": "error", "error": {"type": "api_error", "message": "boom"}})
    ]
