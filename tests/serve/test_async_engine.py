"""AsyncLLMEngine on a tiny random-weight model (no tokenizer): streaming, errors, aborts, failures, idling;
each test with the engine on a thread and in a process of its own (`engine_process`)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from nanovllm.config import EngineConfig
from nanovllm.engine.async_engine import AsyncLLMEngine, EngineDeadError, RequestFailedError
from nanovllm.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
LONG = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)


def _make(path: str, engine_process: bool = False) -> AsyncLLMEngine:
    return AsyncLLMEngine.from_config(EngineConfig(model=path, device="cpu", skip_tokenizer_init=True,
                                                   max_model_len=256, engine_process=engine_process))


@pytest.fixture(scope="module", params=[False, True], ids=["engine-thread", "engine-process"])
def engine(tiny_model_factory, request):
    """The engine stepped on a thread of this process, or in a process of its own (EngineProcessClient)."""
    eng = _make(tiny_model_factory("llama"), engine_process=request.param)
    yield eng
    eng.shutdown()


def _wait_idle(engine: AsyncLLMEngine, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        s = engine.stats()
        idle = s["num_running"] == 0 and s["num_waiting"] == 0 and s["kv_cache_usage"] == 0
        if idle or time.monotonic() > deadline:
            return s
        time.sleep(0.02)


async def _collect(engine, prompt, params, request_id=None):
    outs = [out async for out in engine.generate(prompt, params, request_id)]
    return outs


def test_generate_streams_deltas(engine):
    outs = asyncio.run(_collect(engine, [1, 2, 3, 4], GREEDY))
    assert outs[-1].finished and not any(o.finished for o in outs[:-1])
    tokens = [t for o in outs for t in o.outputs[0].token_ids]
    assert len(tokens) == 5 and len(outs) == 5  # one DELTA output per step, one token each
    assert outs[-1].outputs[0].finish_reason == "length"
    # same greedy tokens as the synchronous engine path would give: run twice, compare
    again = asyncio.run(_collect(engine, [1, 2, 3, 4], GREEDY))
    assert [t for o in again for t in o.outputs[0].token_ids] == tokens


def test_concurrent_requests_on_one_loop(engine):
    async def main():
        return await asyncio.gather(*(_collect(engine, [1 + i, 2, 3], GREEDY) for i in range(8)))

    results = asyncio.run(main())
    assert all(sum(len(o.outputs[0].token_ids) for o in outs) == 5 for outs in results)
    assert _wait_idle(engine)["kv_cache_usage"] == 0


def test_bad_request_raises_to_caller_and_loop_survives(engine):
    async def main():
        with pytest.raises(ValueError, match="empty"):
            await engine.add_request([], GREEDY)
        with pytest.raises(ValueError, match="vocabulary"):
            await engine.add_request([10 ** 6], GREEDY)
        with pytest.raises(ValueError, match="skip_tokenizer_init"):
            async for _ in engine.generate("text needs a tokenizer", GREEDY):
                pass
        with pytest.raises(TypeError):
            await engine.add_request([1, 2], params={"temperature": 0})
        stream = await engine.add_request([1, 2], GREEDY, request_id="dup")
        with pytest.raises(ValueError, match="already in use"):
            await engine.add_request([1, 2], GREEDY, request_id="dup")
        return [o async for o in stream]

    outs = asyncio.run(main())
    assert outs[-1].finished and engine.is_running


def test_closing_the_generator_aborts_and_frees_blocks(engine):
    async def main():
        gen = engine.generate([5, 6, 7], LONG)
        got = [await gen.__anext__() for _ in range(2)]
        await gen.aclose()
        return got

    got = asyncio.run(main())
    assert len(got) == 2 and not got[-1].finished
    s = _wait_idle(engine)
    assert (s["num_running"], s["num_waiting"], s["kv_cache_usage"]) == (0, 0, 0)


def test_cancelled_task_aborts(engine):
    async def consume():
        async for _ in engine.generate([8, 9], LONG):
            pass

    async def main():
        task = asyncio.ensure_future(consume())
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    before = engine.stats()["generation_tokens_total"]
    asyncio.run(main())
    s = _wait_idle(engine)
    assert s["kv_cache_usage"] == 0 and s["num_running"] == 0
    assert s["generation_tokens_total"] - before < 200


def test_step_failure_fails_running_requests_and_keeps_serving(engine, monkeypatch):
    real_step = engine.engine.step
    calls = {"n": 0}

    def flaky_step():
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom (injected)")
        return real_step()

    monkeypatch.setattr(engine.engine, "step", flaky_step)

    async def main():
        with pytest.raises(RequestFailedError, match="boom"):
            async for _ in engine.generate([1, 2, 3], LONG):
                pass
        return await _collect(engine, [1, 2, 3], GREEDY)  # the next request is served normally

    outs = asyncio.run(main())
    assert outs[-1].finished and engine.is_running
    assert _wait_idle(engine)["kv_cache_usage"] == 0


def test_idle_thread_sleeps(engine, monkeypatch):
    calls = {"n": 0}
    real = engine.engine.has_unfinished_requests

    def counting():
        calls["n"] += 1
        return real()

    asyncio.run(_collect(engine, [1, 2], GREEDY))
    _wait_idle(engine)
    monkeypatch.setattr(engine.engine, "has_unfinished_requests", counting)
    time.sleep(0.5)
    assert calls["n"] <= 2  # waiting on the condition, not polling
    asyncio.run(_collect(engine, [1, 2], GREEDY))  # and wakes up for new work
    assert calls["n"] > 2


def test_requests_from_two_event_loops(engine):
    results = {}

    def worker(i):
        results[i] = asyncio.run(_collect(engine, [3, 4, 5], GREEDY))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    toks = [[t for o in results[i] for t in o.outputs[0].token_ids] for i in range(2)]
    assert toks[0] == toks[1] and len(toks[0]) == 5


def test_shutdown_fails_live_streams(tiny_model_factory):
    eng = _make(tiny_model_factory("llama"))

    async def main():
        stream = await eng.add_request([1, 2, 3], LONG)
        await stream.__anext__()
        threading.Thread(target=eng.shutdown).start()
        with pytest.raises(EngineDeadError):
            async for _ in stream:
                pass
        with pytest.raises(EngineDeadError):
            await eng.add_request([1, 2], GREEDY)

    asyncio.run(main())
    assert not eng.is_running


def test_an_aborted_request_id_can_be_reused_at_once(engine):
    """The new request gets none of the aborted one's outputs (an engine process may still send them)."""
    async def main():
        gen = engine.generate([5, 6, 7], LONG, request_id="reused")
        await gen.__anext__()
        await gen.aclose()
        return await _collect(engine, [1, 2, 3, 4], GREEDY, request_id="reused")

    outs = asyncio.run(main())
    fresh = asyncio.run(_collect(engine, [1, 2, 3, 4], GREEDY))
    assert [t for o in outs for t in o.outputs[0].token_ids] == [t for o in fresh for t in o.outputs[0].token_ids]
    assert [o.prompt_token_ids for o in outs] == [[1, 2, 3, 4]] * len(outs)
    assert _wait_idle(engine)["kv_cache_usage"] == 0


def test_step_observers_see_each_engine_step(engine):
    steps = []
    engine.add_step_observer(lambda t0, t1, stats: steps.append((t0, t1, stats["last_step_num_seqs"])))
    outs = asyncio.run(_collect(engine, [1, 2, 3], GREEDY))
    assert len(outs) == 5 and len(steps) >= 5  # one per step that made a token (the engine's own times)
    assert all(t0 <= t1 for t0, t1, _ in steps) and all(n == 1 for *_, n in steps[-5:])
    engine._step_observers.clear()
