"""Soak test of `nanovllm serve`: minutes of mixed traffic, then checks that nothing leaked.

    python benchmarks/soak.py --minutes 3 --concurrency 8 -- --max-model-len 512      # starts its own server
    python benchmarks/soak.py --url http://127.0.0.1:8000 --server-pid 1234 --minutes 5   # an existing one

At a fixed concurrency, workers send a weighted mix (--mix, see soak_load.py) of streamed,
non-streamed, aborted (client drops the stream), structured (response_format; probed at
start, skipped when the server refuses it; --structured on/off to force) and invalid
requests. Every --interval seconds a row goes to the CSV: server RSS, GPU memory (nvidia-smi,
when present), /metrics (running, waiting, KV usage, generated tokens), and latency
percentiles of the requests finished in that window. At the end a PNG plots the rows.

It fails (exit 1) on: any 5xx or error event in a stream, a failed connection, a 4xx other
than the invalid kind's, KV blocks still used (or requests still running) once the load has
stopped, RSS or GPU memory growing after warm-up (median of the last third of the samples
against the first third, above --max-rss-growth-mb / --max-gpu-growth-mb), or a server it
started that does not exit within its drain after SIGTERM. Beyond the server's packages it
needs aiohttp, and matplotlib for the plot.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import datetime
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from soak_load import DEFAULT_MIX, KINDS, Load, Outcome, parse_mix  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
COLUMNS = ["t_s", "rss_mb", "gpu_mb", "running", "waiting", "kv_usage", "generation_tokens", "requests", "failures",
           "aborted", "req_per_s", "e2e_p50_ms", "e2e_p90_ms", "e2e_p99_ms", "ttft_p50_ms", "ttft_p99_ms"]
LATENCY_KINDS = ("stream", "plain", "chat", "structured")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None, help="an existing server (default: start `nanovllm serve` with the args after --)")
    p.add_argument("--server-pid", type=int, default=None, help="its process id, for RSS (an existing server)")
    p.add_argument("--api-key", default=os.environ.get("NANOVLLM_API_KEY"), help="key of an existing server")
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--interval", type=float, default=5.0, help="seconds between samples (default 5)")
    p.add_argument("--mix", default=DEFAULT_MIX, help=f"kind=weight list (default {DEFAULT_MIX})")
    p.add_argument("--structured", choices=("auto", "on", "off"), default="auto",
                   help="response_format requests: auto = when the server accepts them (probed at start)")
    p.add_argument("--max-output", type=int, default=32, help="largest max_tokens sent (default 32)")
    p.add_argument("--vocab-size", type=int, default=1000, help="token-id prompts stay below this (no tokenizer)")
    p.add_argument("--request-timeout", type=float, default=180.0)
    p.add_argument("--warmup-fraction", type=float, default=0.25, help="samples ignored by the memory check")
    p.add_argument("--max-rss-growth-mb", type=float, default=64.0)
    p.add_argument("--max-gpu-growth-mb", type=float, default=64.0)
    p.add_argument("--idle-timeout", type=float, default=60.0, help="seconds for the server to go idle at the end")
    p.add_argument("--out-dir", default=os.path.join(HERE, "results", "soak"))
    p.add_argument("--tag", default=None, help="file name stem (default soak_<date>_<time>)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("serve_args", nargs=argparse.REMAINDER, help="after --: arguments for `nanovllm serve`")
    args = p.parse_args(argv)
    args.serve_args = [a for a in args.serve_args if a != "--"]
    return args


# ---------------------------------------------------------------------- server and samples
def start_server(args, out_dir: str, stem: str) -> tuple[subprocess.Popen, str, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    key = "sk-soak-" + secrets.token_hex(8)
    log = open(os.path.join(out_dir, f"{stem}_server.log"), "w")
    env = dict(os.environ, NANOVLLM_API_KEY=key)
    cmd = [sys.executable, "-m", "nanovllm.cli.main", "serve", "--port", str(port), *args.serve_args]
    print("soak: starting", " ".join(cmd[2:]), flush=True)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    return proc, f"http://127.0.0.1:{port}", key


def rss_mb(pid: Optional[int]) -> Optional[float]:
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def gpu_mb(pid: Optional[int]) -> Optional[float]:
    if pid is None or shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    used = [float(m) for p, m in (line.split(",") for line in out.strip().splitlines() if "," in line)
            if int(p) == pid]
    return sum(used) if used else None


async def metrics(session, url: str) -> dict[str, float]:
    async with session.get(url + "/metrics") as r:
        text = await r.text()
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"^(nanovllm:[a-zA-Z0-9_:]+)(\{[^}]*\})? ([-+0-9.eE]+|NaN)$", line)
        if m and 'le="' not in (m.group(2) or ""):
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(3))
    return out


def percentile(values: list[float], q: float) -> Optional[float]:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


# ---------------------------------------------------------------------- the run
async def probe(session, url: str, headers: dict, args) -> tuple[str, bool, bool]:
    """(model name, token-id prompts?, structured requests on?)"""
    async with session.get(url + "/v1/models", headers=headers) as r:
        model = (await r.json())["data"][0]["id"]
    async with session.post(url + "/tokenize", json={"prompt": "hi"}, headers=headers) as r:
        token_ids = r.status != 200
    structured = args.structured == "on"
    if args.structured == "auto" and not token_ids:
        from soak_load import STRUCTURED_FORMAT

        body = {"model": model, "messages": [{"role": "user", "content": "a city as JSON"}], "max_tokens": 8,
                "response_format": STRUCTURED_FORMAT}
        async with session.post(url + "/v1/chat/completions", json=body, headers=headers) as r:
            structured = r.status == 200
            reason = "" if structured else f" (the server answered {r.status}: {(await r.text())[:160]})"
        print(f"soak: structured requests {'on' if structured else 'skipped'}{reason}", flush=True)
    return model, token_ids, structured


async def run(args, url: str, pid: Optional[int], key: Optional[str], csv_path: str) -> dict:
    import aiohttp

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    rng = random.Random(args.seed)
    connector = aiohttp.TCPConnector(limit=args.concurrency + 4)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        model, token_ids, structured = await probe(session, url, headers, args)
        mix = parse_mix(args.mix)
        if token_ids:
            mix = {k: w for k, w in mix.items() if k not in ("chat", "structured")}
        if not structured:
            mix.pop("structured", None)
        kinds, weights = list(mix), list(mix.values())
        load = Load(session, url, headers, model, token_ids, args.vocab_size, args.max_output, args.request_timeout,
                    rng)
        done: list[Outcome] = []
        window: list[Outcome] = []
        rows: list[dict] = []
        start = time.monotonic()
        deadline = start + args.minutes * 60

        async def worker() -> None:
            while time.monotonic() < deadline:
                out = await load.run(rng.choices(kinds, weights)[0])
                done.append(out)
                window.append(out)

        async def sample() -> dict:
            m = await metrics(session, url)
            finished = [o for o in window if o.kind in LATENCY_KINDS and not o.error]
            e2e = [o.e2e_s * 1e3 for o in finished]
            ttft = [o.ttft_s * 1e3 for o in finished if o.ttft_s is not None]
            elapsed = time.monotonic() - start
            row = {
                "t_s": round(elapsed, 1), "rss_mb": rss_mb(pid), "gpu_mb": gpu_mb(pid),
                "running": m.get("nanovllm:num_requests_running"), "waiting": m.get("nanovllm:num_requests_waiting"),
                "kv_usage": m.get("nanovllm:kv_cache_usage_perc"),
                "generation_tokens": m.get("nanovllm:generation_tokens_total"), "requests": len(done),
                "failures": sum(1 for o in done if o.error), "aborted": sum(1 for o in done if o.kind == "abort"),
                "req_per_s": round(len(window) / args.interval, 2),
                "e2e_p50_ms": percentile(e2e, 50), "e2e_p90_ms": percentile(e2e, 90), "e2e_p99_ms": percentile(e2e, 99),
                "ttft_p50_ms": percentile(ttft, 50), "ttft_p99_ms": percentile(ttft, 99),
            }
            window.clear()
            return row

        with open(csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, COLUMNS)
            writer.writeheader()
            workers = [asyncio.ensure_future(worker()) for _ in range(args.concurrency)]
            while time.monotonic() < deadline:
                await asyncio.sleep(min(args.interval, max(0.0, deadline - time.monotonic())))
                rows.append(await sample())
                writer.writerow(rows[-1])
                f.flush()
                r = rows[-1]
                print(f"soak: {r['t_s']:6.0f} s  {r['requests']} requests, {r['failures']} failed, rss "
                      f"{r['rss_mb'] or 0:.0f} MB, kv {r['kv_usage'] or 0:.2f}, e2e p50 {r['e2e_p50_ms'] or 0:.0f} ms",
                      flush=True)
            await asyncio.wait_for(asyncio.gather(*workers), args.request_timeout + 30)
            idle_by = time.monotonic() + args.idle_timeout
            while True:  # the load has stopped: everything must drain back to zero
                final = await sample()
                if (final["running"] == 0 and final["waiting"] == 0 and final["kv_usage"] == 0) \
                        or time.monotonic() > idle_by:
                    break
                await asyncio.sleep(0.5)
            rows.append(final)
            writer.writerow(final)
    return {"rows": rows, "outcomes": done, "structured": structured, "token_ids": token_ids}


# ---------------------------------------------------------------------- verdict and plot
def memory_growth(rows: list[dict], key: str, warmup_fraction: float) -> Optional[float]:
    """Median of the last third of the post-warm-up samples minus the median of the first third (MB)."""
    values = [r[key] for r in rows[int(len(rows) * warmup_fraction):] if r[key] is not None]
    if len(values) < 6:
        return None
    third = len(values) // 3
    return statistics.median(values[-third:]) - statistics.median(values[:third])


def verdict(args, result: dict, server_exit: Optional[str]) -> tuple[list[str], dict]:
    rows, outcomes = result["rows"], result["outcomes"]
    problems = []
    failed = [o for o in outcomes if o.error]
    server_errors = [o for o in outcomes if o.server_error]
    if server_errors:
        problems.append(f"{len(server_errors)} server errors (5xx or error events), e.g. {server_errors[0].error}")
    other = [o for o in failed if not o.server_error]
    if other:
        problems.append(f"{len(other)} other failed requests, e.g. [{other[0].kind}] {other[0].error}")
    final = rows[-1]
    if final["kv_usage"] != 0 or final["running"] != 0 or final["waiting"] != 0:
        problems.append(f"not idle after the load: kv_usage {final['kv_usage']}, running {final['running']}, "
                        f"waiting {final['waiting']} (leaked KV blocks or requests)")
    growth = {}
    for key, limit in (("rss_mb", args.max_rss_growth_mb), ("gpu_mb", args.max_gpu_growth_mb)):
        growth[key] = memory_growth(rows[:-1], key, args.warmup_fraction)
        if growth[key] is not None and growth[key] > limit:
            problems.append(f"{key} grew by {growth[key]:.0f} MB after warm-up (limit {limit:g} MB)")
    if server_exit:
        problems.append(server_exit)
    by_kind = {k: sum(1 for o in outcomes if o.kind == k) for k in KINDS}
    summary = {"requests": len(outcomes), "failed": len(failed), "server_errors": len(server_errors),
               "by_kind": by_kind, "structured": result["structured"], "token_id_prompts": result["token_ids"],
               "memory_growth_mb": growth, "final": {k: final[k] for k in ("running", "waiting", "kv_usage")}}
    return problems, summary


def plot(rows: list[dict], png_path: str, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("soak: matplotlib is not installed; no plot", flush=True)
        return
    t = [r["t_s"] for r in rows]

    def series(key):
        return [r[key] if r[key] is not None else float("nan") for r in rows]

    fig, axes = plt.subplots(2, 2, figsize=(12, 7), sharex=True)
    ax = axes[0][0]
    ax.plot(t, series("rss_mb"), label="server RSS")
    if any(r["gpu_mb"] is not None for r in rows):
        ax.plot(t, series("gpu_mb"), label="GPU memory")
    ax.set_ylabel("MB")
    ax.legend()
    ax = axes[0][1]
    ax.plot(t, series("running"), label="running")
    ax.plot(t, series("waiting"), label="waiting")
    ax2 = ax.twinx()
    ax2.plot(t, series("kv_usage"), color="tab:red", label="KV usage")
    ax2.set_ylim(0, 1.05)
    ax.set_ylabel("requests")
    ax2.set_ylabel("KV usage")
    ax.legend(loc="upper left")
    ax2.legend(loc="upper right")
    ax = axes[1][0]
    for key in ("e2e_p50_ms", "e2e_p99_ms", "ttft_p50_ms", "ttft_p99_ms"):
        ax.plot(t, series(key), label=key.replace("_ms", ""))
    ax.set_ylabel("ms")
    ax.set_xlabel("seconds")
    ax.legend()
    ax = axes[1][1]
    ax.plot(t, series("req_per_s"), label="requests/s")
    ax.plot(t, series("failures"), label="failures (cumulative)")
    ax.set_xlabel("seconds")
    ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def stop_server(proc: subprocess.Popen, grace_s: float) -> Optional[str]:
    """SIGTERM the server it started; a problem string when it does not drain and exit in time."""
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return f"the server did not exit within {grace_s:g} s of SIGTERM"
    return None if code in (0, -signal.SIGTERM) else f"the server exited with status {code} after SIGTERM"


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    stem = args.tag or "soak_" + datetime.datetime.now().strftime("%Y-%m-%d_%H%M%S")
    csv_path, png_path = (os.path.join(args.out_dir, f"{stem}.{ext}") for ext in ("csv", "png"))
    proc, url, pid, key = None, args.url, args.server_pid, args.api_key
    if url is None:
        proc, url, key = start_server(args, args.out_dir, stem)
        pid = proc.pid
        wait_healthy(proc, url)
    try:
        result = asyncio.run(run(args, url, pid, key, csv_path))
    finally:
        server_exit = stop_server(proc, grace_s=60) if proc is not None else None
    problems, summary = verdict(args, result, server_exit)
    plot(result["rows"], png_path, f"nanovllm soak: {args.minutes:g} min, concurrency {args.concurrency} "
                                   f"({'PASS' if not problems else 'FAIL'})")
    summary.update(passed=not problems, problems=problems, csv=csv_path, png=png_path, minutes=args.minutes,
                   concurrency=args.concurrency)
    with open(os.path.join(args.out_dir, f"{stem}.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary, indent=2), flush=True)
    print("soak: PASS" if not problems else "soak: FAIL\n  " + "\n  ".join(problems), flush=True)
    return 0 if not problems else 1


def wait_healthy(proc: subprocess.Popen, url: str, timeout_s: float = 600) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"soak: the server exited with status {proc.returncode} (see its log)")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"soak: the server was not healthy after {timeout_s:g} s")
        time.sleep(0.5)


if __name__ == "__main__":
    sys.exit(main())
