"""Batched sampler: the last-position logits of each request -> one next token per request.

Every step runs the same sequence of tensor ops over the whole batch (vLLM's order):

  0. logprobs (only if some request asked) from the RAW model distribution:
     `log_softmax(logits)` of the logits exactly as the model produced them, before
     bias, penalties, temperature or truncation.
  0b. grammar mask:      rows with a structured-output grammar: l[t] = -inf for tokens it
                         does not allow (in place on `logits`, so every path below sees it)
  1. logit_bias:         l[t] += bias[t]
  2. min_tokens:         while len(output) < min_tokens, l[t] = -inf for t in EOS ids ∪ stop_token_ids
  3. penalties:          repetition over prompt ∪ output: l > 0 ? l / r : l * r;
                         then l[t] -= frequency * count_out(t) + presence * (count_out(t) > 0)
  4. greedy rows:        argmax of the processed logits (temperature and truncation are skipped)
  5. temperature:        l /= T
  6. top_k:              keep the k largest logits
  7. top_p:              on the distribution left by top_k (renormalised), keep the smallest
                         prefix of the sorted tokens whose mass reaches top_p (top token always kept)
  8. min_p:              drop tokens with p < min_p * p_max
  9. sample:             exponential race `argmax(p / E)`, E ~ Exp(1) i.i.d. per token

Steps 6-8 work on logits through per-row thresholds (ties at a threshold are kept).
Nothing here syncs with the host: per-batch decisions (which steps run, the top-k bound)
are plain Python values computed in `SamplingBatch.build`.

Per-request seeds: a seeded row's Exp(1) noise is a pure function of (seed, step, token id),
computed on the device by a counter-based integer hash (`seeded_exponential`), so a seeded
request samples the same tokens whatever else is in the batch and whatever its row. `step` is
the number of output tokens the request already has. Unseeded rows use the global torch RNG.

Fused fast path. When a batch needs nothing but temperature and the race (no bias,
min_tokens, penalties, top-k, top-p, min-p or logprobs: `SamplingBatch.fast_path_ok`) and
the logits are on CUDA (`Sampler(use_triton=...)` forces it on or off), steps 5 and 9 run as
one Triton pass over the raw logits (`kernels.sampling.fused_sample`), using
argmax_v p_v / E_v = argmax_v (l_v / T - log E_v): no float32 copy, no softmax, no [B, V]
noise tensor. Its noise is always the counter hash: seeded rows use their (seed, step), so
they draw the same tokens as on the torch path (barring last-ulp ties of the score); the
other rows get a fresh random seed per step from the global CPU generator (one small
host-to-device copy, no sync), so they follow the same distribution but not the torch
path's draws. Greedy rows of such a batch are the kernel's argmax of the raw logits;
all-greedy batches are a bare argmax (the same two-stage kernel without noise on CUDA).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from nanovllm.sampling_params import SamplingParams
from nanovllm.worker.structured_output import apply_token_bitmask_

NEG_INF = float("-inf")

# ---- counter-based hash for seeded rows (all values are uint32 held in int64 tensors, so
# every intermediate product stays below 2^63 and nothing relies on integer overflow).
_MASK32 = 0xFFFF_FFFF
_MASK64 = 0xFFFF_FFFF_FFFF_FFFF
_HASH_MUL_1 = 0x7FEB_352D  # Chris Wellons' "lowbias32" multipliers
_HASH_MUL_2 = 0x846C_A68B
_SEED_SALT = 0x9E37_79B9  # 2^32 / golden ratio: keeps seed 0 away from the hash's fixed point 0
_TOKEN_SALT = 0x85EB_CA6B  # keeps token 0 away from the hash's fixed point 0
# float32 has a 24-bit significand: (k + 0.5) / 2^23 for k < 2^23 is exact and strictly inside (0, 1),
# so -log(u) is never 0 or inf.
_UNIFORM_BITS = 23

# Prompt logprobs of a long prompt are computed in row chunks to bound the [P, V] float32 temporaries.
PROMPT_LOGPROBS_CHUNK_ROWS = 1024


# ----------------------------------------------------------------------------- batch description


def to_device_async(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor -> device without waiting for the device's queued work.

    A blocking copy (`torch.tensor(..., device="cuda")`) synchronizes the stream, which would
    stall the host until the step in flight finishes and undo async scheduling. A
    non-blocking copy from pageable memory is staged by the driver before it returns, so
    the source may be freed right away.
    """
    return t.to(device, non_blocking=True)



