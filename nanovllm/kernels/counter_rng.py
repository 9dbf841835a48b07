"""Counter-based random numbers for seeded sampling: Exp(1) noise that is a pure function of
(seed, step, token id), in torch (this file) and bit-identically in Triton (`sampling.py`).

Why. One `torch.Generator` per seeded request is slow and its draws depend on the batch;
hashing the counter instead gives every seeded row its own reproducible stream whatever
else is in the batch, on any device. The hash is Chris Wellons' 'lowbias32' on uint32
values held in int64 tensors, so every intermediate product stays below 2^63 and nothing
relies on integer overflow. The constants are shared with the Triton kernel.
"""

from __future__ import annotations

import functools

import torch

MASK32 = 0xFFFF_FFFF
MASK64 = 0xFFFF_FFFF_FFFF_FFFF
HASH_MUL_1 = 0x7FEB_352D  # 'lowbias32' multipliers
HASH_MUL_2 = 0x846C_A68B
SEED_SALT = 0x9E37_79B9  # 2^32 / golden ratio: keeps seed 0 away from the hash's fixed point 0
TOKEN_SALT = 0x85EB_CA6B  # keeps token 0 away from the hash's fixed point 0
# float32 has a 24-bit significand: (k + 0.5) / 2^23 for k < 2^23 is exact and strictly inside (0, 1),
# so -log(u) is never 0 or inf.
UNIFORM_BITS = 23


def _mul32_(x: torch.Tensor, c: int) -> torch.Tensor:
    """x = (x * c) mod 2^32 in place, for uint32 values in int64: the product is split in
    16-bit halves so no intermediate reaches 2^63 (no reliance on integer overflow)."""
    high = x * (c >> 16)
    high.bitwise_and_(0xFFFF).bitwise_left_shift_(16)  # (x * c_high mod 2^16) * 2^16
    return x.mul_(c & 0xFFFF).add_(high).bitwise_and_(MASK32)


def hash32_(x: torch.Tensor) -> torch.Tensor:
    """'lowbias32' in place: a bijection on uint32 with near-ideal avalanche."""
    x ^= x >> 16
    _mul32_(x, HASH_MUL_1)
    x ^= x >> 15
    _mul32_(x, HASH_MUL_2)
    x ^= x >> 16
    return x


def hash32(x: torch.Tensor) -> torch.Tensor:
    return hash32_(x.clone())


@functools.lru_cache(maxsize=8)
def token_hashes(vocab_size: int, device: torch.device) -> torch.Tensor:
    """hash(token id) [V] int64, computed once per (vocab, device): the per-token half of the hash.
    (A cache of a pure function's value: nothing in it depends on who asked first.)"""
    token = torch.arange(vocab_size, dtype=torch.int64, device=device)
    return hash32_(token.add_(TOKEN_SALT).bitwise_and_(MASK32))


def seeded_exponential(seed_words: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Exp(1) noise [S, V] that depends only on (seed, step, token id): batch- and device-independent.

    seed_words: [S, 2] int64 (low, high 32-bit words of the seed); steps: [S] int64.
    The row key is a chain of hashes over (seed, step); each element is one more hash round
    of (hash(token) XOR key). Keying by XOR with a hashed token id, not by adding the key to
    the raw id, keeps rows with different keys from getting shifted copies of one sequence.
    """
    key = hash32(seed_words[:, 0] ^ SEED_SALT)
    key = hash32_(key ^ seed_words[:, 1])
    key = hash32_(key ^ steps)  # [S]
    bits = hash32_(token_hashes(vocab_size, seed_words.device).unsqueeze(0) ^ key.unsqueeze(1))  # [S, V]
    uniform = bits.bitwise_right_shift_(32 - UNIFORM_BITS).to(torch.float32)
    uniform.add_(0.5).mul_(2.0**-UNIFORM_BITS)  # (k + 0.5) / 2^23: inside (0, 1)
    return uniform.log_().neg_()


def seed_words_of(seed: int) -> tuple[int, int]:
    """A Python int seed (negative ones included) as its (low, high) 32-bit words."""
    seed &= MASK64
    return seed & MASK32, seed >> 32
