"""Chat messages (OpenAI's shape) -> the model's chat template -> prompt token ids.

Shared by `LLM.chat` and the server. Messages may carry text content parts, assistant
`tool_calls` and `tool` results; image and audio parts are refused (the models served are
text-only). Tool definitions reach the template as `tools=` (transformers' convention),
extra template variables (e.g. Qwen3's `enable_thinking`) as `chat_template_kwargs`.

Every string is checked for lone surrogates first, and the rendered text goes through the
engine's `check_text` (length bound, before the tokenizer spends time on it) when given.
Template errors (jinja2's own, `raise_exception` in the template) become a ValueError that
says whose template failed.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable, Optional

from nanovllm.engine.input_processor import invalid
from nanovllm.sampling_params import require_valid_unicode, require_valid_unicode_in

logger = logging.getLogger("nanovllm")

ROLES = ("system", "developer", "user", "assistant", "tool")
NON_TEXT_PARTS = frozenset({"image_url", "input_image", "image", "image_pil", "image_embeds", "input_audio",
                            "audio_url", "audio", "video_url", "video", "file", "input_file"})
# template variables set by the renderer itself; chat_template_kwargs may not override them
RESERVED_TEMPLATE_KWARGS = frozenset({"conversation", "messages", "tools", "documents", "chat_template",
                                      "add_generation_prompt", "continue_final_message", "tokenize",
                                      "return_dict", "return_tensors", "tokenizer", "padding", "truncation"})


def load_chat_template(value: Optional[str]) -> Optional[str]:
    """A chat template given as a file path or as the Jinja text itself (`--chat-template`)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"chat_template must be a Jinja template string or a file path, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"chat template must be a file path or Jinja text, got {value!r}")
    path = os.path.expanduser(value)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    if "{{" in value or "{%" in value:
        return value
    raise ValueError(f"chat template {value!r}: no such file (and not Jinja text with {{{{ or {{%)")


def _text_of(content: Any, where: str) -> str:
    """Message content (None, a string, or a list of parts) as one string; refuses non-text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, (list, tuple)):
        raise TypeError(f"{where}.content must be a string or a list of content parts, got {type(content).__name__}")
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise TypeError(f"{where}.content[{j}] must be an object with a `type`, got {part!r}")
        kind = part["type"]
        if kind in ("text", "input_text", "output_text"):
            if not isinstance(part.get("text"), str):
                raise TypeError(f"{where}.content[{j}].text must be a string")
            texts.append(part["text"])
        elif kind == "refusal":
            texts.append(str(part.get("refusal") or ""))
        elif kind in NON_TEXT_PARTS:
            raise ValueError(f"{where}.content[{j}] is an `{kind}` part, but this model is text-only: "
                             f"send text content only")
        else:
            raise ValueError(f"{where}.content[{j}] has unknown type `{kind}`; use `text` parts")
    return "\n".join(texts)


def normalize_messages(messages: Any) -> list[dict]:
    """Validated template dicts: content as text, `developer` as `system`, tool-call arguments as dicts."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise TypeError("messages must be a non-empty list of {'role', 'content'} objects")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise TypeError(f"{where} must be an object with `role` and `content`, got {type(m).__name__}")
        role = m.get("role")
        if not isinstance(role, str):
            raise TypeError(f"{where} needs a `role` (one of {list(ROLES)})")
        if role not in ROLES:
            raise ValueError(f"{where}.role must be one of {list(ROLES)}, got {role!r}")
        if "content" not in m and not m.get("tool_calls"):
            raise TypeError(f"{where} needs `content` (or `tool_calls` for an assistant message)")
        msg = {"role": "system" if role == "developer" else role, "content": _text_of(m.get("content"), where)}
        if m.get("name") is not None:
            msg["name"] = m["name"]
        if m.get("tool_call_id") is not None:
            msg["tool_call_id"] = m["tool_call_id"]
        if m.get("tool_calls"):
            if role != "assistant":
                raise ValueError(f"{where}: only assistant messages carry tool_calls")
            msg["tool_calls"] = [_tool_call_for_template(c, f"{where}.tool_calls[{k}]")
                                 for k, c in enumerate(m["tool_calls"])]
        out.append(msg)
    return out