@dataclass
class PenaltyTensors:
    """Penalty inputs of the rows that use repetition / frequency / presence penalties."""

    rows: Optional[torch.Tensor]  # [R] int64 rows of the batch; None = every row, in order
    repetition: torch.Tensor  # [R, 1] float32
    frequency: torch.Tensor  # [R, 1] float32
    presence: torch.Tensor  # [R, 1] float32
    seen: torch.Tensor  # [R, V] bool, token occurs in prompt ∪ output (repetition penalty)
    output_counts: torch.Tensor  # [R, V] float32, occurrences in the output (frequency / presence)


@dataclass
class SamplingBatch:
    """Per-request sampling parameters of one step, as tensors on the logits' device.

    Built on the host by `build`, which loops over requests once and leaves every field a
    step does not need at None, so the sampler can skip that step entirely (an all-greedy
    batch without bias, penalties or min_tokens is a bare argmax).
    """

    num_rows: int
    vocab_size: int
    # ---- greedy / temperature
    all_greedy: bool
    greedy_mask: Optional[torch.Tensor]  # [B] bool; None unless greedy and sampled rows are mixed
    temperature: Optional[torch.Tensor]  # [B, 1] float32 (1.0 on greedy rows); None if all are 1.0
    # ---- truncation (greedy rows are always 'off')
    top_k: Optional[torch.Tensor]  # [B] int64, vocab_size = off; None when no row uses top-k
    max_top_k: int  # largest k in use: the bound of torch.topk
    top_p: Optional[torch.Tensor]  # [R] float32 for the rows in top_p_rows; None when unused
    top_p_rows: Optional[torch.Tensor]  # [R] int64; None = every row
    top_p_num_candidates: int  # > 0: every top-p row also has top_k <= this, so sort only the top-k
    log_min_p: Optional[torch.Tensor]  # [B, 1] float32 log(min_p), -inf = off; None when unused
    # ---- logits processors (steps 1-3)
    bias_rows: Optional[torch.Tensor]  # [N] int64
    bias_token_ids: Optional[torch.Tensor]  # [N] int64
    bias_values: Optional[torch.Tensor]  # [N] float32
    banned_rows: Optional[torch.Tensor]  # [M] int64 (min_tokens: EOS / stop ids forced to -inf)
    banned_token_ids: Optional[torch.Tensor]  # [M] int64
    penalties: Optional[PenaltyTensors]
    # ---- seeds
    seeded_rows: Optional[torch.Tensor]  # [S] int64 rows with a seed (sampled rows only)
    seed_words: Optional[torch.Tensor]  # [S, 2] int64, the seed as (low, high) 32-bit words
    seed_steps: Optional[torch.Tensor]  # [S] int64, output tokens generated so far
    all_seeded: bool  # every row is seeded (seeded_rows == arange(B)): no global RNG draw
    # ---- logprobs
    max_num_logprobs: Optional[int]  # None = no request asked; K of the top-K alternatives
    # ---- fused fast path (temperature + exponential race only)
    fast_path_ok: bool = False  # no processors, top-k, top-p, min-p or logprobs in the batch
    sample_temperature: torch.Tensor | None = None  # [B] float32, 0 on greedy rows; only when fast_path_ok
    # ---- structured outputs (set by the model runner; None when no row has a grammar)
    grammar_bitmask: Optional[torch.Tensor] = None  # [R, ceil(V / 32)] int32, bit set = token allowed
    grammar_rows: Optional[torch.Tensor] = None  # [R] int64, the batch row of each bitmask row

    @property
    def needs_logits_processing(self) -> bool:
        """Whether steps 1-3 change anything."""
        return self.bias_rows is not None or self.banned_rows is not None or self.penalties is not None

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams],
        prompt_token_ids: Sequence[Sequence[int]],
        output_token_ids: Sequence[Sequence[int]],
        eos_token_ids: Sequence[int],
        vocab_size: int,
        device: torch.device,
        num_output_tokens: Optional[Sequence[int]] = None,
    ) -> "SamplingBatch":
        """Gather the parameters of one step's requests (row i = request i) into tensors.

        `output_token_ids[i]` are the tokens request i generated so far: their values feed
        the penalties. Their count is the min_tokens progress and the seed's step, unless
        `num_output_tokens` says otherwise (async scheduling: a token sampled by the step
        still on the GPU is counted but its value is not known yet).
        """
        num_rows = len(params)
        if num_output_tokens is None:
            num_output_tokens = [len(ids) for ids in output_token_ids]
        if len(prompt_token_ids) != num_rows or len(output_token_ids) != num_rows:
            raise ValueError(
                f"got {num_rows} SamplingParams but {len(prompt_token_ids)} prompts and "
                f"{len(output_token_ids)} outputs; pass one of each per request"
            )

        def tensor(data, dtype):
            return to_device_async(torch.tensor(data, dtype=dtype), device)

        greedy = [p.is_greedy for p in params]
        all_greedy = all(greedy)
        sampled = [i for i, g in enumerate(greedy) if not g]  # rows that draw a random token

        # ---- greedy / temperature
        greedy_mask = tensor(greedy, torch.bool) if sampled and len(sampled) < num_rows else None
        temperature = None
        if any(params[i].temperature != 1.0 for i in sampled):
            temperature = tensor([[1.0 if g else p.temperature] for p, g in zip(params, greedy)], torch.float32)

        # ---- top-k: k >= vocab_size keeps everything, so it counts as off
        ks = [0] * num_rows
        for i in sampled:
            k = params[i].effective_top_k
            ks[i] = k if k < vocab_size else 0
        max_top_k = max(ks, default=0)
        top_k = tensor([k or vocab_size for k in ks], torch.int64) if max_top_k else None

        # ---- top-p: only its rows are sorted, and only their top-k candidates when all have one
        p_rows = [i for i in sampled if params[i].top_p < 1.0]
        top_p = top_p_rows = None
        top_p_num_candidates = 0
        if p_rows:
            top_p = tensor([params[i].top_p for i in p_rows], torch.float32)
            if len(p_rows) < num_rows:
                top_p_rows = tensor(p_rows, torch.int64)
            if all(ks[i] for i in p_rows):
                top_p_num_candidates = max(ks[i] for i in p_rows)

        # ---- min-p, as a log threshold on logits (p_i < min_p * p_max  <=>  l_i - l_max < log min_p)
        log_min_p = None
        if any(params[i].min_p > 0.0 for i in sampled):
            log_min_p = tensor(
                [[math.log(p.min_p) if (not g and p.min_p > 0.0) else NEG_INF] for p, g in zip(params, greedy)],
                torch.float32,
            )

        # ---- logit bias and min_tokens, as sparse (row, token) lists
        bias_rows, bias_ids, bias_vals = [], [], []
        banned_rows, banned_ids = [], []
        for i, p in enumerate(params):
            if p.logit_bias:
                for tid, value in p.logit_bias.items():
                    if tid >= vocab_size:
                        raise ValueError(f"logit_bias token id {tid} is outside the vocabulary (size {vocab_size})")
                    bias_rows.append(i)
                    bias_ids.append(tid)
                    bias_vals.append(value)
            if num_output_tokens[i] < p.min_tokens:
                stop_ids = {t for t in (*eos_token_ids, *p.stop_token_ids) if t < vocab_size}
                banned_rows.extend([i] * len(stop_ids))
                banned_ids.extend(stop_ids)
        has_bias, has_ban = bool(bias_rows), bool(banned_rows)

        # ---- seeds (greedy rows ignore theirs)
        seeded = [i for i in sampled if params[i].seed is not None]
        seeded_rows = seed_words = seed_steps = None
        if seeded:
            seeded_rows = tensor(seeded, torch.int64)
            words = []
            for i in seeded:
                seed = params[i].seed & _MASK64  # any Python int, negative ones included
                words.append([seed & _MASK32, seed >> 32])
            seed_words = tensor(words, torch.int64)
            seed_steps = tensor([num_output_tokens[i] & _MASK32 for i in seeded], torch.int64)

        asked = [p.logprobs for p in params if p.logprobs is not None]
        penalties = _build_penalties(params, prompt_token_ids, output_token_ids, vocab_size, device)

        # ---- fused fast path: only temperature and the exponential race are left to do
        fast_path_ok = not (has_bias or has_ban or penalties is not None or max_top_k or p_rows or asked)
        fast_path_ok = fast_path_ok and log_min_p is None
        sample_temperature = None
        if fast_path_ok and not all_greedy:
            sample_temperature = tensor([0.0 if g else p.temperature for p, g in zip(params, greedy)], torch.float32)

        return cls(
            num_rows=num_rows,
            vocab_size=vocab_size,
            all_greedy=all_greedy,
            greedy_mask=greedy_mask,
            temperature=temperature,
            top_k=top_k,
            max_top_k=max_top_k,
            top_p=top_p,
            top_p_rows=top_p_rows,
            top_p_num_candidates=top_p_num_candidates,
            log_min_p=log_min_p,
            bias_rows=tensor(bias_rows, torch.int64) if has_bias else None,
            bias_token_ids=tensor(bias_ids, torch.int64) if has_bias else None,
            bias_values=tensor(bias_vals, torch.float32) if has_bias else None,
            banned_rows=tensor(banned_rows, torch.int64) if has_ban else None,
            banned_token_ids=tensor(banned_ids, torch.int64) if has_ban else None,
            penalties=penalties,
            seeded_rows=seeded_rows,
            seed_words=seed_words,
            seed_steps=seed_steps,
            all_seeded=len(seeded) == num_rows > 0,
            max_num_logprobs=max(asked) if asked else None,
            fast_path_ok=fast_path_ok,
            sample_temperature=sample_temperature,
        )


