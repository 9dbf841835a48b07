"""LangChain against `nanovllm serve`: structured output and tool calling.

    pip install langchain-openai           # or: pip install 'nanovllm[examples]'
    nanovllm serve --chat-template examples/tool_chat_template_chatml.jinja \
        --enable-auto-tool-choice --tool-call-parser hermes &
    python examples/langchain_tools.py     # or --base-url http://HOST:PORT/v1 --api-key KEY

`with_structured_output` sends a JSON schema (response_format json_schema, strict) or a
forced function call; the server constrains the output to the schema, so the reply always
parses. `bind_tools` sends the tools; with tool_choice naming one, the arguments always fit
its parameters.
"""

from __future__ import annotations

import argparse
import os
from typing import Literal

from langchain_core.messages import HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from openai import OpenAI
from pydantic import BaseModel, Field


class Country(BaseModel):
    """A country and its capital."""

    name: str = Field(description="the country's name", max_length=40)
    capital: str = Field(description="its capital city", max_length=40)
    continent: Literal["Africa", "Americas", "Asia", "Europe", "Oceania"]


@tool
def get_weather(city: str, unit: Literal["celsius", "fahrenheit"]) -> str:
    """Get the current weather in a city."""
    return f"It is 21 degrees {unit} and sunny in {city}."


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default=os.environ.get("NANOVLLM_BASE_URL", "http://127.0.0.1:8000/v1"))
    p.add_argument("--api-key", default=os.environ.get("NANOVLLM_API_KEY", "EMPTY"))
    p.add_argument("--max-tokens", type=int, default=96)
    args = p.parse_args()

    model = OpenAI(base_url=args.base_url, api_key=args.api_key).models.list().data[0].id
    llm = ChatOpenAI(base_url=args.base_url, api_key=args.api_key, model=model, temperature=0,
                     max_tokens=args.max_tokens)

    question = "Describe France: its name, capital and continent."
    for method in ("json_schema", "function_calling"):
        country = llm.with_structured_output(Country, method=method).invoke(question)
        print(f"structured ({method}): {country!r}")

    with_tools = llm.bind_tools([get_weather], tool_choice="get_weather")
    ask = HumanMessage("What is the weather in Paris, in celsius?")
    reply = with_tools.invoke([ask])
    for call in reply.tool_calls:
        print(f"tool call: {call['name']} {call['args']}")
    results = [ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"]) for call in reply.tool_calls]
    answer = llm.bind_tools([get_weather], tool_choice="none").invoke([ask, reply, *results])
    print(f"answer: {answer.content!r}")


if __name__ == "__main__":
    main()
