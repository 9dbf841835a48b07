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
computed on the device by a counter-based integer hash (`kernels/counter_rng.py`), so a seeded
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

from dataclasses import dataclass
from typing import Optional

import torch

from nanovllm.kernels.counter_rng import seeded_exponential
from nanovllm.worker.grammar_mask import apply_token_bitmask_
from nanovllm.worker.sampling_batch import NEG_INF, PenaltyTensors, SamplingBatch, to_device_async  # noqa: F401

# Prompt logprobs of a long prompt are computed in row chunks to bound the [P, V] float32 temporaries.
PROMPT_LOGPROBS_CHUNK_ROWS = 1024


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
