"""POST /v1/completions: prompts (text or token ids, one or a batch) -> completions, plain or SSE.

Each prompt of a batch is one engine request with `n` completions; choice `index` is
`prompt_index * n + completion_index`, as in OpenAI and vLLM. Without a tokenizer
(--skip-tokenizer-init) prompts must be token ids, texts are "" and every choice carries
its `token_ids`; streaming then still sends one chunk per engine step.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Optional, Union

from nanovllm.engine.async_engine import AsyncLLMEngine, EngineDeadError, RequestFailedError, RequestStream
from nanovllm.outputs import CompletionOutput, RequestOutput
from nanovllm.sampling_params import DEFAULT_MAX_TOKENS
from nanovllm.serve.protocol import (
    SSE_DONE,
    APIError,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
    UsageInfo,
    check_context_length,
    safe_logprob,
    sse,
    sse_error,
    to_sampling_params,
    token_text,
)
from nanovllm.serve.structured import constraint_field, log_ignored_fields, structured_outputs_of


# ---------------------------------------------------------------------- shared with chat.py
async def add_requests(engine: AsyncLLMEngine, requests: list, param_names: Optional[dict] = None) -> list[RequestStream]:
    """engine.add_requests, with the engine's ValueError/TypeError as a 400 naming the field
    (`param_names` maps the engine's names onto this endpoint's, e.g. prompt -> messages)."""
    try:
        return await engine.add_requests(requests)
    except (ValueError, TypeError) as e:
        param = getattr(e, "param", None)
        raise APIError(str(e), param=(param_names or {}).get(param, param)) from None


@dataclass
class ChoiceState:
    """One completion, accumulated from DELTA outputs."""

    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: Optional[list] = None
    finish_reason: Optional[str] = None
    stop_reason: Union[int, str, None] = None

    def add(self, c: CompletionOutput) -> None:
        self.text.append(c.text)
        self.token_ids.extend(c.token_ids)
        if c.logprobs is not None:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.extend(c.logprobs)
        if c.finish_reason is not None:
            self.finish_reason, self.stop_reason = c.finish_reason, c.stop_reason


async def collect(stream: RequestStream, n: int) -> tuple[list[int], list[ChoiceState]]:
    """Drain a stream: (prompt token ids, the n completions)."""
    choices = [ChoiceState() for _ in range(n)]
    prompt_ids: list[int] = []
    async for out in stream:
        prompt_ids = out.prompt_token_ids
        for c in out.outputs:
            choices[c.index].add(c)
    return prompt_ids, choices


async def collect_all(streams: list[RequestStream], n: int) -> list[tuple[list[int], list[ChoiceState]]]:
    """Drain several streams concurrently; on any error (or cancellation) abort them all."""
    tasks = [asyncio.ensure_future(collect(s, n)) for s in streams]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for t in tasks:
            t.cancel()
        for s in streams:
            s.abort()


async def merge_streams(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several streams as outputs arrive: yields (stream index, output)."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, stream: RequestStream) -> None:
        try:
            async for out in stream:
                queue.put_nowait((i, out))
        except Exception as e:
            queue.put_nowait((i, e))
        finally:
            queue.put_nowait((i, done))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        for s in streams:
            s.abort()


# ---------------------------------------------------------------------- completions
class OpenAIServingCompletion:
    def __init__(self, engine: AsyncLLMEngine, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name

    async def prompts(self, req: CompletionRequest) -> list[dict]:
        """The request's prompts as engine inputs {"prompt"?, "prompt_token_ids"}.

        Texts are checked by length first (one too long to fit is refused without tokenizing),
        then tokenized together on the engine's preprocessing threads, off the event loop.
        """
        p = req.prompt
        if isinstance(p, str):
            items = [p]
        elif not p:
            raise APIError("prompt is empty: give a string, a list of strings, or (lists of) token ids",
                           param="prompt")
        elif isinstance(p[0], int):
            items = [p]
        else:
            items = list(p)
        tok = self.engine.tokenizer
        out = []
        for item in items:
            if isinstance(item, str):
                if tok is None:
                    raise APIError("this server runs without a tokenizer (--skip-tokenizer-init): send the prompt "
                                   "as token ids", param="prompt")
                if not item:
                    raise APIError("prompt is empty: give at least one character", param="prompt")
                out.append({"prompt": item})
            else:
                if not item:
                    raise APIError("prompt is empty: give at least one token id", param="prompt")
                out.append({"prompt_token_ids": item})
        texts = [p for p in out if "prompt_token_ids" not in p]
        if texts:
            ids = await self.engine.tokenize([p["prompt"] for p in texts])
            for p, prompt_ids in zip(texts, ids):
                p["prompt_token_ids"] = prompt_ids
        return out

    async def create(self, req: CompletionRequest,
                     request_id: Optional[str] = None) -> Union[CompletionResponse, AsyncIterator[str]]:
        if req.echo and req.logprobs is not None:
            raise APIError("echo with logprobs is not supported (it needs prompt logprobs)", param="echo")
        log_ignored_fields(req)
        structured = structured_outputs_of(req)
        if structured is not None and self.engine.tokenizer is None:
            raise APIError("structured outputs need a tokenizer; this server runs with --skip-tokenizer-init",
                           param=constraint_field(req))
        prompts = await self.prompts(req)
        explicit = "max_tokens" in req.model_fields_set
        for p in prompts:
            check_context_length(len(p["prompt_token_ids"]), req.max_tokens if explicit else None,
                                 self.engine.max_model_len, "max_tokens", "prompt")
        # OpenAI's default of 16 is clamped to the room left, as the engine's own default is
        params = to_sampling_params(req, req.max_tokens if explicit else DEFAULT_MAX_TOKENS, req.logprobs, structured,
                                    self.engine.default_sampling_values)
        request_id = f"cmpl-{request_id or uuid.uuid4().hex}"
        engine_prefix = f"{request_id}-{uuid.uuid4().hex[:8]}"  # unique even when clients reuse X-Request-Id
        # all prompts at once: the engine admits them in the same step
        streams = await add_requests(self.engine, [(p, params, f"{engine_prefix}-{i}") for i, p in enumerate(prompts)],
                                     {"structured_outputs": constraint_field(req)})
        if req.stream:
            return self._stream(req, prompts, streams, request_id)
        return self._response(req, prompts, await collect_all(streams, req.n), request_id)

    # ------------------------------------------------------------------ helpers
    def _show_token_ids(self, req: CompletionRequest) -> bool:
        return req.return_token_ids or self.engine.tokenizer is None

    def _echo_text(self, prompt: dict) -> str:
        if "prompt" in prompt:
            return prompt["prompt"]
        tok = self.engine.tokenizer
        return tok.decode(prompt["prompt_token_ids"]) if tok is not None else ""

    def _logprobs(self, token_ids: list[int], entries: Optional[list], offset: int) -> Optional[CompletionLogprobs]:
        if entries is None:
            return None
        out = CompletionLogprobs()
        for tid, entry in zip(token_ids, entries):
            chosen = entry.get(tid) if entry else None
            text = token_text(tid, chosen)
            out.tokens.append(text)
            out.token_logprobs.append(safe_logprob(chosen.logprob) if chosen is not None else None)
            out.top_logprobs.append({token_text(t, lp): safe_logprob(lp.logprob) for t, lp in entry.items()}
                                    if entry else None)
            out.text_offset.append(offset)
            offset += len(text)
        return out

    def _response(self, req: CompletionRequest, prompts: list[dict], results: list, request_id: str):
        choices = []
        prompt_tokens = completion_tokens = 0
        show_ids = self._show_token_ids(req)
        for i, (prompt, (_, states)) in enumerate(zip(prompts, results)):
            prompt_tokens += len(prompt["prompt_token_ids"])
            prefix = self._echo_text(prompt) if req.echo else ""
            for j, st in enumerate(states):
                completion_tokens += len(st.token_ids)
                choices.append(CompletionChoice(
                    index=i * req.n + j, text=prefix + "".join(st.text),
                    logprobs=self._logprobs(st.token_ids, st.logprobs, 0),
                    finish_reason=st.finish_reason, stop_reason=st.stop_reason,
                    token_ids=st.token_ids if show_ids else None,
                ))
        usage = UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                          total_tokens=prompt_tokens + completion_tokens)
        return CompletionResponse(id=request_id, model=self.model_name, choices=choices, usage=usage)

    async def _stream(self, req: CompletionRequest, prompts: list[dict], streams: list[RequestStream],
                      request_id: str) -> AsyncIterator[str]:
        created = int(time.time())
        show_ids = self._show_token_ids(req)
        prompt_tokens = sum(len(p["prompt_token_ids"]) for p in prompts)
        completion_tokens = 0
        offsets: dict[int, int] = {}
        echoed: set[int] = set()
        try:
            async for i, out in merge_streams(streams):
                for c in out.outputs:
                    index = i * req.n + c.index
                    completion_tokens += len(c.token_ids)
                    text = c.text
                    if req.echo and index not in echoed:
                        echoed.add(index)
                        text = self._echo_text(prompts[i]) + text
                    if not (text or c.finish_reason or (show_ids and c.token_ids)):
                        continue
                    logprobs = self._logprobs(c.token_ids, c.logprobs, offsets.get(index, 0))
                    if logprobs is not None:
                        offsets[index] = offsets.get(index, 0) + sum(len(t) for t in logprobs.tokens)
                    choice = CompletionChoice(index=index, text=text, logprobs=logprobs,
                                              finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                                              token_ids=list(c.token_ids) if show_ids else None)
                    yield sse(CompletionStreamResponse(id=request_id, created=created, model=self.model_name,
                                                       choices=[choice]))
            if req.include_usage:
                usage = UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                  total_tokens=prompt_tokens + completion_tokens)
                yield sse(CompletionStreamResponse(id=request_id, created=created, model=self.model_name,
                                                   choices=[], usage=usage))
        except RequestFailedError as e:
            yield sse_error(str(e), 500)
        except EngineDeadError as e:
            yield sse_error(str(e), 503)
        finally:
            for s in streams:
                s.abort()
        yield SSE_DONE
