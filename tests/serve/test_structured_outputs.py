"""Structured outputs over HTTP: vLLM's structured-outputs example client, its older and newer
request fields, the openai client's typed `parse` (plain and streamed), and bad constraints."""

from __future__ import annotations

import enum
import json
import re

import httpx
import pytest

jsonschema = pytest.importorskip("jsonschema")
pydantic = pytest.importorskip("pydantic")

MAX_TOKENS = 96
SQL_GRAMMAR = """
root ::= select_statement

select_statement ::= "SELECT " column " from " table " where " condition

column ::= "col_1 " | "col_2 "

table ::= "table_1 " | "table_2 "

condition ::= column "= " number

number ::= "1 " | "2 "
"""
SQL_LANGUAGE = r"SELECT (col_1|col_2)  from (table_1|table_2)  where (col_1|col_2) = (1|2) "
EMAIL = r"[a-z0-9.]{1,20}@\w{6,10}\.com\n"


class CarType(str, enum.Enum):
    SEDAN = "SEDAN"
    SUV = "SUV"
    TRUCK = "TRUCK"
    COUPE = "COUPE"


class CarDescription(pydantic.BaseModel):
    brand: str
    model: str
    car_type: CarType


WEATHER_TAG_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}

# vLLM's examples/online_serving/structured_outputs/structured_outputs.py requests (greedy here)
EXAMPLE = {
    "choice": {
        "messages": [{"role": "user", "content": "Classify this sentiment: vLLM is wonderful!"}],
        "extra_body": {"guided_choice": ["positive", "negative"]},
    },
    "regex": {
        "messages": [{"role": "user", "content": "Generate an email address for Alan Turing, who works in Enigma."
                      "End in .com and new line. Example result: 'alan.turing@enigma.com\n'"}],
        "extra_body": {"guided_regex": EMAIL},
    },
    "json": {
        "messages": [{"role": "user", "content": "Generate a JSON with the brand, model and car_type of the most "
                      "iconic car from the 90's"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "car-description",
                                                                   "schema": CarDescription.model_json_schema()}},
    },
    "grammar": {
        "messages": [{"role": "user", "content": "Generate an SQL query to show the 'username' and 'email'from the "
                      "'users' table."}],
        "extra_body": {"guided_grammar": SQL_GRAMMAR},
    },
    "structural_tag": {
        "messages": [{"role": "user", "content": "You have access to the function get_weather(city). To call it, "
                      'reply <function=get_weather>{"city": "..."}</function>. What is the weather in Boston?'}],
        "response_format": {"type": "structural_tag", "triggers": ["<function="], "structures": [
            {"begin": "<function=get_weather>", "schema": WEATHER_TAG_SCHEMA, "end": "</function>"}]},
    },
}


def check_example(name: str, content: str) -> None:
    """What the constraint guarantees, checked on the answer."""
    if name == "choice":
        assert content in ("positive", "negative")
    elif name == "regex":
        assert re.fullmatch(EMAIL, content), content
    elif name == "json":
        jsonschema.validate(json.loads(content), CarDescription.model_json_schema())
    elif name == "grammar":
        assert re.fullmatch(SQL_LANGUAGE, content), content
    elif name == "structural_tag":
        for body in re.findall(r"<function=get_weather>(.*?)</function>", content, flags=re.S):
            jsonschema.validate(json.loads(body), WEATHER_TAG_SCHEMA)
    else:
        raise AssertionError(name)


@pytest.mark.parametrize("name", list(EXAMPLE))
def test_vllm_structured_outputs_example(client, server, name):
    kwargs = EXAMPLE[name]
    out = client.chat.completions.create(model=server.model, max_tokens=MAX_TOKENS, temperature=0, **kwargs)
    content = out.choices[0].message.content
    if name != "structural_tag":  # the tag is optional; the others must complete
        assert out.choices[0].finish_reason == "stop", content
    check_example(name, content)
    # streamed: the same greedy answer, delta by delta
    stream = client.chat.completions.create(model=server.model, max_tokens=MAX_TOKENS, temperature=0, stream=True,
                                            **kwargs)
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert streamed == content


@pytest.mark.parametrize("body", [
    {"structured_outputs": {"choice": ["yes", "no"]}},
    {"guided_choice": ["yes", "no"]},
    {"structured_outputs": {"regex": "(yes|no)"}},
])
def test_completions_take_the_same_fields(client, server, body):
    out = client.completions.create(model=server.model, prompt="Is the sky blue? Answer:", max_tokens=8,
                                    temperature=0, extra_body=body)
    assert out.choices[0].text in ("yes", "no")


def test_json_object_and_guided_json(client, server):
    messages = [{"role": "user", "content": "Describe a cat as JSON with a name and an age."}]
    out = client.chat.completions.create(model=server.model, messages=messages, max_tokens=MAX_TOKENS, temperature=0,
                                         response_format={"type": "json_object"})
    assert isinstance(json.loads(out.choices[0].message.content), dict)
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 30}},
              "required": ["name", "age"], "additionalProperties": False}
    out = client.chat.completions.create(model=server.model, messages=messages, max_tokens=MAX_TOKENS, temperature=0,
                                         extra_body={"guided_json": json.dumps(schema)})
    jsonschema.validate(json.loads(out.choices[0].message.content), schema)


def test_openai_typed_parse_plain_and_streamed(client, server):
    messages = [{"role": "user", "content": "Generate a JSON with the brand, model and car_type of the most iconic "
                 "car from the 90's"}]
    out = client.chat.completions.parse(model=server.model, messages=messages, response_format=CarDescription,
                                        max_tokens=MAX_TOKENS, temperature=0)
    car = out.choices[0].message.parsed
    assert isinstance(car, CarDescription) and isinstance(car.car_type, CarType)
    with client.chat.completions.stream(model=server.model, messages=messages, response_format=CarDescription,
                                        max_tokens=MAX_TOKENS, temperature=0) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].message.parsed == car


def test_text_response_format_is_accepted(client, server):
    out = client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "Hi"}],
                                         max_tokens=4, temperature=0, response_format={"type": "text"})
    assert out.choices[0].message.content


@pytest.mark.parametrize("body, param, words", [
    ({"guided_regex": "[a-"}, "guided_regex", "regex"),  # refused by the engine's compile: the field named
    ({"guided_json": {"type": "object", "properties": {"a": {"type": "nonsense"}}}}, "guided_json", "json"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format", "json"),
    ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs", "regex"),
    ({"guided_choice": []}, "guided_choice", "choice"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "one output constraint"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one"),
    ({"guided_decoding_backend": "outlines", "guided_regex": "a"}, "guided_decoding_backend", "xgrammar"),
])
def test_bad_constraints_are_400(server, body, param, words):
    payload = {"model": server.model, "messages": [{"role": "user", "content": "x"}], "max_tokens": 4, **body}
    r = httpx.post(server.v1 + "/chat/completions", json=payload, headers=server.headers, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert words in err["message"], err
    if param is not None:
        assert err["param"] == param, err
