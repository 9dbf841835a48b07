"""Triton fused temperature sampling: raw logits [B, V] -> one token per row, one pass.

Why. Sampling at temperature T the unfused way (`Sampler`'s torch path) copies the logits
to fp32, divides by T, takes a softmax, draws Exp(1) noise, divides and takes an argmax:
about eight passes over a [B, V] fp32 tensor (~0.9 ms per decode step for 256 rows of a
152k vocabulary). The exponential race needs none of them materialised:

    argmax_v p_v / E_v  =  argmax_v (l_v / T - log E_v),      E_v ~ Exp(1) i.i.d.

(the softmax normaliser is a per-row constant; log is monotonic). So each element is read
once in its own dtype, its noise is computed in registers from a counter-based hash, and
only a running (best score, its index) per chunk is written.

Noise. E_v = -log(u_v) with u_v bit-identical to `counter_rng.seeded_exponential`: the row key
is `hash(hash(hash(seed_lo ^ SEED_SALT) ^ seed_hi) ^ step)`, the element's bits are
`hash(hash(v + TOKEN_SALT) ^ key)`, u = (top 23 bits + 0.5) / 2^23 ('lowbias32' hash on
uint32, whose arithmetic wraps mod 2^32 -- what the torch version emulates in int64). A
seeded request therefore draws the same tokens through this kernel as through the torch
path (up to the last-ulp rounding of l / T and of the logs, which only matters for
near-exact ties of the score). The row key is hashed in-kernel: three scalar hashes per
program, no extra launches.

Two stages, no host sync (CUDA-graph safe): programs (row, chunk) each write the best
score of their BLOCK_V tokens and its index to [B, num_chunks] buffers; a second kernel
then picks each row's best chunk (skipped when a row is a single chunk). Ties go to the
smallest token index at both stages (torch.argmax's first occurrence). Rows with
temperature <= 0 are greedy: the score is the raw logit, and a tile with no sampled row
computes no noise. Small vocabularies (tests, tiny models) put several rows in one program,
like rmsnorm; an LLM vocabulary is one row per program.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nanovllm.kernels import counter_rng
from nanovllm.kernels.launch_math import cdiv, next_pow2

BLOCK_V = 2048  # most tokens of one row per stage-1 program: 75 chunks for a 152k vocabulary
TILE_ELEMENTS = 2048  # elements per program: rows of a small vocabulary share one (tests, tiny models)
NUM_WARPS = 4

# The hash constants as compile-time uint32 literals (values above 2^31 are typed uint32,
# the smaller ones int32, which uint32 arithmetic promotes to uint32).
HASH_MUL_1 = tl.constexpr(counter_rng.HASH_MUL_1)
HASH_MUL_2 = tl.constexpr(counter_rng.HASH_MUL_2)
SEED_SALT = tl.constexpr(counter_rng.SEED_SALT)
TOKEN_SALT = tl.constexpr(counter_rng.TOKEN_SALT)
UNIFORM_SHIFT = tl.constexpr(32 - counter_rng.UNIFORM_BITS)  # keep the top 23 bits
UNIFORM_SCALE = tl.constexpr(2.0**-counter_rng.UNIFORM_BITS)


@triton.jit
def _hash32(x):
    """'lowbias32' on uint32 (wrapping multiplies): `counter_rng.hash32_`."""
    x ^= x >> 16
    x *= HASH_MUL_1
    x ^= x >> 15
    x *= HASH_MUL_2
    x ^= x >> 16
    return x


@triton.jit
def _row_keys(seed_ptr, stride_seed, stride_word, step_ptr, stride_step, rows, row_mask):
    """uint32 keys [ROWS] from each row's seed words (low, high) and step: `seeded_exponential`'s chain."""
    low = tl.load(seed_ptr + rows * stride_seed, mask=row_mask, other=0).to(tl.uint32)
    high = tl.load(seed_ptr + rows * stride_seed + stride_word, mask=row_mask, other=0).to(tl.uint32)
    step = tl.load(step_ptr + rows * stride_step, mask=row_mask, other=0).to(tl.uint32)
    key = _hash32(low ^ SEED_SALT)
    key = _hash32(key ^ high)
    return _hash32(key ^ step)


@triton.jit
def _uniform_bits(cols, keys):
    """Top-23-bit integers k [ROWS, BLOCK] (uint32) of the elements' hashes: u = (k + 0.5) / 2^23."""
    token = _hash32(cols.to(tl.uint32) + TOKEN_SALT)  # [BLOCK]
    return _hash32(token[None, :] ^ keys[:, None]) >> UNIFORM_SHIFT


