"""Sampler semantics on CPU: seeds, truncation sets, distributions, processors, logprobs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from nanovllm.kernels.counter_rng import seeded_exponential
from nanovllm.sampling_params import SamplingParams
from nanovllm.worker import sampler as sampler_mod
from nanovllm.worker.sampler import (
    Sampler,
    SamplingBatch,
    apply_logits_processors,
    compute_prompt_logprobs,
)

CPU = torch.device("cpu")
# Upper 0.1% point of the chi-square distribution with 5 degrees of freedom (scipy is not installed).
CHI2_CRITICAL_DOF5_P001 = 20.515
# Five tokens with probabilities 0.4, 0.3, 0.15, 0.1, 0.05: boundaries are easy to reason about.
CRAFTED_PROBS = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05])


def build(params, logits, prompts=None, outputs=None, eos=()):
    n = len(params)
    return SamplingBatch.build(
        params,
        prompts if prompts is not None else [[] for _ in range(n)],
        outputs if outputs is not None else [[] for _ in range(n)],
        list(eos),
        logits.shape[-1],
        logits.device,
    )


def sample(params, logits, **kw):
    return Sampler()(logits, build(params, logits, **kw))


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


# ----------------------------------------------------------------------------- greedy


def test_all_greedy_is_argmax_and_does_not_touch_logits():
    torch.manual_seed(0)
    logits = torch.randn(8, 100).to(torch.bfloat16)
    before = logits.clone()
    batch = build([SamplingParams(temperature=0.0)] * 8, logits)
    assert batch.all_greedy and not batch.needs_logits_processing
    assert batch.temperature is None and batch.top_k is None and batch.top_p is None and batch.penalties is None
    out = Sampler()(logits, batch)
    assert torch.equal(out.sampled_token_ids, logits.argmax(-1))
    assert out.sampled_logprobs is None and out.topk_token_ids is None
    assert torch.equal(logits, before)


def test_greedy_rows_stay_argmax_in_mixed_batch():
    torch.manual_seed(1)
    logits = torch.randn(6, 50)
    before = logits.clone()
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.3, top_k=5, seed=3),
        SamplingParams(temperature=0.0, logit_bias={7: 100.0}),  # processors still apply to greedy rows
        SamplingParams(top_p=0.5),
        SamplingParams(temperature=0.0, repetition_penalty=2.0),
        SamplingParams(min_p=0.2),
    ]
    batch = build(params, logits, prompts=[[1, 2]] * 6, outputs=[[3]] * 6)
    expected = apply_logits_processors(logits, batch).argmax(-1)
    for _ in range(20):
        got = Sampler()(logits, batch).sampled_token_ids
        assert got[[0, 2, 4]].tolist() == expected[[0, 2, 4]].tolist()
    assert got[2].item() == 7
    assert torch.equal(logits, before)  # the sampler works on a copy


def test_top_k_1_equals_greedy():
    torch.manual_seed(2)
    logits = torch.randn(32, 200)
    out = sample([SamplingParams(temperature=1.5, top_k=1)] * 32, logits)
    assert torch.equal(out.sampled_token_ids, logits.argmax(-1))


# ----------------------------------------------------------------------------- truncation


@pytest.mark.parametrize(
    "kwargs, allowed",
    [
        (dict(top_k=3), {0, 1, 2}),
        (dict(top_p=0.65), {0, 1}),  # 0.4 + 0.3 reaches 0.65
        (dict(top_p=0.8), {0, 1, 2}),
        (dict(min_p=0.3), {0, 1, 2}),  # 0.3 * 0.4 = 0.12 drops 0.1 and 0.05
        (dict(top_k=3, top_p=0.8), {0, 1}),  # top-p sees the top-k mass renormalised: 0.47, 0.35, 0.18
        (dict(top_k=4, min_p=0.3), {0, 1, 2}),
        (dict(top_p=0.9, min_p=0.5), {0, 1}),
    ],
)
def test_truncation_never_samples_outside_allowed_set(kwargs, allowed):
    torch.manual_seed(3)
    num_draws = 4000
    logits = CRAFTED_PROBS.log().expand(num_draws, -1).contiguous()
    # Every other row is unrestricted, so top-p / min-p also run on a subset of the rows.
    params = [SamplingParams(**kwargs) if i % 2 == 0 else SamplingParams() for i in range(num_draws)]
    tokens = sample(params, logits).sampled_token_ids
    assert set(tokens[0::2].tolist()) == allowed
    assert set(tokens[1::2].tolist()) == set(range(len(CRAFTED_PROBS)))


def _reference_allowed(row: torch.Tensor, p: SamplingParams) -> set[int]:
    """Allowed tokens after temperature, top-k, top-p, min-p, computed one token at a time."""
    probs = torch.softmax(row.double() / p.temperature, -1)
    order = probs.argsort(descending=True).tolist()
    kept = order[: p.effective_top_k] if p.effective_top_k else order
    mass = sum(probs[t].item() for t in kept)
    if p.top_p < 1.0:
        prefix, before = [], 0.0
        for t in kept:
            if before >= p.top_p:
                break
            prefix.append(t)
            before += probs[t].item() / mass
        kept = prefix
    top = probs[kept[0]].item()
    return {t for t in kept if probs[t].item() >= p.min_p * top}


def test_truncation_matches_reference_on_random_rows():
    torch.manual_seed(4)
    vocab, draws = 40, 3000
    settings = [
        SamplingParams(temperature=0.7, top_k=7, top_p=0.6),  # top-p over top-k candidates only
        SamplingParams(temperature=1.2, top_p=0.7),  # full sort of the row
        SamplingParams(top_k=10, min_p=0.1),
        SamplingParams(temperature=0.9, top_k=12, top_p=0.85, min_p=0.05),
    ]
    rows = torch.randn(len(settings), vocab) * 2
    logits = rows.repeat_interleave(draws, dim=0)  # [len(settings) * draws, V]
    params = [p for p in settings for _ in range(draws)]
    tokens = sample(params, logits).sampled_token_ids.view(len(settings), draws)
    for i, p in enumerate(settings):
        allowed = _reference_allowed(rows[i], p)
        assert set(tokens[i].tolist()) <= allowed
        assert len(set(tokens[i].tolist())) >= min(len(allowed), 2)


def test_top_p_candidates_only_when_every_top_p_row_has_top_k():
    logits = torch.zeros(3, 30)
    both = build([SamplingParams(top_k=5, top_p=0.5), SamplingParams(top_k=9, top_p=0.9), SamplingParams()], logits)
    assert both.top_p_num_candidates == 9 and both.top_p_rows.tolist() == [0, 1]
    mixed = build([SamplingParams(top_k=5, top_p=0.5), SamplingParams(top_p=0.9), SamplingParams()], logits)
    assert mixed.top_p_num_candidates == 0
    huge_k = build([SamplingParams(top_k=1000)], logits)  # k >= vocab keeps everything: off
    assert huge_k.top_k is None


# ----------------------------------------------------------------------------- distributions


def test_temperature_sampling_matches_softmax_chi_square():
    torch.manual_seed(5)
    logits_row = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0, -1.5])
    temperature, draws = 0.7, 20000
    logits = logits_row.expand(draws, -1).contiguous()
    tokens = sample([SamplingParams(temperature=temperature)] * draws, logits).sampled_token_ids
    counts = torch.bincount(tokens, minlength=6).double()
    assert chi_square(counts, torch.softmax(logits_row.double() / temperature, -1)) < CHI2_CRITICAL_DOF5_P001


def test_seeded_sampling_matches_softmax_chi_square():
    """Across seeds, and across the steps of one seed, seeded draws follow softmax(l / T)."""
    logits_row = torch.tensor([0.5, -0.3, 1.2, 0.0, -2.0, 0.8])
    temperature, draws = 1.3, 20000
    probs = torch.softmax(logits_row.double() / temperature, -1)
    logits = logits_row.expand(draws, -1).contiguous()

    across_seeds = [SamplingParams(temperature=temperature, seed=s) for s in range(draws)]
    tokens = sample(across_seeds, logits).sampled_token_ids
    assert chi_square(torch.bincount(tokens, minlength=6).double(), probs) < CHI2_CRITICAL_DOF5_P001

    one_seed = [SamplingParams(temperature=temperature, seed=1234)] * draws
    batch = dataclasses.replace(build(one_seed, logits), seed_steps=torch.arange(draws))  # steps 0..N-1
    tokens = Sampler()(logits, batch).sampled_token_ids
    assert chi_square(torch.bincount(tokens, minlength=6).double(), probs) < CHI2_CRITICAL_DOF5_P001


def test_seeded_exponential_looks_like_exp1():
    noise = seeded_exponential(torch.tensor([[7, 0], [0, 0], [2**32 - 1, 5]]), torch.tensor([0, 0, 3]), 100_000)
    assert noise.shape == (3, 100_000)
    assert noise.min() > 0 and torch.isfinite(noise).all()
    assert torch.allclose(noise.mean(1), torch.ones(3), atol=0.02)  # std of the mean ~ 0.003
    assert torch.allclose(noise.var(1), torch.ones(3), atol=0.05)
    assert not torch.equal(noise[0], noise[1])


def test_seeded_noise_uncorrelated_across_steps_and_nearby_seeds():
    words = torch.tensor([[5, 0], [5, 0], [4, 0], [5, 1]])  # same seed twice, then seeds one bit away
    noise = seeded_exponential(words, torch.tensor([0, 1, 0, 0]), 50_000)
    corr = torch.corrcoef(noise)
    off_diagonal = corr[~torch.eye(4, dtype=torch.bool)]
    assert off_diagonal.abs().max() < 0.03  # std of a correlation over 50k pairs ~ 0.0045
    again = seeded_exponential(words, torch.tensor([0, 1, 0, 0]), 50_000)
    assert torch.equal(noise, again)


# ----------------------------------------------------------------------------- seeds


def _step_logits(step: int, vocab: int) -> torch.Tensor:
    return torch.randn(vocab, generator=torch.Generator().manual_seed(1000 + step))


def _run_seeded(position: int, companions: list[SamplingParams], steps: int, vocab: int = 500) -> list[int]:
    """Tokens of the seeded request when it sits at `position` among `companions` for `steps` steps."""
    target = SamplingParams(temperature=0.9, top_k=50, top_p=0.9, seed=4242)
    produced: list[int] = []
    for step in range(steps):
        params = list(companions)
        params.insert(position, target)
        logits = torch.randn(len(params), vocab)  # companions see fresh random logits each step
        logits[position] = _step_logits(step, vocab)
        outputs = [[0] * (step + i) for i in range(len(params))]
        outputs[position] = list(produced)
        token = sample(params, logits, outputs=outputs).sampled_token_ids[position].item()
        produced.append(token)
    return produced


def test_seed_reproducible_across_batch_composition_and_row():
    torch.manual_seed(6)
    alone = _run_seeded(0, [], steps=8)
    torch.manual_seed(7)
    mixed = [SamplingParams(), SamplingParams(temperature=0.0), SamplingParams(seed=1, top_p=0.5)]
    assert _run_seeded(2, mixed, steps=8) == alone
    torch.manual_seed(8)
    assert _run_seeded(1, [SamplingParams(min_p=0.1, presence_penalty=0.5)] * 4, steps=8) == alone
    assert len(set(alone)) > 1  # the step advances the noise


def test_different_seeds_differ():
    vocab, steps = 1000, 16
    logits = torch.zeros(2, vocab)  # uniform: the noise alone decides
    runs = {0: [], 1: []}
    for step in range(steps):
        params = [SamplingParams(seed=1), SamplingParams(seed=2)]
        tokens = sample(params, logits, outputs=[runs[0], runs[1]]).sampled_token_ids.tolist()
        runs[0].append(tokens[0])
        runs[1].append(tokens[1])
    assert runs[0] != runs[1]


# ----------------------------------------------------------------------------- logits processors


def test_penalties_follow_formulas():
    logits = torch.tensor([[2.0, -1.0, 0.5, -0.5, 1.0], [2.0, -1.0, 0.5, -0.5, 1.0]])
    params = [
        SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25),
        SamplingParams(),  # no penalties: untouched (and not part of the penalty rows)
    ]
    batch = build(params, logits, prompts=[[0], [0]], outputs=[[2, 2, 3], [2, 2, 3]])
    assert batch.penalties.rows.tolist() == [0]
    # token 0: in prompt, positive -> 2.0 / 2
    # token 1: unseen -> unchanged
    # token 2: output twice, positive -> 0.5 / 2 - 0.5 * 2 - 0.25
    # token 3: output once, negative -> -0.5 * 2 - 0.5 * 1 - 0.25
    expected = torch.tensor([[1.0, -1.0, -1.0, -1.75, 1.0], [2.0, -1.0, 0.5, -0.5, 1.0]])
    assert torch.allclose(apply_logits_processors(logits, batch), expected)


def test_repetition_penalty_uses_prompt_and_output_frequency_only_output():
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    params = [SamplingParams(frequency_penalty=1.0, presence_penalty=0.5)]
    got = apply_logits_processors(logits, build(params, logits, prompts=[[0, 0, 1]], outputs=[[1]]))
    assert torch.allclose(got, torch.tensor([[1.0, -0.5, 1.0, 1.0]]))  # prompt tokens are not counted


def test_logit_bias_is_added():
    logits = torch.tensor([[0.5, 0.0, -1.0], [0.5, 0.0, -1.0]])
    params = [SamplingParams(logit_bias={1: 3.0, 2: -2.5}), SamplingParams(logit_bias={0: -100})]
    got = apply_logits_processors(logits, build(params, logits))
    assert torch.allclose(got, torch.tensor([[0.5, 3.0, -3.5], [-99.5, 0.0, -1.0]]))


def test_logit_bias_outside_vocab_is_refused():
    logits = torch.zeros(1, 10)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        build([SamplingParams(logit_bias={10: 1.0})], logits)


def test_min_tokens_suppresses_eos_and_stop_token_ids():
    eos, stop = 5, 3
    logits = torch.zeros(3, 8)
    logits[:, eos] = 10.0  # EOS would win greedily
    logits[:, stop] = 9.0
    params = [
        SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[stop]),
        SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[stop], ignore_eos=True),
        SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[stop]),
    ]
    outputs = [[1], [], [1, 2]]  # third row has reached min_tokens
    batch = build(params, logits, outputs=outputs, eos=[eos])
    processed = apply_logits_processors(logits, batch)
    assert torch.isinf(processed[:2, [eos, stop]]).all()
    assert torch.equal(processed[2], logits[2])
    assert Sampler()(logits, batch).sampled_token_ids.tolist() == [0, 0, eos]


# ----------------------------------------------------------------------------- logprobs


def test_logprobs_come_from_raw_logits_with_ranks():
    torch.manual_seed(9)
    logits = torch.randn(4, 30)
    params = [
        SamplingParams(temperature=0.5, logprobs=3, repetition_penalty=1.5, logit_bias={4: 5.0}),
        SamplingParams(logprobs=0),
        SamplingParams(temperature=0.0),  # no logprobs asked: the row still gets values (K = batch max)
        SamplingParams(top_k=2, logprobs=1),
    ]
    out = sample(params, logits, prompts=[[1, 2]] * 4)
    raw = torch.log_softmax(logits, -1)
    tokens = out.sampled_token_ids
    assert torch.allclose(out.sampled_logprobs, raw.gather(1, tokens[:, None]).squeeze(1))
    expected_ranks = [(raw[i] >= raw[i, tokens[i]]).sum().item() for i in range(4)]
    assert out.sampled_ranks.tolist() == expected_ranks
    assert out.sampled_ranks[2].item() == 1  # the greedy row took the most likely token
    top_lp, top_ids = raw.topk(3, -1)
    assert out.topk_token_ids.shape == (4, 3)
    assert torch.equal(out.topk_token_ids, top_ids)
    assert torch.allclose(out.topk_logprobs, top_lp)


def test_logprobs_zero_gives_empty_topk_and_none_gives_nothing():
    logits = torch.randn(2, 10)
    out = sample([SamplingParams(logprobs=0), SamplingParams()], logits)
    assert out.topk_token_ids.shape == (2, 0) and out.topk_logprobs.shape == (2, 0)
    assert out.sampled_ranks.dtype == torch.int64
    assert sample([SamplingParams()] * 2, logits).sampled_logprobs is None


def test_prompt_logprobs_chunked(monkeypatch):
    torch.manual_seed(10)
    logits = torch.randn(7, 20).to(torch.bfloat16)
    targets = torch.randint(0, 20, (7,))
    monkeypatch.setattr(sampler_mod, "PROMPT_LOGPROBS_CHUNK_ROWS", 3)
    token_lp, ranks, top_ids, top_lp = compute_prompt_logprobs(logits, targets, 2)
    raw = torch.log_softmax(logits.float(), -1)
    assert torch.allclose(token_lp, raw.gather(1, targets[:, None]).squeeze(1))
    assert ranks.tolist() == [(raw[i] >= raw[i, targets[i]]).sum().item() for i in range(7)]
    assert torch.equal(top_ids, raw.topk(2, -1).indices)
    assert top_lp.shape == (7, 2) and token_lp.dtype == torch.float32


# ----------------------------------------------------------------------------- fused fast path
# On CPU the Triton kernel runs in the interpreter (fp32): small vocabularies keep it fast.


@pytest.mark.parametrize(
    "params, ok",
    [
        ([SamplingParams(temperature=0.6), SamplingParams(temperature=0.0), SamplingParams(seed=3)], True),
        ([SamplingParams(temperature=0.0)] * 2, True),  # all greedy: ok, but stays a bare argmax
        ([SamplingParams(), SamplingParams(top_k=5)], False),
        ([SamplingParams(), SamplingParams(top_p=0.9)], False),
        ([SamplingParams(), SamplingParams(min_p=0.1)], False),
        ([SamplingParams(), SamplingParams(logprobs=0)], False),
        ([SamplingParams(), SamplingParams(temperature=0.0, logit_bias={1: 1.0})], False),
        ([SamplingParams(), SamplingParams(temperature=0.0, presence_penalty=0.5)], False),
        ([SamplingParams(), SamplingParams(min_tokens=3)], False),  # EOS banned this step
        ([SamplingParams(), SamplingParams(min_tokens=1, top_k=1000)], True),  # reached; k >= V is off
    ],
)
def test_fast_path_ok_only_for_temperature_and_race(params, ok):
    logits = torch.zeros(len(params), 30)
    batch = build(params, logits, outputs=[[1]] * len(params), eos=[2])
    assert batch.fast_path_ok is ok
    if ok and not batch.all_greedy:
        expected = [0.0 if p.is_greedy else p.temperature for p in params]
        assert batch.sample_temperature.tolist() == pytest.approx(expected)
    else:
        assert batch.sample_temperature is None


def test_fused_path_is_cuda_only_by_default():
    logits = torch.zeros(2, 30)
    batch = build([SamplingParams(), SamplingParams(temperature=0.0)], logits)
    assert not Sampler().uses_fused_path(logits, batch)  # CPU: the torch path
    assert Sampler(use_triton=True).uses_fused_path(logits, batch)
    assert not Sampler(use_triton=False).uses_fused_path(logits, batch)
    greedy = build([SamplingParams(temperature=0.0)] * 2, logits)
    assert not Sampler(use_triton=True).uses_fused_path(logits, greedy)  # bare argmax instead
    with pytest.raises(ValueError, match="use_triton"):
        Sampler(use_triton="yes")


def test_fused_path_seeded_rows_match_torch_path():
    """A seeded request draws the same tokens on both paths, whatever the other rows are."""
    torch.manual_seed(11)
    vocab = 1000
    params = [
        SamplingParams(temperature=0.6, seed=1),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0, seed=2**40 + 5),
        SamplingParams(temperature=0.8),  # unseeded
        SamplingParams(temperature=1.7, seed=-3),
        SamplingParams(temperature=0.6, seed=1),  # same seed, later step
    ]
    outputs = [[0] * n for n in (4, 0, 9, 2, 0, 5)]
    seeded = [0, 1, 2, 4, 5]  # and the greedy row
    for step in range(3):
        logits = torch.randn(len(params), vocab) * 2
        before = logits.clone()
        batch = build(params, logits, outputs=[o + [0] * step for o in outputs])
        fused = Sampler(use_triton=True)(logits, batch).sampled_token_ids
        plain = Sampler(use_triton=False)(logits, batch).sampled_token_ids
        assert fused[seeded].tolist() == plain[seeded].tolist()
        assert torch.equal(logits, before)
    # all rows seeded: no random draw at all
    batch = build([params[i] for i in (0, 2, 4)], logits[:3])
    assert batch.all_seeded
    fused = Sampler(use_triton=True)(logits[:3], batch).sampled_token_ids
    assert torch.equal(fused, Sampler(use_triton=False)(logits[:3], batch).sampled_token_ids)


def test_fused_path_unseeded_matches_softmax_chi_square():
    torch.manual_seed(12)
    logits_row = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0, -1.5])
    temperature, draws = 0.7, 4000
    logits = logits_row.expand(draws, -1).contiguous()
    params = [SamplingParams(temperature=temperature)] * draws
    tokens = Sampler(use_triton=True)(logits, build(params, logits)).sampled_token_ids
    counts = torch.bincount(tokens, minlength=6).double()
    assert chi_square(counts, torch.softmax(logits_row.double() / temperature, -1)) < CHI2_CRITICAL_DOF5_P001


def test_fused_path_unseeded_follows_manual_seed():
    logits = torch.zeros(4, 1000)  # uniform: the noise alone decides
    batch = build([SamplingParams()] * 4, logits)
    sampler = Sampler(use_triton=True)
    torch.manual_seed(13)
    first = sampler(logits, batch).sampled_token_ids
    second = sampler(logits, batch).sampled_token_ids
    torch.manual_seed(13)
    assert torch.equal(sampler(logits, batch).sampled_token_ids, first)
    assert not torch.equal(first, second)  # a fresh draw per call
