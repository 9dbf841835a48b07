"""Triton fused sampling vs `reference.fused_sample_reference` (the unfused exponential race).

The noise must be the one of `counter_rng.seeded_exponential`: the uniforms' bits are checked
directly (`seeded_uniform_bits`, exact integers; the float logs within a few ulps) and on
all-equal logits, where the noise alone picks the token. On random logits the chosen token's reference score must be the row's best (up to
rounding: l / T and the logs may differ by an ulp between implementations).

CPU: interpreter, fp32 and fp16, small vocabularies. GPU (`@pytest.mark.gpu`): bf16 too, and
16-bit cases with more rows and Qwen3's 151,936-token vocabulary.
"""

from __future__ import annotations

import pytest
import torch
from kernel_params import DEVICE, HAS_CUDA, PRECISIONS, PRECISIONS_CPU_FP16, large_shapes

from nanovllm.kernels import reference
from nanovllm.kernels.sampling import fused_sample, greedy_argmax, seeded_uniform_bits
from nanovllm.kernels.counter_rng import seeded_exponential

UNIFORM_SCALE = 2.0**-23  # u = (k + 0.5) / 2^23
NOISE_RTOL = 4 * 2.0**-23  # four float32 ulps, relative
LLM_VOCAB = 151_936
# Temperatures cycled over the rows; 0 = greedy row.
TEMPERATURES = [0.6, 0.0, 1.0, 1.7, 0.3]


def make_inputs(num_rows: int, vocab: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(num_rows, vocab, generator=gen) * 3).to(DEVICE, dtype)
    temperature = torch.tensor([TEMPERATURES[i % len(TEMPERATURES)] for i in range(num_rows)], device=DEVICE)
    seed_words = torch.randint(0, 1 << 32, (num_rows, 2), generator=gen).to(DEVICE)
    steps = torch.randint(0, 1 << 32, (num_rows,), generator=gen).to(DEVICE)
    return logits, temperature, seed_words, steps


def reference_scores(logits, temperature, seed_words, steps) -> torch.Tensor:
    """[B, V] float64 race scores: l / T - log E on sampled rows, l on greedy rows."""
    x = logits.double()
    noise = seeded_exponential(seed_words, steps, logits.shape[-1]).double()
    sampled = (temperature > 0).unsqueeze(1)
    return torch.where(sampled, x / temperature.double().clamp_min(1e-30).unsqueeze(1) - noise.log(), x)


