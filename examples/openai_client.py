"""Use `nanovllm serve` through the official `openai` client: one completion, then a streamed chat.

    nanovllm serve &                       # bundled SmolLM2 on http://127.0.0.1:8000
    python examples/openai_client.py       # or --base-url http://HOST:PORT/v1 --api-key KEY

The API key defaults to $NANOVLLM_API_KEY (any string works when the server has none).
"""

from __future__ import annotations

import argparse
import os

from openai import OpenAI


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default=os.environ.get("NANOVLLM_BASE_URL", "http://127.0.0.1:8000/v1"))
    p.add_argument("--api-key", default=os.environ.get("NANOVLLM_API_KEY", "EMPTY"))
    p.add_argument("--max-tokens", type=int, default=32)
    args = p.parse_args()

    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = client.models.list().data[0].id  # the server serves one model
    print(f"model: {model}")

    completion = client.completions.create(model=model, prompt="The capital of France is",
                                           max_tokens=args.max_tokens, temperature=0)
    print(f"completion: {completion.choices[0].text!r}")
    print(f"usage: {completion.usage.prompt_tokens} prompt + {completion.usage.completion_tokens} completion tokens")

    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "system", "content": "You are a concise assistant."},
                  {"role": "user", "content": "Name three primary colors."}],
        max_tokens=args.max_tokens, temperature=0, stream=True,
    )
    print("chat: ", end="", flush=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()


if __name__ == "__main__":
    main()