@triton.jit(do_not_specialize=["num_rows"])  # varies every step: no recompiles
def _sample_chunk_kernel(
    logits_ptr,  # [B, V] (row stride stride_logits), any float dtype
    temp_ptr,  # [B] fp32, <= 0 = greedy row
    seed_ptr,  # [B, 2] int64, 32-bit words (low, high)
    step_ptr,  # [B] int64
    best_val_ptr,  # [B, num_chunks] fp32
    best_idx_ptr,  # [B, num_chunks] int64
    num_rows,
    stride_logits,
    stride_seed, stride_word,
    stride_step,
    V,
    num_chunks,
    BLOCK: tl.constexpr,  # tokens per program
    ROWS: tl.constexpr,  # rows per program (1 for an LLM vocabulary)
    ALL_GREEDY: tl.constexpr,  # every row greedy: temperature, seeds and steps are never read
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # [ROWS]
    chunk = tl.program_id(1)
    cols = chunk * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] token ids
    row_mask = rows < num_rows
    mask = row_mask[:, None] & (cols < V)[None, :]  # [ROWS, BLOCK]
    offsets = rows[:, None] * stride_logits + cols[None, :]
    logits = tl.load(logits_ptr + offsets, mask=mask, other=float("-inf")).to(tl.float32)
    if ALL_GREEDY:
        score = logits
    else:
        score = _race_scores(logits, temp_ptr, seed_ptr, stride_seed, stride_word, step_ptr, stride_step,
                             rows, row_mask, cols)
    score = tl.where(mask, score, float("-inf"))
    best, best_col = tl.max(score, 1, return_indices=True, return_indices_tie_break_left=True)  # [ROWS]
    out = rows * num_chunks + chunk
    tl.store(best_val_ptr + out, best, mask=row_mask)
    tl.store(best_idx_ptr + out, (chunk * BLOCK + best_col).to(tl.int64), mask=row_mask)


@triton.jit
def _race_scores(logits, temp_ptr, seed_ptr, stride_seed, stride_word, step_ptr, stride_step, rows, row_mask, cols):
    """[ROWS, BLOCK] scores whose row argmax is the token: l / T - log E on sampled rows, l on greedy ones."""
    temperature = tl.load(temp_ptr + rows, mask=row_mask, other=0.0)  # [ROWS]
    sampled = temperature > 0.0
    if tl.max(sampled.to(tl.int32), 0) > 0:  # some row of the tile samples (else: all greedy, no noise)
        keys = _row_keys(seed_ptr, stride_seed, stride_word, step_ptr, stride_step, rows, row_mask)
        uniform = (_uniform_bits(cols, keys).to(tl.float32) + 0.5) * UNIFORM_SCALE  # exact, in (0, 1)
        exp_noise = -tl.log(uniform)  # Exp(1), > 0
        # IEEE division (plain `/` is approximate on NVIDIA): l / T rounds like torch's
        scaled = tl.math.div_rn(logits, tl.where(sampled, temperature, 1.0)[:, None])
        score = tl.where(sampled[:, None], scaled - tl.log(exp_noise), logits)
    else:
        score = logits
    return score