def check_choice(tokens, logits, temperature, seed_words, steps) -> None:
    """Greedy rows: exactly the first argmax. Sampled rows: a token whose score is the row's best."""
    assert tokens.dtype == torch.int64 and tokens.shape == (logits.shape[0],)
    expected = reference.fused_sample_reference(logits, temperature, seed_words, steps)
    greedy = temperature <= 0
    assert torch.equal(tokens[greedy], logits[greedy].argmax(-1))
    scores = reference_scores(logits, temperature, seed_words, steps)
    best = scores.max(-1).values
    got = scores.gather(1, tokens.unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(got, best, atol=1e-4, rtol=1e-5)  # scores are O(10)
    assert (tokens == expected).float().mean() >= 0.9  # differences only at near-exact ties


def test_uniform_bits_and_noise_match_seeded_exponential():
    seed_words = torch.tensor(
        [[0, 0], [7, 0], [2**32 - 1, 5], [123_456_789, 2**32 - 1], [2**31, 2**31], [7, 0]], device=DEVICE
    )
    steps = torch.tensor([0, 0, 3, 2**32 - 1, 17, 1], device=DEVICE)
    vocab = 4099
    bits = seeded_uniform_bits(seed_words, steps, vocab)  # [S, V] int64
    assert bits.shape == (6, vocab) and bits.min() >= 0 and bits.max() < 2**23
    uniform = (bits.to(torch.float32) + 0.5) * UNIFORM_SCALE  # exact in float32
    # The noise is -log(u) of these very uniforms. Compared to the float64 value within a few
    # float32 ulps, not bit for bit: torch's float32 log can differ in the last ulp between
    # processes (its vectorized and scalar paths), while a wrong formula (no +0.5, another
    # shift or log base) is off by orders of magnitude more on some of the 24k elements.
    exact = uniform.double().log().neg()
    torch.testing.assert_close(seeded_exponential(seed_words, steps, vocab).double(), exact,
                               rtol=NOISE_RTOL, atol=0)
    assert not torch.equal(bits[1], bits[5])  # the step changes the noise


def test_noise_alone_decides_on_equal_logits():
    """All logits equal: the token is argmax of the noise's uniform, a strict test of the hash."""
    num_rows, vocab = 6, 3000
    logits = torch.full((num_rows, vocab), 1.5, device=DEVICE)
    temperature = torch.tensor([0.6, 1.0, 2.5] * 2, device=DEVICE)
    seed_words = torch.tensor([[i * 977, i % 2] for i in range(num_rows)], device=DEVICE)
    steps = torch.arange(num_rows, device=DEVICE) * 5
    tokens = fused_sample(logits, temperature, seed_words, steps)
    assert torch.equal(tokens, reference.fused_sample_reference(logits, temperature, seed_words, steps))
    # and directly: the largest uniform wins (-log(-log u) is increasing in u)
    assert torch.equal(tokens, seeded_uniform_bits(seed_words, steps, vocab).argmax(-1))
    assert len(set(tokens.tolist())) == num_rows


@pytest.mark.parametrize("dtype", PRECISIONS_CPU_FP16)
@pytest.mark.parametrize("vocab", [1000, 4099])
@pytest.mark.parametrize("num_rows", [1, 3, 7])
def test_fused_sample_matches_reference(num_rows, vocab, dtype):
    if large_shapes(dtype):
        num_rows, vocab = num_rows * 37, LLM_VOCAB if vocab == 4099 else vocab
    inputs = make_inputs(num_rows, vocab, dtype, seed=num_rows * vocab)
    check_choice(fused_sample(*inputs), *inputs)


@pytest.mark.parametrize("block_v", [128, 1024])
def test_many_chunks_and_strided_rows(block_v):
    """Small blocks: many chunks per row (the pick stage's tiles); rows with stride > V."""
    logits, temperature, seed_words, steps = make_inputs(5, 2500, torch.float32, seed=11)
    wide = torch.full((5, 3000), float("nan"), device=DEVICE)
    wide[:, :2500] = logits
    tokens = fused_sample(wide[:, :2500], temperature, seed_words, steps, block_v=block_v)
    check_choice(tokens, logits, temperature, seed_words, steps)
    assert torch.equal(tokens, fused_sample(logits, temperature, seed_words, steps))


def test_ties_pick_the_smallest_index_and_inf_rows():
    vocab = 4099
    logits = torch.zeros(5, vocab, device=DEVICE)
    logits[0, [3000, 10, 1500, 4098]] = 5.0  # greedy, tie across chunks -> 10
    logits[1, [7, 5]] = 5.0  # greedy, tie inside a chunk -> 5
    logits[2] = float("-inf")  # greedy, all -inf -> 0 (torch.argmax)
    logits[3] = float("-inf")
    logits[3, 2222] = 0.0  # sampled, a single finite logit -> it
    logits[4] = float("-inf")
    logits[4, [1300, 4097]] = 0.0  # sampled, two finite logits -> one of them
    temperature = torch.tensor([0.0, 0.0, 0.0, 0.8, 1.2], device=DEVICE)
    seed_words = torch.tensor([[1, 2]] * 5, device=DEVICE)
    steps = torch.zeros(5, dtype=torch.int64, device=DEVICE)
    for block_v in (512, 2048):
        tokens = fused_sample(logits, temperature, seed_words, steps, block_v=block_v).tolist()
        assert tokens[:4] == [10, 5, 0, 2222]
        assert tokens[4] in (1300, 4097)
        assert tokens == reference.fused_sample_reference(logits, temperature, seed_words, steps).tolist()


GREEDY_SHAPES_CPU = [(1, 1), (3, 100), (2, 4099), (5, 3000)]
GREEDY_SHAPES_GPU = [(1, LLM_VOCAB), (7, LLM_VOCAB), (256, LLM_VOCAB), (3, 100)]


@pytest.mark.parametrize("dtype", PRECISIONS_CPU_FP16)
@pytest.mark.parametrize("shape", GREEDY_SHAPES_GPU if HAS_CUDA else GREEDY_SHAPES_CPU, ids=str)
def test_greedy_argmax_matches_torch(shape, dtype):
    logits = make_inputs(*shape, dtype, seed=shape[0] * 7 + shape[1])[0]
    assert torch.equal(greedy_argmax(logits), logits.argmax(-1))
    # a strided row view (the rows of a wider buffer) and small chunks give the same answer
    wide = torch.full((shape[0], shape[1] + 64), 1e4, device=DEVICE, dtype=dtype)
    wide[:, : shape[1]] = logits
    assert torch.equal(greedy_argmax(wide[:, : shape[1]], block_v=512), logits.argmax(-1))


def test_greedy_argmax_ties_and_inf_rows():
    logits = torch.zeros(3, 4099, device=DEVICE)
    logits[0, [3000, 10, 1500, 4098]] = 5.0  # tie across chunks -> 10
    logits[1, [7, 5]] = 5.0  # tie inside a chunk -> 5
    logits[2] = float("-inf")  # all -inf -> 0 (torch.argmax)
    for block_v in (512, 2048):
        assert greedy_argmax(logits, block_v=block_v).tolist() == [10, 5, 0]
    with pytest.raises(ValueError, match="logits"):
        greedy_argmax(logits.t())
    assert greedy_argmax(logits[:0]).shape == (0,)


def test_bad_inputs_are_refused():
    logits, temperature, seed_words, steps = make_inputs(3, 100, torch.float32, seed=1)
    with pytest.raises(ValueError, match="temperature"):
        fused_sample(logits, temperature.double(), seed_words, steps)
    with pytest.raises(ValueError, match="seed_words"):
        fused_sample(logits, temperature, seed_words[:2], steps)
    with pytest.raises(ValueError, match="logits"):
        fused_sample(logits.t(), temperature, seed_words, steps)
    assert fused_sample(logits[:0], temperature[:0], seed_words[:0], steps[:0]).shape == (0,)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_graph_replay_matches_eager(dtype):
    """No host sync inside: the call captures into a CUDA graph and replays with new inputs."""
    logits, temperature, seed_words, steps = make_inputs(64, LLM_VOCAB, dtype, seed=3)
    fused_sample(logits, temperature, seed_words, steps)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fused_sample(logits, temperature, seed_words, steps)
    new = make_inputs(64, LLM_VOCAB, dtype, seed=4)
    for dst, src in zip((logits, temperature, seed_words, steps), new):
        dst.copy_(src)
    graph.replay()
    assert torch.equal(captured, fused_sample(*new))

