"""Translation between OpenAI chat completions and Anthropic messages, both ways.

Used when a route's format differs from the provider's: ``ChatToMessages`` serves
``/v1/chat/completions`` from an Anthropic-format provider (the brief's CrewAI and
LangChain snippets sending ``anthropic/claude-...``), ``MessagesToChat`` serves
``/v1/messages`` from an OpenAI-compatible one.

``ParsedRequest.body`` is always the client's own body; ``build_upstream`` translates it.
That way an adapter works whichever ``parse`` produced the request: the route's
same-format parser (what ``ProxyRoute`` calls today) or the adapter's own ``parse``.

The bound stays an upper bound. The adapters' ``parse`` validates the client's request
exactly as the same-format route does (``parse_chat`` / ``parse_messages``: same 400/422s,
same tool names, same output cap), refuses what cannot be translated (422, before anything
is reserved), and bounds *the request the provider will actually receive*: ``raw_size`` is
at least the translated body's length (plus a margin for the model name and cap written
in later), ``media_root`` is the translated messages (each image or document is swapped
for its ceiling exactly as sent), and ``message_count`` is at least the translated count
(one Anthropic turn with three tool results becomes three ``tool`` messages). Whatever
translation adds (structural keys, a default tool schema, a JSON-mode instruction) is
thereby inside the bound. For that, the proxy must call the routed adapter's ``parse``
when it is not the route's parser (see ``ProxyRoute._plan``).

Without that call the bound of the client's body still holds in practice: every text of
the translation comes from the client's body at most once, what translation adds is no
longer than the client fields it replaces (the JSON-mode instruction is shorter than the
``response_format`` it stands for; tool definitions are rendered by the provider and
covered by the tools overhead), and each extra ``tool`` message comes from a
``tool_result`` block whose JSON structure alone exceeds the per-message overhead.
It is not exact, though (untranslatable requests would also be refused only after the
reservation), which is why the routed adapter's ``parse`` should run first.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import re
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from resgov.core.bounds import string_bytes
from resgov.core.errors import BadRequest, InvalidValue
from resgov.core.policy import ProviderPolicy
from resgov.core.pricing import Usage
from resgov.providers.anthropic import (
    MessagesEvents,
    MessagesEventsView,
    anthropic_error_event,
    messages_path,
    parse_messages,
    upstream_messages_body,
    usage_from_anthropic,
)
from resgov.providers.anthropic import (
    response_content_bytes as messages_content_bytes,
)
from resgov.providers.base import Format, ParsedRequest
from resgov.providers.openai import (
    is_openai,
    parse_chat,
    response_content_bytes,
    upstream_body,
    usage_from_openai,
)
from resgov.providers.sse import SSESplitter, TranslatedStream, data_object, decode_event, event_data

Json = dict[str, Any]

#: Bytes the body grows by after parse: the model name is replaced by the upstream's
#: (never longer) and the output cap is written in (at most ``"max_completion_tokens":10000000,``, 33 bytes).
_CAP_MARGIN = 48
_DATA_URL = re.compile(r"^data:([^;,]+)((?:;[^;,]*)*),(.*)$", re.DOTALL)

#: Anthropic ``stop_reason`` → OpenAI ``finish_reason``.
_FINISH_FROM_ANTHROPIC = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
#: OpenAI ``finish_reason`` → Anthropic ``stop_reason``.
_STOP_FROM_OPENAI = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}
#: Anthropic error ``type`` for an HTTP status (as Anthropic's API reports them).
_ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}
#: Upstream error text kept when the error body is not JSON (it is echoed to the client).
_MAX_ERROR_TEXT = 2000


def _obj(value: Any) -> Json:
    """``value`` if it is a JSON object, else an empty one (for lenient reads of answers)."""
    return value if isinstance(value, dict) else {}


def _untranslatable(message: str, param: str | None = None) -> InvalidValue:
    return InvalidValue(message, reason="untranslatable", param=param)


def _text_of(content: Any, where: str) -> str:
    """The text of an OpenAI content value that may only hold text (string or text parts)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict):
                raise BadRequest(f"'{where}' parts must be objects.", reason="invalid_type", param="messages")
            if part.get("type") in ("text", "refusal"):
                value = part.get("text", part.get("refusal"))
                if not isinstance(value, str):
                    raise BadRequest(
                        f"'{where}' text parts need a string.", reason="invalid_type", param="messages"
                    )
                texts.append(value)
            else:
                raise _untranslatable(
                    f"'{where}' may only hold text when translated to Anthropic messages "
                    f"(got a '{part.get('type')}' part).",
                    "messages",
                )
        return "".join(texts)
    raise BadRequest(f"'{where}' must be a string or an array.", reason="invalid_type", param="messages")


# --- OpenAI chat → Anthropic messages: requests --------------------------------------------------


def _data_url(url: str) -> tuple[str, bool, str] | None:
    """``(media_type, is_base64, payload)`` of a ``data:`` URL, or None."""
    match = _DATA_URL.match(url)
    if match is None:
        return None
    media_type, params, payload = match.groups()
    return media_type, ";base64" in params.lower(), payload


