"""Structured outputs through the engine (bundled model): constrained requests follow their
grammar, and unconstrained requests batched with them keep their tokens and their speed."""

from __future__ import annotations

import json
import re
import statistics
import time

import numpy as np
import pytest

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("xgrammar")

from nanovllm import GuidedDecodingParams, SamplingParams, StructuredOutputsParams  # noqa: E402
from nanovllm.worker import sampler as sampler_module  # noqa: E402

CAR = {
    "type": "object",
    "properties": {"brand": {"type": "string"}, "model": {"type": "string"},
                   "car_type": {"type": "string", "enum": ["sedan", "SUV", "Truck", "Coupe"]}},
    "required": ["brand", "model", "car_type"],
}
PROMPTS = ["The capital of France is", "Once upon a time, in a small village,", "def fibonacci(n):"]
# cannot finish within the token budget, so every structured row stays masked to the end
LONG_REGEX = r"[a-z ]{400}"
SHORT_REGEX = r"[a-z]{2,8}( [a-z]{2,8}){2}"
MAX_TOKENS = 8
TIMING_ROUNDS = 3  # extra rounds only when the first one's wall-clock ratio is over the limit
TIMING_REPEATS = 3  # the grammar cost per step is a median: one slow outlier must not decide it
SLOWDOWN_LIMIT = 1.05


def chat_prompt(llm, text: str) -> dict:
    return llm.apply_chat_template([{"role": "user", "content": text}])


def test_offline_constraints_vllm_example(bundled_llm):
    """vLLM's offline structured-outputs example: choice, regex, JSON schema, grammar."""
    llm = bundled_llm
    sql = ('root ::= select_statement\nselect_statement ::= "SELECT " column " from " table " where " condition\n'
           'column ::= "col_1 " | "col_2 "\ntable ::= "table_1 " | "table_2 "\ncondition ::= column "= " number\n'
           'number ::= "1 " | "2 "')
    cases = [
        ("Classify this sentiment: vLLM is wonderful!", StructuredOutputsParams(choice=["Positive", "Negative"])),
        ("Generate an email address for Alan Turing, who works in Enigma. End in .com and new line. Example "
         "result: alan.turing@enigma.com\n", StructuredOutputsParams(regex=r"\w+@\w+\.com\n")),
        ("Generate a JSON with the brand, model and car_type of the most iconic car from the 90's",
         GuidedDecodingParams(json=CAR)),  # vLLM's older spelling
        ("Generate an SQL query to show the 'username' and 'email' from the 'users' table.",
         StructuredOutputsParams(grammar=sql)),
    ]
    params = []
    for _, so in cases:
        p = llm.get_default_sampling_params()
        p.temperature, p.max_tokens, p.structured_outputs = 0.0, 96, so  # adjusted after construction
        params.append(p)
    outs = llm.generate([chat_prompt(llm, text) for text, _ in cases], params, use_tqdm=False)
    texts = [o.outputs[0].text for o in outs]
    assert all(o.outputs[0].finish_reason == "stop" for o in outs), texts
    assert texts[0] in ("Positive", "Negative")
    assert re.fullmatch(r"\w+@\w+\.com\n", texts[1]), texts[1]
    jsonschema.validate(json.loads(texts[2]), CAR)
    assert re.fullmatch(r"SELECT (col_1|col_2)  from (table_1|table_2)  where (col_1|col_2) = (1|2) ", texts[3])
    assert llm.engine.structured.num_live_matchers == 0  # released when the requests finished


def test_bad_constraint_is_refused_before_it_runs(bundled_llm):
    with pytest.raises(ValueError, match="regex"):
        bundled_llm.generate(["x"], SamplingParams(structured_outputs=StructuredOutputsParams(regex="[a-")),
                             use_tqdm=False)
    bad = SamplingParams(max_tokens=4)
    bad.structured_outputs = StructuredOutputsParams(choice=["a"])
    bad.structured_outputs.choice = []  # broken after construction: verify() catches it when the engine copies it
    with pytest.raises(ValueError, match="choice"):
        bundled_llm.generate(["x"], bad, use_tqdm=False)
    assert not bundled_llm.engine.has_unfinished_requests()