@triton.jit(do_not_specialize=["num_rows"])
def _pick_chunk_kernel(
    best_val_ptr,  # [B, num_chunks] fp32
    best_idx_ptr,  # [B, num_chunks] int64
    out_ptr,  # [B] int64
    num_rows,
    num_chunks,
    BLOCK_C: tl.constexpr,  # next_pow2(num_chunks)
    ROWS: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # [ROWS]
    c = tl.arange(0, BLOCK_C)
    row_mask = rows < num_rows
    mask = row_mask[:, None] & (c < num_chunks)[None, :]
    # padding lanes come last, so an all -inf row still picks chunk 0's (first) index
    vals = tl.load(best_val_ptr + rows[:, None] * num_chunks + c[None, :], mask=mask, other=float("-inf"))
    _, best_chunk = tl.max(vals, 1, return_indices=True, return_indices_tie_break_left=True)  # [ROWS]
    token = tl.load(best_idx_ptr + rows * num_chunks + best_chunk, mask=row_mask, other=0)
    tl.store(out_ptr + rows, token, mask=row_mask)


@triton.jit(do_not_specialize=["num_rows"])
def _uniform_bits_kernel(
    seed_ptr, step_ptr, out_ptr,  # [B, 2] int64, [B] int64, [B, V] int64 (contiguous)
    num_rows,
    stride_seed, stride_word, stride_step,
    V,
    BLOCK: tl.constexpr,
    ROWS: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # [ROWS]
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    row_mask = rows < num_rows
    keys = _row_keys(seed_ptr, stride_seed, stride_word, step_ptr, stride_step, rows, row_mask)
    bits = _uniform_bits(cols, keys)  # [ROWS, BLOCK]
    mask = row_mask[:, None] & (cols < V)[None, :]
    tl.store(out_ptr + rows[:, None] * V + cols[None, :], bits.to(tl.int64), mask=mask)


def _check_inputs(temperature, seed_words, steps, num_rows: int, device: torch.device) -> None:
    for name, t, shape, dtype in (
        ("temperature", temperature, (num_rows,), torch.float32),
        ("seed_words", seed_words, (num_rows, 2), torch.int64),
        ("steps", steps, (num_rows,), torch.int64),
    ):
        if t is None:
            continue
        if tuple(t.shape) != shape or t.dtype != dtype or t.device != device:
            raise ValueError(
                f"{name} must be a {dtype} tensor of shape {shape} on {device}, "
                f"got {t.dtype} {tuple(t.shape)} on {t.device}"
            )


def fused_sample(
    logits: torch.Tensor,  # [B, V] bf16 / fp16 / fp32, last dim contiguous; never modified
    temperature: torch.Tensor,  # [B] fp32, <= 0 = greedy row
    seed_words: torch.Tensor,  # [B, 2] int64 (low, high) 32-bit words of each row's seed
    steps: torch.Tensor,  # [B] int64 in [0, 2^32), the seed's step
    block_v: int = BLOCK_V,
) -> torch.Tensor:
    """[B] int64: argmax of l on greedy rows, else argmax_v (l_v / T - log E_v) with
    E_v = `seeded_exponential(seed_words, steps, V)[row, v]` (see `reference.fused_sample_reference`)."""
    if logits.dim() != 2 or logits.stride(-1) != 1:
        raise ValueError(f"logits must be [B, V] with a contiguous last dim, got {tuple(logits.shape)}")
    num_rows, vocab = logits.shape
    if vocab == 0:
        raise ValueError("fused_sample needs a non-empty vocabulary")
    _check_inputs(temperature, seed_words, steps, num_rows, logits.device)
    return _two_stage_argmax(logits, temperature, seed_words, steps, block_v)


def greedy_argmax(logits: torch.Tensor, block_v: int = BLOCK_V) -> torch.Tensor:
    """[B] int64 `logits.argmax(-1)` (ties: smallest index) in the sampler's two stages.

    Why not torch.argmax: for the few long rows of a small decode batch it reduces each row
    in one thread block (~8 us for a 152k vocabulary on an H200); here a row is split over
    ~75 programs and a second tiny kernel picks the best chunk."""
    if logits.dim() != 2 or logits.stride(-1) != 1:
        raise ValueError(f"logits must be [B, V] with a contiguous last dim, got {tuple(logits.shape)}")
    if logits.shape[1] == 0:
        raise ValueError("greedy_argmax needs a non-empty vocabulary")
    return _two_stage_argmax(logits, None, None, None, block_v)


def _two_stage_argmax(logits, temperature, seed_words, steps, block_v: int) -> torch.Tensor:
    """Stage 1 (best of each chunk of each row) and stage 2 (best chunk); no noise inputs = greedy."""
    num_rows, vocab = logits.shape
    all_greedy = temperature is None
    if all_greedy:  # placeholders, never read under ALL_GREEDY
        temperature = seed_words = steps = logits
        seed_strides = (0, 0)
    else:
        seed_strides = (seed_words.stride(0), seed_words.stride(1))
    out = torch.empty(num_rows, dtype=torch.int64, device=logits.device)
    if num_rows == 0:
        return out
    block = min(block_v, next_pow2(vocab))
    num_chunks = cdiv(vocab, block)
    rows = max(1, min(TILE_ELEMENTS // block, next_pow2(num_rows)))
    best_val = torch.empty(num_rows, num_chunks, dtype=torch.float32, device=logits.device)
    # one chunk per row: stage 1's index is the answer, written straight into `out`
    best_idx = out.view(num_rows, 1) if num_chunks == 1 else torch.empty_like(best_val, dtype=torch.int64)
    _sample_chunk_kernel[(cdiv(num_rows, rows), num_chunks)](
        logits, temperature, seed_words, steps, best_val, best_idx, num_rows,
        logits.stride(0), *seed_strides, 0 if all_greedy else steps.stride(0),
        vocab, num_chunks, BLOCK=block, ROWS=rows, ALL_GREEDY=all_greedy, num_warps=NUM_WARPS,
    )
    if num_chunks > 1:
        block_c = next_pow2(num_chunks)
        rows_c = max(1, min(TILE_ELEMENTS // block_c, next_pow2(num_rows)))
        _pick_chunk_kernel[(cdiv(num_rows, rows_c),)](
            best_val, best_idx, out, num_rows, num_chunks, BLOCK_C=block_c, ROWS=rows_c, num_warps=NUM_WARPS
        )
    return out


def seeded_uniform_bits(seed_words: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Debug twin of the kernel's noise: [B, V] int64 top-23-bit hashes k, u = (k + 0.5) / 2^23.

    Bit-for-bit what `fused_sample` draws; tests compare it with `counter_rng.seeded_exponential`.
    """
    num_rows = seed_words.shape[0]
    _check_inputs(None, seed_words, steps, num_rows, seed_words.device)
    out = torch.empty(num_rows, vocab_size, dtype=torch.int64, device=seed_words.device)
    if num_rows == 0 or vocab_size == 0:
        return out
    block = min(BLOCK_V, next_pow2(vocab_size))
    rows = max(1, min(TILE_ELEMENTS // block, next_pow2(num_rows)))
    _uniform_bits_kernel[(cdiv(num_rows, rows), cdiv(vocab_size, block))](
        seed_words, steps, out, num_rows, seed_words.stride(0), seed_words.stride(1), steps.stride(0),
        vocab_size, BLOCK=block, ROWS=rows, num_warps=NUM_WARPS,
    )
    return out
