"""LLM: the synchronous, vLLM-compatible front door (generate, stream, chat)."""

from __future__ import annotations

import itertools
from typing import Any, Iterator, Optional, Sequence, Union

from nanovllm.engine.arg_utils import EngineArgs
from nanovllm.engine.input_processor import PromptType
from nanovllm.entrypoints.chat_utils import ChatRenderer, load_chat_template
from nanovllm.engine.llm_engine import LLMEngine
from nanovllm.outputs import RequestOutput
from nanovllm.sampling_params import RequestOutputKind, SamplingParams, default_max_tokens

Conversation = list[dict]


class LLM:
    """Offline inference: `LLM(model).generate(prompts, params)`.

    `model`: HF directory, hub repo id (downloaded into the HF cache when missing), a .gguf
    file, or None for the bundled SmolLM2-135M-Instruct. Other keyword arguments are
    EngineArgs fields (vLLM's names; see nanovllm/engine/arg_utils.py): the ones with no
    meaning here are accepted with a one-line warning.
    """

    def __init__(self, model: Optional[str] = None, **kwargs) -> None:
        self.config = EngineArgs.from_kwargs(model=model, **kwargs).create_engine_config()
        self.engine = LLMEngine(self.config)
        self._ids = itertools.count()
        self._chat = ChatRenderer(self.engine.tokenizer, check_text=self.engine.input_processor.check_text)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def get_tokenizer(self):
        return self.engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the model's generation_config.json defaults (temperature, top_p,
        top_k, min_p, repetition_penalty, max_new_tokens), or nanovllm's without one."""
        values = dict(self.engine.default_sampling_values)
        if "max_tokens" in values:  # the model's default, not the caller's choice: clamped to the context
            values["max_tokens"] = default_max_tokens(values["max_tokens"])
        return SamplingParams(**values)

    # ------------------------------------------------------------------ generate
    def generate(
        self,
        prompts: Union[PromptType, Sequence[PromptType]],
        sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
        use_tqdm: bool = True,
        lora_request: None = None,
    ) -> list[RequestOutput]:
        """Run prompts to completion; outputs come back in the order of the prompts.

        All prompts are validated before any is queued, so a bad one raises without
        leaving the others half-run.
        """
        _no_lora(lora_request)
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

    def _params_list(self, params, count: int) -> list[SamplingParams]:
        if params is None:
            return [self.get_default_sampling_params()] * count
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
        params = (sampling_params or self.get_default_sampling_params()).replace(output_kind=RequestOutputKind.DELTA)
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
        lora_request: None = None,
        chat_template: Optional[str] = None,
        chat_template_content_format: str = "auto",
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: Optional[list[dict]] = None,
        chat_template_kwargs: Optional[dict[str, Any]] = None,
    ) -> list[RequestOutput]:
        """Apply the chat template to one conversation or a list of them, then generate.

        `chat_template`: Jinja text or a file (default: the model's); `tools`: OpenAI-style tool
        definitions passed to the template; `chat_template_kwargs`: extra template variables
        (e.g. {"enable_thinking": False} for Qwen3). Content may be a string or text parts.
        """
        _no_lora(lora_request)
        if chat_template_content_format not in ("auto", "string", "openai"):
            raise ValueError(f"chat_template_content_format={chat_template_content_format!r}: use 'auto', "
                             f"'string' or 'openai'")
        conversations = _as_conversations(messages)
        prompts = [self.apply_chat_template(c, add_generation_prompt, chat_template, tools=tools,
                                            continue_final_message=continue_final_message,
                                            chat_template_kwargs=chat_template_kwargs) for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def apply_chat_template(self, conversation: Conversation, add_generation_prompt: bool = True,
                            chat_template: Optional[str] = None, *, tools: Optional[list[dict]] = None,
                            continue_final_message: bool = False,
                            chat_template_kwargs: Optional[dict[str, Any]] = None) -> dict:
        """The conversation as an engine prompt {"prompt": text, "prompt_token_ids": ids}."""
        ids = self._chat.render(conversation, chat_template=load_chat_template(chat_template), tools=tools,
                                add_generation_prompt=add_generation_prompt,
                                continue_final_message=continue_final_message,
                                chat_template_kwargs=chat_template_kwargs)
        return {"prompt": self.engine.tokenizer.decode(ids), "prompt_token_ids": ids}


def _no_lora(lora_request) -> None:
    if lora_request is not None:
        raise ValueError("LoRA adapters are not supported by nanovllm; pass lora_request=None")


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
    return [list(c) for c in conversations]