def _tool_call_for_template(call: Any, where: str) -> dict:
    """OpenAI's {"id", "type", "function": {"name", "arguments": JSON text}} with the arguments
    parsed: chat templates (Qwen, Hermes, Llama 3) render them with `tojson`."""
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        raise TypeError(f"{where} must be {{'id', 'type': 'function', 'function': {{'name', 'arguments'}}}}")
    fn = dict(call["function"])
    if not isinstance(fn.get("name"), str):
        raise TypeError(f"{where}.function.name must be a string")
    args = fn.get("arguments")
    if isinstance(args, str):
        try:
            fn["arguments"] = json.loads(args) if args.strip() else {}
        except ValueError:
            pass  # not JSON: the template gets the text as it is
    out = {"type": call.get("type") or "function", "function": fn}
    if call.get("id") is not None:
        out["id"] = call["id"]
    return out


class ChatRenderer:
    """Renders conversations with one tokenizer; `default_template` overrides the tokenizer's.

    `check_text(text, param)`: the engine's check of a text about to be tokenized (it raises
    when the text cannot fit in the context); run on the rendered conversation.
    """

    def __init__(self, tokenizer, default_template: Optional[str] = None,
                 check_text: Optional[Callable[[str, str], None]] = None) -> None:
        self.tokenizer = tokenizer
        self.default_template = default_template
        self.check_text = check_text
        self._warned_tools_ignored = False

    @property
    def has_template(self) -> bool:
        return self.default_template is not None or bool(getattr(self.tokenizer, "chat_template", None))

    def render(self, messages: Any, *, chat_template: Optional[str] = None, tools: Optional[list[dict]] = None,
               add_generation_prompt: bool = True, continue_final_message: bool = False,
               chat_template_kwargs: Optional[dict] = None) -> list[int]:
        """Token ids of `messages` under the template (request's, else the default, else the tokenizer's)."""
        tok = self.tokenizer
        if tok is None:
            raise ValueError("chat needs a tokenizer; this engine runs with skip_tokenizer_init=True")
        template = chat_template or self.default_template
        if template is None and not getattr(tok, "chat_template", None):
            raise ValueError("this model has no chat template: pass chat_template=... (or --chat-template FILE), "
                             "or use completions")
        if add_generation_prompt and continue_final_message:
            raise invalid("continue_final_message continues the last (assistant) message, so it cannot be "
                          "combined with add_generation_prompt=True", "continue_final_message")
        if not isinstance(chat_template_kwargs or {}, dict):
            raise invalid("chat_template_kwargs must be an object of template variables", "chat_template_kwargs",
                          TypeError)
        kwargs = dict(chat_template_kwargs or {})
        reserved = sorted(set(kwargs) & RESERVED_TEMPLATE_KWARGS)
        if reserved:
            raise invalid(f"chat_template_kwargs may not set {reserved}: use the request's own fields",
                          "chat_template_kwargs")
        try:
            conversation = normalize_messages(messages)
            for i, msg in enumerate(conversation):
                for key, value in msg.items():
                    require_valid_unicode_in(f"message {i} {key}", value)
        except (ValueError, TypeError) as e:
            raise invalid(str(e), "messages", type(e)) from None
        for param, value in (("tools", tools), ("chat_template_kwargs", kwargs), ("chat_template", chat_template)):
            try:
                require_valid_unicode_in(param, value)
            except ValueError as e:
                raise invalid(str(e), param) from None
        if tools and not self._warned_tools_ignored and "tools" not in (template or tok.chat_template or ""):
            self._warned_tools_ignored = True
            logger.warning("the chat template never mentions `tools`, so the model is not shown the tool "
                           "definitions; pass a tool-aware template (--chat-template, e.g. "
                           "examples/tool_chat_template_chatml.jinja)")
        try:  # rendered first, tokenized below (what tokenize=True does) after the text is checked
            text = tok.apply_chat_template(
                conversation, tools=tools or None, chat_template=template, add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message, tokenize=False, **kwargs,
            )
        except Exception as e:  # jinja errors (raise_exception in the template, bad role order) are the caller's
            if chat_template is not None:
                whose = "the chat_template passed"
            elif self.default_template is not None:
                whose = "the default chat template (--chat-template)"
            else:
                whose = "the model's chat template"
            raise invalid(f"{whose} failed on these messages ({type(e).__name__}: {e}); fix the template or "
                          f"the messages", "chat_template" if chat_template is not None else "messages") from None
        if self.check_text is not None:
            self.check_text(text, "messages")  # e.g. too long to fit, tools included
        else:
            require_valid_unicode("the rendered conversation", text)
        return list(tok(text, add_special_tokens=False).input_ids)
