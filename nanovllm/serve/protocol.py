"""Pydantic models of the OpenAI request/response shapes (plus vLLM's extra sampling fields).

Requests are strict: unknown fields and wrong types are refused (400 naming the field)
instead of being silently ignored or coerced. `to_sampling_params` maps the fields onto
SamplingParams; its ValueError/TypeError messages become 400s too.
"""

from __future__ import annotations

import json
import time
import uuid
from http import HTTPStatus
from typing import Any, ClassVar, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_serializer

from nanovllm.sampling_params import RequestOutputKind, SamplingParams, require_valid_unicode

# ---------------------------------------------------------------------- errors

ERROR_TYPES = {
    HTTPStatus.BAD_REQUEST: "invalid_request_error",
    HTTPStatus.UNAUTHORIZED: "authentication_error",
    HTTPStatus.NOT_FOUND: "not_found_error",
    HTTPStatus.METHOD_NOT_ALLOWED: "invalid_request_error",
    HTTPStatus.REQUEST_ENTITY_TOO_LARGE: "request_too_large",
    HTTPStatus.INTERNAL_SERVER_ERROR: "server_error",
    HTTPStatus.SERVICE_UNAVAILABLE: "service_unavailable",
}


class APIError(Exception):
    """An error answered in the OpenAI shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, message: str, status: int = HTTPStatus.BAD_REQUEST, param: Optional[str] = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = int(status)
        self.param = param

    def body(self) -> dict:
        return error_body(self.message, self.status, self.param)


def error_body(message: str, status: int, param: Optional[str] = None) -> dict:
    err_type = ERROR_TYPES.get(HTTPStatus(status), "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": err_type, "param": param, "code": int(status)}}


# ---------------------------------------------------------------------- requests


class OpenAIRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    @field_validator("*", mode="after")
    @classmethod
    def _valid_unicode(cls, value: Any, info: ValidationInfo) -> Any:
        """Refuse lone surrogates ("\\ud800", legal in JSON) here, with the field's name, rather
        than as the tokenizer's internal error."""
        if isinstance(value, str):
            require_valid_unicode(info.field_name, value)
        elif isinstance(value, list) and value and isinstance(value[0], str):
            for item in value:
                if isinstance(item, str):
                    require_valid_unicode(info.field_name, item)
        return value


class StreamOptions(OpenAIRequest):
    include_usage: bool = False


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
    user: Optional[str] = None
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

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingRequest):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = 16  # OpenAI's default for completions
    logprobs: Optional[int] = None
    echo: bool = False
    return_token_ids: bool = False  # vLLM extra: each choice carries its generated token ids


class TextContentPart(OpenAIRequest):
    type: Literal["text"]
    text: str


class ChatMessage(OpenAIRequest):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextContentPart], None] = None
    name: Optional[str] = None

    def as_template_dict(self) -> dict:
        content = self.content
        if isinstance(content, list):
            content = "\n".join(part.text for part in content)
        msg = {"role": "system" if self.role == "developer" else self.role, "content": content or ""}
        if self.name is not None:
            msg["name"] = self.name
        return msg


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = None
    add_generation_prompt: bool = True  # vLLM extra


class TokenizeRequest(OpenAIRequest):
    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(OpenAIRequest):
    model: Optional[str] = None
    tokens: list[int]


# ---------------------------------------------------------------------- responses


class OpenAIResponse(BaseModel):
    # fields dropped from the JSON when None (vLLM-style extras that plain OpenAI clients never see)
    _omit_if_none: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _drop_empty_extras(self, handler):
        data = handler(self)
        for key in self._omit_if_none:
            if data.get(key, 0) is None:
                del data[key]
        return data


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
    _omit_if_none: ClassVar[frozenset[str]] = frozenset({"role", "content"})
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None


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


def to_sampling_params(req: SamplingRequest, max_tokens: Optional[int], logprobs: Optional[int]) -> SamplingParams:
    """Map the request's fields onto SamplingParams (DELTA outputs). Bad values raise APIError(400)."""
    values: dict[str, Any] = dict(
        n=req.n,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=0 if req.top_k is None else req.top_k,
        min_p=0.0 if req.min_p is None else req.min_p,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
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
