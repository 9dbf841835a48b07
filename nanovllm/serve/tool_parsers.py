"""Tool calls in generated text -> OpenAI tool calls, incrementally (streaming) or at once.

Formats (`--tool-call-parser`, vLLM's names):
    hermes       Hermes / Qwen2.5 / Qwen3: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`,
                 any number of blocks, text around them is content
    llama3_json  Llama 3.x: the whole reply is `{"name": ..., "parameters": {...}}` (several
                 separated by `;`), optionally after `<|python_tag|>`; any other reply is content
and, for tool_choice "required" / a named function (the output is constrained by a grammar):
    required     a JSON array `[{"name": ..., "parameters": {...}}, ...]`
    named        the reply is the named function's arguments object

Every format is read by one state machine over JSON characters (`JsonCallScanner`), so a
call's arguments stream out as the model writes them: the first delta of a call carries its
`id`, `type` and `function.name` (and arguments ""), the next ones `function.arguments`
pieces, as OpenAI streams them. The non-streamed answer is the same stream concatenated.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Optional

NAME_KEYS = ("name",)
ARGUMENT_KEYS = ("arguments", "parameters")


def tool_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


@dataclass
class ToolCallDelta:
    """A piece of tool call `index`: the first one has `id` and `name`, later ones argument text."""

    index: int
    id: Optional[str] = None
    name: Optional[str] = None
    arguments: str = ""


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str


@dataclass
class ParsedOutput:
    content: Optional[str]
    tool_calls: list[ToolCall] = field(default_factory=list)


class _Call:
    """One call object being scanned: its raw text, JSON nesting state and what was sent."""

    def __init__(self) -> None:
        self.raw = ""
        self.depth = 0
        self.in_string = False
        self.escape = False
        self.phase = "key"  # key -> colon -> value -> in_value -> (',' -> key)
        self.key: Optional[str] = None
        self.token_start = 0  # where the current key or value starts in raw
        self.value_is_container = False
        self.name: Optional[str] = None
        self.args_start: Optional[int] = None  # raw offset of the arguments value
        self.args_end: Optional[int] = None  # set once the arguments value is complete
        self.args_is_string = False
        self.args_sent = 0  # characters of the arguments value already emitted


class JsonCallScanner:
    """Scans text that holds tool-call objects `{"name": ..., "arguments"/"parameters": ...}`.

    Characters outside objects (whitespace, `[`, `,`, `;`, `]`) are skipped. `feed` returns
    the deltas that became known: a call's header as soon as its name is complete, argument
    text as it arrives (trailing whitespace held back until more follows).
    """

    def __init__(self) -> None:
        self._call: Optional[_Call] = None
        self.calls: list[ToolCall] = []  # complete calls (name + full arguments)
        self._partial: list[ToolCall] = []  # calls whose header was sent, by index

    @property
    def in_call(self) -> bool:
        return self._call is not None

    def feed(self, text: str) -> list[ToolCallDelta]:
        out: list[ToolCallDelta] = []
        for ch in text:
            call = self._call
            if call is None:
                if ch == "{":
                    self._call = call = _Call()
                    call.raw, call.depth = "{", 1
                continue
            self._step(call, ch, out)
        if self._call is not None:
            self._emit_arguments(self._call, out)
        return _merge(out)

    def _step(self, call: _Call, ch: str, out: list[ToolCallDelta]) -> None:
        call.raw += ch
        pos = len(call.raw) - 1
        if call.in_string:
            if call.escape:
                call.escape = False
            elif ch == "\\":
                call.escape = True
            elif ch == '"':
                call.in_string = False
                if call.depth == 1 and call.phase == "key":
                    call.key = _loads(call.raw[call.token_start:])
                    call.phase = "colon"
                elif call.depth == 1 and call.phase == "in_value" and not call.value_is_container:
                    self._end_value(call, pos + 1, out)
            return
        if ch == '"':
            call.in_string = True
            if call.depth == 1 and call.phase in ("key", "value"):
                self._start_token(call, pos, container=False)
        elif ch in "{[":
            if call.depth == 1 and call.phase == "value":
                self._start_token(call, pos, container=True)
            call.depth += 1
        elif ch in "}]":
            call.depth -= 1
            if call.depth == 1 and call.phase == "in_value" and call.value_is_container:
                self._end_value(call, pos + 1, out)
            elif call.depth == 0:
                if call.phase == "in_value":  # a bare scalar ends at the closing brace
                    self._end_value(call, pos, out)
                self._end_call(call, out)
        elif call.depth == 1:
            if ch == ":" and call.phase == "colon":
                call.phase = "value"
            elif ch == ",":
                if call.phase == "in_value":
                    self._end_value(call, pos, out)
                call.phase = "key"
            elif call.phase == "value" and not ch.isspace():
                self._start_token(call, pos, container=False)

    def _start_token(self, call: _Call, pos: int, container: bool) -> None:
        call.token_start = pos
        if call.phase == "value":
            call.phase = "in_value"
            call.value_is_container = container
            if call.key in ARGUMENT_KEYS and call.args_start is None:
                call.args_start = pos
                call.args_is_string = call.raw[pos] == '"'

    def _end_value(self, call: _Call, end: int, out: list[ToolCallDelta]) -> None:
        call.phase = "after"
        if call.key in NAME_KEYS and call.name is None:
            name = _loads(call.raw[call.token_start:end].strip())
            if isinstance(name, str):
                call.name = name
                self._emit_header(call, out)
        elif call.key in ARGUMENT_KEYS and call.args_start is not None and call.args_end is None:
            call.args_end = end
        self._emit_arguments(call, out)

    def _emit_header(self, call: _Call, out: list[ToolCallDelta]) -> None:
        index = len(self._partial)
        self._partial.append(ToolCall(tool_call_id(), call.name, ""))
        out.append(ToolCallDelta(index, id=self._partial[index].id, name=call.name, arguments=""))

    def _emit_arguments(self, call: _Call, out: list[ToolCallDelta]) -> None:
        if call.name is None or call.args_start is None:
            return
        if call.args_is_string:  # arguments sent as a JSON string: decode once complete
            if call.args_end is not None and call.args_sent == 0:
                text = _loads(call.raw[call.args_start:call.args_end])
                text = text if isinstance(text, str) else ""
                call.args_sent = 1
                self._send(out, text)
            return
        end = call.args_end if call.args_end is not None else len(call.raw)
        text = call.raw[call.args_start:end].rstrip()  # whitespace may turn out to trail the value: held back
        new = text[call.args_sent:]
        if new:
            call.args_sent += len(new)
            self._send(out, new)

    def _send(self, out: list[ToolCallDelta], text: str) -> None:
        index = len(self._partial) - 1
        self._partial[index].arguments += text
        out.append(ToolCallDelta(index, arguments=text))

    def _end_call(self, call: _Call, out: list[ToolCallDelta]) -> None:
        self._call = None
        if call.name is None:
            return  # not a tool call object (no name): ignored
        if call.args_start is None:  # no arguments key: an empty object
            self._send(out, "{}")
        else:
            self._emit_arguments(call, out)
        self.calls.append(self._partial[-1])


def _loads(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return None


def _merge(deltas: list[ToolCallDelta]) -> list[ToolCallDelta]:
    """Join consecutive argument pieces of one call (one delta per call per feed)."""
    out: list[ToolCallDelta] = []
    for d in deltas:
        if out and out[-1].index == d.index and d.id is None:
            out[-1].arguments += d.arguments
        else:
            out.append(d)
    return out


def _held_prefix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that could be the start of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


# ----------------------------------------------------------------------------- output streams


class ToolOutputStream:
    """Splits generated text into content and tool-call deltas as it arrives."""

    def __init__(self) -> None:
        self.scanner = JsonCallScanner()

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        raise NotImplementedError

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        return "", []

    @property
    def tool_calls(self) -> list[ToolCall]:
        """The complete calls seen so far."""
        return self.scanner.calls

    def parse(self, text: str) -> ParsedOutput:
        """The whole output at once: content (None when empty) and the complete tool calls.

        If the text ends inside a call (cut by max_tokens), that call is dropped, so no
        half-written arguments reach the client; the complete calls before it stand. With
        no complete call at all the raw text is returned as content.
        """
        content, _ = self.feed(text)
        rest, _ = self.finish()
        content += rest
        if self.scanner.in_call and not self.tool_calls:
            return ParsedOutput(content=text or None)
        content = content.strip()
        return ParsedOutput(content=content or None, tool_calls=list(self.tool_calls))


class HermesStream(ToolOutputStream):
    START, END = "<tool_call>", "</tool_call>"

    def __init__(self) -> None:
        super().__init__()
        self._buf = ""
        self._inside = False

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        self._buf += text
        content, calls = [], []
        while True:
            tag = self.END if self._inside else self.START
            i = self._buf.find(tag)
            cut = i if i >= 0 else len(self._buf) - _held_prefix(self._buf, tag)
            piece, self._buf = self._buf[:cut], self._buf[cut:]
            if self._inside:
                calls += self.scanner.feed(piece)
            else:
                content.append(piece)
            if i < 0:
                break
            self._buf = self._buf[len(tag):]
            self._inside = not self._inside
        return "".join(content), _merge(calls)

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        rest, self._buf = self._buf, ""
        if self._inside:
            return "", self.scanner.feed(rest)
        return rest, []


class Llama3JsonStream(ToolOutputStream):
    PYTHON_TAG = "<|python_tag|>"

    def __init__(self) -> None:
        super().__init__()
        self._buf = ""
        self._mode: Optional[str] = None  # None (undecided), "calls" or "content"

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        if self._mode is None:
            self._buf += text
            head = self._buf.lstrip()
            if not head or (self.PYTHON_TAG.startswith(head) and head != self.PYTHON_TAG):
                return "", []
            text, self._buf = self._buf, ""
            if head.startswith(self.PYTHON_TAG):
                self._mode, text = "calls", head[len(self.PYTHON_TAG):]
            else:
                self._mode = "calls" if head.startswith("{") else "content"
        if self._mode == "content":
            return text, []
        return "", self.scanner.feed(text)

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        rest, self._buf = self._buf, ""
        return rest, []


class RequiredStream(ToolOutputStream):
    """tool_choice="required": a grammar-constrained JSON array of {"name", "parameters"}."""

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        return "", self.scanner.feed(text)


class NamedStream(ToolOutputStream):
    """tool_choice naming a function: the whole (constrained) output is its arguments."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self._call = ToolCall(tool_call_id(), name, "")
        self._raw = ""
        self._started = False

    @property
    def tool_calls(self) -> list[ToolCall]:
        return [self._call] if self._started else []

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        self._raw += text
        deltas = []
        if not self._started:
            self._started = True
            deltas.append(ToolCallDelta(0, id=self._call.id, name=self.name, arguments=""))
        new = self._raw.strip()[len(self._call.arguments):]  # whitespace at either end is not sent
        if new:
            self._call.arguments += new
            deltas.append(ToolCallDelta(0, arguments=new))
        return "", _merge(deltas)

    def parse(self, text: str) -> ParsedOutput:
        self.feed(text)
        if _loads(self._call.arguments) is None:  # cut short: not a complete JSON value
            return ParsedOutput(content=text or None)
        return ParsedOutput(content=None, tool_calls=[self._call])


TOOL_PARSERS = {"hermes": HermesStream, "llama3_json": Llama3JsonStream}
