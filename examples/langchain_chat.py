"""LangChain's `ChatOpenAI` pointed at `nanovllm serve`: one answer, then a streamed one.

    pip install langchain-openai           # or: pip install 'nanovllm[examples]'
    nanovllm serve &
    python examples/langchain_chat.py      # or --base-url http://HOST:PORT/v1 --api-key KEY
"""

from __future__ import annotations

import argparse
import os

from langchain_core.messages import HumanMessage, SystemMessage
from langchain_openai import ChatOpenAI
from openai import OpenAI


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default=os.environ.get("NANOVLLM_BASE_URL", "http://127.0.0.1:8000/v1"))
    p.add_argument("--api-key", default=os.environ.get("NANOVLLM_API_KEY", "EMPTY"))
    p.add_argument("--max-tokens", type=int, default=32)
    args = p.parse_args()

    model = OpenAI(base_url=args.base_url, api_key=args.api_key).models.list().data[0].id
    llm = ChatOpenAI(base_url=args.base_url, api_key=args.api_key, model=model, temperature=0,
                     max_tokens=args.max_tokens)

    reply = llm.invoke([SystemMessage("You are a concise assistant."),
                        HumanMessage("What is the capital of France?")])
    print(f"answer: {reply.content!r}")

    print("stream: ", end="", flush=True)
    for chunk in llm.stream([HumanMessage("Count from one to five.")]):
        print(chunk.content, end="", flush=True)
    print()


if __name__ == "__main__":
    main()