def _build_penalties(params, prompt_token_ids, output_token_ids, vocab_size, device) -> Optional[PenaltyTensors]:
    """Token-presence mask and output counts of the rows with penalties (None if no row has any).

    Host work is one concatenation of those rows' token ids (O(prompt + output) per step;
    pass numpy arrays to make it a memcpy); the [R, V] tensors are scattered on the device.
    """
    rows = [i for i, p in enumerate(params) if p.uses_penalties]
    if not rows:
        return None

    def scatter_rows(token_lists) -> tuple[torch.Tensor, torch.Tensor]:
        """(row index, token id) pairs of every token of the given per-row lists (or arrays)."""
        # numpy converts Python ints ~10x faster than torch.tensor, and numpy arrays for free
        flat = np.concatenate([np.asarray(tokens, dtype=np.int64) for tokens in token_lists])
        row_idx = np.repeat(np.arange(len(token_lists)), [len(tokens) for tokens in token_lists])
        return to_device_async(torch.from_numpy(row_idx), device), to_device_async(torch.from_numpy(flat), device)

    num = len(rows)
    out_rows, out_ids = scatter_rows([output_token_ids[i] for i in rows])
    counts = torch.zeros(num, vocab_size, dtype=torch.float32, device=device)  # [R, V]
    counts.index_put_((out_rows, out_ids), torch.ones_like(out_ids, dtype=torch.float32), accumulate=True)
    seen = counts > 0  # [R, V]
    prompt_rows, prompt_ids = scatter_rows([prompt_token_ids[i] for i in rows])
    seen[prompt_rows, prompt_ids] = True

    def column(values) -> torch.Tensor:
        return to_device_async(torch.tensor(values, dtype=torch.float32), device).unsqueeze(1)  # [R, 1]

    return PenaltyTensors(
        rows=None if num == len(params) else to_device_async(torch.tensor(rows, dtype=torch.int64), device),
        repetition=column([params[i].repetition_penalty for i in rows]),
        frequency=column([params[i].frequency_penalty for i in rows]),
        presence=column([params[i].presence_penalty for i in rows]),
        seen=seen,
        output_counts=counts,
    )


