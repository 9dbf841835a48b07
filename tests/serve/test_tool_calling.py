"""Tool calling over HTTP, after vLLM's example clients (openai_chat_completion_client_with_tools*.py):
tool_choice required / named / auto, streamed deltas, tool results sent back, typed parsing."""

from __future__ import annotations

import json

import httpx
import pytest

jsonschema = pytest.importorskip("jsonschema")
pydantic = pytest.importorskip("pydantic")

MAX_TOKENS = 160
# Two identical greedy requests may prefill different numbers of tokens (the second finds more of
# its prompt in the prefix cache), and the CPU kernels' sums then round differently: the texts
# may part where the first request's top two tokens are this close (a near tie), never elsewhere.
NEAR_TIE_NATS = 0.1

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_current_weather",
        "description": "Get the current weather in a given location",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "The city to find the weather for, e.g. 'San Francisco'"},
                "state": {"type": "string", "description": "the two-letter abbreviation for the state that the city "
                          "is in, e.g. 'CA' which would mean 'California'"},
                "unit": {"type": "string", "description": "The unit to fetch the temperature in",
                         "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "state", "unit"],
        },
    },
}
FORECAST = {
    "type": "function",
    "function": {
        "name": "get_forecast",
        "description": "Get the weather forecast for a given location",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "The city to get the forecast for, e.g. 'New York'"},
                "state": {"type": "string", "description": "The two-letter abbreviation for the state, e.g. 'NY'"},
                "days": {"type": "integer", "description": "Number of days to get the forecast for (1-7)"},
                "unit": {"type": "string", "description": "The unit to fetch the temperature in",
                         "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "state", "days", "unit"],
        },
    },
}
TOOLS = [WEATHER, FORECAST]
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
MESSAGES = [
    {"role": "user", "content": "Hi! How are you doing today?"},
    {"role": "assistant", "content": "I'm doing well! How can I help you?"},
    {"role": "user", "content": "Can you tell me what the current weather is in Dallas and the forecast for the next "
                                "5 days, in fahrenheit?"},
]


def check_calls(calls, allowed=tuple(PARAMETERS)) -> None:
    """Every call names a declared function and its arguments validate against its schema."""
    assert calls, "expected tool calls"
    for call in calls:
        assert call.type == "function" and call.id
        assert call.function.name in allowed
        jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])


def collect_stream(stream) -> tuple[str, list[dict], list]:
    """Content, and tool calls rebuilt from deltas as vLLM's example does; plus the chunks."""
    content, calls, chunks = "", {}, []
    for chunk in stream:
        chunks.append(chunk)
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for tc in delta.tool_calls or []:
            call = calls.setdefault(tc.index, {"id": None, "name": None, "arguments": ""})
            if tc.id:
                call["id"] = tc.id
            if tc.function and tc.function.name:
                call["name"] = tc.function.name
            if tc.function and tc.function.arguments:
                call["arguments"] += tc.function.arguments
    return content, [calls[i] for i in sorted(calls)], chunks


def streamed_tokens(chunks) -> list[str]:
    return [t.token for c in chunks if c.choices and c.choices[0].logprobs and c.choices[0].logprobs.content
            for t in c.choices[0].logprobs.content]


def first_split(ranked, tokens: list[str]):
    """Index where `tokens` leave the greedy tokens of `ranked` (logprob entries with their top
    candidates), None if they never do; a split must be a near tie of the first request."""
    for i, (entry, tok) in enumerate(zip(ranked, tokens)):
        if entry.token != tok:
            top = {t.token: t.logprob for t in entry.top_logprobs}
            assert tok in top and entry.logprob - top[tok] < NEAR_TIE_NATS, (i, entry.token, tok, top)
            return i
    assert len(tokens) == len(ranked) or not tokens, (len(tokens), len(ranked))
    return None


def test_required_tool_choice_example(client, server):
    out = client.chat.completions.create(messages=MESSAGES, model=server.model, tools=TOOLS, tool_choice="required",
                                         max_tokens=MAX_TOKENS, temperature=0)
    choice = out.choices[0]
    check_calls(choice.message.tool_calls)
    # a 135M model may repeat calls until max_tokens: the complete ones are returned either way
    assert choice.finish_reason in ("tool_calls", "length")
    # streamed (the example's first request): the same calls, arguments arriving in pieces
    stream = client.chat.completions.create(messages=MESSAGES, model=server.model, tools=TOOLS, tool_choice="required",
                                            max_tokens=MAX_TOKENS, temperature=0, stream=True)
    content, calls, chunks = collect_stream(stream)
    assert content == ""
    complete = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls]
    assert [(c["name"], c["arguments"]) for c in calls][:len(complete)] == complete
    assert all(c["id"] and c["id"].startswith("chatcmpl-tool-") for c in calls)
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason


