"""The request mix of benchmarks/soak.py: one coroutine per request kind, each returning an Outcome.

Kinds: `stream` (streamed completion), `plain` (non-streamed completion, sometimes n=2 or a
batch of two prompts), `chat` (streamed or not), `abort` (a stream the client drops after a
few chunks), `structured` (when the server accepts response_format: in turn a json_schema
chat, a guided_choice completion, a streamed guided_regex chat, tool_choice required and a
named tool; an output that finished with "stop" must match its constraint), `bad` (an
invalid request that must come back as a 400 in the OpenAI error shape). Prompts are random
common words, or random token ids for a server without a tokenizer.
"""

from __future__ import annotations

import json
import random
import re
import time
from dataclasses import dataclass
from typing import Optional

WORDS = ("the of and to in is was for on that with as by at from his it an were are which this be had not but "
         "they have one all their there been has more also new would first two time after other when some only "
         "city year world state people team life school work history music game river house water light").split()

# A small JSON schema for the structured kind (OpenAI's response_format shape).
STRUCTURED_FORMAT = {"type": "json_schema", "json_schema": {"name": "city", "strict": True, "schema": {
    "type": "object", "properties": {"name": {"type": "string"}, "population": {"type": "integer"}},
    "required": ["name", "population"], "additionalProperties": False}}}
CHOICES = ["north", "south", "east", "west"]
REGEX = r"[A-Z][a-z]{2,8}, [0-9]{1,3}"
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
STRUCTURED_SHAPES = ("json_schema", "choice", "regex_stream", "tool_required", "tool_named")
DEFAULT_MIX = "stream=4,plain=3,chat=2,abort=2,structured=1,bad=1"
KINDS = ("stream", "plain", "chat", "abort", "structured", "bad")


@dataclass
class Outcome:
    kind: str
    status: int  # HTTP status; 0 = connection failed
    e2e_s: float
    ttft_s: Optional[float] = None
    tokens: int = 0
    error: str = ""  # why it counts as a failure ("" = fine)
    server_error: bool = False  # a 5xx, or an error event inside a 200 stream


def parse_mix(text: str) -> dict[str, float]:
    mix = {}
    for part in filter(None, text.split(",")):
        kind, _, weight = part.partition("=")
        if kind not in KINDS:
            raise ValueError(f"unknown request kind {kind!r} in --mix; kinds: {', '.join(KINDS)}")
        mix[kind] = float(weight or 1)
    return mix


