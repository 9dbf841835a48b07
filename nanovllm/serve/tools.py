"""Tool calling for /v1/chat/completions: what tool_choice means and how the output is read.

    tool_choice "none"      tools are shown to the template, the reply is plain content
    "auto" (the default     the model decides; its reply is read by the server's tool-call parser
     when tools are given)  (`--tool-call-parser`, needs `--enable-auto-tool-choice`, as in vLLM)
    "required"              the output is constrained (xgrammar) to a JSON array of
                            {"name": one of the tools, "parameters": its schema}, at least one
                            (exactly one with parallel_tool_calls=false)
    {"type": "function",    the output is constrained to that function's parameters schema
     "function": {"name"}}

Required and named choices do not depend on the model's own tool format, so they work with
any model and parser.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

from nanovllm.sampling_params import StructuredOutputsParams
from nanovllm.serve.protocol import APIError, ChatCompletionRequest
from nanovllm.serve.tool_protocol import NamedToolChoice
from nanovllm.serve.tool_parsers import TOOL_PARSERS, NamedStream, RequiredStream, ToolOutputStream

logger = logging.getLogger("nanovllm")

ANY_OBJECT = {"type": "object"}


@dataclass
class ToolPlan:
    mode: str  # "none" | "auto" | "required" | "named"
    template_tools: Optional[list[dict]] = None  # what the chat template gets as `tools`
    constraint: Optional[StructuredOutputsParams] = None  # required / named
    parser: Optional[str] = None  # auto: the --tool-call-parser name
    function: Optional[str] = None  # named: the function

    @property
    def parses_tool_calls(self) -> bool:
        return self.mode != "none"

    def new_stream(self) -> Optional[ToolOutputStream]:
        """A fresh reader of one choice's output (None: the output is plain content)."""
        if self.mode == "auto":
            return TOOL_PARSERS[self.parser]()
        if self.mode == "required":
            return RequiredStream()
        if self.mode == "named":
            return NamedStream(self.function)
        return None

    def finish_reason(self, reason: Optional[str], made_calls: bool) -> Optional[str]:
        """OpenAI's: "tool_calls" when the model chose to call tools; a forced named call stops."""
        if reason == "stop" and made_calls and self.mode in ("auto", "required"):
            return "tool_calls"
        return reason


def plan_tools(req: ChatCompletionRequest, tool_parser: Optional[str], enable_auto_tool_choice: bool) -> ToolPlan:
    """Validate tools / tool_choice / parallel_tool_calls and decide how the reply is read."""
    tools = req.tools or []
    choice = req.tool_choice
    if not tools:
        if isinstance(choice, NamedToolChoice) or choice == "required":
            raise APIError("tool_choice needs `tools` (the functions the model may call)", param="tool_choice")
        if req.parallel_tool_calls is not None:
            logger.debug("parallel_tool_calls without tools: ignored")
        return ToolPlan("none")
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise APIError(f"tool names must be unique, got {names}", param="tools")
    template_tools = [t.model_dump(exclude_none=True) for t in tools]
    if choice == "none":
        return ToolPlan("none", template_tools)
    if choice is None or choice == "auto":
        if not enable_auto_tool_choice or tool_parser is None:
            raise APIError('"auto" tool choice requires the server to run with --enable-auto-tool-choice and '
                           '--tool-call-parser; or send tool_choice "required", "none" or a named function',
                           param="tool_choice")
        return ToolPlan("auto", template_tools, parser=tool_parser)
    if choice == "required":
        return ToolPlan("required", template_tools, constraint=_tool_constraint(required_schema(
            tools, single=req.parallel_tool_calls is False)))
    name = choice.function.name
    if name not in names:
        raise APIError(f"tool_choice names the function {name!r}, which is not among the tools {names}",
                       param="tool_choice")
    params = next(t.function.parameters for t in tools if t.function.name == name)
    return ToolPlan("named", template_tools, constraint=_tool_constraint(params or ANY_OBJECT), function=name)


def required_schema(tools, single: bool = False) -> dict:
    """JSON schema of a list of calls to the given tools: [{"name", "parameters"}, ...]."""
    calls = [{
        "type": "object",
        "properties": {"name": {"type": "string", "enum": [t.function.name]},
                       "parameters": t.function.parameters or ANY_OBJECT},
        "required": ["name", "parameters"],
    } for t in tools]
    schema = {"type": "array", "minItems": 1, "items": calls[0] if len(calls) == 1 else {"anyOf": calls}}
    if single:
        schema["maxItems"] = 1
    return schema


def _tool_constraint(schema: dict) -> StructuredOutputsParams:
    # compact JSON: tool arguments are read by programs, and small models given free
    # whitespace can loop on it
    return StructuredOutputsParams(json=schema, disable_any_whitespace=True)


def check_tool_parser(name: Optional[str], enable_auto_tool_choice: bool) -> None:
    """Server start-up check of --tool-call-parser / --enable-auto-tool-choice (ValueError)."""
    if name is not None and name not in TOOL_PARSERS:
        raise ValueError(f"--tool-call-parser {name!r} is unknown; use one of {sorted(TOOL_PARSERS)}")
    if enable_auto_tool_choice and name is None:
        raise ValueError("--enable-auto-tool-choice needs --tool-call-parser (one of "
                         f"{sorted(TOOL_PARSERS)})")
