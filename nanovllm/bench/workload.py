"""The serve benchmark's workload, shared by `bench serve` (over HTTP) and `bench throughput --workload serve`
(the same requests replayed through the engine without HTTP), so both measure exactly the same requests.

A workload is fixed by its arguments and `--seed`: the prompts (random token ids or random words),
the gaps between arrivals (Poisson at `--request-rate`, or all at once), the cap on requests in
flight (`--max-concurrency`), and the sampling settings. Request i is released at the sum of the
first i+1 gaps and starts as soon as fewer than `max_concurrency` requests are in flight, in order.
"""

from __future__ import annotations

import argparse
import math
import random
from dataclasses import dataclass
from typing import Optional, Union

# Words for synthetic text prompts: common English words are about one token each.
WORDS = ("the of and to in is was for on that with as by at from his it an were are which this be had not but "
         "they have one all their there been has more also new would first two time after other when some only "
         "city year world state people team life school work history music game river house water light").split()
PROMPT_KINDS = ("tokens", "text")


@dataclass(frozen=True)
class ServeWorkload:
    """Everything that defines the requests of one serve benchmark run."""

    prompts: list[Union[str, list[int]]]
    prompt_lens: list[int]
    delays: list[float]  # seconds before each request is released, after the previous one
    output_len: int
    max_concurrency: Optional[int]  # None = no cap
    ignore_eos: bool
    temperature: float

    def __len__(self) -> int:
        return len(self.prompts)

    def release_times(self) -> list[float]:
        """Seconds after the start at which each request may start (cumulative gaps)."""
        out, t = [], 0.0
        for d in self.delays:
            t += d
            out.append(t)
        return out


def add_workload_args(p: argparse.ArgumentParser) -> None:
    """The flags that define the workload; `bench serve` and `bench throughput --workload serve` share them."""
    p.add_argument("--num-prompts", type=int, default=100, help="requests to send (default 100)")
    p.add_argument("--request-rate", type=float, default=math.inf,
                   help="mean requests/s of Poisson arrivals; inf = all at once (default inf)")
    p.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight (default: no limit)")
    p.add_argument("--input-len", type=int, default=32, help="prompt length in tokens (words for text) (default 32)")
    p.add_argument("--output-len", type=int, default=16, help="max_tokens of each request (default 16)")
    p.add_argument("--token-id-range", type=int, nargs=2, default=(1000, 10000), metavar=("LOW", "HIGH"),
                   help="random prompt token ids are drawn from [LOW, HIGH) (default 1000 10000)")
    p.add_argument("--ignore-eos", action="store_true", help="generate exactly --output-len tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0 = greedy)")
    p.add_argument("--seed", type=int, default=0, help="seed of prompts and arrival times (default 0)")


def validate_workload_args(args) -> None:
    for name in ("num_prompts", "input_len", "output_len"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.request_rate <= 0:
        raise ValueError("--request-rate must be > 0 (inf = all at once)")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError("--max-concurrency must be >= 1")
    low, high = args.token_id_range
    if not 0 <= low < high:
        raise ValueError(f"--token-id-range {low} {high}: need 0 <= LOW < HIGH")


def make_workload(args, kind: str = "tokens") -> ServeWorkload:
    """The workload of `args` (see add_workload_args); `kind` is 'tokens' (token-id prompts) or 'text'."""
    if kind not in PROMPT_KINDS:
        raise ValueError(f"prompt kind {kind!r}: use one of {PROMPT_KINDS}")
    validate_workload_args(args)
    rng = random.Random(args.seed)
    low, high = args.token_id_range
    prompts: list[Union[str, list[int]]] = []
    for _ in range(args.num_prompts):
        if kind == "tokens":
            prompts.append([rng.randrange(low, high) for _ in range(args.input_len)])
        else:
            prompts.append(" ".join(rng.choice(WORDS) for _ in range(args.input_len)))
    return ServeWorkload(prompts=prompts, prompt_lens=[args.input_len] * args.num_prompts,
                         delays=arrival_delays(args.num_prompts, args.request_rate, args.seed),
                         output_len=args.output_len, max_concurrency=args.max_concurrency,
                         ignore_eos=args.ignore_eos, temperature=args.temperature)


def arrival_delays(n: int, rate: float, seed: int) -> list[float]:
    """Gaps before each request: exponential (Poisson process) at `rate`/s, 0 when rate is inf."""
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed + 1)
    return [rng.expovariate(rate) for _ in range(n)]
