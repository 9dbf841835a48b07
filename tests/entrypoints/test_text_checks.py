"""Text input through the Python API: lone surrogates, prompts too long to tokenize, broken chat
templates all raise a ValueError saying what to change (never the tokenizer's or jinja2's own)."""

import pytest

from nanovllm import SamplingParams

CHAT = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("prompt", ["\ud800", "ok \udfff ok", {"prompt": "a\ud83d"}])
def test_lone_surrogate_in_a_prompt(bundled_llm, prompt):
    with pytest.raises(ValueError, match="invalid character .* lone UTF-16 surrogate") as info:
        bundled_llm.generate([prompt], use_tqdm=False)
    assert info.value.param == "prompt"


def test_lone_surrogate_in_a_chat_message(bundled_llm):
    with pytest.raises(ValueError, match="message 0 content contains an invalid character"):
        bundled_llm.chat([{"role": "user", "content": "x\ud800"}], use_tqdm=False)


def test_prompt_too_long_is_refused_before_tokenizing(bundled_llm, monkeypatch):
    limit = bundled_llm.engine.input_processor.max_prompt_chars
    assert limit is not None and limit >= bundled_llm.engine.max_model_len
    calls = []
    tok = bundled_llm.engine.tokenizer
    monkeypatch.setattr(type(tok), "__call__", lambda self, *a, **k: calls.append(1), raising=True)
    with pytest.raises(ValueError, match=f"prompt has {limit + 1} characters.*max_model_len=1024"):
        bundled_llm.generate(["x" * (limit + 1)], use_tqdm=False)
    assert calls == []  # refused by length alone


@pytest.mark.parametrize("template, words", [
    ("{{ messages[0].nope.deeper }}", "UndefinedError"),
    ("{% if %}", "TemplateSyntaxError"),
    ("{{ raise_exception('roles must alternate') }}", "roles must alternate"),
])
def test_broken_chat_template(bundled_llm, template, words):
    with pytest.raises(ValueError, match=f"the chat_template passed failed on these messages .*{words}"):
        bundled_llm.apply_chat_template(CHAT, chat_template=template)
    with pytest.raises(ValueError, match="failed on these messages"):
        bundled_llm.chat(CHAT, SamplingParams(max_tokens=1), chat_template=template, use_tqdm=False)
    assert not bundled_llm.engine.has_unfinished_requests()


def test_chat_still_works_after_template_errors(bundled_llm):
    out = bundled_llm.chat(CHAT, SamplingParams(max_tokens=2, temperature=0), use_tqdm=False)
    assert out[0].outputs[0].token_ids