class Load:
    """Builds and sends the soak's requests against one server."""

    def __init__(self, session, url: str, headers: dict, model: str, token_ids: bool, vocab_size: int,
                 max_output: int, timeout_s: float, rng: random.Random) -> None:
        self.session, self.url, self.headers, self.model = session, url, headers, model
        self.token_ids, self.vocab_size, self.max_output = token_ids, vocab_size, max_output
        self.timeout_s, self.rng = timeout_s, rng
        self._structured_count = 0

    def prompt(self):
        n = self.rng.randint(4, 48)
        if self.token_ids:
            return [self.rng.randrange(1, self.vocab_size) for _ in range(n)]
        return " ".join(self.rng.choice(WORDS) for _ in range(n))

    def messages(self) -> list[dict]:
        text = self.prompt() if not self.token_ids else "hello"
        return [{"role": "user", "content": text}]

    def sampling(self) -> dict:
        return {"model": self.model, "max_tokens": self.rng.randint(4, self.max_output),
                "temperature": self.rng.choice([0.0, 0.7, 1.0]), "seed": self.rng.randrange(1 << 30)}

    async def run(self, kind: str) -> Outcome:
        import aiohttp

        start = time.monotonic()
        try:
            return await getattr(self, f"_{kind}")(start)
        except (aiohttp.ClientError, OSError) as e:  # includes timeouts of the connection
            return Outcome(kind, 0, time.monotonic() - start, error=f"connection: {type(e).__name__}: {e}")
        except TimeoutError:
            return Outcome(kind, 0, time.monotonic() - start, error=f"no answer within {self.timeout_s:g} s")

    # ------------------------------------------------------------------ kinds
    async def _stream(self, start: float) -> Outcome:
        body = dict(self.sampling(), prompt=self.prompt(), stream=True, stream_options={"include_usage": True})
        return await self._sse("stream", "/v1/completions", body, start)

    async def _abort(self, start: float) -> Outcome:
        body = dict(self.sampling(), prompt=self.prompt(), stream=True, max_tokens=self.max_output, ignore_eos=True)
        return await self._sse("abort", "/v1/completions", body, start, stop_after=self.rng.randint(1, 3))

    async def _chat(self, start: float) -> Outcome:
        body = dict(self.sampling(), messages=self.messages())
        if self.rng.random() < 0.5:
            return await self._sse("chat", "/v1/chat/completions", dict(body, stream=True), start)
        return await self._json("chat", "/v1/chat/completions", body, start)

    async def _plain(self, start: float) -> Outcome:
        body = dict(self.sampling(), prompt=self.prompt())
        shape = self.rng.random()
        if shape < 0.2:
            body["n"] = 2
        elif shape < 0.4:
            body["prompt"] = [self.prompt(), self.prompt()]
        return await self._json("plain", "/v1/completions", body, start)

    async def _structured(self, start: float) -> Outcome:
        """One of STRUCTURED_SHAPES in turn; a finished ("stop") output must satisfy its constraint."""
        shape = STRUCTURED_SHAPES[self._structured_count % len(STRUCTURED_SHAPES)]
        self._structured_count += 1
        body = dict(self.sampling(), max_tokens=self.max_output)
        ask = [{"role": "user", "content": "Name a city and its population."}]
        if shape == "json_schema":
            body.update(messages=ask, response_format=STRUCTURED_FORMAT)
            return await self._json("structured", "/v1/chat/completions", body, start,
                                    check=lambda c: _is_city_json(c["message"]))
        if shape == "choice":
            body.update(prompt="Which way is the sea? Answer:", guided_choice=CHOICES)
            return await self._json("structured", "/v1/completions", body, start, check=lambda c: c["text"] in CHOICES)
        if shape == "regex_stream":
            body.update(messages=ask, guided_regex=REGEX, stream=True)
            return await self._sse("structured", "/v1/chat/completions", body, start,
                                   check=lambda text: re.fullmatch(REGEX, text) is not None)
        body.update(messages=[{"role": "user", "content": "What is the weather in Paris?"}], tools=[TOOL],
                    tool_choice="required" if shape == "tool_required" else
                    {"type": "function", "function": {"name": "get_weather"}})
        return await self._json("structured", "/v1/chat/completions", body, start,
                                check=lambda c: _is_weather_call(c["message"]))

    async def _bad(self, start: float) -> Outcome:
        body = dict(self.sampling(), prompt=self.prompt(), temperature=-1)
        out = await self._json("bad", "/v1/completions", body, start, expect=400)
        return out

    # ------------------------------------------------------------------ transport
    async def _json(self, kind: str, path: str, body: dict, start: float, expect: int = 200,
                    check=None) -> Outcome:
        import aiohttp

        async with self.session.post(self.url + path, json=body, headers=self.headers,
                                     timeout=aiohttp.ClientTimeout(total=self.timeout_s)) as r:
            text = await r.text()
        out = Outcome(kind, r.status, time.monotonic() - start, server_error=r.status >= 500)
        if r.status != expect:
            out.error = f"HTTP {r.status} (expected {expect}): {text[:200]}"
        elif expect == 200:
            data = json.loads(text)
            out.tokens = data.get("usage", {}).get("completion_tokens", 0)
            choice = data["choices"][0]
            if check is not None and choice.get("finish_reason") in ("stop", "tool_calls") and not check(choice):
                out.error = f"the output breaks its constraint: {json.dumps(choice)[:200]}"
        elif set(json.loads(text).get("error", {})) != {"message", "type", "param", "code"}:
            out.error = f"not the OpenAI error shape: {text[:200]}"
        return out

    async def _sse(self, kind: str, path: str, body: dict, start: float, stop_after: Optional[int] = None,
                   check=None) -> Outcome:
        """A streamed request; `check(text)` judges the first choice's whole text when it finished with "stop"."""
        import aiohttp

        out = Outcome(kind, 0, 0.0)
        chunks, done = 0, False
        text, finish = [], None
        async with self.session.post(self.url + path, json=body, headers=self.headers,
                                     timeout=aiohttp.ClientTimeout(total=self.timeout_s)) as r:
            out.status = r.status
            if r.status != 200:
                out.error, out.server_error = f"HTTP {r.status}: {(await r.text())[:200]}", r.status >= 500
                out.e2e_s = time.monotonic() - start
                return out
            async for raw in r.content:
                line = raw.decode().strip()
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    out.error, out.server_error = f"error event: {event['error'].get('message', '')[:200]}", True
                    continue
                if event.get("usage"):
                    out.tokens = event["usage"].get("completion_tokens", 0)
                if event.get("choices"):
                    chunks += 1
                    first = event["choices"][0]
                    if first.get("index", 0) == 0:
                        text.append(first.get("text") or (first.get("delta") or {}).get("content") or "")
                        finish = first.get("finish_reason") or finish
                    if out.ttft_s is None:
                        out.ttft_s = time.monotonic() - start
                if stop_after is not None and chunks >= stop_after:
                    r.close()  # the client goes away mid-stream: the server must abort and free the blocks
                    out.e2e_s = time.monotonic() - start
                    return out
        out.e2e_s = time.monotonic() - start
        if not done and not out.error:
            out.error = "stream ended without [DONE]"
        elif check is not None and finish == "stop" and not out.error and not check("".join(text)):
            out.error = f"the output breaks its constraint: {''.join(text)[:200]!r}"
        return out


# ---------------------------------------------------------------------- constraint checks
def _is_city_json(message: dict) -> bool:
    try:
        value = json.loads(message.get("content") or "")
    except ValueError:
        return False
    return (isinstance(value, dict) and set(value) == {"name", "population"} and isinstance(value["name"], str)
            and isinstance(value["population"], int))


def _is_weather_call(message: dict) -> bool:
    calls = message.get("tool_calls") or []
    try:
        return bool(calls) and all(c["function"]["name"] == "get_weather"
                                   and isinstance(json.loads(c["function"]["arguments"]).get("city"), str)
                                   for c in calls)
    except (ValueError, KeyError, AttributeError):
        return False