# ----------------------------------------------------------------------------- output


@dataclass
class SamplerOutput:
    sampled_token_ids: torch.Tensor  # [B] int64
    # Only when some request asked for logprobs (else None); from the RAW model distribution.
    sampled_logprobs: Optional[torch.Tensor] = None  # [B] float32 logprob of the sampled token
    sampled_ranks: Optional[torch.Tensor] = None  # [B] int64 rank (1 = most likely) of the sampled token
    topk_token_ids: Optional[torch.Tensor] = None  # [B, K] int64, K = max logprobs requested in the batch
    topk_logprobs: Optional[torch.Tensor] = None  # [B, K] float32


# ----------------------------------------------------------------------------- sampler


class Sampler:
    """Samples one token per row of `logits` following the batch's parameters (module docstring).

    `use_triton`: whether batches with `fast_path_ok` use the fused Triton kernel
    (`kernels.sampling.fused_sample`): "auto" = when the logits are on CUDA (on CPU the
    Triton interpreter would be far slower than torch); True / False force it on / off.
    """

    def __init__(self, use_triton: bool | str = "auto"):
        if use_triton not in ("auto", True, False):
            raise ValueError(f"use_triton must be 'auto', True or False, got {use_triton!r}")
        self.use_triton = use_triton

    def uses_fused_path(self, logits: torch.Tensor, batch: SamplingBatch) -> bool:
        """Whether this batch is sampled by the fused kernel (greedy-only batches never are)."""
        if batch.all_greedy or not batch.fast_path_ok:
            return False
        return logits.is_cuda if self.use_triton == "auto" else self.use_triton

    def _argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """Row argmax of raw logits: the Triton two-stage kernel on CUDA (torch's reduces a
        long row in one thread block), torch elsewhere."""
        use = logits.is_cuda if self.use_triton == "auto" else self.use_triton
        if use and logits.dim() == 2 and logits.stride(-1) == 1 and logits.shape[1] > 0:
            from nanovllm.kernels.sampling import greedy_argmax  # imports triton: only when used

            return greedy_argmax(logits)
        return logits.argmax(dim=-1)

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        """`logits`: [B, V], any float dtype; only grammar masks change it (in place, their rows)."""
        raw_logprobs = None
        if batch.max_num_logprobs is not None:
            raw_logprobs = torch.log_softmax(logits, dim=-1, dtype=torch.float32)  # [B, V]
        if batch.grammar_rows is not None:
            # structured outputs: disallowed tokens -> -inf on the grammar rows, before any
            # sampling path (one kernel on CUDA); other rows are not touched
            apply_token_bitmask_(logits, batch.grammar_bitmask, batch.grammar_rows)

        if batch.all_greedy and not batch.needs_logits_processing:
            sampled = self._argmax(logits)  # fast path: no copy, no float32 conversion
        elif self.uses_fused_path(logits, batch):
            sampled = _fused_sample(logits, batch)  # one pass over the raw logits
        else:
            work = logits.to(torch.float32, copy=True)  # [B, V], modified in place below
            _apply_logits_processors_(work, batch)
            sampled = work.argmax(dim=-1) if batch.all_greedy else _sample_(work, batch)

        if raw_logprobs is None:
            return SamplerOutput(sampled_token_ids=sampled)
        token_lp, ranks, topk_ids, topk_lp = _gather_logprobs(raw_logprobs, sampled, batch.max_num_logprobs)
        return SamplerOutput(sampled, token_lp, ranks, topk_ids, topk_lp)


