"""Sampling features end to end: n>1 block sharing, seeds, streaming, stops, logprobs."""

import math

import pytest
import torch

from nanovllm import LLM, SamplingParams


@pytest.fixture(scope="module")
def tiny(tiny_model_factory):
    return LLM(tiny_model_factory("qwen3"), skip_tokenizer_init=True, device="cpu", dtype="float32",
               max_model_len=256)


PROMPT = {"prompt_token_ids": list(range(10, 50))}  # 40 tokens: 2 full blocks + 8
LOGPROB_ATOL = 1e-4  # fp32 CPU: the engine's and HF's forwards differ by rounding only


def peak_blocks(llm, requests):
    eng = llm.engine
    for rid, params in requests:
        eng.add_request(rid, PROMPT, params)
    peak = 0
    while eng.has_unfinished_requests():
        eng.step()
        peak = max(peak, eng.kv.num_blocks - eng.kv.num_free_blocks)
    assert eng.kv.num_free_blocks == eng.kv.num_blocks
    return peak


def test_n4_shares_prompt_blocks(tiny, tiny_model_factory):
    params = SamplingParams(n=4, temperature=1.0, seed=1, max_tokens=8, ignore_eos=True)
    one = SamplingParams(temperature=1.0, seed=1, max_tokens=8, ignore_eos=True)
    # prefix caching off: only the fork can make the completions share blocks
    llm = LLM(tiny_model_factory("qwen3"), skip_tokenizer_init=True, device="cpu", max_model_len=256,
              enable_prefix_caching=False)
    shared = peak_blocks(llm, [("n4", params)])
    separate = peak_blocks(llm, [(f"s{i}", one) for i in range(4)])
    assert separate == 4 * 3  # 48 tokens each = 3 blocks
    assert shared == 2 + 4  # 2 shared full prompt blocks + one private block per completion
    out = tiny.generate([PROMPT], params, use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert all(len(c.token_ids) == 8 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1  # independent samples


def test_seed_reproducible_in_different_batches(tiny):
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=12, ignore_eos=True)
    other = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    alone = tiny.generate([PROMPT], seeded, use_tqdm=False)[0].outputs[0].token_ids
    noisy = [{"prompt_token_ids": list(range(100, 100 + k))} for k in (3, 30)]
    mixed = tiny.generate(noisy + [PROMPT], [other, other, seeded], use_tqdm=False)[2].outputs[0].token_ids
    assert alone == mixed
    different = tiny.generate([PROMPT], seeded.replace(seed=99), use_tqdm=False)[0].outputs[0].token_ids
    assert different != alone


def test_seeded_draws_change_with_the_step(tiny):
    """A seeded request's noise is keyed by (seed, number of output tokens): new at every step.

    At a temperature this high the logits hardly matter and the noise alone picks each token,
    so one noise reused for every step would repeat one token; fresh draws over a
    1003-token vocabulary almost never repeat in 16 steps.
    """
    params = SamplingParams(temperature=1e4, seed=5, max_tokens=16, ignore_eos=True)
    toks = tiny.generate([PROMPT], params, use_tqdm=False)[0].outputs[0].token_ids
    assert len(set(toks)) > len(toks) // 2, toks
    assert tiny.generate([PROMPT], params, use_tqdm=False)[0].outputs[0].token_ids == toks


def test_seeded_tokens_do_not_depend_on_when_the_request_joins(tiny):
    """The step of a seeded draw is the request's own output count, not the engine's step."""
    seeded = SamplingParams(temperature=1.0, seed=77, max_tokens=10, ignore_eos=True)
    alone = tiny.generate([PROMPT], seeded, use_tqdm=False)[0].outputs[0].token_ids
    eng = tiny.engine
    eng.add_request("early", {"prompt_token_ids": list(range(200, 230))},
                    SamplingParams(temperature=1.0, seed=1, max_tokens=30, ignore_eos=True))
    for _ in range(4):
        eng.step()
    eng.add_request("late", PROMPT, seeded)
    finals = {}
    while eng.has_unfinished_requests():
        finals.update({o.request_id: o.outputs[0].token_ids for o in eng.step() if o.finished})
    assert finals["late"] == alone


def test_top_k_1_equals_greedy(tiny):
    greedy = tiny.generate([PROMPT], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)
    topk1 = tiny.generate([PROMPT], SamplingParams(temperature=0.9, top_k=1, max_tokens=10, ignore_eos=True),
                          use_tqdm=False)
    assert greedy[0].outputs[0].token_ids == topk1[0].outputs[0].token_ids


def hf_log_softmax(path: str, token_ids: list[int]) -> torch.Tensor:
    """[L, V] float32 log-probabilities of one full HF transformers forward: row p predicts token p + 1."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([token_ids])).logits[0]  # [L, V]
    return torch.log_softmax(logits.float(), dim=-1)


def test_prompt_logprobs_match_a_full_forward(tiny, tiny_model_factory):
    """Every prompt position against an independent forward (HF transformers, fp32): the
    logprob of the actual token given the ones before it, its rank, and the top-k."""
    k = 2
    ids = torch.randint(3, 1000, (40,), generator=torch.Generator().manual_seed(7)).tolist()
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=k, logprobs=3)
    out = tiny.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0]
    expected = hf_log_softmax(tiny_model_factory("qwen3"), ids)
    plp = out.prompt_logprobs
    assert len(plp) == len(ids) and plp[0] is None
    for pos in range(1, len(ids)):
        row, tok, entry = expected[pos - 1], ids[pos], plp[pos]
        assert entry[tok].logprob == pytest.approx(row[tok].item(), abs=LOGPROB_ATOL), f"position {pos}"
        # rank: tokens at least as likely (a band of width 2 * atol absorbs rounding at near ties)
        assert int((row > row[tok] + LOGPROB_ATOL).sum()) + 1 <= entry[tok].rank <= int((row >= row[tok] - LOGPROB_ATOL).sum())
        top_lp, top_ids = row.topk(k)
        assert len(entry) <= k + 1
        for tid, lp in zip(top_ids.tolist(), top_lp.tolist()):
            assert entry[tid].logprob == pytest.approx(lp, abs=LOGPROB_ATOL)
    # the sampled token: greedy argmax of the last row, its logprob in cumulative_logprob
    comp = out.outputs[0]
    assert comp.token_ids == [int(expected[-1].argmax())]
    assert comp.cumulative_logprob == pytest.approx(expected[-1].max().item(), abs=LOGPROB_ATOL)
    assert len(comp.logprobs[0]) >= 3


def test_prompt_logprobs_survive_chunked_prefill(tiny_model_factory):
    path = tiny_model_factory("qwen3")
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    whole = LLM(path, skip_tokenizer_init=True, device="cpu", max_model_len=256)
    chunked = LLM(path, skip_tokenizer_init=True, device="cpu", max_model_len=256, max_num_batched_tokens=7)
    a = whole.generate([PROMPT], params, use_tqdm=False)[0].prompt_logprobs
    b = chunked.generate([PROMPT], params, use_tqdm=False)[0].prompt_logprobs
    assert len(a) == len(b) == 40
    for x, y in zip(a[1:], b[1:]):
        (tx, lx), = x.items()
        (ty, ly), = y.items()
        assert tx == ty and lx.logprob == pytest.approx(ly.logprob, abs=1e-4)


# ----------------------------------------------------------------------------- bundled model (text)

def test_streamed_deltas_concatenate_to_final_text(bundled_llm):
    params = SamplingParams(temperature=0, max_tokens=24)
    prompt = bundled_llm.apply_chat_template([{"role": "user", "content": "Write one sentence about the sea."}])
    final = bundled_llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].text
    deltas = list(bundled_llm.stream(prompt, params))
    assert len(deltas) > 3
    assert "".join(deltas) == final


def test_abort_mid_stream_frees_blocks(bundled_llm):
    eng = bundled_llm.engine
    gen = bundled_llm.stream("Count from one to one hundred:", SamplingParams(temperature=0, max_tokens=200,
                                                                                 ignore_eos=True))
    for _ in range(3):
        next(gen)
    assert eng.kv.num_free_blocks < eng.kv.num_blocks
    gen.close()
    assert eng.kv.num_free_blocks == eng.kv.num_blocks
    assert not eng.has_unfinished_requests()


def test_stop_string_across_tokens_is_trimmed(bundled_llm):
    base = SamplingParams(temperature=0, max_tokens=24)
    text = bundled_llm.generate(["The capital of France is"], base, use_tqdm=False)[0].outputs[0].text
    assert "Paris" in text
    stop = "aris"  # "Paris" is one or two tokens; "aris" starts inside a token either way
    out = bundled_llm.generate(["The capital of France is"], base.replace(stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert out.text == text[: text.index(stop)]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    kept = bundled_llm.generate(["The capital of France is"], base.replace(stop=[stop], include_stop_str_in_output=True),
                                use_tqdm=False)[0].outputs[0]
    assert kept.text == text[: text.index(stop) + len(stop)]


def test_stop_string_completed_by_the_last_allowed_token(bundled_llm):
    """The token that reaches max_tokens also completes a stop string: the stop string wins
    (finish_reason "stop", text cut before it), as it would one token earlier."""
    prompt, k = "The capital of France is", 8
    base = SamplingParams(temperature=0, max_tokens=k, ignore_eos=True)
    text = bundled_llm.generate([prompt], base, use_tqdm=False)[0].outputs[0].text
    before = bundled_llm.generate([prompt], base.replace(max_tokens=k - 1), use_tqdm=False)[0].outputs[0].text
    # the shortest tail of the k-token text that occurs nowhere earlier: completed by token k
    stop = next(text[-n:] for n in range(2, len(text)) if text.find(text[-n:]) == len(text) - n
                and text[-n:] not in before)
    out = bundled_llm.generate([prompt], base.replace(stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == k
    assert (out.finish_reason, out.stop_reason) == ("stop", stop)
    assert out.text == text[: -len(stop)]
    kept = bundled_llm.generate([prompt], base.replace(stop=[stop], include_stop_str_in_output=True),
                                use_tqdm=False)[0].outputs[0]
    assert (kept.finish_reason, kept.text) == ("stop", text)


def test_min_tokens_suppresses_eos(bundled_llm):
    params = SamplingParams(temperature=0, max_tokens=40)
    short = bundled_llm.chat([{"role": "user", "content": "Say hi."}], params, use_tqdm=False)[0].outputs[0]
    assert short.finish_reason == "stop" and len(short.token_ids) < 40
    longer = bundled_llm.chat([{"role": "user", "content": "Say hi."}], params.replace(min_tokens=len(short.token_ids) + 5),
                              use_tqdm=False)[0].outputs[0]
    assert len(longer.token_ids) >= len(short.token_ids) + 5


def test_logprobs_are_the_raw_distribution(bundled_llm):
    params = SamplingParams(temperature=0.8, top_k=5, seed=0, max_tokens=4, logprobs=5)
    out = bundled_llm.generate(["The capital of France is"], params, use_tqdm=False)[0].outputs[0]
    for entry, tok in zip(out.logprobs, out.token_ids):
        assert tok in entry
        assert all(lp.decoded_token is not None for lp in entry.values())
        probs = [math.exp(lp.logprob) for lp in entry.values()]
        assert sum(probs) <= 1.0 + 1e-4  # a sub-distribution of the raw softmax, not renormalised over top-5


def test_chat_applies_template_and_answers(bundled_llm):
    out = bundled_llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                           SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0]
    assert "<|im_start|>assistant" in out.prompt
    assert "Paris" in out.outputs[0].text
    with pytest.raises(TypeError):
        bundled_llm.chat([{"content": "no role"}])
