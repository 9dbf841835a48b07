"""Merging consecutive DELTA RequestOutputs of one request, for consumers that fall behind the engine.

When a stream's consumer (an SSE response) has several steps' outputs waiting, it takes them as one:
one chunk to frame and send instead of several, so the event loop's work per step shrinks exactly
when it is the bottleneck. The merged output carries the same text, token ids and logprobs, in the
same order, as the outputs it replaces; only the chunk boundaries change.
"""

from __future__ import annotations

from nanovllm.outputs import CompletionOutput, RequestOutput


def merge_completion(a: CompletionOutput, b: CompletionOutput) -> CompletionOutput:
    """`a` then `b`, two deltas of the same completion index."""
    if a.logprobs is None and b.logprobs is None:
        logprobs = None
    else:
        logprobs = list(a.logprobs or []) + list(b.logprobs or [])
    return CompletionOutput(
        index=b.index, text=a.text + b.text, token_ids=list(a.token_ids) + list(b.token_ids),
        cumulative_logprob=b.cumulative_logprob if b.cumulative_logprob is not None else a.cumulative_logprob,
        logprobs=logprobs, finish_reason=b.finish_reason, stop_reason=b.stop_reason,
    )


def merge_delta_outputs(a: RequestOutput, b: RequestOutput) -> RequestOutput:
    """One DELTA output equivalent to `a` followed by `b` (the same request; `a` not finished)."""
    if a.request_id != b.request_id:
        raise ValueError(f"cannot merge outputs of different requests ({a.request_id!r}, {b.request_id!r})")
    by_index = {c.index: c for c in a.outputs}
    merged = []
    for c in b.outputs:
        prev = by_index.pop(c.index, None)
        merged.append(merge_completion(prev, c) if prev is not None else c)
    merged = sorted(list(by_index.values()) + merged, key=lambda c: c.index)
    return RequestOutput(
        request_id=b.request_id, prompt=b.prompt, prompt_token_ids=b.prompt_token_ids, outputs=merged,
        finished=b.finished,
        prompt_logprobs=a.prompt_logprobs if a.prompt_logprobs is not None else b.prompt_logprobs,
        num_cached_tokens=b.num_cached_tokens, metrics=b.metrics,
    )
