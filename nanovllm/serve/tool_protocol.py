"""Request and response models of structured outputs and tool calling (OpenAI's and vLLM's
shapes): response_format, structured_outputs, tool definitions, tool_choice, the tool calls
of earlier turns and of replies. What they mean: structured.py and tools.py."""

from __future__ import annotations

from typing import Any, ClassVar, Literal, Optional, Union

from pydantic import ConfigDict, Field

from nanovllm.serve.protocol_base import OpenAIRequest, OpenAIResponse

# ---------------------------------------------------------------------- output constraints (requests)


class JsonSchemaFormat(OpenAIRequest):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)
    name: Optional[str] = None
    description: Optional[str] = None
    json_schema: Optional[dict[str, Any]] = Field(default=None, alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(OpenAIRequest):
    """OpenAI's response_format, plus vLLM's structural_tag (`structures` + `triggers`, or `format`)."""

    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: Optional[JsonSchemaFormat] = None
    structures: Optional[list[dict[str, Any]]] = None
    triggers: Optional[list[str]] = None
    format: Optional[dict[str, Any]] = None


class StructuredOutputsRequest(OpenAIRequest):
    """vLLM's `structured_outputs` request object (StructuredOutputsParams' fields)."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)
    json_: Union[str, dict[str, Any], None] = Field(default=None, alias="json")
    regex: Optional[str] = None
    choice: Optional[list[str]] = None
    grammar: Optional[str] = None
    json_object: Optional[bool] = None
    structural_tag: Union[str, dict[str, Any], None] = None
    disable_fallback: bool = False
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: Optional[str] = None


# ---------------------------------------------------------------------- tools (requests)


class FunctionDefinition(OpenAIRequest):
    name: str = Field(min_length=1)
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None


class ChatTool(OpenAIRequest):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(OpenAIRequest):
    name: str


class NamedToolChoice(OpenAIRequest):
    type: Literal["function"] = "function"
    function: NamedFunction


class FunctionCallRequest(OpenAIRequest):
    name: str
    arguments: str


class ToolCallRequest(OpenAIRequest):
    """An earlier assistant turn's tool call, sent back in the conversation."""

    id: Optional[str] = None
    type: Literal["function"] = "function"
    function: FunctionCallRequest


# ---------------------------------------------------------------------- tool calls (responses)


class FunctionCall(OpenAIResponse):
    name: str
    arguments: str  # JSON text


class ToolCall(OpenAIResponse):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class DeltaFunctionCall(OpenAIResponse):
    _omit_if_none: ClassVar[frozenset[str]] = frozenset({"name", "arguments"})
    name: Optional[str] = None
    arguments: Optional[str] = None


class DeltaToolCall(OpenAIResponse):
    _omit_if_none: ClassVar[frozenset[str]] = frozenset({"id", "type"})
    index: int
    id: Optional[str] = None
    type: Optional[Literal["function"]] = None
    function: DeltaFunctionCall
