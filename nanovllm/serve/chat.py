"""POST /v1/chat/completions: messages -> the chat template -> completions, plain or SSE.

The template (the request's `chat_template`, else `--chat-template`, else the model's) is
rendered with the request's `tools` and `chat_template_kwargs` (chat_utils.ChatRenderer) on
the engine's preprocessing threads, never on the event loop, after a length precheck; the
token ids go to the engine, so the prompt is tokenized once, there. Output constraints
(response_format, structured_outputs, guided_*) and tool_choice required / named become a
grammar (structured.py, tools.py); tool calls in the output are read by tools.ToolPlan.
Streaming sends the assistant role first (one chunk per choice), then one chunk per step
with new content or tool-call deltas, the finish_reason on the last one, the usage chunk
when asked, [DONE].
"""

from __future__ import annotations

import time
import uuid
from typing import AsyncIterator, Optional, Union

from nanovllm.engine.async_engine import AsyncLLMEngine, EngineDeadError, RequestFailedError, RequestStream
from nanovllm.entrypoints.chat_utils import ChatRenderer
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
    safe_logprob,
    sse,
    sse_error,
    to_sampling_params,
    token_text,
)
from nanovllm.serve.structured import constraint_field, log_ignored_fields, structured_outputs_of
from nanovllm.serve.tool_protocol import DeltaFunctionCall, DeltaToolCall, FunctionCall, ToolCall
from nanovllm.serve.tools import ToolPlan, plan_tools


