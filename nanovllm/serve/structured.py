"""Request fields -> one StructuredOutputsParams (or None), for completions and chat.

Accepted spellings, at most one constraint per request:
    response_format      {"type": "json_object"} / {"type": "json_schema", "json_schema": {"schema": ...}}
                         / vLLM's {"type": "structural_tag", ...}; {"type": "text"} = no constraint
    structured_outputs   vLLM's object: {"json" | "regex" | "choice" | "grammar" | "json_object"
                         | "structural_tag": ..., options}
    guided_json / guided_regex / guided_choice / guided_grammar   vLLM's older fields
The grammar is compiled (and cached) by the engine's worker when the request is added; a
schema or regex it cannot compile is a 400.
"""

from __future__ import annotations

import logging
from typing import Optional

from nanovllm.sampling_params import StructuredOutputsParams
from nanovllm.serve.protocol import APIError, SamplingRequest

logger = logging.getLogger("nanovllm")

GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                 "guided_grammar": "grammar"}
SUPPORTED_BACKENDS = ("auto", "xgrammar")


def log_ignored_fields(req: SamplingRequest, *extra: str) -> None:
    """OpenAI fields that change nothing here: accepted, noted at debug level."""
    names = [n for n in (*req.IGNORED_FIELDS, *extra) if getattr(req, n, None) is not None]
    if req.response_format is not None and req.response_format.type == "text":
        names.append("response_format (text)")
    if names:
        logger.debug("request fields accepted and ignored (no effect in nanovllm): %s", ", ".join(names))


def constraint_field(req: SamplingRequest) -> Optional[str]:
    """The request field that carries the output constraint (where an engine error about it points)."""
    if req.response_format is not None and req.response_format.type != "text":
        return "response_format"
    if req.structured_outputs is not None:
        return "structured_outputs"
    return next((name for name in GUIDED_FIELDS if getattr(req, name) is not None), None)


def structured_outputs_of(req: SamplingRequest) -> Optional[StructuredOutputsParams]:
    """The request's output constraint; APIError(400) when it gives several or a bad one."""
    found: list[tuple[str, dict]] = []  # (request field, StructuredOutputsParams kwargs)
    rf = req.response_format
    if rf is not None and rf.type != "text":
        found.append(("response_format", _from_response_format(rf)))
    if req.structured_outputs is not None:
        values = req.structured_outputs.model_dump(by_alias=True, exclude_defaults=True)
        found.append(("structured_outputs", values))
    for name, kind in GUIDED_FIELDS.items():
        value = getattr(req, name)
        if value is not None:
            found.append((name, {kind: value}))
    if len(found) > 1:
        raise APIError(f"give one output constraint, not several ({', '.join(f for f, _ in found)})",
                       param=found[1][0])
    if req.guided_decoding_backend is not None and req.guided_decoding_backend not in SUPPORTED_BACKENDS:
        raise APIError(f"guided_decoding_backend={req.guided_decoding_backend!r} is not available; nanovllm uses "
                       f"xgrammar (leave the field out)", param="guided_decoding_backend")
    if not found:
        return None
    field, values = found[0]
    if field != "structured_outputs" and req.guided_whitespace_pattern is not None:
        values["whitespace_pattern"] = req.guided_whitespace_pattern
    try:
        return StructuredOutputsParams(**values)
    except (ValueError, TypeError) as e:
        raise APIError(str(e), param=field) from None


def _from_response_format(rf) -> dict:
    if rf.type == "json_object":
        return {"json_object": True}
    if rf.type == "json_schema":
        if rf.json_schema is None:
            raise APIError("response_format of type json_schema needs a `json_schema` object with a `schema`",
                           param="response_format")
        schema = rf.json_schema.json_schema
        return {"json": schema} if schema is not None else {"json_object": True}
    # structural_tag: xgrammar's `format`, or the older `structures` + `triggers`
    tag = {k: v for k, v in (("format", rf.format), ("structures", rf.structures), ("triggers", rf.triggers))
           if v is not None}
    if not tag:
        raise APIError("response_format of type structural_tag needs `format`, or `structures` and `triggers`",
                       param="response_format")
    return {"structural_tag": {"type": "structural_tag", **tag}}
