"""Grammars of structured requests are compiled on AsyncLLMEngine's preprocessing threads, not on
the engine thread: a schema that takes a second to compile must not stall every running stream
(issue #19's rule for tokenization, applied to #18's grammars). Checked by where the work ran,
not by timing."""

from __future__ import annotations

import asyncio
import threading

import pytest

from nanovllm.config import EngineConfig
from nanovllm.engine.async_engine import AsyncLLMEngine
from nanovllm.sampling_params import SamplingParams, StructuredOutputsParams
from nanovllm.engine import structured_output

pytest.importorskip("xgrammar")

ENGINE_THREAD = "nanovllm-engine"
PREPROCESS_THREAD = "nanovllm-preprocess"


@pytest.fixture(scope="module")
def engine():
    eng = AsyncLLMEngine.from_config(EngineConfig(device="cpu", max_model_len=256, max_num_seqs=8))
    yield eng
    eng.shutdown()


@pytest.fixture
def compile_threads(monkeypatch):
    """Names of the threads that built the grammar compiler or compiled a grammar."""
    seen: list[str] = []
    compile_uncached = structured_output.GrammarCompiler._compile_uncached
    init = structured_output.GrammarCompiler.__init__

    def record_compile(self, spec):
        seen.append(threading.current_thread().name)
        return compile_uncached(self, spec)

    def record_init(self, *args, **kwargs):
        seen.append(threading.current_thread().name)
        init(self, *args, **kwargs)

    monkeypatch.setattr(structured_output.GrammarCompiler, "_compile_uncached", record_compile)
    monkeypatch.setattr(structured_output.GrammarCompiler, "__init__", record_init)
    return seen


async def _run(engine, params_list):
    streams = await engine.add_requests([({"prompt": "A city:"}, p, None) for p in params_list])
    texts = []
    for stream in streams:
        texts.append("".join([c.text async for out in stream for c in out.outputs]))
    return texts


def test_grammars_compile_off_the_engine_thread(engine, compile_threads):
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "size": {"type": "integer"}},
              "required": ["name", "size"]}
    params = [SamplingParams(temperature=0.0, max_tokens=12, structured_outputs=StructuredOutputsParams(json=schema)),
              SamplingParams(temperature=0.0, max_tokens=4,
                             structured_outputs=StructuredOutputsParams(choice=["north", "south"])),
              SamplingParams(temperature=0.0, max_tokens=4)]  # unstructured, in the same batch
    texts = asyncio.run(_run(engine, params))
    assert texts[1] in ("north", "south")
    assert len(compile_threads) >= 2  # two new grammars (and the compiler, the first time)
    assert all(name.startswith(PREPROCESS_THREAD) for name in compile_threads), compile_threads
    assert ENGINE_THREAD not in compile_threads


def test_bad_grammar_is_refused_before_the_engine_thread(engine, compile_threads):
    bad = SamplingParams(max_tokens=4, structured_outputs=StructuredOutputsParams(regex="(unclosed"))
    with pytest.raises(ValueError, match="could not be compiled") as info:
        asyncio.run(_run(engine, [SamplingParams(max_tokens=4), bad]))  # all or nothing
    assert info.value.param == "structured_outputs"
    assert compile_threads and all(name.startswith(PREPROCESS_THREAD) for name in compile_threads)
    stats = engine.stats()
    assert stats["num_running"] == 0 and stats["num_waiting"] == 0