def _fused_sample(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Temperature + exponential race in one Triton pass ([B] int64); needs `batch.fast_path_ok`.

    Every row's noise comes from the counter hash: seeded rows use their (seed, step), the
    others a fresh random 64-bit seed and step drawn from the global CPU generator (so
    `torch.manual_seed` still makes runs reproducible) and copied over without a device sync.
    """
    from nanovllm.kernels.sampling import fused_sample  # imports triton: only when used

    if batch.all_seeded:
        seed_words, steps = batch.seed_words, batch.seed_steps
    else:
        draw = torch.randint(0, 1 << 32, (batch.num_rows, 3), dtype=torch.int64)  # [B, 3] seed low, high, step
        draw = draw.to(logits.device, non_blocking=True)
        seed_words, steps = draw[:, :2], draw[:, 2]  # strided views: the kernel takes strides
        if batch.seeded_rows is not None:
            seed_words[batch.seeded_rows] = batch.seed_words
            steps[batch.seeded_rows] = batch.seed_steps
    return fused_sample(logits, batch.sample_temperature, seed_words, steps)


def apply_logits_processors(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Steps 1-3 (logit_bias, min_tokens, penalties) on a float32 copy of `logits` [B, V]."""
    out = logits.to(torch.float32, copy=True)
    _apply_logits_processors_(out, batch)
    return out


def _apply_logits_processors_(logits: torch.Tensor, batch: SamplingBatch) -> None:
    if batch.bias_rows is not None:
        logits.index_put_((batch.bias_rows, batch.bias_token_ids), batch.bias_values, accumulate=True)
    if batch.banned_rows is not None:
        logits[batch.banned_rows, batch.banned_token_ids] = NEG_INF
    if batch.penalties is not None:
        _apply_penalties_(logits, batch.penalties)


def _apply_penalties_(logits: torch.Tensor, pen: PenaltyTensors) -> None:
    rows = logits if pen.rows is None else logits[pen.rows]  # [R, V]
    # Repetition penalty makes a seen token less likely whatever its sign: shrink positive
    # logits, push negative ones further down.
    scale = torch.where(pen.seen, pen.repetition, 1.0)  # [R, V]
    rows = torch.where(rows > 0, rows / scale, rows * scale)
    rows -= pen.frequency * pen.output_counts + pen.presence * (pen.output_counts > 0)
    if pen.rows is None:
        logits.copy_(rows)
    else:
        logits[pen.rows] = rows


def _sample_(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Steps 4-9 on processed float32 logits [B, V] (modified in place); returns [B] int64."""
    greedy_ids = logits.argmax(dim=-1) if batch.greedy_mask is not None else None  # [B]
    if batch.temperature is not None:
        logits.div_(batch.temperature)
    top_values = None
    if batch.top_k is not None:
        top_values = _apply_top_k_(logits, batch.top_k, batch.max_top_k)
    if batch.top_p is not None:
        _apply_top_p_(logits, batch, top_values)
    if batch.log_min_p is not None:
        _apply_min_p_(logits, batch.log_min_p)
    probs = logits.softmax(dim=-1)  # [B, V]
    sampled = probs.div_(_exponential_noise(probs, batch)).argmax(dim=-1)  # exponential race
    if greedy_ids is not None:
        sampled = torch.where(batch.greedy_mask, greedy_ids, sampled)
    return sampled


def _apply_top_k_(logits: torch.Tensor, top_k: torch.Tensor, max_top_k: int) -> torch.Tensor:
    """Mask every logit below the row's k-th largest (rows with k = vocab_size are untouched).

    Returns the largest `max_top_k` logits of each row after masking ([B, max_k], descending,
    -inf past the row's k): the candidates top-p sorts when every top-p row has a top-k.
    """
    top_values = logits.topk(max_top_k, dim=-1).values  # [B, max_k], descending
    kth = top_values.gather(1, (top_k.clamp(max=max_top_k) - 1).unsqueeze(1))  # [B, 1]
    threshold = torch.where(top_k.unsqueeze(1) >= logits.shape[-1], NEG_INF, kth)  # [B, 1]
    logits.masked_fill_(logits < threshold, NEG_INF)
    return top_values.masked_fill_(top_values < threshold, NEG_INF)


def _apply_top_p_(logits: torch.Tensor, batch: SamplingBatch, top_values: Optional[torch.Tensor]) -> None:
    """Keep the smallest most-likely prefix with mass >= top_p, on the rows that use top-p.

    Runs after top-k, so the mass is that of the top-k distribution renormalised; when every
    top-p row has a top-k, its candidates are top-k's `top_values` (already sorted), and
    nothing of the full vocabulary is sorted.
    """
    rows = batch.top_p_rows
    sub = logits if rows is None else logits[rows]  # [R, V]
    if batch.top_p_num_candidates:
        candidates = top_values if rows is None else top_values[rows]  # [R, max_k]
        sorted_logits = candidates[:, : batch.top_p_num_candidates]  # [R, C], descending
    else:
        sorted_logits = sub.sort(dim=-1, descending=True).values  # [R, V]
    probs = sorted_logits.softmax(dim=-1)  # [R, C]
    cumulative = probs.cumsum(dim=-1)
    mass_before = torch.nn.functional.pad(cumulative[:, :-1], (1, 0))  # [R, C], 0 for the top token
    num_kept = (mass_before < batch.top_p.unsqueeze(1)).sum(dim=-1, keepdim=True)  # [R, 1], >= 1
    threshold = sorted_logits.gather(1, num_kept - 1)  # [R, 1], smallest kept logit
    sub.masked_fill_(sub < threshold, NEG_INF)
    if rows is not None:
        logits[rows] = sub


def _apply_min_p_(logits: torch.Tensor, log_min_p: torch.Tensor) -> None:
    """Drop tokens with p < min_p * p_max, computed on logits (softmax's normaliser cancels)."""
    max_logit = logits.amax(dim=-1, keepdim=True)  # [B, 1]
    logits.masked_fill_(logits < max_logit + log_min_p, NEG_INF)


def _exponential_noise(probs: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Exp(1) noise [B, V]: from the global RNG, except seeded rows (a function of seed and step)."""
    vocab_size = probs.shape[-1]
    if batch.all_seeded:
        return seeded_exponential(batch.seed_words, batch.seed_steps, vocab_size)
    # clamp: an exact 0 draw would turn a masked token's 0/0 into NaN, which argmax picks
    noise = torch.empty_like(probs).exponential_().clamp_min_(torch.finfo(torch.float32).tiny)
    if batch.seeded_rows is not None:
        noise[batch.seeded_rows] = seeded_exponential(batch.seed_words, batch.seed_steps, vocab_size)
    return noise


# ----------------------------------------------------------------------------- counter-based RNG


def _mul32_(x: torch.Tensor, c: int) -> torch.Tensor:
    """x = (x * c) mod 2^32 in place, for uint32 values in int64: the product is split in
    16-bit halves so no intermediate reaches 2^63 (no reliance on integer overflow)."""
    high = x * (c >> 16)
    high.bitwise_and_(0xFFFF).bitwise_left_shift_(16)  # (x * c_high mod 2^16) * 2^16
    return x.mul_(c & 0xFFFF).add_(high).bitwise_and_(_MASK32)


def _hash32_(x: torch.Tensor) -> torch.Tensor:
    """'lowbias32' (Chris Wellons) in place: a bijection on uint32 with near-ideal avalanche."""
    x ^= x >> 16
    _mul32_(x, _HASH_MUL_1)
    x ^= x >> 15
    _mul32_(x, _HASH_MUL_2)
    x ^= x >> 16
    return x


def _hash32(x: torch.Tensor) -> torch.Tensor:
    return _hash32_(x.clone())


_token_hash_cache: dict[tuple[int, torch.device], torch.Tensor] = {}


def _token_hashes(vocab_size: int, device: torch.device) -> torch.Tensor:
    """hash(token id) [V] int64, computed once per (vocab, device): the per-token half of the hash."""
    key = (vocab_size, device)
    if key not in _token_hash_cache:
        token = torch.arange(vocab_size, dtype=torch.int64, device=device)
        _token_hash_cache[key] = _hash32_(token.add_(_TOKEN_SALT).bitwise_and_(_MASK32))
    return _token_hash_cache[key]


def seeded_exponential(seed_words: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Exp(1) noise [S, V] that depends only on (seed, step, token id): batch- and device-independent.

    seed_words: [S, 2] int64 (low, high 32-bit words of the seed); steps: [S] int64.
    The row key is a chain of hashes over (seed, step); each element is one more hash round
    of (hash(token) XOR key). Keying by XOR with a hashed token id, not by adding the key to
    the raw id, keeps rows with different keys from getting shifted copies of one sequence.
    """
    key = _hash32(seed_words[:, 0] ^ _SEED_SALT)
    key = _hash32_(key ^ seed_words[:, 1])
    key = _hash32_(key ^ steps)  # [S]
    bits = _hash32_(_token_hashes(vocab_size, seed_words.device).unsqueeze(0) ^ key.unsqueeze(1))  # [S, V]
    uniform = bits.bitwise_right_shift_(32 - _UNIFORM_BITS).to(torch.float32)
    uniform.add_(0.5).mul_(2.0**-_UNIFORM_BITS)  # (k + 0.5) / 2^23: inside (0, 1)
    return uniform.log_().neg_()


# ----------------------------------------------------------------------------- logprobs


def _gather_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor, num_logprobs: int):
    """Logprob and rank of `token_ids` [N] in `logprobs` [N, V], plus the top-K alternatives.

    Rank = number of tokens at least as likely as the chosen one (1 = most likely), as vLLM.
    """
    token_lp = logprobs.gather(1, token_ids.long().unsqueeze(1))  # [N, 1]
    ranks = (logprobs >= token_lp).sum(dim=-1)  # [N] int64
    if num_logprobs > 0:
        topk_lp, topk_ids = logprobs.topk(num_logprobs, dim=-1)  # [N, K]
    else:
        topk_lp = logprobs.new_empty((logprobs.shape[0], 0))
        topk_ids = torch.empty((logprobs.shape[0], 0), dtype=torch.int64, device=logprobs.device)
    return token_lp.squeeze(1), ranks, topk_ids, topk_lp


def compute_prompt_logprobs(
    logits: torch.Tensor, next_token_ids: torch.Tensor, num_logprobs: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logprobs of the actual next prompt tokens under the raw model distribution.

    logits [P, V] (any float dtype), next_token_ids [P] -> (token_logprobs [P] float32,
    ranks [P] int64, topk_ids [P, K] int64, topk_logprobs [P, K] float32), K = num_logprobs.
    Long prompts are processed in chunks so the float32 temporaries stay bounded.
    """
    parts = []
    step = PROMPT_LOGPROBS_CHUNK_ROWS
    for start in range(0, max(logits.shape[0], 1), step):
        logprobs = torch.log_softmax(logits[start : start + step], dim=-1, dtype=torch.float32)  # [chunk, V]
        parts.append(_gather_logprobs(logprobs, next_token_ids[start : start + step], num_logprobs))
    if len(parts) == 1:
        return parts[0]
    return tuple(torch.cat(ts, dim=0) for ts in zip(*parts))  # type: ignore[return-value]
