"""Pydantic models of the OpenAI request/response shapes (plus vLLM's extra sampling fields).

Requests are strict: unknown fields and wrong types are refused (400 naming the field)
instead of being silently ignored or coerced. `to_sampling_params` maps the fields onto
SamplingParams; its ValueError/TypeError messages become 400s too.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, ClassVar, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from nanovllm.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams
from nanovllm.serve.protocol_base import APIError, OpenAIRequest, OpenAIResponse, error_body  # noqa: F401 (re-exported)
from nanovllm.serve.tool_protocol import (
    ChatTool,
    DeltaToolCall,
    NamedToolChoice,
    ResponseFormat,
    StructuredOutputsRequest,
    ToolCall,
    ToolCallRequest,
)

# ---------------------------------------------------------------------- requests


class StreamOptions(OpenAIRequest):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM extra; accepted, usage comes once at the end


class SamplingRequest(OpenAIRequest):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: Optional[str] = None  # None = the served model
    n: int = 1
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    max_tokens: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Optional[dict[str, float]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    # vLLM extras
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: Optional[list[int]] = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # structured output (see serve/structured.py): OpenAI's and vLLM's spellings
    response_format: Optional[ResponseFormat] = None
    structured_outputs: Optional[StructuredOutputsRequest] = None
    guided_json: Union[str, dict[str, Any], None] = None
    guided_regex: Optional[str] = None
    guided_choice: Optional[list[str]] = None
    guided_grammar: Optional[str] = None
    guided_whitespace_pattern: Optional[str] = None
    guided_decoding_backend: Optional[str] = None
    # OpenAI fields that change nothing here: accepted, logged at debug level, ignored
    user: Optional[str] = None
    store: Optional[bool] = None
    metadata: Optional[dict[str, str]] = None
    service_tier: Optional[str] = None

    IGNORED_FIELDS: ClassVar[tuple[str, ...]] = ("user", "store", "metadata", "service_tier")

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingRequest):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = 16  # OpenAI's default for completions
    logprobs: Optional[int] = None
    echo: bool = False
    return_token_ids: bool = False  # vLLM extra: each choice carries its generated token ids


class ContentPart(OpenAIRequest):
    """A content part: `text` is supported; image or audio parts are refused by the chat
    renderer with a text-only message (so they are let through here, unvalidated)."""

    model_config = ConfigDict(extra="allow", strict=True)
    type: str
    text: Optional[str] = None


class ChatMessage(OpenAIRequest):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[ContentPart], None] = None
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCallRequest]] = None  # assistant
    tool_call_id: Optional[str] = None  # tool
    # what SDKs echo back from an earlier response: accepted, not rendered
    refusal: Optional[str] = None
    annotations: Optional[list[dict[str, Any]]] = None
    audio: Optional[dict[str, Any]] = None
    function_call: Optional[dict[str, Any]] = None
    reasoning_content: Optional[str] = None

    def num_chars(self) -> int:
        """Characters of the text this message puts in the prompt (content, tool-call arguments)."""
        if isinstance(self.content, str):
            chars = len(self.content)
        else:
            chars = sum(len(part.text or "") for part in self.content or ())
        return chars + sum(len(c.function.arguments) for c in self.tool_calls or ())

    def as_template_dict(self) -> dict:
        """The message for chat_utils.normalize_messages (which validates content parts)."""
        msg: dict[str, Any] = {"role": self.role, "content": self.content}
        if isinstance(self.content, list):
            msg["content"] = [part.model_dump(exclude_none=True) for part in self.content]
        if self.name is not None:
            msg["name"] = self.name
        if self.tool_calls:
            msg["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            msg["tool_call_id"] = self.tool_call_id
        return msg


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = None
    tools: Optional[list[ChatTool]] = Field(default=None, min_length=1)
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: Optional[bool] = None
    # vLLM extras
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: Optional[str] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None


class TokenizeRequest(OpenAIRequest):
    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    tools: Optional[list[ChatTool]] = None
    chat_template: Optional[str] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None


class DetokenizeRequest(OpenAIRequest):
    model: Optional[str] = None
    tokens: list[int]


# ---------------------------------------------------------------------- responses


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class UsageInfo(OpenAIResponse):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class ModelCard(OpenAIResponse):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "nanovllm"
    root: Optional[str] = None
    max_model_len: Optional[int] = None


class ModelList(OpenAIResponse):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class CompletionLogprobs(OpenAIResponse):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[Optional[float]] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[Optional[dict[str, float]]] = Field(default_factory=list)


class CompletionChoice(OpenAIResponse):
    _omit_if_none: ClassVar[frozenset[str]] = frozenset({"token_ids"})
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Optional[str] = None
    stop_reason: Union[int, str, None] = None
    token_ids: Optional[list[int]] = None


class CompletionResponse(OpenAIResponse):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo


class CompletionStreamResponse(OpenAIResponse):
    _omit_if_none: ClassVar[frozenset[str]] = frozenset({"usage"})
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[UsageInfo] = None


class TopLogprob(OpenAIResponse):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(OpenAIResponse):
    content: Optional[list[ChatTokenLogprob]] = None


class ChatResponseMessage(OpenAIResponse):
    role: Literal["assistant"] = "assistant"
    content: Optional[str] = None
    tool_calls: list[ToolCall] = Field(default_factory=list)


class ChatChoice(OpenAIResponse):
    index: int
    message: ChatResponseMessage
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[str] = None
    stop_reason: Union[int, str, None] = None


class ChatCompletionResponse(OpenAIResponse):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class DeltaMessage(OpenAIResponse):
    _omit_if_none: ClassVar[frozenset[str]] = frozenset({"role", "content", "tool_calls"})
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None
    tool_calls: Optional[list[DeltaToolCall]] = None


class ChatStreamChoice(OpenAIResponse):
    index: int
    delta: DeltaMessage
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[str] = None
    stop_reason: Union[int, str, None] = None


class ChatCompletionStreamResponse(OpenAIResponse):
    _omit_if_none: ClassVar[frozenset[str]] = frozenset({"usage"})
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: Optional[UsageInfo] = None


class TokenizeResponse(OpenAIResponse):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(OpenAIResponse):
    prompt: str


# ---------------------------------------------------------------------- request -> SamplingParams


def to_sampling_params(req: SamplingRequest, max_tokens: Optional[int], logprobs: Optional[int],
                       structured: Optional[StructuredOutputsParams] = None,
                       defaults: Optional[dict] = None) -> SamplingParams:
    """Map the request's fields onto SamplingParams (DELTA outputs). Bad values raise APIError(400).

    `defaults`: the model's generation_config.json values, used where the request gives none.
    """
    defaults = defaults or {}

    def pick(name: str, fallback):
        value = getattr(req, name)
        return value if value is not None else defaults.get(name, fallback)

    values: dict[str, Any] = dict(
        n=req.n,
        temperature=pick("temperature", 1.0),
        top_p=pick("top_p", 1.0),
        top_k=pick("top_k", 0),
        min_p=pick("min_p", 0.0),
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        repetition_penalty=pick("repetition_penalty", 1.0),
        seed=req.seed,
        max_tokens=max_tokens,
        min_tokens=req.min_tokens,
        stop=req.stop,
        stop_token_ids=req.stop_token_ids,
        include_stop_str_in_output=req.include_stop_str_in_output,
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
        logit_bias=req.logit_bias,
        skip_special_tokens=req.skip_special_tokens,
        output_kind=RequestOutputKind.DELTA,
        structured_outputs=structured,
    )
    try:
        return SamplingParams(**values)
    except (ValueError, TypeError) as e:
        message = str(e)
        first = message.split("=", 1)[0].split(" ", 1)[0]
        raise APIError(message, param=first if first in values else None) from None


def check_context_length(prompt_len: int, max_tokens: Optional[int], max_model_len: int, param: str,
                         prompt_param: str) -> None:
    """400 when the prompt, or the prompt plus an explicit max_tokens, cannot fit in the context."""
    if prompt_len >= max_model_len:
        raise APIError(
            f"this model's maximum context length is {max_model_len} tokens, but the prompt has {prompt_len} "
            f"tokens (room is needed for at least one generated token): shorten the prompt",
            param=prompt_param,
        )
    if max_tokens is not None and prompt_len + max_tokens > max_model_len:
        raise APIError(
            f"this model's maximum context length is {max_model_len} tokens, but {prompt_len + max_tokens} were "
            f"requested ({prompt_len} in the prompt + {param}={max_tokens}): lower {param} to at most "
            f"{max_model_len - prompt_len} or shorten the prompt",
            param=param,
        )


# ---------------------------------------------------------------------- logprobs and SSE helpers

MIN_LOGPROB = -9999.0  # JSON has no -inf


def safe_logprob(value: float) -> float:
    return value if value == value and value > MIN_LOGPROB else MIN_LOGPROB


def token_text(token_id: int, logprob) -> str:
    """The decoded token of a Logprob entry, or `token_id:<id>` when the server has no tokenizer."""
    text = getattr(logprob, "decoded_token", None)
    return text if text is not None else f"token_id:{token_id}"


SSE_DONE = "data: [DONE]\n\n"


def sse(message: BaseModel) -> str:
    return f"data: {message.model_dump_json()}\n\n"


def sse_error(message: str, status: int) -> str:
    return f"data: {json.dumps(error_body(message, status))}\n\n"
