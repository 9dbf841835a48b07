"""Tool-call parsers: whole outputs and the same outputs fed in every possible split."""

from __future__ import annotations

import json

import pytest

from nanovllm.serve.tool_parsers import HermesStream, Llama3JsonStream, NamedStream, RequiredStream

WEATHER = {"city": "Dallas", "state": "TX", "unit": "fahrenheit", "note": "a \"quoted\" {brace} ]"}

HERMES = ("Let me check.\n<tool_call>\n" + json.dumps({"name": "get_weather", "arguments": WEATHER})
          + "\n</tool_call>\n<tool_call>\n" + '{"arguments": {"days": 5}, "name": "get_forecast"}' + "\n</tool_call>")
LLAMA3 = (json.dumps({"name": "get_weather", "parameters": WEATHER}) + "; "
          + json.dumps({"name": "get_forecast", "parameters": {"days": 5}}))
REQUIRED = json.dumps([{"name": "get_weather", "parameters": WEATHER}, {"name": "get_forecast", "parameters": {"days": 5}}],
                      indent=2)


def stream_all(stream, pieces):
    """Feed pieces; rebuild content and tool calls from the deltas as an OpenAI client does."""
    content, calls = "", {}
    for piece in pieces:
        c, deltas = stream.feed(piece)
        content += c
        for d in deltas:
            call = calls.setdefault(d.index, {"id": None, "name": None, "arguments": ""})
            if d.id is not None:
                assert call["id"] is None, "id sent twice"
                call["id"], call["name"] = d.id, d.name
            else:
                assert call["id"] is not None, "arguments before the header"
            call["arguments"] += d.arguments
    c, deltas = stream.finish()
    content += c
    assert not deltas or all(d.id is None for d in deltas)
    for d in deltas:
        calls[d.index]["arguments"] += d.arguments
    return content, [calls[i] for i in sorted(calls)]


def splits(text):
    yield [text]
    yield list(text)  # one character at a time
    for step in (3, 7):
        yield [text[i:i + step] for i in range(0, len(text), step)]


@pytest.mark.parametrize("make, text, content", [
    (HermesStream, HERMES, "Let me check."),
    (Llama3JsonStream, LLAMA3, ""),
    (Llama3JsonStream, "<|python_tag|>" + LLAMA3, ""),
    (RequiredStream, REQUIRED, ""),
])
def test_calls_parse_whole_and_streamed(make, text, content):
    parsed = make().parse(text)
    assert (parsed.content or "") == content
    assert [c.name for c in parsed.tool_calls] == ["get_weather", "get_forecast"]
    assert json.loads(parsed.tool_calls[0].arguments) == WEATHER
    assert json.loads(parsed.tool_calls[1].arguments) == {"days": 5}
    for pieces in splits(text):
        streamed_content, calls = stream_all(make(), pieces)
        assert streamed_content.strip() == content
        assert [(c["name"], c["arguments"]) for c in calls] == [(c.name, c.arguments) for c in parsed.tool_calls]
        assert all(c["id"].startswith("chatcmpl-tool-") for c in calls)


def test_arguments_stream_before_the_call_ends():
    stream = HermesStream()
    _, deltas = stream.feed('<tool_call>{"name": "f", "arguments": {"text": "hel')
    assert deltas[0].name == "f" and deltas[0].id
    assert "".join(d.arguments for d in deltas) == '{"text": "hel'


@pytest.mark.parametrize("make, text", [
    (HermesStream, "Just an answer, no tools."),
    (Llama3JsonStream, "The weather is fine."),
    (HermesStream, "Partial <tool_ca"),
])
def test_plain_content(make, text):
    parsed = make().parse(text)
    assert parsed.content == text.strip() and parsed.tool_calls == []
    content, calls = stream_all(make(), list(text))
    assert content == text and calls == []


def test_cut_off_call_is_returned_as_content():
    text = '<tool_call>{"name": "f", "arguments": {"a": 1'
    parsed = HermesStream().parse(text)
    assert parsed.content == text and parsed.tool_calls == []
    # complete calls before the cut stand; the half-written one is dropped
    parsed = RequiredStream().parse('[{"name": "f", "parameters": {"a": 1}}, {"name": "f", "parameters": {"a"')
    assert parsed.content is None and [(c.name, c.arguments) for c in parsed.tool_calls] == [("f", '{"a": 1}')]


def test_string_encoded_arguments_are_decoded():
    parsed = HermesStream().parse('<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>')
    assert parsed.tool_calls[0].arguments == '{"a": 1}'


def test_named_stream():
    text = '  {"city": "Paris"}\n'
    parsed = NamedStream("get_weather").parse(text)
    assert parsed.content is None
    assert parsed.tool_calls[0].name == "get_weather" and json.loads(parsed.tool_calls[0].arguments) == {"city": "Paris"}
    _, calls = stream_all(NamedStream("get_weather"), list(text))
    assert calls[0]["arguments"] == '{"city": "Paris"}'
    assert NamedStream("f").parse('{"city": "Pa').tool_calls == []
