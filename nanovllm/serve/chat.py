"""POST /v1/chat/completions: messages -> the model's chat template -> completions, plain or SSE.

The template is applied as `LLM.apply_chat_template` does (tokenize=True, generation prompt
added); the token ids go to the engine, so the prompt is tokenized once, here.
Streaming sends the assistant role first (one chunk per choice), then one chunk per step
with new text, the finish_reason on the last one, the usage chunk when asked, [DONE].
"""

from __future__ import annotations

import time
from typing import AsyncIterator, Optional, Union

from nanovllm.engine.async_engine import AsyncLLMEngine, EngineDeadError, RequestFailedError, RequestStream
from nanovllm.sampling_params import MAX_LOGPROBS
from nanovllm.serve.completions import add_requests, collect_all
from nanovllm.serve.protocol import (
    MIN_LOGPROB,
    SSE_DONE,
    APIError,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamResponse,
    ChatLogprobs,
    ChatMessage,
    ChatResponseMessage,
    ChatStreamChoice,
    ChatTokenLogprob,
    DeltaMessage,
    TopLogprob,
    UsageInfo,
    check_context_length,
    random_id,
    safe_logprob,
    sse,
    sse_error,
    to_sampling_params,
    token_text,
)


class OpenAIServingChat:
    def __init__(self, engine: AsyncLLMEngine, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name

    def render(self, messages: list[ChatMessage], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the conversation under the model's chat template."""
        tok = self.engine.tokenizer
        if tok is None:
            raise APIError("chat needs a tokenizer, and this server runs with --skip-tokenizer-init: use "
                           "/v1/completions with token-id prompts", param="messages")
        if not getattr(tok, "chat_template", None):
            raise APIError("this model has no chat template: use /v1/completions", param="messages")
        conversation = [m.as_template_dict() for m in messages]
        try:
            ids = tok.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt, tokenize=True,
                                          return_dict=False)
        except Exception as e:  # jinja errors (e.g. the template refuses a role order) are the client's
            raise APIError(f"the chat template refused these messages: {e}", param="messages") from None
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)

    async def render_async(self, messages: list[ChatMessage], *args, **kwargs) -> list[int]:
        """`render(messages, *args, **kwargs)` on the engine's preprocessing threads (never on the
        event loop), after a length check that refuses a conversation too long to fit unrendered."""
        limit = self.engine.max_prompt_chars
        chars = sum(len(m.as_template_dict()["content"]) for m in messages)
        if limit is not None and chars > limit:
            raise APIError(f"messages have {chars} characters, more than any prompt that fits in max_model_len="
                           f"{self.engine.max_model_len} tokens can have ({limit}): shorten them", param="messages")
        return await self.engine.preprocess(self.render, messages, *args, **kwargs)

    async def create(self, req: ChatCompletionRequest) -> Union[ChatCompletionResponse, AsyncIterator[str]]:
        if req.top_logprobs is not None:
            if not req.logprobs:
                raise APIError("top_logprobs needs logprobs=true", param="top_logprobs")
            if not 0 <= req.top_logprobs <= MAX_LOGPROBS:
                raise APIError(f"top_logprobs={req.top_logprobs} is out of range: must be in [0, {MAX_LOGPROBS}]",
                               param="top_logprobs")
        ids = await self.render_async(req.messages, req.add_generation_prompt)
        if req.max_completion_tokens is not None:
            max_tokens, param = req.max_completion_tokens, "max_completion_tokens"
        else:
            max_tokens, param = req.max_tokens, "max_tokens"
        check_context_length(len(ids), max_tokens, self.engine.max_model_len, param, "messages")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = to_sampling_params(req, max_tokens, logprobs)  # max_tokens None = up to the context
        request_id = random_id("chatcmpl")
        [stream] = await add_requests(self.engine, [({"prompt_token_ids": ids}, params, request_id)],
                                      {"prompt": "messages", "max_tokens": param})
        if req.stream:
            return self._stream(req, len(ids), stream, request_id)
        [(_, states)] = await collect_all([stream], req.n)
        choices = [
            ChatChoice(index=j, message=ChatResponseMessage(content="".join(st.text)),
                       logprobs=self._logprobs(st.token_ids, st.logprobs, req.top_logprobs or 0),
                       finish_reason=st.finish_reason, stop_reason=st.stop_reason)
            for j, st in enumerate(states)
        ]
        completion_tokens = sum(len(st.token_ids) for st in states)
        usage = UsageInfo(prompt_tokens=len(ids), completion_tokens=completion_tokens,
                          total_tokens=len(ids) + completion_tokens)
        return ChatCompletionResponse(id=request_id, model=self.model_name, choices=choices, usage=usage)

    @staticmethod
    def _logprobs(token_ids: list[int], entries: Optional[list], top_n: int) -> Optional[ChatLogprobs]:
        if entries is None:
            return None
        content = []
        for tid, entry in zip(token_ids, entries):
            entry = entry or {}
            chosen = entry.get(tid)
            text = token_text(tid, chosen)
            ranked = sorted((lp.rank, t, lp) for t, lp in entry.items() if lp.rank is not None and lp.rank <= top_n)
            content.append(ChatTokenLogprob(
                token=text, logprob=safe_logprob(chosen.logprob) if chosen is not None else MIN_LOGPROB,
                bytes=list(text.encode("utf-8")),
                top_logprobs=[TopLogprob(token=token_text(t, lp), logprob=safe_logprob(lp.logprob),
                                         bytes=list(token_text(t, lp).encode("utf-8"))) for _, t, lp in ranked[:top_n]],
            ))
        return ChatLogprobs(content=content)

    async def _stream(self, req: ChatCompletionRequest, prompt_tokens: int, stream: RequestStream,
                      request_id: str) -> AsyncIterator[str]:
        created = int(time.time())

        def chunk(choices, usage=None) -> str:
            return sse(ChatCompletionStreamResponse(id=request_id, created=created, model=self.model_name,
                                                    choices=choices, usage=usage))

        completion_tokens = 0
        # tokens whose text is still held back (partial UTF-8, possible stop string): their
        # logprobs go out with the next chunk that carries text
        pending: dict[int, tuple[list, list]] = {}
        try:
            for j in range(req.n):
                yield chunk([ChatStreamChoice(index=j, delta=DeltaMessage(role="assistant", content=""))])
            async for out in stream:
                for c in out.outputs:
                    completion_tokens += len(c.token_ids)
                    ids, entries = pending.setdefault(c.index, ([], []))
                    ids.extend(c.token_ids)
                    entries.extend(c.logprobs or [])
                    if not (c.text or c.finish_reason):
                        continue
                    del pending[c.index]
                    logprobs = self._logprobs(ids, entries, req.top_logprobs or 0) if req.logprobs else None
                    yield chunk([ChatStreamChoice(
                        index=c.index, delta=DeltaMessage(content=c.text or None), logprobs=logprobs,
                        finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                    )])
            if req.include_usage:
                yield chunk([], UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                          total_tokens=prompt_tokens + completion_tokens))
        except RequestFailedError as e:
            yield sse_error(str(e), 500)
        except EngineDeadError as e:
            yield sse_error(str(e), 503)
        finally:
            stream.abort()
        yield SSE_DONE