def _run_batch(llm, structured: bool) -> tuple[dict[str, list[int]], list[float], int]:
    """PROMPTS unconstrained + as many extra requests (constrained or not); per-step wall times."""
    engine = llm.engine
    plain = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    extra = plain.replace(structured_outputs=StructuredOutputsParams(regex=LONG_REGEX)) if structured else plain
    ids = [engine.add_request(None, p, plain) for p in PROMPTS]
    for p in PROMPTS:
        engine.add_request(None, p + " The", extra)
    tokens, times = {}, []
    while engine.has_unfinished_requests():
        t0 = time.perf_counter()
        outs = engine.step()
        times.append(time.perf_counter() - t0)
        for out in outs:
            if out.finished and out.request_id in ids:
                tokens[out.request_id] = out.outputs[0].token_ids
    return {p: tokens[i] for p, i in zip(PROMPTS, ids)}, times[1:], len(times)  # [1:]: the prefill step


def test_unstructured_requests_keep_tokens_and_speed(bundled_llm, monkeypatch):
    llm = bundled_llm
    grammar_s: list[float] = []
    fill = llm.engine.step_builder._grammar_bitmask
    apply = sampler_module.apply_token_bitmask_

    def timed(fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                grammar_s.append(time.perf_counter() - t0)
        return wrapper

    monkeypatch.setattr(llm.engine.step_builder, "_grammar_bitmask", timed(fill))
    monkeypatch.setattr(sampler_module, "apply_token_bitmask_", timed(apply))
    _run_batch(llm, structured=True)  # warm-up: compile the grammar, load xgrammar
    ratios = []
    for _ in range(TIMING_ROUNDS):
        plain_steps, mixed_steps, grammar_per_step = [], [], []
        for _ in range(TIMING_REPEATS):  # interleaved, so both see the same machine load
            ref_tokens, times, n_plain = _run_batch(llm, structured=False)
            plain_steps += times
            grammar_s.clear()
            tokens, times, n_mixed = _run_batch(llm, structured=True)
            mixed_steps += times
            grammar_per_step.append(sum(grammar_s) / n_mixed)
            # greedy tokens of the unconstrained requests do not depend on their neighbours' grammars
            assert tokens == ref_tokens
            assert n_mixed == n_plain  # same number of steps to finish
        # The structured machinery (bitmask fill + apply) is what a mixed batch adds to each
        # step; measured inside the same steps it is immune to the machine's load.
        assert statistics.median(grammar_per_step) < (SLOWDOWN_LIMIT - 1) * statistics.median(mixed_steps)
        # Wall clock, same run: fast steps (low quantile) show the cost without other jobs' noise.
        ratios.append(_low_quantile(mixed_steps) / _low_quantile(plain_steps))
        if ratios[-1] <= SLOWDOWN_LIMIT:
            break
    assert min(ratios) <= SLOWDOWN_LIMIT, f"mixed/plain step time ratios {ratios}"


def _low_quantile(values: list[float]) -> float:
    return statistics.quantiles(values, n=5)[0]  # 20th percentile


def test_async_scheduling_gives_the_same_constrained_answers(bundled_llm):
    """With async scheduling a grammar row's previous token would still be in flight when the
    next step is built; the engine resolves that step first so the matcher has seen it. Same
    greedy answers as the synchronous engine."""
    from nanovllm import LLM

    llm = LLM(device="cpu", async_scheduling=True, max_model_len=512)
    assert llm.engine.async_scheduling
    # short constraints: every step of them runs without the host/device overlap
    cases = [("Name three colours, lower case, separated by spaces.", StructuredOutputsParams(regex=SHORT_REGEX)),
             ("Classify this sentiment: vLLM is wonderful!", StructuredOutputsParams(choice=["Positive", "Negative"]))]
    params = [SamplingParams(temperature=0, max_tokens=24, structured_outputs=so) for _, so in cases]
    plain = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompts = [chat_prompt(llm, text) for text, _ in cases] + PROMPTS[:2]
    got = llm.generate(prompts, params + [plain] * 2, use_tqdm=False)
    want = bundled_llm.generate(prompts, params + [plain] * 2, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    assert re.fullmatch(SHORT_REGEX, got[0].outputs[0].text), got[0].outputs[0].text
    assert got[1].outputs[0].text in ("Positive", "Negative")
    assert llm.engine.structured.num_live_matchers == 0


@pytest.mark.gpu
def test_gpu_mixed_batch_launch_never_waits_and_keeps_tokens():
    """On CUDA (async scheduling, CUDA graphs): grammar rows are masked by the Triton kernel,
    launch() makes no synchronization (the bitmask arrives filled in the StepInput), unconstrained neighbours keep their
    greedy tokens, and constrained JSON validates."""
    import warnings

    import torch

    from nanovllm import LLM

    llm = LLM(device="cuda", max_model_len=512, max_num_seqs=16)
    assert llm.engine.async_scheduling
    plain = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    regex = plain.replace(structured_outputs=StructuredOutputsParams(regex=LONG_REGEX))
    extra = [p + " The" for p in PROMPTS]
    # same batch shapes at every step in both runs: every request runs exactly 24 tokens
    ref = llm.generate(PROMPTS + extra, plain, use_tqdm=False)
    runner = llm.engine.executor.worker.runner  # the in-process worker's step runner
    original, syncs = runner.launch, []

    def watched_launch(sched):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                return original(sched)
            finally:
                torch.cuda.set_sync_debug_mode("default")
                syncs.extend(str(w.message) for w in caught if "called a synchronizing" in str(w.message))

    runner.launch = watched_launch
    outs = llm.generate(PROMPTS + extra, [plain] * len(PROMPTS) + [regex] * len(extra), use_tqdm=False)
    car = SamplingParams(temperature=0, max_tokens=96, structured_outputs=StructuredOutputsParams(json=CAR))
    cars = llm.generate([chat_prompt(llm, "Generate a JSON with the brand, model and car_type of a 90's car")] * 2,
                        car, use_tqdm=False)
    assert syncs == [], "launch() synchronized with the GPU:\n" + "\n".join(syncs)
    assert [o.outputs[0].token_ids for o in outs[:len(PROMPTS)]] == [o.outputs[0].token_ids for o in ref[:len(PROMPTS)]]
    assert all(re.fullmatch(r"[a-z ]+", o.outputs[0].text) for o in outs[len(PROMPTS):])
    for o in cars:
        jsonschema.validate(json.loads(o.outputs[0].text), CAR)


def test_step_input_carries_bitmasks_and_abort_releases_matchers(bundled_llm, monkeypatch):
    """The engine's matchers fill one bitmask row per constrained sampled request and send it in
    the plain-data StepInput (picklable: a worker may live in another process); an aborted
    request's matcher is dropped at once."""
    import pickle

    engine = bundled_llm.engine
    sent = []
    build = engine.step_builder.build

    def record(sched):
        step = build(sched)
        sent.append(pickle.loads(pickle.dumps(step)))
        return step

    monkeypatch.setattr(engine.step_builder, "build", record)
    plain = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    regex = plain.replace(structured_outputs=StructuredOutputsParams(regex=r"[a-z ]{40}"))
    engine.add_request("plain", PROMPTS[0], plain)
    engine.add_request("regex", PROMPTS[1], regex)
    for _ in range(2):  # the prefill (first token) and one decode
        engine.step()
    assert engine.structured.num_live_matchers == 1
    sampled = [s for s in sent if any(s.needs_sample)]
    assert sampled
    for step in sampled:
        rows = [rid for rid, needs in zip(step.req_ids, step.needs_sample) if needs]
        assert [rows[r] for r in step.grammar_rows] == ["regex"]
        assert step.grammar_bitmask.shape == (1, (engine.hf_config.vocab_size + 31) // 32)
        allowed = np.unpackbits(step.grammar_bitmask.view(np.uint8), bitorder="little")
        assert 0 < allowed.sum() < engine.hf_config.vocab_size  # a real constraint, not all or nothing
    engine.abort_request("regex")
    assert engine.structured.num_live_matchers == 0
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.kv.num_free_blocks == engine.kv.num_blocks
