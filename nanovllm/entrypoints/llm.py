"""LLM: the synchronous, vLLM-compatible front door (generate, stream, chat)."""

from __future__ import annotations

import itertools
from typing import Iterator, Optional, Sequence, Union

from nanovllm.config import EngineConfig
from nanovllm.engine.input_processor import PromptType
from nanovllm.engine.llm_engine import LLMEngine
from nanovllm.outputs import RequestOutput
from nanovllm.sampling_params import RequestOutputKind, SamplingParams, require_valid_unicode

Conversation = list[dict]


class LLM:
    """Offline inference: `LLM(model).generate(prompts, params)`.

    `model`: HF directory, repo id in the local HF cache, a .gguf file, or None for the
    bundled SmolLM2-135M-Instruct. Other keyword arguments are EngineConfig fields.
    """

    def __init__(self, model: Optional[str] = None, **kwargs) -> None:
        known = set(EngineConfig.__dataclass_fields__) - {"model", "extra"}
        extra = {k: kwargs.pop(k) for k in list(kwargs) if k in ("load_format",)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"LLM() got unknown argument(s) {unknown}; known: {sorted(known | {'load_format'})}")
        self.config = EngineConfig(model=model, extra=extra, **kwargs)
        self.engine = LLMEngine(self.config)
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def get_tokenizer(self):
        return self.engine.tokenizer

    # ------------------------------------------------------------------ generate
    def generate(
        self,
        prompts: Union[PromptType, Sequence[PromptType]],
        sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Run prompts to completion; outputs come back in the order of the prompts.

        All prompts are validated before any is queued, so a bad one raises without
        leaving the others half-run.
        """
        prompt_list = _as_prompt_list(prompts)
        params_list = self._params_list(sampling_params, len(prompt_list))
        params_list = [p.replace(output_kind=RequestOutputKind.FINAL_ONLY) for p in params_list]
        ids = []
        try:
            for prompt, params in zip(prompt_list, params_list):
                ids.append(self.engine.add_request(f"llm-{next(self._ids)}", prompt, params))
        except Exception:
            self.engine.abort_request(ids)
            raise
        return self._run(ids, use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        results: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(ids), desc="Processed prompts", dynamic_ncols=True)
        wanted = set(ids)
        try:
            while len(results) < len(ids):
                for out in self.engine.step():
                    if out.finished and out.request_id in wanted:
                        results[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            self.engine.abort_request([i for i in ids if i not in results])
            raise
        finally:
            if bar is not None:
                bar.close()
        return [results[i] for i in ids]

    @staticmethod
    def _params_list(params, count: int) -> list[SamplingParams]:
        if params is None:
            return [SamplingParams()] * count
        if isinstance(params, SamplingParams):
            return [params] * count
        if not isinstance(params, (list, tuple)):
            raise TypeError(_params_type_message(params))
        params = list(params)
        for p in params:
            if not isinstance(p, SamplingParams):
                raise TypeError(_params_type_message(p))
        if len(params) != count:
            raise ValueError(f"got {len(params)} SamplingParams for {count} prompts; pass one, or one per prompt")
        return params

    # ------------------------------------------------------------------ stream
    def stream(self, prompt: PromptType, sampling_params: Optional[SamplingParams] = None) -> Iterator[str]:
        """Yield text deltas of one completion as they are produced.

        Closing the generator early (break) aborts the request and frees its blocks.
        """
        if sampling_params is not None and not isinstance(sampling_params, SamplingParams):
            raise TypeError(_params_type_message(sampling_params, one=True))
        params = (sampling_params or SamplingParams()).replace(output_kind=RequestOutputKind.DELTA)
        if params.n != 1:
            raise ValueError("stream() produces one completion; use n=1")
        rid = self.engine.add_request(f"stream-{next(self._ids)}", prompt, params)
        finished = False
        try:
            while not finished:
                for out in self.engine.step():
                    if out.request_id != rid:
                        continue
                    finished = out.finished
                    if out.outputs[0].text:
                        yield out.outputs[0].text
        finally:
            if not finished:
                self.engine.abort_request(rid)

    # ------------------------------------------------------------------ chat
    def chat(
        self,
        messages: Union[Conversation, Sequence[Conversation]],
        sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        chat_template: Optional[str] = None,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them, then generate."""
        conversations = _as_conversations(messages)
        prompts = [self.apply_chat_template(c, add_generation_prompt, chat_template) for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def apply_chat_template(self, conversation: Conversation, add_generation_prompt: bool = True,
                            chat_template: Optional[str] = None) -> dict:
        tok = self.engine.tokenizer
        if tok is None:
            raise ValueError("chat needs a tokenizer; this engine was started with skip_tokenizer_init=True")
        if chat_template is None and not getattr(tok, "chat_template", None):
            raise ValueError("this model has no chat template; pass chat_template=... or use generate()")
        if chat_template is not None and not isinstance(chat_template, str):
            raise TypeError(f"chat_template must be a Jinja template string, got {type(chat_template).__name__}")
        for i, m in enumerate(conversation):
            for key, value in (m.items() if isinstance(m, dict) else ()):
                if isinstance(value, str):
                    require_valid_unicode(f"message {i} {key}", value)
        ids = render_chat_template(tok, conversation, add_generation_prompt, chat_template)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        text = tok.decode(ids)
        return {"prompt": text, "prompt_token_ids": list(ids)}


def render_chat_template(tok, conversation: list[dict], add_generation_prompt: bool,
                         chat_template: Optional[str] = None):
    """tok.apply_chat_template with the template's own errors (jinja2) as a ValueError saying whose they are."""
    import jinja2

    try:
        return tok.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt, tokenize=True,
                                       chat_template=chat_template, return_dict=False)
    except jinja2.TemplateError as e:
        whose = "the chat_template passed" if chat_template is not None else "the model's chat template"
        raise ValueError(f"{whose} failed on these messages ({type(e).__name__}: {e}); fix the template or the "
                         f"messages") from None


def _params_type_message(value, one: bool = False) -> str:
    want = "a SamplingParams" if one else "a SamplingParams or a list of them (one per prompt)"
    hint = ""
    if isinstance(value, dict):
        hint = "; build one with SamplingParams(**values) or SamplingParams.from_dict(values)"
    elif isinstance(value, str):
        hint = "; e.g. SamplingParams(temperature=0.0, max_tokens=64)"
    return f"sampling_params must be {want}, got {type(value).__name__} {_short_repr(value)}{hint}"


def _short_repr(value, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _as_prompt_list(prompts) -> list:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if isinstance(prompts, (list, tuple)):
        if not prompts:
            raise ValueError("no prompts given")
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompts):
            return [list(prompts)]  # one prompt given as token ids
        return list(prompts)
    raise TypeError(f"prompts must be a string, a dict, or a list of them, got {type(prompts).__name__}")


def _as_conversations(messages) -> list[Conversation]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise TypeError("messages must be a non-empty list of {'role', 'content'} dicts (or a list of such lists)")
    conversations = [messages] if isinstance(messages[0], dict) else list(messages)
    for conv in conversations:
        if not isinstance(conv, (list, tuple)) or not conv:
            raise TypeError("each conversation must be a non-empty list of messages")
        for m in conv:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise TypeError(f"each message needs 'role' and 'content', got {m!r}")
            if not isinstance(m["content"], str):
                raise TypeError(f"message content must be a string, got {type(m['content']).__name__}")
    return [list(c) for c in conversations]