def _image_block(part: Json, where: str) -> Json:
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str) or not url:
        raise BadRequest(
            f"'{where}.image_url.url' must be a string.", reason="invalid_type", param="messages"
        )
    if url.startswith("data:"):
        parsed = _data_url(url)
        if parsed is None or not parsed[1]:
            raise _untranslatable(f"'{where}' must be a base64 data: URL or an http(s) URL.", "messages")
        return {"type": "image", "source": {"type": "base64", "media_type": parsed[0], "data": parsed[2]}}
    return {"type": "image", "source": {"type": "url", "url": url}}


def _file_block(part: Json, where: str) -> Json:
    file = part.get("file")
    data = file.get("file_data") if isinstance(file, dict) else None
    if not isinstance(data, str):
        # A file_id names an OpenAI upload: Anthropic cannot see it.
        raise _untranslatable(f"'{where}' must carry inline 'file_data' to reach Anthropic.", "messages")
    parsed = _data_url(data)
    if parsed is None or not parsed[1]:
        raise _untranslatable(f"'{where}.file.file_data' must be a base64 data: URL.", "messages")
    media_type, _, payload = parsed
    block: Json
    if media_type.startswith("text/"):
        try:
            text = base64.b64decode(payload, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError) as exc:
            raise InvalidValue(f"'{where}' is not base64 UTF-8 text.", param="messages") from exc
        block = {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": text}}
    else:
        block = {"type": "document", "source": {"type": "base64", "media_type": media_type, "data": payload}}
    if isinstance(file, dict) and isinstance(file.get("filename"), str):
        block["title"] = file["filename"]
    return block


def _content_blocks(content: Any, where: str) -> list[Json]:
    """OpenAI user/assistant content as Anthropic content blocks (empty text dropped)."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        raise BadRequest(f"'{where}' must be a string or an array.", reason="invalid_type", param="messages")
    blocks: list[Json] = []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        if not isinstance(part, dict):
            raise BadRequest(f"'{at}' must be an object.", reason="invalid_type", param="messages")
        kind = part.get("type")
        block: Json
        if kind in ("text", "refusal"):
            text = part.get("text", part.get("refusal"))
            if not isinstance(text, str):
                raise BadRequest(f"'{at}.text' must be a string.", reason="invalid_type", param="messages")
            if not text:
                continue
            block = {"type": "text", "text": text}
        elif kind == "image_url":
            block = _image_block(part, at)
        elif kind == "file":
            block = _file_block(part, at)
        else:
            raise _untranslatable(f"'{at}': '{kind}' parts have no Anthropic equivalent.", "messages")
        # Prompt caching markers (LiteLLM/OpenRouter convention) carry over as they are.
        if isinstance(part.get("cache_control"), dict):
            block["cache_control"] = part["cache_control"]
        blocks.append(block)
    return blocks


def _tool_use_blocks(calls: Any, where: str) -> list[Json]:
    if calls is None:
        return []
    if not isinstance(calls, list):
        raise BadRequest(f"'{where}.tool_calls' must be an array.", reason="invalid_type", param="messages")
    blocks: list[Json] = []
    for k, call in enumerate(calls):
        at = f"{where}.tool_calls[{k}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(call, dict) or not isinstance(fn, dict):
            raise BadRequest(f"'{at}' must be a function call.", reason="invalid_type", param="messages")
        name, args, call_id = fn.get("name"), fn.get("arguments"), call.get("id")
        if not isinstance(name, str) or not isinstance(call_id, str):
            raise BadRequest(f"'{at}' needs a string id and name.", reason="invalid_type", param="messages")
        if args is None or args == "":
            arguments: Any = {}
        elif isinstance(args, str):
            try:
                arguments = orjson.loads(args)
            except orjson.JSONDecodeError as exc:
                raise _untranslatable(
                    f"'{at}.function.arguments' is not valid JSON; Anthropic needs a JSON object.", "messages"
                ) from exc
        else:
            raise BadRequest(f"'{at}.function.arguments' must be a string.", reason="invalid_type")
        if not isinstance(arguments, dict):
            raise _untranslatable(f"'{at}.function.arguments' must be a JSON object.", "messages")
        blocks.append({"type": "tool_use", "id": call_id, "name": name, "input": arguments})
    return blocks


def _tool_result_block(message: Json, where: str) -> Json:
    call_id = message.get("tool_call_id")
    if not isinstance(call_id, str):
        raise BadRequest(f"'{where}.tool_call_id' must be a string.", reason="invalid_type", param="messages")
    text = _text_of(message.get("content"), f"{where}.content")
    block: Json = {"type": "tool_result", "tool_use_id": call_id}
    if text:
        block["content"] = text
    return block


def _chat_tools(tools: Any) -> list[Json]:
    out: list[Json] = []
    for i, tool in enumerate(tools or []):
        fn = tool.get("function")
        if tool.get("type", "function") != "function" or not isinstance(fn, dict):
            raise _untranslatable(
                f"'tools[{i}]': only function tools can be translated to Anthropic messages.", "tools"
            )
        if not isinstance(fn.get("name"), str):
            raise BadRequest(
                f"'tools[{i}].function.name' must be a string.", reason="invalid_type", param="tools"
            )
        converted: Json = {"name": fn["name"]}
        if isinstance(fn.get("description"), str):
            converted["description"] = fn["description"]
        params = fn.get("parameters")
        converted["input_schema"] = (
            params if isinstance(params, dict) else {"type": "object", "properties": {}}
        )
        if isinstance(tool.get("cache_control"), dict):
            converted["cache_control"] = tool["cache_control"]
        out.append(converted)
    return out


def _chat_tool_choice(choice: Any, parallel: Any) -> Json | None:
    converted: Json
    if choice is None or choice == "auto":
        converted = {"type": "auto"}
    elif choice == "none":
        return {"type": "none"}
    elif choice == "required":
        converted = {"type": "any"}
    elif isinstance(choice, dict):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str):
            raise BadRequest(
                "'tool_choice.function.name' must be a string.", reason="invalid_type", param="tool_choice"
            )
        converted = {"type": "tool", "name": name}
    else:
        raise BadRequest(
            "'tool_choice' must be 'none', 'auto', 'required' or an object.",
            reason="invalid_type",
            param="tool_choice",
        )
    if parallel is False:
        converted["disable_parallel_tool_use"] = True
    return converted


def _number(body: Json, name: str) -> float | int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f"'{name}' must be a number.", reason="invalid_type", param=name)
    return value


def _json_instruction(fmt: Any) -> str | None:
    """A system instruction standing in for ``response_format`` (Anthropic has no JSON mode).

    Kept shorter than the ``response_format`` field it replaces, so the client body's
    length still bounds the translation when the proxy bounds the client's body.
    """
    if not isinstance(fmt, dict) or fmt.get("type") in (None, "text"):
        return None
    if fmt.get("type") == "json_object":
        return "Reply with only a JSON object."
    spec = fmt.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if fmt.get("type") == "json_schema" and isinstance(schema, dict):
        return "Reply with only a JSON object matching this JSON schema: " + orjson.dumps(schema).decode()
    raise _untranslatable("'response_format' is not translatable to Anthropic messages.", "response_format")


def _append(messages: list[Json], role: str, blocks: list[Json]) -> None:
    """Add blocks as a turn, merging into the previous turn of the same role.

    Anthropic expects tool results in the user turn right after the assistant's tool_use,
    and OpenAI sends each result (and any text after them) as separate messages.
    """
    if not blocks:
        return
    if messages and messages[-1]["role"] == role:
        messages[-1]["content"].extend(blocks)
    else:
        messages.append({"role": role, "content": blocks})


def chat_to_messages_request(body: Json) -> Json:
    """An OpenAI chat completions request (validated by ``parse_chat``) as an Anthropic one.

    ``max_tokens`` is left for the adapter to set (it is ResGov's reserved cap).
    """
    system: list[Json] = []
    messages: list[Json] = []
    for i, message in enumerate(body["messages"]):
        where = f"messages[{i}]"
        role = message.get("role")
        if role in ("system", "developer"):
            content = message.get("content")
            if isinstance(content, list):
                system.extend(b for b in _content_blocks(content, f"{where}.content") if b["type"] == "text")
            else:
                text = _text_of(content, f"{where}.content")
                if text:
                    system.append({"type": "text", "text": text})
        elif role == "user":
            _append(messages, "user", _content_blocks(message.get("content"), f"{where}.content"))
        elif role == "assistant":
            blocks = _content_blocks(message.get("content"), f"{where}.content")
            blocks += _tool_use_blocks(message.get("tool_calls"), where)
            _append(messages, "assistant", blocks)
        elif role == "tool":
            _append(messages, "user", [_tool_result_block(message, where)])
        elif isinstance(role, str):
            raise _untranslatable(f"'{where}.role' '{role}' has no Anthropic equivalent.", "messages")
        else:
            raise BadRequest(f"'{where}.role' must be a string.", reason="invalid_type", param="messages")
    instruction = _json_instruction(body.get("response_format"))
    if instruction:
        system.append({"type": "text", "text": instruction})
    out: Json = {"model": body["model"], "messages": messages}
    if system:
        out["system"] = system
    tools = _chat_tools(body.get("tools"))
    if tools:
        out["tools"] = tools
        choice = _chat_tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"))
        if choice is not None:
            out["tool_choice"] = choice
    stop = body.get("stop")
    if isinstance(stop, str):
        out["stop_sequences"] = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        if stop:
            out["stop_sequences"] = stop
    elif stop is not None:
        raise BadRequest(
            "'stop' must be a string or an array of strings.", reason="invalid_type", param="stop"
        )
    temperature = _number(body, "temperature")
    if temperature is not None:
        # OpenAI accepts 0-2, Anthropic 0-1: the nearest value Anthropic accepts.
        out["temperature"] = min(temperature, 1)
    for name in ("top_p", "top_k"):
        value = _number(body, name)
        if value is not None:
            out[name] = value
    if isinstance(body.get("user"), str):
        out["metadata"] = {"user_id": body["user"]}
    if body.get("stream"):
        out["stream"] = True
    return out


# --- Anthropic messages → OpenAI chat: requests --------------------------------------------------


def _anthropic_text(content: Any, where: str) -> str:
    """The text of an Anthropic content value that may only hold text blocks."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    texts = []
    for block in content:
        if block.get("type") != "text" or not isinstance(block.get("text"), str):
            raise _untranslatable(
                f"'{where}' may only hold text blocks when translated to OpenAI chat.", "messages"
            )
        texts.append(block["text"])
    return "\n".join(texts)


def _chat_part(block: Json, where: str) -> Json:
    """One Anthropic user content block (not a tool result) as an OpenAI content part."""
    kind = block.get("type")
    source = block.get("source")
    src: Json = source if isinstance(source, dict) else {}
    if kind == "text":
        if not isinstance(block.get("text"), str):
            raise BadRequest(f"'{where}.text' must be a string.", reason="invalid_type", param="messages")
        return {"type": "text", "text": block["text"]}
    if kind == "image":
        if src.get("type") == "base64":
            url = f"data:{src.get('media_type')};base64,{src.get('data')}"
        elif src.get("type") == "url" and isinstance(src.get("url"), str):
            url = src["url"]
        else:
            raise _untranslatable(f"'{where}': only base64 and URL images reach OpenAI chat.", "messages")
        return {"type": "image_url", "image_url": {"url": url}}
    if kind == "document":
        if src.get("type") == "text" and isinstance(src.get("data"), str):
            return {"type": "text", "text": src["data"]}
        if src.get("type") == "base64":
            title = block.get("title") if isinstance(block.get("title"), str) else "document.pdf"
            data = f"data:{src.get('media_type')};base64,{src.get('data')}"
            return {"type": "file", "file": {"filename": title, "file_data": data}}
        raise _untranslatable(f"'{where}': only inline documents reach OpenAI chat.", "messages")
    raise _untranslatable(f"'{where}': '{kind}' blocks have no OpenAI chat equivalent.", "messages")


def _user_turn(content: Any, where: str) -> list[Json]:
    """An Anthropic user turn as OpenAI messages: tool results first (as ``tool`` messages),
    then the rest as one user message. Images inside tool results (OpenAI tool messages
    are text only) join that user message."""
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    tool_messages: list[Json] = []
    parts: list[Json] = []
    for j, block in enumerate(content):
        at = f"{where}[{j}]"
        if block.get("type") == "tool_result":
            call_id = block.get("tool_use_id")
            if not isinstance(call_id, str):
                raise BadRequest(f"'{at}.tool_use_id' must be a string.", reason="invalid_type")
            inner = block.get("content")
            texts: list[str] = []
            if isinstance(inner, str):
                texts.append(inner)
            elif isinstance(inner, list):
                for k, item in enumerate(inner):
                    if not isinstance(item, dict):
                        raise BadRequest(f"'{at}.content[{k}]' must be an object.", reason="invalid_type")
                    part = _chat_part(item, f"{at}.content[{k}]")
                    if part["type"] == "text":
                        texts.append(part["text"])
                    else:
                        parts.append(part)
            elif inner is not None:
                raise BadRequest(f"'{at}.content' must be a string or an array.", reason="invalid_type")
            tool_messages.append({"role": "tool", "tool_call_id": call_id, "content": "\n".join(texts)})
        else:
            parts.append(_chat_part(block, at))
    out = tool_messages
    if parts:
        single_text = len(parts) == 1 and parts[0]["type"] == "text"
        out.append({"role": "user", "content": parts[0]["text"] if single_text else parts})
    return out


def _assistant_turn(content: Any, where: str) -> Json:
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    texts: list[str] = []
    calls: list[Json] = []
    for j, block in enumerate(content):
        kind = block.get("type")
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind == "tool_use":
            if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
                raise BadRequest(f"'{where}[{j}]' needs a string id and name.", reason="invalid_type")
            arguments = orjson.dumps(block.get("input") or {}).decode()
            calls.append(
                {
                    "id": block["id"],
                    "type": "function",
                    "function": {"name": block["name"], "arguments": arguments},
                }
            )
        elif kind in ("thinking", "redacted_thinking"):
            # OpenAI chat cannot take reasoning back; dropping it only shrinks the input.
            continue
        else:
            raise _untranslatable(
                f"'{where}[{j}]': '{kind}' blocks have no OpenAI chat equivalent.", "messages"
            )
    message: Json = {"role": "assistant", "content": "".join(texts) if texts else None}
    if calls:
        message["tool_calls"] = calls
    return message


def messages_to_chat_request(body: Json) -> Json:
    """An Anthropic Messages request (validated by ``parse_messages``) as an OpenAI chat one.

    The output cap and ``stream_options`` are set by ``upstream_body`` when sending.
    """
    messages: list[Json] = []
    system = body.get("system")
    if system:
        messages.append({"role": "system", "content": _anthropic_text(system, "system")})
    for i, message in enumerate(body["messages"]):
        where = f"messages[{i}].content"
        if message["role"] == "user":
            messages.extend(_user_turn(message["content"], where))
        else:
            messages.append(_assistant_turn(message["content"], where))
    out: Json = {"model": body["model"], "messages": messages}
    tools: list[Json] = []
    for i, tool in enumerate(body.get("tools") or []):
        if tool.get("type") not in (None, "custom"):
            raise _untranslatable(
                f"'tools[{i}]': server tool '{tool.get('type')}' runs only on Anthropic's API.", "tools"
            )
        fn: Json = {"name": tool["name"]}
        if isinstance(tool.get("description"), str):
            fn["description"] = tool["description"]
        fn["parameters"] = tool.get("input_schema") or {"type": "object", "properties": {}}
        tools.append({"type": "function", "function": fn})
    if body.get("mcp_servers"):
        raise _untranslatable("'mcp_servers' runs only on Anthropic's API.", "mcp_servers")
    choice = body.get("tool_choice")
    if tools:
        out["tools"] = tools
        if isinstance(choice, dict):
            kind = choice["type"]
            if kind == "any":
                out["tool_choice"] = "required"
            elif kind == "tool":
                out["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
            elif kind in ("auto", "none"):
                out["tool_choice"] = kind
            if choice.get("disable_parallel_tool_use") is True:
                out["parallel_tool_calls"] = False
    stops = body.get("stop_sequences")
    if stops is not None:
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise BadRequest("'stop_sequences' must be an array of strings.", reason="invalid_type")
        if stops:
            out["stop"] = stops
    for name in ("temperature", "top_p"):
        value = _number(body, name)
        if value is not None:
            out[name] = value
    metadata = body.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str):
        out["user"] = metadata["user_id"]
    if body.get("stream"):
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    return out


# --- responses ------------------------------------------------------------------------------------


def chat_usage(usage: Usage) -> Json:
    """A usage as OpenAI reports it: every input token in ``prompt_tokens``, cache reads detailed."""
    prompt = usage.total_input
    return {
        "prompt_tokens": prompt,
        "completion_tokens": usage.total_output,
        "total_tokens": prompt + usage.total_output,
        "prompt_tokens_details": {"cached_tokens": usage.cache_read_tokens},
    }


def anthropic_usage(usage: Usage | None) -> Json:
    """A usage as Anthropic reports it: plain input, cache reads and writes beside it."""
    if usage is None:
        return {"input_tokens": 0, "output_tokens": 0}
    return {
        "input_tokens": usage.input_tokens + usage.input_audio_tokens,
        "output_tokens": usage.total_output,
        "cache_creation_input_tokens": usage.cache_write_tokens + usage.cache_write_1h_tokens,
        "cache_read_input_tokens": usage.cache_read_tokens,
    }


def messages_response_to_chat(resp: Json) -> Json:
    """An Anthropic message as an OpenAI chat completion."""
    texts: list[str] = []
    thinking: list[str] = []
    calls: list[Json] = []
    for block in resp.get("content") or []:
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind == "thinking" and isinstance(block.get("thinking"), str):
            thinking.append(block["thinking"])
        elif kind == "tool_use":
            arguments = orjson.dumps(block.get("input") or {}).decode()
            calls.append(
                {
                    "id": block.get("id"),
                    "type": "function",
                    "function": {"name": block.get("name"), "arguments": arguments},
                }
            )
    message: Json = {
        "role": "assistant",
        "content": "".join(texts) if texts or not calls else None,
        "refusal": None,
    }
    if calls:
        message["tool_calls"] = calls
    if thinking:
        # The field DeepSeek, vLLM and LiteLLM use; OpenAI clients ignore it.
        message["reasoning_content"] = "".join(thinking)
    stop = resp.get("stop_reason")
    out: Json = {
        "id": resp.get("id"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": resp.get("model"),
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": _FINISH_FROM_ANTHROPIC.get(stop, "stop")
                if isinstance(stop, str)
                else "stop",
            }
        ],
    }
    usage = usage_from_anthropic(resp.get("usage"))
    if usage is not None:
        out["usage"] = chat_usage(usage)
    return out


def _tool_input(arguments: Any) -> Json:
    """Tool arguments as the JSON object Anthropic clients expect.

    Models occasionally emit arguments that are not a JSON object; they are kept whole
    under ``_raw_arguments`` rather than silently lost.
    """
    if not arguments:
        return {}
    try:
        parsed = orjson.loads(arguments) if isinstance(arguments, str) else arguments
    except orjson.JSONDecodeError:
        parsed = None
    return parsed if isinstance(parsed, dict) else {"_raw_arguments": arguments}


def chat_response_to_messages(resp: Json) -> Json:
    """An OpenAI chat completion (first choice) as an Anthropic message."""
    choices = resp.get("choices")
    choice = _obj(choices[0]) if isinstance(choices, list) and choices else {}
    message = _obj(choice.get("message"))
    content: list[Json] = []
    text = message.get("content")
    if isinstance(text, str) and text:
        content.append({"type": "text", "text": text})
    refusal = message.get("refusal")
    if isinstance(refusal, str) and refusal:
        content.append({"type": "text", "text": refusal})
    for call in message.get("tool_calls") or []:
        fn = call.get("function") if isinstance(call, dict) else None
        if isinstance(fn, dict):
            content.append(
                {
                    "type": "tool_use",
                    "id": call.get("id"),
                    "name": fn.get("name"),
                    "input": _tool_input(fn.get("arguments")),
                }
            )
    finish = choice.get("finish_reason")
    stop = _STOP_FROM_OPENAI.get(finish, "end_turn") if isinstance(finish, str) else "end_turn"
    if isinstance(refusal, str) and refusal:
        stop = "refusal"
    return {
        "id": resp.get("id"),
        "type": "message",
        "role": "assistant",
        "model": resp.get("model"),
        "content": content,
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": anthropic_usage(usage_from_openai(resp.get("usage"))),
    }


# --- errors ---------------------------------------------------------------------------------------


def _error_fields(raw: bytes) -> tuple[str | None, str]:
    """``(type, message)`` of an error body in either format (or its text)."""
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError:
        parsed = None
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if isinstance(error, dict):
        kind = error.get("type") if isinstance(error.get("type"), str) else None
        message = error.get("message")
        return kind, message if isinstance(message, str) else orjson.dumps(error).decode()
    if isinstance(error, str):
        return None, error
    return None, raw[:_MAX_ERROR_TEXT].decode("utf-8", "replace")


def anthropic_error_to_openai(status: int, raw: bytes) -> bytes:
    """An Anthropic error body in OpenAI's envelope (the status is kept by the proxy)."""
    kind, message = _error_fields(raw)
    default = "server_error" if status >= 500 else "invalid_request_error"
    return orjson.dumps({"error": {"message": message, "type": kind or default, "param": None, "code": kind}})


def openai_error_to_anthropic(status: int, raw: bytes) -> bytes:
    """An OpenAI error body in Anthropic's envelope, typed by status as Anthropic types it."""
    _, message = _error_fields(raw)
    kind = _ANTHROPIC_ERROR_TYPES.get(status) or ("api_error" if status >= 500 else "invalid_request_error")
    return orjson.dumps({"type": "error", "error": {"type": kind, "message": message}})


# --- streams ---------------------------------------------------------------------------------------


def _sse(payload: Json) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def _named(name: str, payload: Json) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


def openai_error_event(kind: str, message: str) -> bytes:
    """An SSE event the OpenAI SDKs raise as an APIError."""
    return _sse({"error": {"type": kind, "message": message}})


class AnthropicToChatStream(MessagesEventsView, TranslatedStream):
    """Consumes an Anthropic Messages stream, emits an OpenAI chat completion stream.

    Usage is read from the Anthropic events (priced as Anthropic reports it). The usage
    chunk is sent only when the client asked for it; ``[DONE]`` is held until
    :meth:`finish` so the call is settled before the client sees the end.
    """

    def __init__(self, wants_usage: bool, model: str) -> None:
        self.wants_usage = wants_usage
        self.events = MessagesEvents()
        self.model = model
        self.created = int(time.time())
        #: Anthropic block index → OpenAI tool call index.
        self.tool_index: dict[int, int] = {}
        self.finished = False
        self.out = bytearray()
        self.held = b""
        self.splitter = SSESplitter()

    def _chunk(self, delta: Json | None, finish: str | None = None, usage: Json | None = None) -> None:
        chunk: Json = {
            "id": self.events.upstream_id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.events.model or self.model,
            "choices": []
            if delta is None
            else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if self.wants_usage:
            # The real API marks every chunk with usage=null when usage is requested.
            chunk["usage"] = usage
        self.out += _sse(chunk)

    def _event(self, raw: bytes) -> bool:
        if self.events.done:
            return False
        event = decode_event(raw)
        if event is None:
            return False
        self.events.absorb(event)
        kind = event.get("type")
        if kind == "message_start":
            self._chunk({"role": "assistant", "content": ""})
        elif kind == "content_block_start":
            self._block_start(event)
        elif kind == "content_block_delta":
            self._block_delta(event)
        elif kind == "message_delta" and self.events.stop_reason and not self.finished:
            self.finished = True
            self._chunk({}, _FINISH_FROM_ANTHROPIC.get(self.events.stop_reason, "stop"))
        elif kind == "message_stop":
            if not self.finished:
                self.finished = True
                self._chunk({}, "stop")
            usage = self.events.merger.usage
            if self.wants_usage and usage is not None:
                self._chunk(None, usage=chat_usage(usage))
            self.held += b"data: [DONE]\n\n"
        elif kind == "error":
            error = _obj(event.get("error"))
            self.out += _sse({"error": {"type": error.get("type"), "message": error.get("message")}})
        # Nothing of the Anthropic stream is forwarded as it is: the chunks replace it.
        return False

    def _block_start(self, event: Json) -> None:
        block = event.get("content_block")
        index = event.get("index")
        if not isinstance(block, dict) or not isinstance(index, int):
            return
        kind = block.get("type")
        if kind == "tool_use":
            position = len(self.tool_index)
            self.tool_index[index] = position
            call = {
                "index": position,
                "id": block.get("id"),
                "type": "function",
                "function": {"name": block.get("name"), "arguments": ""},
            }
            self._chunk({"tool_calls": [call]})
        elif kind == "text" and isinstance(block.get("text"), str) and block["text"]:
            self._chunk({"content": block["text"]})

    def _block_delta(self, event: Json) -> None:
        delta = event.get("delta")
        if not isinstance(delta, dict):
            return
        kind = delta.get("type")
        if kind == "text_delta" and isinstance(delta.get("text"), str):
            self._chunk({"content": delta["text"]})
        elif kind == "input_json_delta" and isinstance(delta.get("partial_json"), str):
            index = event.get("index")
            position = self.tool_index.get(index) if isinstance(index, int) else None
            if position is not None and delta["partial_json"]:
                self._chunk(
                    {"tool_calls": [{"index": position, "function": {"arguments": delta["partial_json"]}}]}
                )
        elif kind == "thinking_delta" and isinstance(delta.get("thinking"), str):
            self._chunk({"reasoning_content": delta["thinking"]})

    def error_event(self, kind: str, message: str) -> bytes:
        """An OpenAI-style error chunk."""
        return openai_error_event(kind, message)


@dataclass(slots=True)
class _Block:
    index: int
    kind: str


@dataclass
class ChatToAnthropicStream(TranslatedStream):
    """Consumes an OpenAI chat completion stream, emits Anthropic Messages events.

    Content blocks are opened as content arrives (text, then each tool call), closed
    when the next one opens or the choice finishes. ``message_delta`` carries the usage
    of the upstream's usage chunk (ResGov asks for it); ``message_stop`` is held until
    :meth:`finish` so the call is settled before the client sees the end.
    """

    model: str
    usage_raw: Json | None = None
    content_bytes: int = 0
    upstream_id: str | None = None
    done: bool = False
    stop_reason: str | None = None
    started: bool = False
    blocks: int = 0
    open: _Block | None = None
    #: OpenAI tool call index → Anthropic block index.
    tool_blocks: dict[int, int] = field(default_factory=dict)
    out: bytearray = field(default_factory=bytearray)
    held: bytes = b""
    splitter: SSESplitter = field(init=False)

    def __post_init__(self) -> None:
        self.splitter = SSESplitter()

    def _start(self, chunk: Json) -> None:
        if self.started:
            return
        self.started = True
        model = chunk.get("model") if isinstance(chunk.get("model"), str) else self.model
        message: Json = {
            "id": self.upstream_id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            # Input is only known at the end (the usage chunk): message_delta carries it.
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        self.out += _named("message_start", {"type": "message_start", "message": message})

    def _close(self) -> None:
        if self.open is not None:
            self.out += _named("content_block_stop", {"type": "content_block_stop", "index": self.open.index})
            self.open = None

    def _open(self, kind: str, block: Json) -> int:
        self._close()
        index = self.blocks
        self.blocks += 1
        self.open = _Block(index, kind)
        self.out += _named(
            "content_block_start", {"type": "content_block_start", "index": index, "content_block": block}
        )
        return index

    def _text(self, text: str) -> None:
        if self.open is None or self.open.kind != "text":
            self._open("text", {"type": "text", "text": ""})
        assert self.open is not None
        delta = {"type": "text_delta", "text": text}
        self.out += _named(
            "content_block_delta", {"type": "content_block_delta", "index": self.open.index, "delta": delta}
        )

    def _tool(self, call: Json) -> None:
        position = call.get("index", 0)
        if not isinstance(position, int):
            return
        fn = _obj(call.get("function"))
        if position not in self.tool_blocks:
            block: Json = {"type": "tool_use", "id": call.get("id"), "name": fn.get("name"), "input": {}}
            self.tool_blocks[position] = self._open("tool_use", block)
        arguments = fn.get("arguments")
        if isinstance(arguments, str) and arguments:
            delta = {"type": "input_json_delta", "partial_json": arguments}
            event = {"type": "content_block_delta", "index": self.tool_blocks[position], "delta": delta}
            self.out += _named("content_block_delta", event)

    def _end(self) -> None:
        """``[DONE]``: close the content, send the usage, hold ``message_stop``."""
        self.done = True
        self._start({})
        self._close()
        event: Json = {
            "type": "message_delta",
            "delta": {"stop_reason": self.stop_reason or "end_turn", "stop_sequence": None},
            "usage": anthropic_usage(self.usage),
        }
        self.out += _named("message_delta", event)
        self.held += _named("message_stop", {"type": "message_stop"})

    def _event(self, raw: bytes) -> bool:
        if self.done:
            return False
        data = event_data(raw)
        if data == b"[DONE]":
            self._end()
            return False
        chunk = data_object(data)
        if chunk is None:
            return False
        error = chunk.get("error")
        if error is not None:
            message = error.get("message") if isinstance(error, dict) else str(error)
            self.out += anthropic_error_event("api_error", str(message))
            return False
        if self.upstream_id is None and isinstance(chunk.get("id"), str):
            self.upstream_id = chunk["id"]
        self._start(chunk)
        if isinstance(chunk.get("usage"), dict):
            self.usage_raw = chunk["usage"]
        for choice in chunk.get("choices") or []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta")
            if isinstance(delta, dict):
                self.content_bytes += string_bytes(delta)
                for key in ("content", "refusal"):
                    if isinstance(delta.get(key), str) and delta[key]:
                        self._text(delta[key])
                for call in delta.get("tool_calls") or []:
                    if isinstance(call, dict):
                        self._tool(call)
            finish = choice.get("finish_reason")
            if isinstance(finish, str):
                self.stop_reason = _STOP_FROM_OPENAI.get(finish, "end_turn")
                self._close()
        return False

    @property
    def usage(self) -> Usage | None:
        """The upstream's usage chunk, priced as the upstream reports it."""
        return usage_from_openai(self.usage_raw) if self.usage_raw is not None else None

    def error_event(self, kind: str, message: str) -> bytes:
        """An Anthropic ``error`` event."""
        return anthropic_error_event(kind, message)


# --- adapters --------------------------------------------------------------------------------------


def _translated(req: ParsedRequest, body: Json, media_root: Any, message_count: int) -> ParsedRequest:
    """``req`` (the client's body kept) bounded as the translated request ``body``."""
    size = len(orjson.dumps(body)) + _CAP_MARGIN
    return dataclasses.replace(
        req,
        raw_size=max(req.raw_size, size),
        media_root=media_root,
        message_count=max(req.message_count, message_count),
    )


class ChatToMessages:
    """``/v1/chat/completions`` served by an Anthropic-format provider."""

    client_format: Format = "openai"
    upstream_format: Format = "anthropic"

    def parse(self, raw: bytes) -> ParsedRequest:
        """``parse_chat``'s checks, then the request translated and bounded as sent."""
        req = parse_chat(raw)
        if req.n > 1:
            raise InvalidValue(
                f"'n' = {req.n}: Anthropic messages generate one choice per request.",
                reason="untranslatable",
                param="n",
            )
        if req.body.get("web_search_options") is not None:
            raise _untranslatable(
                "'web_search_options' cannot be bounded on Anthropic: call /v1/messages with a "
                "web_search tool and 'max_uses'.",
                "web_search_options",
            )
        modalities = req.body.get("modalities")
        if isinstance(modalities, list) and "audio" in modalities:
            raise _untranslatable("Anthropic messages have no audio output.", "modalities")
        body = chat_to_messages_request(req.body)
        count = len(body["messages"]) + (1 if body.get("system") else 0)
        out = _translated(req, body, [body["messages"], body.get("system")], count)
        # Predicted outputs are not sent to Anthropic: no rejected-prediction tokens to bill.
        out.extra_output_tokens = 0
        return out

    def build_upstream(
        self, req: ParsedRequest, cap: int, upstream_model: str, provider: ProviderPolicy
    ) -> tuple[str, bytes]:
        """The translated body with the provider's model name and ``max_tokens`` = cap."""
        body = chat_to_messages_request(req.body)
        return messages_path(provider), upstream_messages_body(body, cap, upstream_model)

    def usage(self, response: Any) -> Usage | None:
        """``usage`` of the Anthropic message."""
        return usage_from_anthropic(response.get("usage")) if isinstance(response, dict) else None

    def content_bytes(self, response: Any) -> int:
        """Generated content of the Anthropic message."""
        return messages_content_bytes(response)

    def client_body(self, raw: bytes, response: Any, req: ParsedRequest) -> bytes:
        """The Anthropic message as a chat completion."""
        return orjson.dumps(messages_response_to_chat(response)) if isinstance(response, dict) else raw

    def client_error(self, status: int, raw: bytes) -> bytes:
        """An Anthropic error in OpenAI's envelope."""
        return anthropic_error_to_openai(status, raw)

    def scanner(self, req: ParsedRequest) -> AnthropicToChatStream:
        """Anthropic events in, chat chunks out."""
        return AnthropicToChatStream(wants_usage=req.client_wants_usage, model=req.model)


class MessagesToChat:
    """``/v1/messages`` served by an OpenAI-compatible provider."""

    client_format: Format = "anthropic"
    upstream_format: Format = "openai"

    def parse(self, raw: bytes) -> ParsedRequest:
        """``parse_messages``' checks, then the request translated and bounded as sent."""
        req = parse_messages(raw)
        body = messages_to_chat_request(req.body)
        return _translated(req, body, body["messages"], len(body["messages"]))

    def build_upstream(
        self, req: ParsedRequest, cap: int, upstream_model: str, provider: ProviderPolicy
    ) -> tuple[str, bytes]:
        """The translated body with the model renamed, the cap set and stream usage on."""
        translated = dataclasses.replace(req, body=messages_to_chat_request(req.body))
        return "/chat/completions", upstream_body(translated, cap, upstream_model, is_openai(provider))

    def usage(self, response: Any) -> Usage | None:
        """``usage`` of the chat completion."""
        return usage_from_openai(response.get("usage")) if isinstance(response, dict) else None

    def content_bytes(self, response: Any) -> int:
        """Generated content of the chat completion."""
        return response_content_bytes(response)

    def client_body(self, raw: bytes, response: Any, req: ParsedRequest) -> bytes:
        """The chat completion as an Anthropic message."""
        return orjson.dumps(chat_response_to_messages(response)) if isinstance(response, dict) else raw

    def client_error(self, status: int, raw: bytes) -> bytes:
        """An OpenAI error in Anthropic's envelope."""
        return openai_error_to_anthropic(status, raw)

    def scanner(self, req: ParsedRequest) -> ChatToAnthropicStream:
        """Chat chunks in, Anthropic events out."""
        return ChatToAnthropicStream(model=req.model)
