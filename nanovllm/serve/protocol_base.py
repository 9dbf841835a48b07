"""The base of the OpenAI protocol models: errors in OpenAI's shape, strict request models
(unknown fields, wrong types and lone surrogates refused) and response models that drop
empty vLLM extras. protocol.py and tool_protocol.py build on it."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any, ClassVar, Optional

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator, model_serializer

from nanovllm.sampling_params import require_valid_unicode_in

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


# ---------------------------------------------------------------------- base models


class OpenAIRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    @field_validator("*", mode="after")
    @classmethod
    def _valid_unicode(cls, value: Any, info: ValidationInfo) -> Any:
        """Refuse lone surrogates ("\\ud800", legal in JSON) here, with the field's name, rather
        than as the tokenizer's (or xgrammar's) internal error: in strings, lists of strings and
        JSON objects (schemas, tool parameters, template variables) alike. Nested request models
        check their own fields."""
        if not _is_token_ids(value):
            require_valid_unicode_in(info.field_name, value)
        return value


def _is_token_ids(value: Any) -> bool:
    """A list of ints or of int lists (token ids, strictly typed): no text, and possibly long."""
    if not isinstance(value, list) or not value:
        return False
    first = value[0]
    if isinstance(first, list):
        first = first[0] if first else 0
    return isinstance(first, int)


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