class OpenAIServingChat:
    def __init__(self, engine: AsyncLLMEngine, model_name: str, chat_template: Optional[str] = None,
                 tool_parser: Optional[str] = None, enable_auto_tool_choice: bool = False) -> None:
        self.engine = engine
        self.model_name = model_name
        self.renderer = ChatRenderer(engine.tokenizer, chat_template, check_text=engine.check_text)
        self.tool_parser = tool_parser
        self.enable_auto_tool_choice = enable_auto_tool_choice

    def render(self, messages: list[ChatMessage], add_generation_prompt: bool = True, *,
               tools: Optional[list[dict]] = None, chat_template: Optional[str] = None,
               chat_template_kwargs: Optional[dict] = None, continue_final_message: bool = False) -> list[int]:
        """Token ids of the conversation under the chat template."""
        if self.engine.tokenizer is None:
            raise APIError("chat needs a tokenizer, and this server runs with --skip-tokenizer-init: use "
                           "/v1/completions with token-id prompts", param="messages")
        if not self.renderer.has_template and chat_template is None:
            raise APIError("this model has no chat template: use /v1/completions, send `chat_template`, or start "
                           "the server with --chat-template FILE", param="messages")
        if chat_template is not None and "{{" not in chat_template and "{%" not in chat_template:
            raise APIError("chat_template must be the Jinja text of a template", param="chat_template")
        try:
            return self.renderer.render(
                [m.as_template_dict() for m in messages], chat_template=chat_template, tools=tools,
                add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message,
                chat_template_kwargs=chat_template_kwargs)
        except (ValueError, TypeError) as e:  # the renderer names the field as .param
            raise APIError(str(e), param=getattr(e, "param", None) or "messages") from None

    async def render_async(self, messages: list[ChatMessage], *args, **kwargs) -> list[int]:
        """`render(messages, *args, **kwargs)` on the engine's preprocessing threads (never on the
        event loop), after a length check that refuses a conversation too long to fit unrendered
        (tools and template variables are checked on the thread, once rendered)."""
        limit = self.engine.max_prompt_chars
        chars = sum(m.num_chars() for m in messages)
        if limit is not None and chars > limit:
            raise APIError(f"messages have {chars} characters, more than any prompt that fits in max_model_len="
                           f"{self.engine.max_model_len} tokens can have ({limit}): shorten them", param="messages")
        return await self.engine.preprocess(self.render, messages, *args, **kwargs)

    async def create(self, req: ChatCompletionRequest,
                     request_id: Optional[str] = None) -> Union[ChatCompletionResponse, AsyncIterator[str]]:
        if req.top_logprobs is not None:
            if not req.logprobs:
                raise APIError("top_logprobs needs logprobs=true", param="top_logprobs")
            if not 0 <= req.top_logprobs <= MAX_LOGPROBS:
                raise APIError(f"top_logprobs={req.top_logprobs} is out of range: must be in [0, {MAX_LOGPROBS}]",
                               param="top_logprobs")
        log_ignored_fields(req)
        plan = plan_tools(req, self.tool_parser, self.enable_auto_tool_choice)
        structured, structured_param = structured_outputs_of(req), constraint_field(req)
        if plan.constraint is not None:
            if structured is not None:
                raise APIError("tool_choice required / a named function already constrains the output: drop "
                               "response_format / structured_outputs", param="tool_choice")
            structured, structured_param = plan.constraint, "tools"  # the grammar is built from the tools' schemas
        ids = await self.render_async(req.messages, req.add_generation_prompt, tools=plan.template_tools,
                                      chat_template=req.chat_template, chat_template_kwargs=req.chat_template_kwargs,
                                      continue_final_message=req.continue_final_message)
        if req.max_completion_tokens is not None:
            max_tokens, param = req.max_completion_tokens, "max_completion_tokens"
        else:
            max_tokens, param = req.max_tokens, "max_tokens"
        check_context_length(len(ids), max_tokens, self.engine.max_model_len, param, "messages")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = to_sampling_params(req, max_tokens, logprobs, structured,  # max_tokens None = up to the context
                                    self.engine.default_sampling_values)
        response_id = f"chatcmpl-{request_id or uuid.uuid4().hex}"
        engine_id = f"{response_id}-{uuid.uuid4().hex[:8]}"  # unique even when clients reuse X-Request-Id
        [stream] = await add_requests(self.engine, [({"prompt_token_ids": ids}, params, engine_id)],
                                      {"prompt": "messages", "max_tokens": param, "structured_outputs": structured_param})
        if req.stream:
            return self._stream(req, plan, len(ids), stream, response_id)
        [(_, states)] = await collect_all([stream], req.n)
        choices = []
        for j, st in enumerate(states):
            text = "".join(st.text)
            message, made_calls = self._message(plan, text)
            choices.append(ChatChoice(
                index=j, message=message, logprobs=self._logprobs(st.token_ids, st.logprobs, req.top_logprobs or 0),
                finish_reason=plan.finish_reason(st.finish_reason, made_calls), stop_reason=st.stop_reason))
        completion_tokens = sum(len(st.token_ids) for st in states)
        usage = UsageInfo(prompt_tokens=len(ids), completion_tokens=completion_tokens,
                          total_tokens=len(ids) + completion_tokens)
        return ChatCompletionResponse(id=response_id, model=self.model_name, choices=choices, usage=usage)

    @staticmethod
    def _message(plan: ToolPlan, text: str) -> tuple[ChatResponseMessage, bool]:
        reader = plan.new_stream()
        if reader is None:
            return ChatResponseMessage(content=text), False
        parsed = reader.parse(text)
        calls = [ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments))
                 for c in parsed.tool_calls]
        return ChatResponseMessage(content=parsed.content, tool_calls=calls), bool(calls)

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

    async def _stream(self, req: ChatCompletionRequest, plan: ToolPlan, prompt_tokens: int, stream: RequestStream,
                      response_id: str) -> AsyncIterator[str]:
        created = int(time.time())

        def chunk(choices, usage=None) -> str:
            return sse(ChatCompletionStreamResponse(id=response_id, created=created, model=self.model_name,
                                                    choices=choices, usage=usage))

        completion_tokens = 0
        # tokens whose text is still held back (partial UTF-8, possible stop string, tool-call
        # markup): their logprobs go out with the next chunk that says something
        pending: dict[int, tuple[list, list]] = {}
        readers = {j: plan.new_stream() for j in range(req.n)}
        made_calls: set[int] = set()
        try:
            for j in range(req.n):
                yield chunk([ChatStreamChoice(index=j, delta=DeltaMessage(role="assistant", content=""))])
            async for out in stream:
                for c in out.outputs:
                    completion_tokens += len(c.token_ids)
                    ids, entries = pending.setdefault(c.index, ([], []))
                    ids.extend(c.token_ids)
                    entries.extend(c.logprobs or [])
                    content, deltas = c.text or "", []
                    reader = readers[c.index]
                    if reader is not None:
                        content, deltas = reader.feed(content)
                        if c.finish_reason is not None:
                            rest, more = reader.finish()
                            content, deltas = content + rest, deltas + more
                    if deltas:
                        made_calls.add(c.index)
                    if not (content or deltas or c.finish_reason):
                        continue
                    del pending[c.index]
                    logprobs = self._logprobs(ids, entries, req.top_logprobs or 0) if req.logprobs else None
                    tool_calls = [DeltaToolCall(index=d.index, id=d.id, type="function" if d.id else None,
                                                function=DeltaFunctionCall(name=d.name, arguments=d.arguments))
                                  for d in deltas] or None
                    yield chunk([ChatStreamChoice(
                        index=c.index, delta=DeltaMessage(content=content or None, tool_calls=tool_calls),
                        logprobs=logprobs, finish_reason=plan.finish_reason(c.finish_reason, c.index in made_calls),
                        stop_reason=c.stop_reason,
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
