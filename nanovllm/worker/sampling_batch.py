"""SamplingBatch: one step's per-request sampling parameters as tensors (built on the host).

`SamplingBatch.build` loops over the step's requests once and leaves every field a step does
not need at None, so the sampler (sampler.py) skips that step entirely. Nothing here waits
for the device: every tensor goes over with a non-blocking copy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from nanovllm.kernels.counter_rng import MASK32, seed_words_of
from nanovllm.sampling_params import SamplingParams

NEG_INF = float("-inf")


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
    # a function of the rows' SamplingParams alone (no min_tokens, seeds, penalties or grammars,
    # which read the step's token counts, histories or masks): the same rows next step may reuse it
    params_only: bool = False
    sample_temperature: torch.Tensor | None = None  # [B] float32, 0 on greedy rows; only when fast_path_ok
    # ---- structured outputs (set by the model runner from the StepInput; None when no row has a grammar)
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
        per_step = False  # some row's tensors depend on more than its params
        for i, p in enumerate(params):
            if p.min_tokens or p.structured_outputs is not None:
                per_step = True
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
            seed_words = tensor([seed_words_of(params[i].seed) for i in seeded], torch.int64)
            seed_steps = tensor([num_output_tokens[i] & MASK32 for i in seeded], torch.int64)

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
            params_only=not (per_step or seeded or penalties is not None),
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