def test_parallel_tool_calls_false_gives_one_call(client, server):
    out = client.chat.completions.create(messages=MESSAGES, model=server.model, tools=TOOLS, tool_choice="required",
                                         parallel_tool_calls=False, max_tokens=MAX_TOKENS, temperature=0)
    check_calls(out.choices[0].message.tool_calls)
    assert len(out.choices[0].message.tool_calls) == 1


def test_named_tool_choice(client, server):
    choice = {"type": "function", "function": {"name": "get_forecast"}}
    out = client.chat.completions.create(messages=MESSAGES, model=server.model, tools=TOOLS, tool_choice=choice,
                                         max_tokens=MAX_TOKENS, temperature=0)
    calls = out.choices[0].message.tool_calls
    check_calls(calls, allowed=("get_forecast",))
    assert len(calls) == 1 and out.choices[0].message.content is None
    stream = client.chat.completions.create(messages=MESSAGES, model=server.model, tools=TOOLS, tool_choice=choice,
                                            max_tokens=MAX_TOKENS, temperature=0, stream=True)
    _, streamed, _ = collect_stream(stream)
    assert [(c["name"], c["arguments"]) for c in streamed] == [("get_forecast", calls[0].function.arguments)]


def test_auto_tool_choice_example_round_trip(client, server):
    """vLLM's tools example: the reply is either valid tool calls or plain content; then the
    tool results go back as `tool` messages and the conversation continues."""
    out = client.chat.completions.create(messages=MESSAGES, model=server.model, tools=[WEATHER], max_tokens=64,
                                         temperature=0, logprobs=True, top_logprobs=5)
    message = out.choices[0].message
    if message.tool_calls:
        check_calls(message.tool_calls, allowed=("get_current_weather",))
        assert out.choices[0].finish_reason == "tool_calls"
        calls = message.tool_calls
    else:
        assert message.content and out.choices[0].finish_reason in ("stop", "length")
        # what a client would have received; the follow-up must render whatever the model said
        calls = [{"id": "call-1", "type": "function", "function": {
            "name": "get_current_weather", "arguments": '{"city": "Dallas", "state": "TX", "unit": "fahrenheit"}'}}]
    stream = client.chat.completions.create(messages=MESSAGES, model=server.model, tools=[WEATHER], max_tokens=64,
                                            temperature=0, stream=True, logprobs=True)
    content, streamed, chunks = collect_stream(stream)
    split = first_split(out.choices[0].logprobs.content, streamed_tokens(chunks))
    if split is None:  # the same tokens: the same content and the same calls
        assert content.strip() == (message.content or "").strip()
        assert [c["arguments"] for c in streamed] == [c.function.arguments for c in message.tool_calls or []]
    follow_up = MESSAGES + [{"role": "assistant", "tool_calls": calls}]
    for call in calls:
        call_id = call.id if hasattr(call, "id") else call["id"]
        follow_up.append({"role": "tool", "content": "The weather in Dallas, Texas is 85 degrees fahrenheit.",
                          "tool_call_id": call_id, "name": "get_current_weather"})
    again = client.chat.completions.create(messages=follow_up, model=server.model, tools=[WEATHER], max_tokens=16,
                                           temperature=0)
    assert again.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_tool_choice_none_gives_content(client, server):
    out = client.chat.completions.create(messages=MESSAGES, model=server.model, tools=TOOLS, tool_choice="none",
                                         max_tokens=8, temperature=0)
    assert out.choices[0].message.content and not out.choices[0].message.tool_calls


def test_openai_typed_tool_parsing(client, server):
    openai = pytest.importorskip("openai")

    class GetForecast(pydantic.BaseModel):
        city: str
        state: str
        days: int

    tool = openai.pydantic_function_tool(GetForecast, name="get_forecast")
    choice = {"type": "function", "function": {"name": "get_forecast"}}
    out = client.chat.completions.parse(model=server.model, messages=MESSAGES, tools=[tool], tool_choice=choice,
                                        max_tokens=MAX_TOKENS, temperature=0)
    parsed = out.choices[0].message.tool_calls[0].function.parsed_arguments
    assert isinstance(parsed, GetForecast)
    with client.chat.completions.stream(model=server.model, messages=MESSAGES, tools=[tool], tool_choice=choice,
                                        max_tokens=MAX_TOKENS, temperature=0) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].message.tool_calls[0].function.parsed_arguments == parsed


@pytest.mark.parametrize("body, param", [
    ({"tool_choice": "required"}, "tool_choice"),  # no tools
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [WEATHER, WEATHER], "tool_choice": "required"}, "tools"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
])
def test_bad_tool_requests_are_400(server, body, param):
    payload = {"model": server.model, "messages": MESSAGES, "max_tokens": 4, **body}
    r = httpx.post(server.v1 + "/chat/completions", json=payload, headers=server.headers, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
