"""Load generator for any OpenAI-compatible server: streamed requests, Poisson arrivals, latency percentiles.

    nanovllm serve --port 8000 &
    nanovllm bench serve --base-url http://127.0.0.1:8000 --num-prompts 200 --max-concurrency 32 \\
        --input-len 32 --output-len 16 --ignore-eos

Every request is streamed (`stream: true`, usage in the last chunk). Per request:
TTFT = first chunk with generated content, ITL = gaps between such chunks, TPOT =
(E2E - TTFT) / (output tokens - 1), E2E = until `[DONE]`. Prompts are random token ids
(completions) or random words (chat, or --prompt-kind text); token-id prompts need no
tokenizer on either side. Prints a summary and appends a CSV row + PNG to
benchmarks/results/ (serve.csv, serve.png) unless --no-save.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Optional, Union

from nanovllm import envs

# Words for synthetic text prompts: common English words are about one token each.
WORDS = ("the of and to in is was for on that with as by at from his it an were are which this be had not but "
         "they have one all their there been has more also new would first two time after other when some only "
         "city year world state people team life school work history music game river house water light").split()


@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)

    @property
    def tpot(self) -> Optional[float]:
        if self.output_tokens <= 1:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (default http://127.0.0.1:8000)")
    p.add_argument("--endpoint", choices=("completions", "chat"), default="completions",
                   help="/v1/completions or /v1/chat/completions (default completions)")
    p.add_argument("--model", default=None, help="model name to send (default: the first of GET /v1/models)")
    p.add_argument("--api-key", default=None, help="bearer key (default: $NANOVLLM_API_KEY, then $OPENAI_API_KEY)")
    p.add_argument("--num-prompts", type=int, default=100, help="requests to send (default 100)")
    p.add_argument("--request-rate", type=float, default=math.inf,
                   help="mean requests/s of Poisson arrivals; inf = all at once (default inf)")
    p.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight (default: no limit)")
    p.add_argument("--input-len", type=int, default=32, help="prompt length in tokens (words for text) (default 32)")
    p.add_argument("--output-len", type=int, default=16, help="max_tokens of each request (default 16)")
    p.add_argument("--prompt-kind", choices=("auto", "tokens", "text"), default="auto",
                   help="auto = token ids for completions, text for chat")
    p.add_argument("--token-id-range", type=int, nargs=2, default=(1000, 10000), metavar=("LOW", "HIGH"),
                   help="random prompt token ids are drawn from [LOW, HIGH) (default 1000 10000)")
    p.add_argument("--ignore-eos", action="store_true", help="generate exactly --output-len tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0 = greedy)")
    p.add_argument("--seed", type=int, default=0, help="seed of prompts and arrival times (default 0)")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds (default 600)")
    p.add_argument("--label", default="", help="free text stored in the CSV row")
    p.add_argument("--result-dir", default=None, help="where serve.csv / serve.png go (default benchmarks/results)")
    p.add_argument("--no-save", action="store_true", help="print only; write no CSV/PNG")


# ---------------------------------------------------------------------- workload
def make_prompts(args) -> list[tuple[Union[str, list[int]], int]]:
    """(prompt, prompt length) pairs, reproducible from --seed."""
    rng = random.Random(args.seed)
    kind = args.prompt_kind
    if kind == "auto":
        kind = "tokens" if args.endpoint == "completions" else "text"
    if kind == "tokens" and args.endpoint == "chat":
        raise ValueError("chat prompts are text: use --prompt-kind text (or auto) with --endpoint chat")
    low, high = args.token_id_range
    prompts = []
    for _ in range(args.num_prompts):
        if kind == "tokens":
            prompts.append(([rng.randrange(low, high) for _ in range(args.input_len)], args.input_len))
        else:
            prompts.append((" ".join(rng.choice(WORDS) for _ in range(args.input_len)), args.input_len))
    return prompts


def arrival_delays(n: int, rate: float, seed: int) -> list[float]:
    """Gaps before each request: exponential (Poisson process) at `rate`/s, 0 when rate is inf."""
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed + 1)
    return [rng.expovariate(rate) for _ in range(n)]


# ---------------------------------------------------------------------- one request
async def send_request(session, url: str, headers: dict, payload: dict, timeout: float) -> RequestResult:
    import aiohttp

    res = RequestResult()
    start = time.perf_counter()
    last = None
    chunks = 0
    try:
        async with session.post(url, json=payload, headers=headers,
                                timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            if resp.status != 200:
                res.error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                return res
            buffer = b""
            async for data in resp.content.iter_any():
                buffer += data
                while b"\n\n" in buffer:
                    event, buffer = buffer.split(b"\n\n", 1)
                    line = event.strip()
                    if not line.startswith(b"data:"):
                        continue
                    body = line[5:].strip()
                    now = time.perf_counter()
                    if body == b"[DONE]":
                        res.e2e = now - start
                        res.ok = res.error == "" and chunks > 0
                        if chunks == 0 and not res.error:
                            res.error = "no tokens were streamed"
                        continue
                    msg = json.loads(body)
                    if "error" in msg:
                        res.error = str(msg["error"].get("message", msg["error"]))
                        continue
                    if msg.get("usage"):  # the server's counts beat ours (chat templates add tokens)
                        res.output_tokens = msg["usage"].get("completion_tokens", res.output_tokens)
                        res.prompt_len = msg["usage"].get("prompt_tokens", res.prompt_len)
                    for choice in msg.get("choices", []):
                        content = choice.get("text") or (choice.get("delta") or {}).get("content")
                        if not content and not choice.get("token_ids"):
                            continue
                        chunks += 1
                        if last is None:
                            res.ttft = now - start
                        else:
                            res.itl.append(now - last)
                        last = now
            if res.e2e == 0.0:
                res.error = res.error or "stream ended without [DONE]"
                res.ok = False
    except Exception as e:  # noqa: BLE001 - any failure of one request is recorded, not raised
        res.error = f"{type(e).__name__}: {e}"
        res.ok = False
    if res.ok and res.output_tokens == 0:
        res.output_tokens = chunks  # server sent no usage: one chunk ~ one token
    return res


# ---------------------------------------------------------------------- the run
async def benchmark(args) -> dict:
    import aiohttp

    base = args.base_url.rstrip("/")
    if base.endswith("/v1"):
        base = base[:-3]
    key = args.api_key or envs.api_key(openai_fallback=True)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    prompts = make_prompts(args)
    delays = arrival_delays(len(prompts), args.request_rate, args.seed)
    connector = aiohttp.TCPConnector(limit=args.max_concurrency or 0, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        model = args.model
        if model is None:
            async with session.get(f"{base}/v1/models", headers=headers) as r:
                if r.status != 200:
                    raise ValueError(f"GET {base}/v1/models answered {r.status}: {(await r.text())[:200]}")
                model = (await r.json())["data"][0]["id"]
        url = f"{base}/v1/completions" if args.endpoint == "completions" else f"{base}/v1/chat/completions"
        semaphore = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None

        def payload(prompt) -> dict:
            body = {"model": model, "max_tokens": args.output_len, "temperature": args.temperature,
                    "stream": True, "stream_options": {"include_usage": True}}
            if args.ignore_eos:
                body["ignore_eos"] = True
            if args.endpoint == "completions":
                body["prompt"] = prompt
            else:
                body["messages"] = [{"role": "user", "content": prompt}]
            return body

        async def one(prompt, prompt_len) -> RequestResult:
            if semaphore is None:
                res = await send_request(session, url, headers, payload(prompt), args.timeout)
            else:
                async with semaphore:
                    res = await send_request(session, url, headers, payload(prompt), args.timeout)
            res.prompt_len = res.prompt_len or prompt_len
            return res

        start = time.perf_counter()
        tasks = []
        for (prompt, plen), delay in zip(prompts, delays):
            if delay:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(prompt, plen)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return summarize(args, model, results, duration)


def _stats(values: list[float]) -> tuple[float, float, float]:
    """(mean, median, p99) in milliseconds."""
    if not values:
        return (0.0, 0.0, 0.0)
    import numpy as np

    arr = np.asarray(values) * 1000.0
    return float(arr.mean()), float(np.median(arr)), float(np.percentile(arr, 99))


def summarize(args, model: str, results: list[RequestResult], duration: float) -> dict:
    ok = [r for r in results if r.ok]
    errors = [r.error for r in results if not r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_len for r in ok)
    summary = {
        "model": model, "endpoint": args.endpoint, "num_prompts": args.num_prompts,
        "request_rate": args.request_rate, "max_concurrency": args.max_concurrency or 0,
        "input_len": args.input_len, "output_len": args.output_len,
        "completed": len(ok), "failed": len(errors), "duration_s": duration,
        "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration if duration else 0.0,
        "output_throughput": out_tokens / duration if duration else 0.0,
        "total_token_throughput": (in_tokens + out_tokens) / duration if duration else 0.0,
    }
    metrics = {
        "ttft": [r.ttft for r in ok],
        "tpot": [r.tpot for r in ok if r.tpot is not None],
        "itl": [x for r in ok for x in r.itl],
        "e2e": [r.e2e for r in ok],
    }
    for name, values in metrics.items():
        mean, median, p99 = _stats(values)
        summary[f"mean_{name}_ms"], summary[f"median_{name}_ms"], summary[f"p99_{name}_ms"] = mean, median, p99
    summary["errors"] = errors[:5]
    return summary


def print_summary(s: dict) -> None:
    w = 44
    print("=" * 20 + " nanovllm bench serve " + "=" * 20)
    rows = [
        ("Model / endpoint", f"{s['model']} / {s['endpoint']}"),
        ("Request rate (req/s) / max concurrency", f"{s['request_rate']} / {s['max_concurrency'] or 'none'}"),
        ("Successful requests", s["completed"]),
        ("Failed requests", s["failed"]),
        ("Benchmark duration (s)", f"{s['duration_s']:.2f}"),
        ("Total input tokens", s["total_input_tokens"]),
        ("Total generated tokens", s["total_output_tokens"]),
        ("Request throughput (req/s)", f"{s['request_throughput']:.2f}"),
        ("Output token throughput (tok/s)", f"{s['output_throughput']:.2f}"),
        ("Total token throughput (tok/s)", f"{s['total_token_throughput']:.2f}"),
    ]
    for label, value in rows:
        print(f"{label:<{w}}{value}")
    for name, title in (("ttft", "Time to first token"), ("tpot", "Time per output token (excl. 1st)"),
                        ("itl", "Inter-token latency"), ("e2e", "End-to-end latency")):
        print(f"{'-' * 8} {title} {'-' * 8}")
        for stat in ("mean", "median", "p99"):
            print(f"{stat.capitalize() + ' ' + name.upper() + ' (ms)':<{w}}{s[f'{stat}_{name}_ms']:.2f}")
    if s["errors"]:
        print("First errors:")
        for e in s["errors"]:
            print(f"  {e}")
    print("=" * 62)


def save(args, s: dict) -> tuple[str, str]:
    from nanovllm.bench.report import RESULTS_DIR, append_rows, bar_plot, base_row

    out_dir = args.result_dir or RESULTS_DIR
    row = base_row()
    row.update({"bench": "serve", "label": args.label})
    row.update({k: (round(v, 3) if isinstance(v, float) else v) for k, v in s.items() if k != "errors"})
    csv_path = append_rows(os.path.join(out_dir, "serve.csv"), [row])
    labels = ["TTFT p50", "TTFT p99", "TPOT p50", "ITL p50", "ITL p99", "E2E p50"]
    values = [s["median_ttft_ms"], s["p99_ttft_ms"], s["median_tpot_ms"], s["median_itl_ms"], s["p99_itl_ms"],
              s["median_e2e_ms"]]
    title = (f"bench serve: {s['model']} {s['endpoint']}, {s['num_prompts']} req, conc "
             f"{s['max_concurrency'] or 'inf'}, {s['request_throughput']:.2f} req/s, "
             f"{s['output_throughput']:.0f} out tok/s ({row['device']})")
    png_path = bar_plot(os.path.join(out_dir, "serve.png"), labels, values, "milliseconds", title,
                        annotate_fmt="{:,.1f}")
    return csv_path, png_path


def run(args) -> int:
    for name in ("num_prompts", "input_len", "output_len"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.request_rate <= 0:
        raise ValueError("--request-rate must be > 0 (inf = all at once)")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError("--max-concurrency must be >= 1")
    summary = asyncio.run(benchmark(args))
    print_summary(summary)
    if not args.no_save:
        csv_path, png_path = save(args, summary)
        print(f"saved {csv_path} and {png_path}")
    return 1 if summary["failed"] else 0


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="nanovllm bench serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p)
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(run(parse_args()))
